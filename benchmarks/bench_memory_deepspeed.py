"""Planner's per-GPU model states vs DeepSpeed's own estimators, ZeRO-2/3 at 8 and 64 GPUs.

    python benchmarks/bench_memory_deepspeed.py [--out benchmarks/results/memory_deepspeed.json]

DeepSpeed's numbers come from its functions (``deepspeed.runtime.zero.stage_1_and_2.
estimate_zero2_model_states_mem_needs`` and ``stage3.estimate_zero3_model_states_mem_needs``, the functions
its ``*_all_live`` estimators print from), fed with total and largest-layer parameters counted by DeepSpeed's
``model_to_params`` rule on the model built on the meta device (see ``ds_counts``). The planner's number is the
sum of its model-state terms that the estimator counts (memory.deploy.deepspeed_terms) for a bf16
mixed-precision AdamW actor; the ZeRO-3 16-bit weight partition, which stage3.py keeps but the no-offload
formula has no term for, is reported per row as ``not_in_estimator_bytes`` (the plan's total includes it).
One difference remains by design: with ZeRO-3 and no offload the estimator counts a whole fp32 gradient
partition (4 B/param/GPU) while stage3.py builds it one optimizer sub-group (``sub_group_size``, 1e9
elements) at a time; ``explained_bytes`` is the estimator with that term per sub-group. Needs ``pip install
deepspeed`` (not a test dependency).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import row, write_result  # noqa: E402

MODELS = ["Qwen2.5-0.5B", "Qwen2.5-7B", "Llama-3-8B", "Mistral-7B", "Gemma-2-9B", "Llama-3-70B", "Qwen2.5-72B"]
LAYOUTS = [(1, 8), (8, 8)]  # (nodes, GPUs per node): 8 and 64 GPUs


def ds_counts(name: str) -> tuple[int, int]:
    """DeepSpeed's ``model_to_params`` rule (distinct parameters; largest sum of one module's own parameters)
    on the meta-device model. Its dedupe key is ``data_ptr()``, which is 0 for every meta tensor, so the same
    rule is applied here keyed by the parameter object instead."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memory.arch import builtin_config

    cfg = builtin_config(name)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_deepspeed.json"))
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.disable(logging.WARNING)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from memory.arch import load_arch
    from memory.deploy import Role, Sharding, deepspeed_terms

    rows = []
    for name in MODELS:
        total, largest_layer = ds_counts(name)
        arch = load_arch(name)
        role = Role("actor", arch, trained=True)
        for nodes, gpn in LAYOUTS:
            n = nodes * gpn
            cases = [("zero2", False, False, estimate_zero2_model_states_mem_needs(
                          total, gpn, nodes, cpu_offload=False)[1]),
                     ("zero2", True, False, estimate_zero2_model_states_mem_needs(
                         total, gpn, nodes, cpu_offload=True)[1]),
                     ("zero3", False, False, estimate_zero3_model_states_mem_needs(
                         total, largest_layer, gpn, nodes, cpu_offload=False, cpu_offload_params=False)[1]),
                     ("zero3", True, False, estimate_zero3_model_states_mem_needs(
                         total, largest_layer, gpn, nodes, cpu_offload=True, cpu_offload_params=False)[1]),
                     ("zero3", True, True, estimate_zero3_model_states_mem_needs(
                         total, largest_layer, gpn, nodes, cpu_offload=True, cpu_offload_params=True)[1])]
            for kind, off_opt, off_par, ds in cases:
                sharding = Sharding(kind, offload_optimizer=off_opt, offload_params=off_par)
                terms = deepspeed_terms(role, sharding, n)
                ours = sum(b for b, counted in terms.values() if counted)
                outside = sum(b for b, counted in terms.values() if not counted)
                explained = ds
                if kind == "zero3" and not off_opt:
                    # stage3.py: _prepare_fp32_grad_for_sub_group makes the fp32 gradient of one sub-group,
                    # _release_sub_group frees it before the next; the estimator counts all of them at once
                    explained = ds - 4 * total // n + 4 * min(total // n, sharding.sub_group_size)
                rows.append({"explained_bytes": int(explained), "model": name, "params": arch.params,
                             "ds_total_params": total, "ds_largest_layer_params": largest_layer, "gpus": n,
                             "stage": kind,
                             "offload_optimizer": off_opt, "offload_params": off_par, "deepspeed_bytes": int(ds),
                             "planner_bytes": int(ours), "not_in_estimator_bytes": int(outside),
                             "planner_terms": {k: b for k, (b, _) in terms.items()}, "error": ours / ds - 1})
                r = rows[-1]
                print(f"{name:13s} {n:3d} GPUs {kind} off_opt={int(off_opt)} off_par={int(off_par)}  DeepSpeed "
                      f"{ds / 2**30:8.2f} GiB  planner {ours / 2**30:8.2f} GiB  {r['error']:+.2%}")
    worst = max(abs(r["error"]) for r in rows)
    within = sum(abs(r["error"]) <= 0.05 for r in rows)
    unexplained = max(abs(r["planner_bytes"] / r["explained_bytes"] - 1) for r in rows)
    print(f"worst |error| {worst:.3%} over {len(rows)} rows; within 5%: {within}/{len(rows)}; after the "
          f"documented ZeRO-3 difference (fp32 gradients per sub-group): worst {unexplained:.3%}")
    details = {"rows": rows, "worst_abs_error": worst, "within_5pct": within,
               "worst_after_documented_differences": unexplained}
    write_result("memory_deepspeed", summary(details), details, path=Path(a.out))
    return 0


def summary(details: dict) -> list[dict]:
    """README rows: how many ZeRO-2/3 rows sit within 5% of DeepSpeed's estimators, and what explains the rest."""
    rows = details["rows"]
    n, within = len(rows), details["within_5pct"]
    misses = ", ".join(f"{r['model']} {r['stage']} {r['gpus']} GPUs ({100 * r['error']:+.1f}%)"
                       for r in rows if abs(r["error"]) > 0.05)
    return [row("planner vs DeepSpeed's ZeRO-2/3 model-state estimators, rows within ±5%", f"{within}/{n}", "",
                "all within ±5%", within == n,
                "compared over the terms the estimator counts (the ZeRO-3 16-bit weight partition, which "
                "stage3.py keeps and the formula omits, is a separate plan component); "
                + (f"outside: {misses}: the estimator counts a whole fp32 gradient partition where stage3.py "
                   "builds one 1e9-element sub-group at a time (measured on DeepSpeed's own ZeRO-3 optimizer: "
                   "one sub-group's fp32 gradient alive at a time, memory_ds_stage3); with that term per sub-group, "
                   f"worst {100 * details['worst_after_documented_differences']:.1f}%" if misses else "none outside"))]


if __name__ == "__main__":
    sys.exit(main())
