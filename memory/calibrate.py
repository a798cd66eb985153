"""Fit the estimator's per-element constants to measured CPU peaks: ``python -m memory.calibrate``.

Runs :func:`memory.probe_step.measure_step` over ``CALIBRATION_GRID`` (fp32 GPT-2 shapes, plain and chunked
log-prob heads, with and without gradient checkpointing; none of them is in the benchmark grid, which checks
the fit on configurations it has not seen), then fits each phase's transient bytes (measured peak minus the
analytic weights, optimizer state and gradients) as a non-negative combination of
:func:`memory.estimator.features`, rows weighted by 1/peak so the fit minimises relative error. Writes
``memory/calibration.json`` with the coefficients, the grid and every measured row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .estimator import CALIBRATION_FILE, DEFAULT_CALIBRATION, ModelShape, StepSpec, _persistent, features, predict


def shape(layers: int, hidden: int, vocab: int, heads: int = 2, mlp: int = 4) -> ModelShape:
    return ModelShape(layers=layers, hidden=hidden, heads=heads, vocab_size=vocab, intermediate=mlp * hidden,
                      n_positions=256)


CALIBRATION_GRID: list[StepSpec] = [
    StepSpec(shape(2, 64, 2048), batch_size=4, prompt_len=16, gen_len=24),
    StepSpec(shape(3, 96, 4096, heads=3), batch_size=6, prompt_len=24, gen_len=24),
    StepSpec(shape(2, 128, 512, heads=4), batch_size=8, prompt_len=48, gen_len=32),
    StepSpec(shape(5, 64, 1024), batch_size=4, prompt_len=64, gen_len=32),
    StepSpec(shape(2, 192, 16384, heads=3), batch_size=2, prompt_len=16, gen_len=16),
    StepSpec(shape(4, 160, 3000, heads=4), batch_size=6, prompt_len=20, gen_len=20, train_batch_size=3),
    StepSpec(shape(2, 64, 32000), batch_size=6, prompt_len=16, gen_len=24, rollout_batch_size=3),
    StepSpec(shape(3, 128, 256, heads=4, mlp=2), batch_size=12, prompt_len=48, gen_len=24),
    StepSpec(shape(1, 256, 1024, heads=4), batch_size=16, prompt_len=64, gen_len=16),
    StepSpec(shape(2, 96, 8000, heads=3), batch_size=8, prompt_len=24, gen_len=24, logprob_impl="chunked"),
    StepSpec(shape(3, 64, 40000), batch_size=4, prompt_len=16, gen_len=32, logprob_impl="chunked"),
    StepSpec(shape(2, 128, 1024, heads=4), batch_size=12, prompt_len=64, gen_len=16, logprob_impl="chunked"),
    StepSpec(shape(4, 128, 1024, heads=4), batch_size=8, prompt_len=48, gen_len=24, gradient_checkpointing=True),
    StepSpec(shape(2, 96, 2048, heads=3), batch_size=6, prompt_len=64, gen_len=16, gradient_checkpointing=True),
    StepSpec(shape(6, 64, 512), batch_size=8, prompt_len=16, gen_len=32, gradient_checkpointing=True,
             logprob_impl="chunked"),
    StepSpec(shape(1, 192, 768, heads=3), batch_size=16, prompt_len=96, gen_len=16, gradient_checkpointing=True),
]


def measure_rows(specs: list[StepSpec], log=print) -> list[dict[str, Any]]:
    """One row per spec: measured peak and baseline per phase, and the seconds it took."""
    import torch

    from .probe_step import measure_step

    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast and immune to oversubscription
    rows = []
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        peaks = measure_step(spec, seed=i)
        row: dict[str, Any] = {"spec": spec.to_dict(), "seconds": time.perf_counter() - t0,
               "measured": {ph: r.peak_bytes for ph, r in peaks.items()},
               "baseline": {ph: r.baseline_bytes for ph, r in peaks.items()}}
        rows.append(row)
        log(f"[{i + 1}/{len(specs)}] {row['seconds']:.1f}s " + " ".join(
            f"{ph}={v / 2**20:.1f}MiB" for ph, v in row["measured"].items()))
    return rows


def spec_of(row: dict[str, Any]) -> StepSpec:
    d = dict(row["spec"])
    d["model"] = ModelShape(**d["model"])
    return StepSpec(**d)


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active-set elimination (small problems only)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def _fit(rows: list[tuple[dict[str, float], float, float]], names: list[str]) -> dict[str, float]:
    """rows: (feature bytes, transient bytes, weight); returns a coefficient for every feature seen."""
    used = [n for n in names if any(r[0].get(n, 0) for r in rows)]
    if not used:
        return {}
    x = np.array([[r[0].get(n, 0.0) * r[2] for n in used] for r in rows])
    y = np.array([r[1] * r[2] for r in rows])
    return dict(zip(used, map(float, _nnls(x, y))))


def _flat(feats: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v for terms in feats.values() for k, v in terms.items()}


# Terms whose size is known exactly, not fitted: the KV cache, the block inputs kept by checkpointing, the
# fp32 weight gradient of the chunked head, LoRA activations, and the no-grad head (logits + log-softmax, or
# one chunk's logits + exp: 2 fp32 tensors, measured exactly 2.00 at three shapes).
FIXED = {"gen_kv": 1.0, "ckpt_lh": 1.0, "vh_fp32": 1.0, "lora": 1.0, "score_logits": 2.0, "score_chunk": 2.0}


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    coef = dict(DEFAULT_CALIBRATION)
    coef.update({k: v for k, v in FIXED.items() if k in coef})
    free = [k for k in DEFAULT_CALIBRATION if k not in FIXED]
    data = []
    for row in rows:
        spec = spec_of(row)
        w, o, g, _ = _persistent(spec)
        data.append((spec, features(spec), row["measured"], w + o, g))

    def split(flat: dict[str, float]) -> tuple[dict[str, float], float]:
        return ({k: v for k, v in flat.items() if k not in FIXED},
                sum(v * FIXED[k] for k, v in flat.items() if k in FIXED))

    for _ in range(4):  # rollout: prefill or last decode step, whichever is larger: assign rows, refit
        rows_r = []
        for _, f, m, base, _ in data:
            decode, prefill = _flat(f["rollout"]), _flat(f["prefill"])
            which = decode if sum(_apply_flat(decode, coef).values()) >= sum(_apply_flat(prefill, coef).values()) \
                else prefill
            feats, known = split(which)
            rows_r.append((feats, m["rollout"] - base - known, 1.0 / m["rollout"]))
        coef.update(_fit(rows_r, free))
    for _ in range(4):  # scoring: kept hidden + max(one block's buffers, the head): assign rows, refit
        rows_s = []
        for _, f, m, base, _ in data:
            sc = f["scoring"]
            head = sum(v * FIXED[k] for k, v in sc["logits"].items())
            body = sum(v * coef[k] for k, v in sc["body"].items())
            feats = dict(sc["activations"])
            if body > head:
                feats.update(sc["body"])
                rows_s.append((feats, m["scoring"] - base, 1.0 / m["scoring"]))
            else:
                rows_s.append((feats, m["scoring"] - base - head, 1.0 / m["scoring"]))
        coef.update(_fit(rows_s, free))
    plain = [d for d in data if not d[0].gradient_checkpointing]
    for _ in range(4):  # the update peaks at backward start or at the optimizer step: assign rows, refit
        bwd_rows: list[tuple[Any, ...]] = []
        step_rows: list[tuple[Any, ...]] = []
        for spec, f, m, base, grads in plain:
            step = base + grads + coef["step_largest"] * f["step"]["activations"]["step_largest"]
            bwd = base + sum(_apply_flat(_flat(f["update"]), coef).values())
            (step_rows if step > bwd else bwd_rows).append((spec, f, m, base, grads))
        if bwd_rows:
            rows_b = []
            for _, f, m, base, _ in bwd_rows:
                feats, known = split(_flat(f["update"]))
                rows_b.append((feats, m["update"] - base - known, 1.0 / m["update"]))
            coef.update(_fit(rows_b, free))
        if step_rows:
            coef.update(_fit([({"step_largest": f["step"]["activations"]["step_largest"]},
                               m["update"] - base - grads, 1.0 / m["update"]) for _, f, m, base, grads in step_rows],
                             ["step_largest"]))
    ckpt = [row for row, d in zip(rows, data) if d[0].gradient_checkpointing]
    if ckpt:  # one coefficient, a max() inside the prediction: pick it by the smallest worst error
        def worst(c: float) -> float:
            trial = dict(coef, ckpt_block=c)
            return max(abs(e["phases"]["update"]["rel_err"]) for e in errors(ckpt, trial))
        coef["ckpt_block"] = min((0.25 * k for k in range(1, 25)), key=worst)
    return coef


def _apply_flat(flat: dict[str, float], coef: dict[str, float]) -> dict[str, float]:
    return {k: v * coef.get(k, 1.0) for k, v in flat.items()}


def errors(rows: list[dict[str, Any]], coef: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Per row and phase: predicted, measured, relative error; plus the step peak."""
    out = []
    for row in rows:
        pred = predict(spec_of(row), coef)
        per = {ph: {"predicted": pred.phases[ph]["total"], "measured": row["measured"][ph],
                    "rel_err": pred.phases[ph]["total"] / row["measured"][ph] - 1} for ph in row["measured"]}
        meas_peak = max(row["measured"].values())
        out.append({"phases": per, "predicted_peak": pred.peak_bytes, "measured_peak": meas_peak,
                    "peak_rel_err": pred.peak_bytes / meas_peak - 1, "peak_phase": pred.peak_phase})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memory.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(CALIBRATION_FILE))
    ap.add_argument("--dry_run", action="store_true", help="measure and print the fit; write nothing")
    ap.add_argument("--refit", action="store_true", help="refit the rows stored in --out instead of measuring")
    args = ap.parse_args(argv)
    if args.refit:
        rows = json.loads(Path(args.out).read_text())["rows"]
    else:
        rows = measure_rows(CALIBRATION_GRID)
    coef = fit(rows)
    errs = errors(rows, coef)
    for e in errs:
        print(" ".join(f"{ph}:{v['rel_err']:+.1%}" for ph, v in e["phases"].items()), f"peak:{e['peak_rel_err']:+.1%}")
    worst = max(abs(v["rel_err"]) for e in errs for v in e["phases"].values())
    print(f"coefficients: {json.dumps({k: round(v, 3) for k, v in coef.items()})}")
    print(f"worst phase error on the calibration grid: {worst:.1%}")
    if not args.dry_run:
        payload = {"coefficients": coef, "fitted_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "method": "NNLS on measured CPU peaks (memory.measure, torch.profiler) of memory.probe_step, fp32",
                   "worst_phase_rel_err": worst, "rows": rows}
        with open(args.out, "w") as fh:
            json.dump(payload, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
