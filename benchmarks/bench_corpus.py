"""The stability rules on real runs: each run of the corpus (benchmarks/corpus, docs/corpus.md) is fed to the
rules one record at a time, as a live producer would, and every alert is compared with the run's outcome label.

An unstable run counts as detected when a warning or critical alert whose rule names one of the run's outcome
kinds (:data:`ACCEPTED`) comes from a record no later than the run's outcome step + :data:`GRACE`; the step
used is the one of the record whose update returned the alert (when the user could have seen it), not the
alert's back-dated ``step``. A healthy run with any warning or critical alert is a false alarm. Dev and
held-out splits are reported separately; only dev may be used to tune the rules. The spike checks (runner runs
of seeds no rule change had seen when they were made: grid.SPIKE_CHECK_SEEDS, then grid.SPIKE_CHECK2_SEEDS,
then grid.SPIKE_CHECK3_SEEDS; docs/corpus.md) are reported as separate splits.

    python benchmarks/bench_corpus.py [--runs DIR] [--spike-runs DIR] [--spike2-runs DIR] [--spike3-runs DIR]
                                      [--name corpus]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, write_result

CORPUS = Path(__file__).resolve().parent / "corpus"
GRACE = 3  # steps after the outcome step an alert may still come
SEVERE = ("warning", "critical")
# outcome kind → the rule names that count as naming it (the one place this is defined)
ACCEPTED: dict[str, frozenset[str]] = {
    "kl": frozenset({"kl_budget", "kl_explosion"}),
    "entropy": frozenset({"entropy_collapse"}),
    "nonfinite": frozenset({"nonfinite"}),
    "reward_hacking": frozenset({"reward_hacking_kl", "reward_hacking_length", "reward_hacking_heldout",
                                 "pattern_collapse"}),
    "text_collapse": frozenset({"pattern_collapse", "entropy_collapse"}),
}
TARGET_RECALL, TARGET_FALSE_ALARM = 0.95, 1 / 20


def build_diagnoser(meta: Mapping[str, Any]) -> Any:
    """The rules exactly as ``rlhfkit diagnose``, the dashboard and the live producers build them for this run."""
    from rlhf_core.stability.analysis import Analysis

    return Analysis(meta)


def detections(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Every alert of the run with the step of the record whose update returned it; and the record count."""
    from rlhf_core.runformat.run_reader import Run

    run = Run(run_dir)
    diagnoser = build_diagnoser(run.meta)
    out, n = [], 0
    for rec in run.metrics():
        n += 1
        for alert in diagnoser.update([rec]):
            out.append({"at": int(rec["step"]), "rule": alert.rule, "severity": alert.severity,
                        "alert_step": alert.step})
    return out, n


def judge(entry: Mapping[str, Any], alerts: list[dict[str, Any]]) -> dict[str, Any]:
    """Detected or not, detection step and lead time of one run; its false alarms if healthy."""
    severe = [a for a in alerts if a["severity"] in SEVERE]
    if entry["label"] == "healthy":
        return {"false_alarm": bool(severe), "first_alert": severe[0] if severe else None}
    accepted = frozenset().union(*(ACCEPTED[k] for k in entry["outcome_kinds"]))
    deadline = entry["outcome_step"] + GRACE
    hits = [a for a in severe if a["rule"] in accepted and a["at"] <= deadline]
    first = hits[0] if hits else None
    return {"detected": first is not None, "detection_step": first["at"] if first else None,
            "rule": first["rule"] if first else None,
            "lead": entry["outcome_step"] - first["at"] if first else None,
            "correct_rules": sorted({a["rule"] for a in hits}),
            "any_severe_before_deadline": sorted({a["rule"] for a in severe if a["at"] <= deadline})}


