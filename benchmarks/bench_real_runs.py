"""The stability rules on public training logs nobody on this project generated (docs/diagnose.md, "Real runs
nobody here generated"): the rules were tuned on runs the kit made itself (bench_corpus.py), and this measures
what they say on other people's veRL, TRL and notebook logs whose outcome the source states.

Each run of ``benchmarks/real_runs_manifest.json`` (metadata and URLs only: third-party logs are never committed)
is read from a log folder, imported into a run directory with the kit's own importers (``rlhfkit import verl``'s
``import_verl``; TRL ``log_history`` dicts through ``RunWriter`` and ``map_trl``, as the TRL adapter writes them),
and diagnosed with ``RunAnalysis``, the API ``rlhfkit diagnose`` uses. A healthy run (the source says it improved)
with a warning or critical alert is a false alarm; an unstable one is detected when an alert naming its outcome
kind comes no later than its outcome step + ``GRACE`` (bench_corpus.ACCEPTED); a run whose source states no
outcome is reported but never counted either way. Dev and held-out splits (fixed in the manifest before any alert
was looked at) are reported separately; only dev may be used to tune the rules.

    python benchmarks/bench_real_runs.py [--logs DIR] [--from-mirrors DIR] [--manifest FILE]

No log folder (CI has no network): one line, exit 0, and the last results file is kept.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_corpus import ACCEPTED, GRACE, SEVERE
from benchmarks.common import row, write_result

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "real_runs_manifest.json"
LOGS = Path("/tmp/realruns/logs")
SPLITS = ("dev", "heldout")
KL_KEYS = ("kl/ref_k3", "kl/ref_k1", "kl/ref_k2")
# rules whose evidence levels the report quotes (the two the public veRL runs raised)
LEVEL_RULES = ("kl_explosion", "entropy_collapse")
_KL = KL_KEYS
_LENGTH = (("reward/mean",), ("response/length_mean",))
# what a rule reads: each group needs one of its keys in the run's records, or the rule cannot fire on that run
# (a notebook table has no entropy, a GPG run no KL); false-alarm rates are over the runs that log them
RULE_INPUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "kl_budget": (_KL,), "kl_explosion": (_KL,), "negative_kl": (("kl/ref_k1",),),
    "entropy_collapse": (("policy/entropy",),), "loss_spike": (("loss/total",),),
    "grad_spike": (("grad/norm",),), "grad_explosion": (("grad/norm",),), "grad_clipping": (("grad/norm",),),
    "reward_hacking_length": _LENGTH, "pattern_collapse": (*_LENGTH, _KL), "reward_hacking_kl": (("reward/mean",), _KL),
    "ppo_ratio": (("policy/ratio_mean",),), "ppo_ratio_extreme": (("policy/ratio_max", "policy/ratio_min"),),
    "clipfrac": (("policy/clipfrac",),), "critic": (("value/explained_var",),),
    "rollout_logprob_mismatch": (("rollout/logprob_diff_mean", "rollout/prob_diff_mean", "rollout/kl_k3",
                                  "rollout/kl_k1"),),
}


def materialize(runs: list[dict[str, Any]], logs: Path, mirrors: Path) -> int:
    """Copy each run's file out of a fetched bare mirror (``<mirrors>/<owner>+<name>/repo``) at the manifest's
    commit, so the log folder can be rebuilt without the network; returns how many were written."""
    logs.mkdir(parents=True, exist_ok=True)
    done = 0
    for run in runs:
        git_dir = mirrors / run["repo"].replace("/", "+") / "repo"
        out = subprocess.run(["git", "-C", str(git_dir), "show", f"{run['commit']}:{run['path']}"],
                             capture_output=True)
        if out.returncode == 0:
            (logs / run["file"]).write_bytes(out.stdout)
            done += 1
        else:
            print(f"{run['name']}: not in {git_dir} ({out.stderr.decode(errors='replace').strip()[:120]})")
    return done


def trl_entries(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """TRL ``Trainer.log`` dicts with their step: a ``trainer_state.json``'s ``log_history``, or the metrics
    table a notebook kept as the output of ``trainer.train()`` (the columns TRL logged, as the notebook shows
    them, ``Training Loss`` as ``loss``, ``rewards / f`` as ``rewards/f``; the longest such table)."""
    if fmt == "trl_state":
        for logged in json.loads(path.read_text())["log_history"]:
            if isinstance(logged.get("step"), int):
                yield logged
        return
    notebook = json.loads(path.read_text())
    tables = ["".join((output.get("data") or {}).get("text/html", []) or [])
              for cell in notebook.get("cells", []) for output in cell.get("outputs", []) or []]
    tables = [t for t in tables if "<table" in t and "Training Loss" in t and "reward" in t]
    if not tables:
        return
    table = max(tables, key=lambda t: t.count("<tr>"))  # a notebook rerun in part keeps a short table too
    heads = [_column(h) for h in re.findall(r"<th>(.*?)</th>", table, re.S)]
    for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S):
        cells = [html.unescape(c).strip() for c in re.findall(r"<td>(.*?)</td>", tr, re.S)]
        if not cells or not cells[0].isdigit():
            continue
        entry: dict[str, Any] = {"step": int(cells[0])}
        for key, text in zip(heads[1:], cells[1:]):
            try:
                entry[key] = float(text)
            except ValueError:
                continue  # "No log" and blanks: the metric was not logged on that step
        yield entry


def _column(head: str) -> str:
    head = html.unescape(head).strip()
    return "loss" if head == "Training Loss" else head.replace(" / ", "/")


def import_run(run: Mapping[str, Any], src: Path, out: Path) -> dict[str, Any]:
    """Write the run directory ``out`` from one log with the kit's own importers; returns the import summary."""
    if run["format"] == "verl":
        from adapters.verl import import_verl

        return import_verl(src, out, overwrite=True, alerts=False)
    from adapters.mapping import TRL_SUMMARY_MARKERS, map_trl
    from rlhf_core.runformat.run_writer import RunWriter

    steps = 0
    with RunWriter(out, source="trl", config={"imported_from": str(src)}, overwrite=True,
                   tensorboard=False) as writer:
        last = 0
        for entry in trl_entries(src, run["format"]):
            if TRL_SUMMARY_MARKERS & entry.keys() or entry["step"] <= last:
                continue
            writer.log(entry["step"], map_trl(entry, "GRPOTrainer"))
            last, steps = entry["step"], steps + 1
    return {"steps": steps, "last_step": last, "format": run["format"]}


