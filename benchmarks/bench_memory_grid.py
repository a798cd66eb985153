"""Predicted against measured peak memory of a PPO step over a grid of GPT-2 shapes (issue 5).

Each configuration is a real step (memory.probe_step: generate with KV cache, score, one PPO update with
AdamW) measured per phase with memory.measure (CPU: torch.profiler allocation events + declared baseline;
CUDA: max_memory_allocated). None of these shapes is in the calibration grid (memory/calibrate.py). For
comparison, accelerate's weights-only rule (16 bytes per trained parameter, 4 per frozen one) on the same grid.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, spread, write_result
from memory.calibrate import measure_rows, shape
from memory.estimator import StepSpec, accelerate_rule, predict

GRID = [
    StepSpec(shape(2, 64, 1024), batch_size=4, prompt_len=16, gen_len=16),
    StepSpec(shape(2, 64, 50257), batch_size=4, prompt_len=16, gen_len=16),
    StepSpec(shape(4, 128, 8192, heads=4), batch_size=8, prompt_len=16, gen_len=32),
    StepSpec(shape(2, 256, 4096, heads=4), batch_size=4, prompt_len=32, gen_len=16),
    StepSpec(shape(6, 64, 2048), batch_size=8, prompt_len=16, gen_len=24),
    StepSpec(shape(3, 192, 16000, heads=3), batch_size=2, prompt_len=16, gen_len=32),
    StepSpec(shape(2, 96, 32000, heads=3), batch_size=8, prompt_len=16, gen_len=16, logprob_impl="chunked"),
    StepSpec(shape(4, 64, 512), batch_size=16, prompt_len=32, gen_len=16),
    StepSpec(shape(1, 320, 1024, heads=5), batch_size=8, prompt_len=48, gen_len=16),
    StepSpec(shape(2, 128, 50257, heads=4), batch_size=2, prompt_len=16, gen_len=48, logprob_impl="chunked"),
    StepSpec(shape(3, 128, 4096, heads=4), batch_size=8, prompt_len=32, gen_len=24, gradient_checkpointing=True),
    StepSpec(shape(2, 160, 12000, heads=4), batch_size=6, prompt_len=16, gen_len=20, rollout_batch_size=3,
             train_batch_size=3),
    StepSpec(shape(2, 64, 50257), batch_size=8, prompt_len=16, gen_len=32),
    # peaks outside the update: scoring (big batch, plain head, micro-batch 1) and rollout (deep, long KV cache)
    StepSpec(shape(2, 64, 32000), batch_size=16, prompt_len=16, gen_len=32, train_batch_size=1),
    StepSpec(shape(12, 64, 512), batch_size=24, prompt_len=32, gen_len=64, train_batch_size=1,
             logprob_impl="chunked"),
    # bf16 (not in the calibration, which is fp32 only)
    StepSpec(shape(3, 128, 2048, heads=4), batch_size=8, prompt_len=16, gen_len=32, dtype="bf16"),
    StepSpec(shape(2, 96, 30000, heads=3), batch_size=4, prompt_len=16, gen_len=24, dtype="bf16",
             logprob_impl="chunked"),
]
TARGET = 0.10


def label(spec: StepSpec) -> str:
    m = spec.model
    extra = [k for k, on in (("ckpt", spec.gradient_checkpointing), (spec.logprob_impl, spec.logprob_impl != "torch"),
                             (spec.dtype, spec.dtype != "fp32")) if on]
    return (f"L{m.layers} h{m.hidden} V{m.vocab_size} b{spec.batch_size}/{spec.rollout_batch_size}/"
            f"{spec.train_batch_size} p{spec.prompt_len} g{spec.gen_len}" + (f" {'+'.join(extra)}" if extra else ""))


def main() -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = [s.with_(device=device) for s in GRID]
    t0, c0 = time.perf_counter(), time.process_time()
    measured = measure_rows(grid)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    configs, errs, acc_errs, phase_errs, phase_hits = [], [], [], [], 0
    for spec, meas in zip(grid, measured):
        pred = predict(spec)
        peak = max(meas["measured"].values())
        err = pred.peak_bytes / peak - 1
        acc = accelerate_rule(spec)
        per_phase = {ph: pred.phases[ph]["total"] / v - 1 for ph, v in meas["measured"].items()}
        errs.append(err)
        phase_hits += pred.peak_phase == max(meas["measured"], key=meas["measured"].get)
        acc_errs.append(acc / peak - 1)
        phase_errs.extend(per_phase.values())
        configs.append({"config": label(spec), "predicted_peak": pred.peak_bytes, "measured_peak": peak,
                        "peak_rel_err": err, "predicted_phase": pred.peak_phase,
                        "measured_phase": max(meas["measured"], key=meas["measured"].get),
                        "accelerate_rule": acc, "accelerate_rel_err": acc / peak - 1,
                        "phase_rel_err": per_phase, "measured": meas["measured"],
                        "predicted": {ph: pred.phases[ph]["total"] for ph in meas["measured"]},
                        "seconds": meas["seconds"]})
        print(f"{label(spec):<48} pred {pred.peak_bytes / 2**20:8.1f} MiB  meas {peak / 2**20:8.1f} MiB  "
              f"err {err:+6.1%}  accelerate {acc / 2**20:8.1f} MiB ({acc / peak - 1:+6.1%})")
    worst = max(errs, key=abs)
    worst_acc = max(acc_errs, key=abs)
    abs_errs = [abs(e) for e in errs]
    rows = [
        row("peak error, worst of grid", round(100 * worst, 2), "%", "within ±10% on every config",
            all(abs(e) <= TARGET for e in errs), f"{len(grid)} configs on {device}; none in the calibration grid"),
        row("peak abs. error, median", round(100 * statistics.median(abs_errs), 2), "%", "", None,
            f"spread of abs. error: min {100 * min(abs_errs):.1f}%, max {100 * max(abs_errs):.1f}%"),
        row("phase abs. error, worst (rollout/scoring/update)", round(100 * max(map(abs, phase_errs)), 2), "%", "",
            None, "every phase of every config"),
        row("peak phase named correctly", phase_hits, f"of {len(grid)}", "", phase_hits == len(grid),
            "predicted peak phase = measured peak phase"),
        row("accelerate weights-only rule, worst error", round(100 * worst_acc, 2), "%", "comparison", None,
            "16 B per trained param + 4 B per frozen one; no activations, logits or KV cache"),
        row("grid measurement time", round(wall, 1), "s", "< 240 s", wall < 240,
            f"CPU time {cpu:.1f} s; wall time depends on the machine's load"),
    ]
    details = {"device": device, "configs": configs, "peak_rel_err": spread(errs),
               "accelerate_rel_err": spread(acc_errs), "method": measured and "see memory/measure.py",
               "calibration": "memory/calibration.json (separate grid)"}
    write_result("memory_grid", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