def per_rule(entries: Mapping[str, Mapping[str, Any]], results: Mapping[str, Mapping[str, Any]],
             alerts: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per rule: runs where it fired (warning/critical), of those the unstable runs it named correctly in
    time (precision), and the share of runs whose kinds it could name that it did (recall)."""
    rules = sorted({a["rule"] for al in alerts.values() for a in al if a["severity"] in SEVERE}
                   | set().union(*ACCEPTED.values()))
    out = {}
    for rule in rules:
        fired = [n for n, al in alerts.items() if any(a["rule"] == rule and a["severity"] in SEVERE for a in al)]
        correct = [n for n in fired if entries[n]["label"] == "unstable" and rule in results[n]["correct_rules"]]
        eligible = [n for n, e in entries.items() if e["label"] == "unstable"
                    and any(rule in ACCEPTED[k] for k in e["outcome_kinds"])]
        tp = sum(1 for n in eligible if rule in results[n]["correct_rules"])
        out[rule] = {"fired_runs": len(fired), "correct_runs": len(correct),
                     "precision": round(len(correct) / len(fired), 3) if fired else None,
                     "eligible_runs": len(eligible), "recall": round(tp / len(eligible), 3) if eligible else None,
                     "fired_on_healthy": sum(1 for n in fired if entries[n]["label"] == "healthy"),
                     "fired_on_unstable": sum(1 for n in fired if entries[n]["label"] == "unstable")}
    return out


def evaluate(runs_dir: Path, split: str) -> dict[str, Any]:
    labels = json.loads((runs_dir / "labels.json").read_text())["runs"]
    entries = {n: e for n, e in sorted(labels.items()) if e["split"] == split}
    alerts, results = {}, {}
    for name, entry in entries.items():
        alerts[name], _ = detections(runs_dir / name)
        results[name] = judge(entry, alerts[name])
    unstable = [n for n, e in entries.items() if e["label"] == "unstable"]
    healthy = [n for n, e in entries.items() if e["label"] == "healthy"]
    detected = [n for n in unstable if results[n]["detected"]]
    leads = [results[n]["lead"] for n in detected]
    false_alarms = [n for n in healthy if results[n]["false_alarm"]]
    by_trainer: dict[str, dict[str, int]] = {}
    for n, e in entries.items():
        t = by_trainer.setdefault(e["trainer"], {"unstable": 0, "detected": 0, "healthy": 0, "false_alarms": 0})
        if e["label"] == "unstable":
            t["unstable"] += 1
            t["detected"] += int(results[n]["detected"])
        else:
            t["healthy"] += 1
            t["false_alarms"] += int(results[n]["false_alarm"])
    return {
        "split": split, "runs": len(entries), "unstable": len(unstable), "healthy": len(healthy),
        "detected": len(detected), "recall": len(detected) / len(unstable) if unstable else None,
        "lead": {"median": statistics.median(leads), "min": min(leads), "max": max(leads)} if leads else None,
        "false_alarms": len(false_alarms), "false_alarm_rate": len(false_alarms) / len(healthy) if healthy else None,
        "by_trainer": by_trainer, "per_rule": per_rule(entries, results, alerts),
        "per_run": {n: {"label": entries[n]["label"], "outcome_step": entries[n]["outcome_step"],
                        "outcome_kinds": entries[n]["outcome_kinds"], **results[n],
                        "alerts": [f"{a['rule']}:{a['severity']}@{a['at']}" for a in alerts[n]]}
                    for n in entries},
    }


SPIKE_SPLITS = ("spike_check", "spike_check2", "spike_check3")
SPIKE_FLAGS = {"spike_check": "--spike-check", "spike_check2": "--spike-check2", "spike_check3": "--spike-check3"}
SPIKE_TAGS = {"spike_check": "spike check", "spike_check2": "second spike check", "spike_check3": "third spike check"}
# the rules that judge a clipped event (or tail-only ratios) by its consequence and so may leave an info note
NOTED_RULES = ("grad_explosion", "loss_spike", "ppo_ratio_extreme")


def spike_section(s: Mapping[str, Any]) -> list[str]:
    """A spike check's healthy runs one by one: whether a gradient-norm spike passed the bar (a ``grad_spike``
    alert of any severity: a clipped one without consequence is an ``info`` note), the notes of the other rules
    that judge a clipped event by its consequence, and which warnings/criticals came."""
    lines = ["", f"## {s['split']}: healthy runs", "",
             "| run | grad_spike alerts (severity@step) | warning/critical alerts | "
             f"notes of {', '.join(NOTED_RULES)} |", "|---|---|---|---|"]
    for name, r in s["per_run"].items():
        if r["label"] != "healthy":
            continue
        spikes = [a.split(":", 1)[1] for a in r["alerts"] if a.startswith("grad_spike:")]
        severe = [a for a in r["alerts"] if a.split(":", 1)[1].split("@")[0] in SEVERE]
        notes = [a for a in r["alerts"] if a.split(":", 1)[0] in NOTED_RULES and ":info@" in a]
        lines.append(f"| {name} | {', '.join(spikes) or '-'} | {', '.join(severe) or '-'} | "
                     f"{', '.join(notes) or '-'} |")
    return lines


def spiked(s: Mapping[str, Any]) -> int:
    """Healthy runs of a split with a gradient-norm spike past the rule's bar (a note or a warning)."""
    return sum(1 for r in s["per_run"].values()
               if r["label"] == "healthy" and any(a.startswith("grad_spike:") for a in r["alerts"]))


