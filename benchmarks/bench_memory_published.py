"""Planner verdicts next to published RLHF setups that ran (or ran out of memory): memory/published.json.

    python benchmarks/bench_memory_published.py [--out benchmarks/results/memory_published.json]

Each row's published command is read by the same readers users have (memory.inputs.from_openrlhf /
from_verl). Frameworks pack real tokens (OpenRLHF --packing_samples, veRL use_remove_padding), so a command
bounds the lengths without fixing them; the planner therefore gives a verdict only when it does not depend on
them: "fits" when the plan fits even with every sequence at the maximum prompt+response length, "oom" when it
does not fit even with one-token prompts and responses, else "depends on lengths" (counted apart).

Second, for the veRL rows (all GSM8K, same maximum lengths, n=5) one unknown is shared: the packed length
per sequence. It is fitted on one published boundary (Qwen2.5-7B LoRA: 100 sequences fit, 101 run out) and
the other rows are then predicted with it; this tests the planner's scaling across model sizes and GPU counts,
not its absolute level (the fitted length also absorbs veRL's own log-prob/entropy kernels).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import row, write_result  # noqa: E402


def verdict(row: dict) -> dict:
    from memory.deploy import plan_deployment
    from memory.inputs import from_openrlhf, from_verl
    from memory.planner import parse_bytes

    mem = parse_bytes(row["gpu_memory"])
    reader = {"openrlhf": from_openrlhf, "verl": from_verl}[row["framework"]]
    dep = reader(row["input"], gpu_memory=mem)
    at_max = plan_deployment(dep)
    at_min = plan_deployment(dep.with_(prompt_len=1, response_len=1))
    v = "fits" if at_max.fits else ("oom" if not at_min.fits else "depends on lengths")
    worst = max(at_max.groups, key=lambda g: g.peak_bytes / mem)
    return {"planner": v, "peak_at_max_bytes": at_max.peak_bytes, "peak_at_min_bytes": at_min.peak_bytes,
            "peak_group": worst.name, "peak_phase_at_max": worst.peak_phase}


CALIBRATION_ROWS = ("verl-Qwen2.5-7B-Instruct-lora-1xH100-b100", "verl-Qwen2.5-7B-Instruct-lora-1xH100-b101")


def _at_length(row: dict, total: int):
    from memory.inputs import from_verl
    from memory.planner import parse_bytes

    d = from_verl(row["input"], gpu_memory=parse_bytes(row["gpu_memory"]))
    p = max(1, round(total * d.prompt_len / d.seq))
    return d.with_(prompt_len=p, response_len=max(1, total - p))


def calibrated(rows: list[dict]) -> tuple[int | None, list[dict]]:
    """Fit the packed length on the calibration pair, then give every other veRL row a verdict at it."""
    from memory.deploy import plan_deployment

    by_id = {r["id"]: r for r in rows}
    fit_row, oom_row = (by_id[i] for i in CALIBRATION_ROWS)
    window = [t for t in range(8, 1537, 2) if plan_deployment(_at_length(fit_row, t)).fits
              and not plan_deployment(_at_length(oom_row, t)).fits]
    if not window:
        return None, []
    t = window[len(window) // 2]
    out = []
    for r in rows:
        if r["framework"] != "verl" or r["id"] in CALIBRATION_ROWS:
            continue
        v = "fits" if plan_deployment(_at_length(r, t)).fits else "oom"
        out.append({"id": r["id"], "published": r["published"], "planner_at_fitted_length": v,
                    "agree": v == r["published"]})
    return t, out


def missing_at_boundaries(rows: list[dict], t: int) -> list[dict]:
    """For each veRL script (model x GPUs) with a published boundary: how many bytes per GPU the planner would
    have to add, at the fitted length, for its boundary to fall where the script's comment puts it (between
    the largest batch that ran and the smallest that ran out of memory) in the phases that grow with the batch
    (scoring, update), next to the engine's weights per GPU."""
    from memory.deploy import plan_deployment

    scripts: dict[str, list[dict]] = {}
    for r in rows:
        if r["framework"] == "verl":
            scripts.setdefault(r["id"].rsplit("-b", 1)[0], []).append(r)
    out = []
    for key, rs in scripts.items():
        fits = [r for r in rs if r["published"] == "fits"]
        ooms = [r for r in rs if r["published"] == "oom"]
        if not fits or not ooms:
            continue
        last_fit = max(fits, key=lambda r: int(r["id"].rsplit("-b", 1)[1]))
        first_oom = min(ooms, key=lambda r: int(r["id"].rsplit("-b", 1)[1]))
        pf, po = plan_deployment(_at_length(last_fit, t)), plan_deployment(_at_length(first_oom, t))
        mem = pf.deployment.gpu_memory

        def batch_peak(plan) -> int:  # the phases whose bytes grow with the batch
            return max(plan.groups[0].totals[ph] for ph in ("scoring", "update"))

        low, high = int(mem - batch_peak(po)), int(mem - batch_peak(pf))
        # a size, not a mechanism: the engine's weights at TP degree plus one decoder layer in fp32 (veRL's
        # actor dtype); no source read shows either resident in training (docs/memory.md)
        size = pf.engine.weights + pf.deployment.actor.arch.layer_params * 4
        out.append({"script": key, "gpus": pf.deployment.total_gpus, "engine_tp": pf.deployment.engine.tp,
                    "last_fit": last_fit["id"], "first_oom": first_oom["id"],
                    "missing_bytes_low": low, "missing_bytes_high": high,
                    "engine_weights_bytes": pf.engine.weights, "engine_weights_plus_fp32_layer_bytes": size,
                    "size_inside_window": low < size <= high})
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=str(ROOT / "memory/published.json"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_published.json"))
    a = p.parse_args()
    rows = json.loads(Path(a.rows).read_text())["rows"]
    out = []
    for rec in rows:
        r = {"id": rec["id"], "published": rec["published"], **verdict(rec)}
        r["agree"] = None if r["planner"] == "depends on lengths" else r["planner"] == rec["published"]
        out.append(r)
        print(f"{r['id']:44s} published {rec['published']:5s} planner {r['planner']:19s} peak at max "
              f"{r['peak_at_max_bytes'] / 2**30:7.1f} GiB, at min {r['peak_at_min_bytes'] / 2**30:6.1f} GiB "
              f"({r['peak_group']}/{r['peak_phase_at_max']})")
    decided = [r for r in out if r["agree"] is not None]
    agree = sum(r["agree"] for r in decided)
    print(f"agreement {agree}/{len(decided)} decided rows; {len(out) - len(decided)} of {len(out)} depend on the "
          f"actual lengths")
    t, cal = calibrated(rows)
    cal_agree = sum(r["agree"] for r in cal)
    for r in cal:
        print(f"  at fitted length {t}: {r['id']:44s} published {r['published']:5s} planner "
              f"{r['planner_at_fitted_length']}")
    print(f"with the packed length fitted on {CALIBRATION_ROWS[0]} / ...b101 ({t} tokens per sequence): "
          f"{cal_agree}/{len(cal)} other veRL rows agree")
    missing = missing_at_boundaries(rows, t) if t else []
    for m in missing:
        print(f"  {m['script']:40s} {m['gpus']} GPU(s), engine TP {m['engine_tp']}: the boundary needs "
              f"{m['missing_bytes_low'] / 1e9:+.1f} .. {m['missing_bytes_high'] / 1e9:+.1f} GB more per GPU; "
              f"engine weights {m['engine_weights_bytes'] / 1e9:.1f} GB per GPU, + one fp32 layer "
              f"{m['engine_weights_plus_fp32_layer_bytes'] / 1e9:.2f} GB "
              f"({'inside' if m['size_inside_window'] else 'outside'} the window)")
    details = {"rows": out, "decided": len(decided), "agree": agree, "fitted_length": t, "calibrated": cal,
               "calibrated_agree": cal_agree, "missing_at_boundaries": missing}
    write_result("memory_published", summary(details), details, path=Path(a.out))
    return 0


def summary(details: dict) -> list[dict]:
    """README rows: agreement with published fit/out-of-memory rows, decided as stated and at a fitted length."""
    n, cal, agree = len(details["rows"]), len(details["calibrated"]), details["calibrated_agree"]
    multi = [m for m in details.get("missing_at_boundaries", []) if m["gpus"] > 1]
    gaps = "; ".join(f"{m['script'].split('-', 1)[1]}: {m['missing_bytes_low'] / 1e9:.1f}-"
                     f"{m['missing_bytes_high'] / 1e9:.1f} GB (engine weights {m['engine_weights_bytes'] / 1e9:.1f}"
                     f", + one fp32 layer {m['engine_weights_plus_fp32_layer_bytes'] / 1e9:.2f})" for m in multi)
    inside = sum(bool(m.get("size_inside_window")) for m in multi)
    misses = [r for r in details["calibrated"] if not r["agree"]]
    kinds = {(r["published"], r["planner_at_fitted_length"]) for r in misses}
    return [row("published fit/OOM rows the planner agrees with", f"{agree}/{cal}", "", ">= 90%",
                agree >= 0.9 * cal,
                f"{n} rows collected; {details['agree']}/{details['decided']} decidable at their stated lengths; "
                f"the rest (veRL packs real tokens) at one fitted length of {details['fitted_length']} tokens per "
                "sequence; every fit agrees, "
                + ("every miss is an out-of-memory point of a multi-GPU script (vLLM TP > 1, Ulysses 2) called "
                   "fitting" if kinds == {("oom", "fits")} and all("1xH100" not in r["id"] for r in misses)
                   else f"{len(misses)} misses")
                + (f"; per GPU the planner lacks, at those boundaries, {gaps}: the vLLM weights at TP degree "
                   f"plus one fp32 decoder layer fall inside {inside} of {len(multi)} windows, but veRL 49b08e9 "
                   "sleeps vLLM (level 1) before training and FSDP1 measured on CPU ranks keeps no such copy "
                   "(memory_fsdp1_verl), so no source explains it and it is not modelled (see docs/memory.md)"
                   if gaps else ""))]

if __name__ == "__main__":
    sys.exit(main())
