"""Rollout speed: the runner's KV-cache sampling loop vs ``model.generate()`` on the same model and batch.

Both sample exactly ``NEW_TOKENS`` tokens per prompt (EOS disabled for the loop, ``min_new_tokens`` for
``generate``) at temperature 1 with the KV cache, fp32, batch ``BATCH`` of the built-in prompts, one torch
thread (the runner's default for the tiny model). Throughput = generated tokens per process-CPU second (the
target; stable on a shared machine) and per wall second, ``REPEATS`` calls per side, alternating, after one
warm-up call each. Model: the tiny GPT-2 (the default).

``python benchmarks/bench_sampling.py``
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import pairwise, row, spread, write_result  # noqa: E402

BATCH = 8
NEW_TOKENS = 32
REPEATS = 7
THREADS = 1
TARGET_RATIO = 1.5


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. With one thread CPU time is the work done, which other
    jobs on a shared machine barely disturb; wall time is what a user waits for on a quiet one."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    import torch

    from rlhf_core.tiny_model import tiny_model_path
    from rlhf_core.train.policy import load_causal_lm, load_tokenizer
    from rlhf_core.train.prompts import BUILTIN_PROMPTS
    from rlhf_core.train.sampling import generate

    torch.set_num_threads(THREADS)
    path = str(tiny_model_path())
    tok = load_tokenizer(path)
    model = load_causal_lm(path, "fp32", torch.device("cpu")).eval()
    enc = tok(list(BUILTIN_PROMPTS[:BATCH]), return_tensors="pt", padding=True)
    tokens = BATCH * NEW_TOKENS

    def ours() -> None:
        out = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=NEW_TOKENS, eos_token_id=-1,
                       pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
        assert out.response_mask.sum().item() == tokens

    def hf() -> None:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - enc.input_ids.shape[1] == NEW_TOKENS

    ours(), hf()
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    for _ in range(REPEATS):
        times["ours"].append(_timed(ours))
        times["hf"].append(_timed(hf))
    rows, details = [], {"batch": BATCH, "new_tokens": NEW_TOKENS, "threads": THREADS,
                         "load_avg_1m": os.getloadavg()[0]}
    for idx, clock in ((1, "CPU"), (0, "wall")):
        o = [tokens / t[idx] for t in times["ours"]]
        h = [tokens / t[idx] for t in times["hf"]]
        so, sh, (_, sr) = spread(o), spread(h), pairwise(o, h)
        unit = "tok/CPU-s" if clock == "CPU" else "tok/s"
        print(f"{clock}: ours {so['median']:.0f} {unit} [{so['min']:.0f}-{so['max']:.0f}], generate() "
              f"{sh['median']:.0f} [{sh['min']:.0f}-{sh['max']:.0f}], ratio {sr['median']:.2f} "
              f"[{sr['min']:.2f}-{sr['max']:.2f}]")
        rows += [
            row(f"KV-cache loop ({clock})", round(so["median"], 1), unit,
                notes=f"median of {REPEATS}, range {so['min']:.0f}-{so['max']:.0f}; "
                      f"batch {BATCH} x {NEW_TOKENS} tokens"),
            row(f"generate() ({clock})", round(sh["median"], 1), unit,
                notes=f"median of {REPEATS}, range {sh['min']:.0f}-{sh['max']:.0f}"),
            row(f"loop / generate() speed-up ({clock})", round(sr["median"], 2), "x",
                f">= {TARGET_RATIO}" if clock == "CPU" else "",
                sr["median"] >= TARGET_RATIO if clock == "CPU" else None,
                notes=f"pairwise, range {sr['min']:.2f}-{sr['max']:.2f}"),
        ]
        details[clock] = {"ours": so, "generate": sh, "ratio": sr}
    write_result("sampling", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