def markdown(name: str, splits: list[dict[str, Any]]) -> str:
    lines = [f"# {name}: stability rules on the corpus of real runs", "",
             "Generated by `benchmarks/bench_corpus.py`; criteria in docs/corpus.md. Detection = a warning/critical "
             f"alert naming the outcome, from a record no later than outcome step + {GRACE}.", "",
             "| split | unstable detected | recall | lead median (min, max) | healthy with alerts | false-alarm rate |",
             "|---|---|---|---|---|---|"]
    for s in splits:
        lead = s["lead"]
        lead_txt = f"{lead['median']} ({lead['min']}, {lead['max']})" if lead else "-"
        lines.append(f"| {s['split']} | {s['detected']}/{s['unstable']} | {_pct(s['recall'])} | {lead_txt} | "
                     f"{s['false_alarms']}/{s['healthy']} | {_pct(s['false_alarm_rate'])} |")
    for s in splits:
        lines += ["", f"## {s['split']}: per trainer", "", "| trainer | detected | false alarms |", "|---|---|---|"]
        for t, c in sorted(s["by_trainer"].items()):
            lines.append(f"| {t} | {c['detected']}/{c['unstable']} | {c['false_alarms']}/{c['healthy']} |")
        lines += ["", f"## {s['split']}: per rule", "",
                  "| rule | fired (runs) | on healthy | on unstable | precision | recall (of runs it could name) |",
                  "|---|---|---|---|---|---|"]
        for rule, r in s["per_rule"].items():
            lines.append(f"| {rule} | {r['fired_runs']} | {r['fired_on_healthy']} | {r['fired_on_unstable']} | "
                         f"{_pct(r['precision'])} | "
                         f"{_pct(r['recall'])} ({r['correct_runs']}/{r['eligible_runs']}) |")
        if s["split"] in SPIKE_SPLITS:
            lines += spike_section(s)
            if s.get("carried_over"):
                flag = SPIKE_FLAGS[s["split"]]
                lines += ["", f"({s['split']} carried over from the run of {s['carried_over']}: its runs were not "
                          f"on disk; `python -m benchmarks.corpus.generate {flag}` regenerates them)"]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def ensure_runs(runs_dir: Path) -> None:
    """Unpack the committed corpus when the runs are not on disk (``make corpus`` regenerates them)."""
    if (runs_dir / "labels.json").exists():
        return
    if runs_dir != CORPUS / "runs":
        raise SystemExit(f"{runs_dir} has no labels.json")
    from benchmarks.corpus.generate import extract_archive

    extract_archive()


