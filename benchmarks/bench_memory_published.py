"""Planner verdicts next to published RLHF setups that ran (or ran out of memory): memory/published.json.

    python benchmarks/bench_memory_published.py [--out benchmarks/results/memory_published.json]

Each row's published command is read by the same readers users have (memory.inputs.from_openrlhf / from_verl /
from_deepspeed_chat; a TRL row's GRPOConfig/RLOOConfig args with its accelerate or DeepSpeed config through
memory.inputs.trl_deployment, as --trl_config does). Frameworks pack real tokens (OpenRLHF --packing_samples,
veRL use_remove_padding), so a command bounds the lengths without fixing them; the planner therefore gives a
verdict only when it does not depend on them: "fits" when the plan fits even with every sequence at the maximum
prompt+response length, "oom" when it does not fit even with one-token prompts and responses, else "depends on
lengths" (counted apart).

A row whose lengths were measured says so: ``lengths_from`` names a run of memory/measured_runs.json, veRL's own
log of the same model on the same data (veRL's LoRA GRPO scripts on GSM8K: the logs of the same Qwen2.5 models,
same prompts, same sampling), and the row is planned once, at that run's step-1 mean prompt and response
lengths. Nothing is fitted on the rows.

Rows carry a "family" (the source they come from: verl-lora, verl, openrlhf, trl, ...); agreement is reported
overall and per family. Rows the planner cannot express ("not_expressible": e.g. veRL's Megatron backend, a source
that gives no settings) and rows whose sources contradict each other ("conflicting_sources") are counted apart, as
are verdicts that depend on the lengths. A framework's reader is one entry of READERS.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.common import RESULTS, row, write_result  # noqa: E402
from memory.deploy import Deployment  # noqa: E402
from memory.inputs import (  # noqa: E402
    GiB,
    from_deepspeed_chat,
    from_openrlhf,
    from_verl,
    trl_from_mappings,
)

MEASURED_RUNS = ROOT / "memory/measured_runs.json"


def from_trl_row(inp: dict[str, Any], model: str | None = None, gpu_memory: int = 80 * GiB) -> Deployment:
    """A TRL row's input: ``config`` (GRPOConfig args), ``accelerate`` (an accelerate config mapping) or
    ``deepspeed`` (a DeepSpeed JSON mapping), ``num_processes`` (accelerate's total, which overrides the config's),
    ``gpus_per_node`` and ``trl_version``; read by the same function as ``--trl_config``."""
    return trl_from_mappings(dict(inp["config"]), accelerate=inp.get("accelerate"), deepspeed=inp.get("deepspeed"),
                             base_dir=ROOT, model=model, num_processes=inp.get("num_processes"),
                             gpu_memory=gpu_memory, gpus_per_node=int(inp.get("gpus_per_node", 8)),
                             source="TRL row", trl_version=inp.get("trl_version"))


# framework name -> reader(input, model=None, gpu_memory=...) -> Deployment; a new framework is one line here
READERS: dict[str, Callable[..., Deployment]] = {
    "openrlhf": from_openrlhf,
    "verl": from_verl,
    "trl": from_trl_row,
    "deepspeed-chat": from_deepspeed_chat,
}


def deployment(row: dict) -> Deployment:
    """The row's published setup as the planner's Deployment (its reader, its GPU memory, its shape stand-in), at
    its measured lengths when it has them."""
    from memory.planner import parse_bytes

    kwargs: dict[str, Any] = {"gpu_memory": parse_bytes(row["gpu_memory"])}
    if row.get("model"):
        kwargs["model"] = row["model"]
    lengths = measured_lengths(row)
    text = row["input"]
    if lengths and row["framework"] == "verl":  # re-read, so that token-budget micro-batches follow the lengths
        text = f"{text} data.max_prompt_length={lengths[0]} data.max_response_length={lengths[1]}"
    dep = READERS[row["framework"]](text, **kwargs)
    return dep.with_(prompt_len=lengths[0], response_len=lengths[1]) if lengths else dep


@cache
def _measured_runs() -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(MEASURED_RUNS.read_text())["runs"]}


def measured_lengths(row: dict) -> tuple[int, int] | None:
    """The step-1 mean prompt and response lengths of the run the row's ``lengths_from`` names, or None."""
    if not row.get("lengths_from"):
        return None
    run = _measured_runs()[row["lengths_from"]]
    return max(1, round(run["prompt_length_mean"])), max(1, round(run["response_length_mean"]))


def apart(row: dict) -> str | None:
    """Why a row is counted apart from the agreement before any plan: not expressible, or sources disagree."""
    if row.get("not_expressible"):
        return "not expressible"
    if row.get("conflicting_sources"):
        return "conflicting sources"
    return None


