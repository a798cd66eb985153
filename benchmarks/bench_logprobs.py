"""Peak memory and time of the log-prob step (head matmul, log-softmax, gather, entropy; forward + backward).

At GPT-2's vocabulary (50257) the plain path holds several b·s·V fp32 tensors; the chunked path (and the
Triton kernel on CUDA) hold a chunk at a time. Memory is measured with memory.measure (CPU: profiler
allocation events; CUDA: max_memory_allocated); results are checked equal to the plain path.
"""
from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, spread, write_result

B, S, H, V = 4, 128, 256, 50257
REPEATS = 5


def main() -> int:
    import torch

    from memory.logprobs import token_logprobs
    from memory.measure import measure_peak

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["torch", "chunked"] + (["triton"] if device == "cuda" else [])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.05).to(device).requires_grad_()
    targets = torch.randint(0, V, (B, S), generator=g).to(device)

    def step(impl):
        logp, ent = token_logprobs(hidden, weight, targets, impl=impl)
        (logp.sum() + 0.01 * ent.sum()).backward()
        return logp.detach(), ent.detach()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results, outputs = {}, {}
    for impl in impls:
        hidden.grad = weight.grad = None
        outputs[impl], peak = measure_peak(partial(step, impl), device)
        grads = (hidden.grad.clone(), weight.grad.clone())
        times = []
        for _ in range(REPEATS):
            hidden.grad = weight.grad = None
            sync()
            t0 = time.perf_counter()
            step(impl)
            sync()
            times.append(time.perf_counter() - t0)
        results[impl] = {"delta_peak_bytes": peak.delta_peak_bytes, "seconds": spread(times), "grads": grads,
                         "method": peak.method}
        print(f"{impl:>8}: peak +{peak.delta_peak_bytes / 2**20:8.1f} MiB  time median {spread(times)['median']:.3f} s")
    ref_logp, ref_ent = outputs["torch"]
    rows, details = [], {"shape": {"b": B, "s": S, "h": H, "V": V}, "device": device, "repeats": REPEATS}
    plain = results["torch"]["delta_peak_bytes"]
    for impl in impls:
        r = results[impl]
        logp, ent = outputs[impl]
        same = (torch.allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
                and torch.allclose(ent, ref_ent, rtol=1e-5, atol=1e-4)
                and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                        for a, b in zip(r["grads"], results["torch"]["grads"])))
        details[impl] = {"delta_peak_bytes": r["delta_peak_bytes"], "seconds": r["seconds"], "equal_to_plain": same,
                         "method": r["method"]}
        rows.append(row(f"{impl}: peak memory of the log-prob step", round(r["delta_peak_bytes"] / 2**20, 1), "MiB",
                        "", None, f"b={B} s={S} h={H} V={V}, fwd+bwd with entropy, {device}"))
        rows.append(row(f"{impl}: time of the log-prob step (median of {REPEATS})", round(r["seconds"]["median"], 4),
                        "s", "", None, f"min {r['seconds']['min']:.4f} max {r['seconds']['max']:.4f}; 1 thread; "
                        "shared machine, noisy"))
        if impl != "torch":
            ratio = plain / max(1, r["delta_peak_bytes"])
            rows.append(row(f"{impl}: peak reduction vs plain", round(ratio, 2), "x", ">= 4x, equal results",
                            ratio >= 4 and same, f"results equal to the plain path: {same}"))
    if device == "cpu":
        details["cuda"] = "no CUDA device: Triton speed and GPU memory not measured on this machine"
    write_result("logprobs", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
