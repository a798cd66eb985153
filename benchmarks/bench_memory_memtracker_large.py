"""Planner vs torch's MemTracker at the sizes of veRL's multi-GPU LoRA scripts: level and per-token slope.

    python benchmarks/bench_memory_memtracker_large.py [--out benchmarks/results/memory_memtracker_large.json]

Why: at one packed length veRL's LoRA scripts (memory/published.json, family verl-lora) run out of memory earlier
than the planner predicts, by more the larger the model (bench_memory_published.py). One explanation would be a
per-token activation cost of the large models that the planner under-counts. This measures it where the model
is the whole story: the HF model itself (LoRA r=32 on every projection, gradient checkpointing, bf16) in one
process under FakeTensorMode, at two micro-batches, so that the slope between them is the update's bytes per
token. Same measurement and planner layout as bench_memory_memtracker.py (memory/memtrack.py); each
configuration in its own subprocess, one at a time (6-8 minutes each at 14B, about 20 at 72B, on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_memory_memtracker import measure_one, planned  # noqa: E402
from benchmarks.common import measure_isolated, row, write_result  # noqa: E402

LORA, SEQ = 32, 2048
# model, micro-batches measured (the slope is taken between the two)
CONFIGS = [("Qwen2.5-14B", (2, 4)), ("Qwen2.5-72B", (2, 4))]
RUNS = [(model, b) for model, bs in CONFIGS for b in bs]
PHASES = ("scoring", "update")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_memtracker_large.json"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        import json

        model, b = RUNS[a.one]
        print(json.dumps(measure_one(model, b, SEQ, True, LORA, "flash")))
        return 0
    measured: dict[tuple[str, int], dict] = {}
    for k, (model, b) in enumerate(RUNS):
        try:
            measured[model, b] = measure_isolated(__file__, k)
        except RuntimeError as err:
            print(f"{model} b{b}: {err}", file=sys.stderr)
            return 1
        print(f"measured {model} lora{LORA} ckpt b{b} s{SEQ} in {measured[model, b]['seconds']:.0f} s",
              file=sys.stderr, flush=True)
    rows = []
    for model, (b1, b2) in CONFIGS:
        m1, m2 = measured[model, b1]["peaks"], measured[model, b2]["peaks"]
        p1, p2 = (planned(model, b, SEQ, True, LORA, "flash") for b in (b1, b2))
        tokens = (b2 - b1) * SEQ
        out = {"model": model, "lora_rank": LORA, "seq": SEQ, "batches": [b1, b2], "measured": [m1, m2],
               "predicted": [p1, p2], "seconds": [measured[model, b]["seconds"] for b in (b1, b2)]}
        for ph in PHASES:
            ms, ps = (m2[ph] - m1[ph]) / tokens, (p2[ph] - p1[ph]) / tokens
            out[f"{ph}_slope_bytes_per_token"] = {"measured": ms, "predicted": ps, "error": ps / ms - 1}
            out[f"{ph}_level_error"] = [p1[ph] / m1[ph] - 1, p2[ph] / m2[ph] - 1]
        rows.append(out)
        print(f"{model:12s} " + "  ".join(
            f"{ph}: per token {out[f'{ph}_slope_bytes_per_token']['measured'] / 1e6:.3f} MB measured, "
            f"{out[f'{ph}_slope_bytes_per_token']['predicted'] / 1e6:.3f} planned "
            f"({out[f'{ph}_slope_bytes_per_token']['error']:+.1%}); level "
            + "/".join(f"{e:+.1%}" for e in out[f"{ph}_level_error"]) for ph in PHASES))
    worst = max(abs(r[f"{ph}_slope_bytes_per_token"]["error"]) for r in rows for ph in PHASES)
    level = max(abs(e) for r in rows for ph in PHASES for e in r[f"{ph}_level_error"])
    summary = [row("planner vs MemTracker at 14B/72B LoRA + checkpointing: per-token slope, worst abs. error",
                   round(100 * worst, 2), "%", "within ±10%", worst <= 0.10,
                   f"{', '.join(m for m, _ in CONFIGS)}: scoring and update bytes per token between micro-batches "
                   f"{CONFIGS[0][1][0]} and {CONFIGS[0][1][1]} x {SEQ} tokens; peaks within {100 * level:.2f}%")]
    write_result("memory_memtracker_large", summary, {"rows": rows}, path=Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