def verdict(row: dict) -> dict:
    """fits / oom / depends on lengths, with the peaks at the row's maximum and minimum lengths (one plan at the
    measured lengths when the row has them)."""
    from memory.deploy import plan_deployment

    dep = deployment(row)
    measured = measured_lengths(row) is not None
    at_max = plan_deployment(dep)
    if measured:
        v, at_min = ("fits" if at_max.fits else "oom"), at_max
    else:
        at_min = plan_deployment(dep.with_(prompt_len=1, response_len=1))
        v = "fits" if at_max.fits else ("oom" if not at_min.fits else "depends on lengths")
    worst = max(at_max.groups, key=lambda g: g.peak_bytes / dep.gpu_memory)
    return {"planner": v, "lengths": "measured" if measured else "bounds",
            "peak_at_max_bytes": at_max.peak_bytes, "peak_at_min_bytes": at_min.peak_bytes,
            "peak_group": worst.name, "peak_phase_at_max": worst.peak_phase}


def missing_at_boundaries(rows: list[dict]) -> list[dict]:
    """For each script (model x GPUs) with a published boundary planned at measured lengths: how many bytes per GPU
    the planner would have to add for its boundary to fall where the script's comment puts it (between the largest
    batch that ran and the smallest that ran out of memory), in the phases that grow with the batch (scoring,
    update), next to the engine's weights per GPU."""
    from memory.deploy import plan_deployment

    scripts: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("lengths_from") and "-b" in r["id"] and not apart(r):
            scripts.setdefault(r["id"].rsplit("-b", 1)[0], []).append(r)
    out = []
    for key, rs in scripts.items():
        fits = [r for r in rs if r["published"] == "fits"]
        ooms = [r for r in rs if r["published"] == "oom"]
        if not fits or not ooms:
            continue
        last_fit = max(fits, key=lambda r: int(r["id"].rsplit("-b", 1)[1]))
        first_oom = min(ooms, key=lambda r: int(r["id"].rsplit("-b", 1)[1]))
        pf, po = plan_deployment(deployment(last_fit)), plan_deployment(deployment(first_oom))
        mem = pf.deployment.gpu_memory

        def batch_peak(plan) -> int:  # the phases whose bytes grow with the batch
            return max(plan.groups[0].totals[ph] for ph in ("scoring", "update"))

        low, high = int(mem - batch_peak(po)), int(mem - batch_peak(pf))
        out.append({"script": key, "gpus": pf.deployment.total_gpus, "engine_tp": pf.deployment.engine.tp,
                    "sequence_parallel": pf.deployment.sequence_parallel,
                    "last_fit": last_fit["id"], "first_oom": first_oom["id"],
                    "missing_bytes_low": low, "missing_bytes_high": high,
                    "engine_weights_bytes": pf.engine.weights,
                    "engine_weights_inside_window": low < pf.engine.weights <= high})
    return out