def spike_split(runs_dir: Path, previous: Path, split: str = "spike_check") -> dict[str, Any] | None:
    """A spike check scored from its runs; when they are not on disk (they are not archived:
    benchmarks/corpus/generate.py), the split of the last results file, marked ``carried_over`` with its date,
    so a rerun without the runs neither drops nor silently re-dates it; None when there is neither."""
    if (runs_dir / "labels.json").exists():
        return evaluate(runs_dir, split)
    if not previous.exists():
        return None
    old = json.loads(previous.read_text())
    for s in old.get("details", {}).get("splits", []):
        if s["split"] == split:
            return {**s, "carried_over": s.get("carried_over") or old.get("measured_at")}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=CORPUS / "runs")
    ap.add_argument("--spike-runs", type=Path, default=CORPUS / "runs" / "spike_check",
                    help="the spike check's runs (generate.py --spike-check); when absent, its scores are carried "
                         "over from the last results file")
    ap.add_argument("--spike2-runs", type=Path, default=CORPUS / "runs" / "spike_check2",
                    help="the second spike check's runs (generate.py --spike-check2); likewise")
    ap.add_argument("--spike3-runs", type=Path, default=CORPUS / "runs" / "spike_check3",
                    help="the third spike check's runs (generate.py --spike-check3); likewise")
    ap.add_argument("--name", default="corpus", help="result name: benchmarks/results/<name>.json and .md "
                    "(a name with a folder, e.g. baseline/corpus, stays out of the README table)")
    args = ap.parse_args(argv)
    ensure_runs(args.runs)
    (Path(__file__).resolve().parent / "results" / args.name).parent.mkdir(parents=True, exist_ok=True)
    splits = [evaluate(args.runs, split) for split in ("dev", "heldout")]
    previous = Path(__file__).resolve().parent / "results" / f"{args.name}.json"
    for split, runs_dir in (("spike_check", args.spike_runs), ("spike_check2", args.spike2_runs),
                            ("spike_check3", args.spike3_runs)):
        spike = spike_split(runs_dir, previous, split)
        if spike is not None:
            splits.append(spike)
    rows = []
    for s in splits:
        tag = {"heldout": "held-out", **SPIKE_TAGS}.get(s["split"], s["split"])
        lead = s["lead"]
        rows += [
            row(f"{tag}: unstable runs detected in time", f"{s['detected']}/{s['unstable']}", "",
                target=">= 95%", met=s["recall"] is not None and s["recall"] >= TARGET_RECALL,
                notes=f"recall {_pct(s['recall'])}; correctly named alert <= outcome step + {GRACE}"),
            row(f"{tag}: lead time (outcome - detection step)", lead["median"] if lead else "-", "steps",
                notes=(f"min {lead['min']} max {lead['max']} over {s['detected']} detected" if lead
                       else "none detected")),
            row(f"{tag}: healthy runs with a warning/critical alert", f"{s['false_alarms']}/{s['healthy']}", "",
                target="<= 1 in 20",
                met=s["false_alarm_rate"] is not None and s["false_alarm_rate"] <= TARGET_FALSE_ALARM,
                notes=f"false-alarm rate {_pct(s['false_alarm_rate'])}"),
        ]
        if s["split"] in SPIKE_SPLITS:
            if s.get("carried_over"):
                for r in rows[-3:]:
                    r["notes"] += f"; carried over from {s['carried_over']} (runs not on disk)"
            rows.append(row(f"{tag}: healthy runs with a gradient-norm spike past the bar",
                            f"{spiked(s)}/{s['healthy']}", "",
                            notes="a grad_spike alert of any severity (clipped, no consequence: an info note)"))
    for r in rows:
        print(f"{r['metric']:52} {r['value']} {r['unit']}  {r['notes']}")
    labels = json.loads((args.runs / "labels.json").read_text())
    write_result(args.name, rows, {"grace_steps": GRACE, "accepted_rules": {k: sorted(v) for k, v in ACCEPTED.items()},
                                   "criteria": labels.get("criteria"), "splits": splits})
    md = Path(__file__).resolve().parent / "results" / f"{args.name}.md"
    md.write_text(markdown(args.name, splits))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