def diagnose(run_dir: Path) -> tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The alerts ``rlhfkit diagnose`` prints (RunAnalysis), the step of the record whose update raised each
    (when a live user could have seen it: bench_corpus's replay, the same rules built from the same meta), and
    the records."""
    from benchmarks.bench_corpus import detections
    from rlhf_core.runformat.run_reader import Run
    from rlhf_core.stability.analysis import RunAnalysis

    alerts = RunAnalysis(run_dir).alerts()
    raised, _ = detections(run_dir)
    return alerts, raised, Run(run_dir).metrics()


def series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[str | None, list[tuple[int, float]]]:
    """The first of ``keys`` the run logs, and its (step, value) pairs."""
    for key in keys:
        pairs = [(int(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
        if pairs:
            return key, pairs
    return None, []


def levels(records: list[dict[str, Any]]) -> dict[str, Any]:
    """KL and entropy over the run (first, median of the first 10, extreme, last; entropy against H0, steps of
    KL past the default 1 nat/token budget): the scale an alert is read against."""
    out: dict[str, Any] = {}
    for name, keys, extreme in (("kl", KL_KEYS, max), ("entropy", ("policy/entropy",), min)):
        key, pairs = series(records, keys)
        if not pairs:
            continue
        values = [v for _, v in pairs]
        out[name] = {"key": key, "first": _r(values[0]), "median_first10": _r(statistics.median(values[:10])),
                     "extreme": _r(extreme(values)), "last": _r(values[-1]), "n": len(values)}
        if name == "entropy" and max(values[:3]) > 0:  # H0 as entropy_collapse takes it: the largest of 3
            h0 = max(values[:3])
            out[name].update(h0=_r(h0), min_over_h0=_r(min(values) / h0), last_over_h0=_r(values[-1] / h0))
        if name == "kl":
            streak = longest = 0
            for v in values:
                streak = streak + 1 if v > 1.0 else 0
                longest = max(longest, streak)
            out[name].update(steps_above_1=sum(v > 1.0 for v in values), longest_run_above_1=longest)
    return out


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def value_at(records: list[dict[str, Any]], keys: tuple[str, ...], step: int) -> float | None:
    key, pairs = series(records, keys)
    return next((_r(v) for s, v in pairs if s == step), None)


def evaluate_run(run: Mapping[str, Any], src: Path, work: Path) -> dict[str, Any]:
    out = work / run["name"]
    summary = import_run(run, src, out)
    alerts, raised, records = diagnose(out)
    steps = [int(r["step"]) for r in records]
    n_steps, last = len(steps), max(steps, default=0)
    severe = [a for a in alerts if a.severity in SEVERE]
    first = min(severe, key=lambda a: a.step) if severe else None
    raised_severe = [a for a in raised if a["severity"] in SEVERE]
    keys = set().union(*records) if records else set()
    result: dict[str, Any] = {
        "rules_with_inputs": sorted(rule for rule, groups in RULE_INPUTS.items()
                                    if all(any(k in keys for k in group) for group in groups)),
        "label": run["label"], "split": run["split"], "trainer": run["trainer"], "algorithm": run["algorithm"],
        "model": run["model"], "steps": n_steps, "last_step": last,
        "import": {k: summary.get(k) for k in ("steps", "bad_lines", "format", "kl_loss_type", "kl_penalty",
                                                "grad_clip") if k in summary},
        "alerts": [f"{a.rule}:{a.severity}@{a.step}" for a in alerts],
        "by_rule": _by_rule(alerts),
        "first_severe": ({"rule": first.rule, "severity": first.severity, "step": first.step,
                          "frac_of_run": round(first.step / last, 3) if last else None} if first else None),
        "first_severe_raised_at": raised_severe[0]["at"] if raised_severe else None,
        "levels": levels(records),
        "evidence": {a.rule: {"severity": a.severity, "step": a.step, "message": a.message,
                              "kl_at_step": value_at(records, KL_KEYS, a.step),
                              "entropy_at_step": value_at(records, ("policy/entropy",), a.step)}
                     for a in sorted(severe, key=lambda a: a.step) if a.rule in LEVEL_RULES},
    }
    if run["label"] == "healthy":
        result["false_alarm"] = bool(severe)
    elif run["label"] == "unstable":
        accepted = frozenset().union(*(ACCEPTED[k] for k in run["outcome_kinds"]))
        deadline = (run["outcome_step"] if run["outcome_step"] is not None else last) + GRACE
        hits = [a for a in raised_severe if a["rule"] in accepted and a["at"] <= deadline]
        result.update(detected=bool(hits), detection_step=hits[0]["at"] if hits else None,
                      correct_rules=sorted({a["rule"] for a in hits}))
    return result


def _by_rule(alerts: list[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for a in alerts:
        out.setdefault(a.rule, {}).setdefault(a.severity, 0)
        out[a.rule][a.severity] += 1
    return out


def summarize(split: str, results: Mapping[str, Mapping[str, Any]], runs: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, Any]:
    """One split: false alarms on healthy runs, recall on unstable ones, and per rule where it fired."""
    names = [n for n, r in results.items() if r["split"] == split]
    by_label = {lab: [n for n in names if results[n]["label"] == lab] for lab in ("healthy", "unstable", "unstated")}
    healthy, unstable = by_label["healthy"], by_label["unstable"]
    false_alarms = [n for n in healthy if results[n]["false_alarm"]]
    detected = [n for n in unstable if results[n]["detected"]]
    rules = sorted({rule for n in names for rule in (*results[n]["by_rule"], *results[n]["rules_with_inputs"])})
    per_rule = {}
    for rule in rules:
        fired = {lab: [n for n in group if any(s in SEVERE for s in results[n]["by_rule"].get(rule, {}))]
                 for lab, group in by_label.items()}
        logging = [n for n in healthy if rule in results[n]["rules_with_inputs"]]
        eligible = [n for n in unstable if any(rule in ACCEPTED[k] for k in runs[n]["outcome_kinds"])]
        named = [n for n in eligible if rule in results[n]["correct_rules"]]
        per_rule[rule] = {
            "severe_on_healthy": len(fired["healthy"]), "healthy_logging_inputs": len(logging),
            "false_alarm_rate": round(len(fired["healthy"]) / len(logging), 3) if logging else None,
            "severe_on_unstable": len(fired["unstable"]), "severe_on_unstated": len(fired["unstated"]),
            "unstated": len(by_label["unstated"]),
            "info_only_runs": sum(1 for n in names if set(results[n]["by_rule"].get(rule, {})) == {"info"}),
            "recall": round(len(named) / len(eligible), 3) if eligible else None, "eligible_unstable": len(eligible),
            "runs": sorted(fired["healthy"] + fired["unstable"] + fired["unstated"]),
        }
    return {"split": split, "runs": len(names), **{lab: len(group) for lab, group in by_label.items()},
            "false_alarms": len(false_alarms),
            "false_alarm_rate": round(len(false_alarms) / len(healthy), 3) if healthy else None,
            "detected": len(detected), "recall": round(len(detected) / len(unstable), 3) if unstable else None,
            "per_rule": per_rule}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logs", type=Path, default=LOGS, help="folder holding the manifest's files (default %(default)s)")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--from-mirrors", type=Path, default=None, metavar="DIR",
                    help="first copy the logs out of fetched bare mirrors DIR/<owner>+<name>/repo at the manifest's "
                         "commits")
    ap.add_argument("--work", type=Path, default=None, help="where the imported run directories go (default: a "
                    "temporary folder, removed afterwards)")
    ap.add_argument("--name", default="real_runs")
    args = ap.parse_args(argv)
    manifest = json.loads(args.manifest.read_text())
    runs = {r["name"]: r for r in manifest["runs"]}
    if args.from_mirrors is not None:
        print(f"copied {materialize(list(runs.values()), args.logs, args.from_mirrors)} logs into {args.logs}")
    present = {n: args.logs / r["file"] for n, r in runs.items() if (args.logs / r["file"]).is_file()}
    if not present:
        print(f"bench_real_runs: no logs in {args.logs} (third-party logs are not in the repository; see "
              f"{args.manifest.name} for their URLs, or pass --from-mirrors); nothing measured")
        return 0
    with tempfile.TemporaryDirectory(prefix="real_runs_") as tmp:
        work = args.work or Path(tmp)
        results = {}
        for name, src in present.items():
            results[name] = evaluate_run(runs[name], src, work)
            r = results[name]
            print(f"{name:48} {r['split']:7} {r['label']:8} {r['steps']:5} steps  "
                  f"{', '.join(a for a in r['alerts'] if ':info@' not in a) or '-'}")
    splits = [summarize(s, results, runs) for s in SPLITS]
    rows = []
    for s in splits:
        tag = "held-out" if s["split"] == "heldout" else s["split"]
        fired = {rule: p["severe_on_healthy"] for rule, p in s["per_rule"].items() if p["severe_on_healthy"]}
        rows += [
            row(f"{tag}: healthy public runs with a warning/critical alert", f"{s['false_alarms']}/{s['healthy']}",
                notes="; ".join(f"{rule} {k}" for rule, k in sorted(fired.items())) or "none"),
            row(f"{tag}: unstable public runs named in time", f"{s['detected']}/{s['unstable']}",
                notes=f"{s['unstated']} more runs whose source states no outcome are reported, not scored"),
        ]
    for r in rows:
        print(f"{r['metric']:56} {r['value']}  {r['notes']}")
    missing = sorted(set(runs) - set(present))
    root = HERE.parent
    where = args.manifest.resolve()
    write_result(args.name, rows, {"grace_steps": GRACE, "accepted_rules": {k: sorted(v) for k, v in ACCEPTED.items()},
                                   "manifest": str(where.relative_to(root) if where.is_relative_to(root) else where),
                                   "split_rule": manifest.get("split_rule"), "missing_logs": missing,
                                   "splits": splits, "per_run": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