def families(out: list[dict]) -> dict[str, dict]:
    """Per family: rows, how many are counted apart and why, and agreement over the rows with a verdict."""
    fam: dict[str, dict] = {}
    for r in out:
        f = fam.setdefault(r["family"], {"rows": 0, "not_expressible": 0, "conflicting_sources": 0,
                                         "depends_on_lengths": 0, "checked": 0, "agree": 0,
                                         "checked_published_oom": 0, "at_measured_lengths": 0})
        f["rows"] += 1
        if r["status"] == "not expressible":
            f["not_expressible"] += 1
        elif r["status"] == "conflicting sources":
            f["conflicting_sources"] += 1
        elif r["agree"] is None:
            f["depends_on_lengths"] += 1
        else:
            f["checked"] += 1
            f["agree"] += r["agree"]
            f["checked_published_oom"] += r["published"] == "oom"
            f["at_measured_lengths"] += r.get("lengths") == "measured"
    return fam


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=str(ROOT / "memory/published.json"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_published.json"))
    a = p.parse_args()
    rows = json.loads(Path(a.rows).read_text())["rows"]
    out = []
    for rec in rows:
        r: dict[str, Any] = {"id": rec["id"], "family": rec.get("family", rec["framework"]),
                             "published": rec["published"], "status": apart(rec) or "planned"}
        if r["status"] != "planned":
            r.update(planner=None, agree=None)
            out.append(r)
            print(f"{r['id']:48s} published {rec['published']:5s} counted apart: {r['status']}")
            continue
        r.update(verdict(rec))
        r["agree"] = None if r["planner"] == "depends on lengths" else r["planner"] == rec["published"]
        out.append(r)
        at = ("at the measured lengths" if r["lengths"] == "measured" else
              f"at max {r['peak_at_max_bytes'] / 2**30:7.1f} GiB, at min {r['peak_at_min_bytes'] / 2**30:6.1f} GiB")
        print(f"{r['id']:48s} published {rec['published']:5s} planner {r['planner']:19s} peak "
              f"{r['peak_at_max_bytes'] / 2**30:7.1f} GiB {at} ({r['peak_group']}/{r['peak_phase_at_max']})")
    missing = missing_at_boundaries(rows)
    for m in missing:
        print(f"  {m['script']:40s} {m['gpus']} GPU(s), engine TP {m['engine_tp']}, Ulysses SP "
              f"{m['sequence_parallel']}: the boundary needs {m['missing_bytes_low'] / 2**30:+.1f} .. "
              f"{m['missing_bytes_high'] / 2**30:+.1f} GiB more per GPU; engine weights "
              f"{m['engine_weights_bytes'] / 2**30:.1f} GiB per GPU")
    fam = families(out)
    checked = sum(f["checked"] for f in fam.values())
    overall = sum(f["agree"] for f in fam.values())
    for name, f in fam.items():
        print(f"  family {name:10s}: {f['agree']}/{f['checked']} agree ({f['at_measured_lengths']} at measured "
              f"lengths); {f['rows']} rows, {f['depends_on_lengths']} depend on lengths, {f['not_expressible']} not "
              f"expressible, {f['conflicting_sources']} with conflicting sources")
    print(f"overall: {overall}/{checked} rows with a verdict agree")
    explanations = {r["id"]: r.get("explanation") for r in rows}
    disagreements = [{"id": r["id"], "published": r["published"], "planner": r["planner"],
                      "explanation": explanations.get(r["id"])} for r in out if r["agree"] is False]
    details = {"rows": out, "missing_at_boundaries": missing, "families": fam, "overall_checked": checked,
               "overall_agree": overall, "disagreements": disagreements}
    write_result("memory_published", summary(details), details, path=Path(a.out))
    return 0


def _ulysses_note() -> str:
    """What bench_memory_ulysses.py measured Ulysses SP 2 to add at the scripts' boundaries, when it has run."""
    path = RESULTS / "memory_ulysses.json"
    if not path.exists():
        return ""
    rows = json.loads(path.read_text())["details"]["rows"]
    most = max(max(r["ulysses_bytes"].values()) for r in rows)
    return f" and Ulysses SP 2 itself adds at most {most / 2**20:.0f} MiB to the model step there (memory_ulysses)"


def summary(details: dict) -> list[dict]:
    """README row: agreement with published fit/out-of-memory rows, overall and per source family, with what is
    counted apart and why, and where the veRL LoRA boundaries sit."""
    n, fam = len(details["rows"]), details["families"]
    checked, overall = details["overall_checked"], details["overall_agree"]
    measured = [r for r in details["rows"] if r.get("lengths") == "measured"]
    measured_agree = sum(bool(r["agree"]) for r in measured)
    misses = [r for r in measured if r["agree"] is False]
    multi = [m for m in details.get("missing_at_boundaries", []) if m["gpus"] > 1]
    single = [m for m in details.get("missing_at_boundaries", []) if m["gpus"] == 1]
    gaps = "; ".join(f"{m['script'].split('-', 1)[1]} (TP {m['engine_tp']}, SP {m['sequence_parallel']}): "
                     f"{m['missing_bytes_low'] / 2**30:.1f}-{m['missing_bytes_high'] / 2**30:.1f} GiB (engine weights "
                     f"{m['engine_weights_bytes'] / 2**30:.1f})" for m in multi)
    per_family = "; ".join(
        f"{name} {f['agree']}/{f['checked']} of {f['rows']} rows"
        + "".join(f", {f[k]} {label}" for k, label in (
            ("depends_on_lengths", "depend on lengths"), ("not_expressible", "not expressible"),
            ("conflicting_sources", "with conflicting sources")) if f[k])
        for name, f in fam.items())
    outside = [d for d in details.get("disagreements", []) if d["id"] not in {r["id"] for r in misses}]
    fits_only = [name for name, f in fam.items() if f["checked"] and not f["checked_published_oom"]]
    notes = (f"{n} rows collected from {len(fam)} source families; per family: {per_family}. "
             f"Rows with measured lengths (veRL LoRA scripts at the step-1 means of veRL's own logs of the same "
             f"models on GSM8K, memory/measured_runs.json; nothing fitted): {measured_agree}/{len(measured)}")
    if single:
        s = single[0]
        notes += (f"; the single-GPU boundary ({s['script'].split('-', 1)[1]}) needs "
                  f"{s['missing_bytes_low'] / 2**30:+.1f} .. {s['missing_bytes_high'] / 2**30:+.1f} GiB")
    if gaps:
        notes += (f"; every multi-GPU script (all run Ulysses SP 2) runs out of memory earlier than planned: per GPU "
                  f"the planner lacks, at its boundary, {gaps}; the same models at SP 1 on 8 GPUs in veRL's logs "
                  f"are not under-counted (memory_verl_runs){_ulysses_note()}, so no source explains it and it is "
                  "not modelled (see docs/memory.md)")
    notes += (f"; {len(outside)} other disagreements (see details.disagreements)" if outside else "")
    if fits_only:
        notes += (f"; {', '.join(fits_only)}: every checked row is a published fit (those sources state no "
                  "out-of-memory setup), so they test the planner against false out-of-memory calls only")
    return [row("published fit/OOM rows the planner agrees with", f"{overall}/{checked}", "", ">= 90%",
                overall >= 0.9 * checked, notes)]


if __name__ == "__main__":
    sys.exit(main())
