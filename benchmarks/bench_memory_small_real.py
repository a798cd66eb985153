"""Planner vs real tensors on the CPU: small configs of five families, all four phases of one GPU's step.

    python benchmarks/bench_memory_small_real.py [--out benchmarks/results/memory_small_real.json]

Each configuration is a built-in model's shape shrunk to two layers and a 8192-token vocabulary (its family's
structure kept: grouped KV heads, gated MLP, tied embeddings, Qwen2's q/k/v biases, Gemma-2's extra norms and
soft-capping, OPT's LayerNorms and learned positions). ``memory.memtrack.measure_real`` runs generation (HF
``generate`` with its KV cache), scoring, update and the optimizer step on real tensors with real CPU kernels and
measures each phase by replaying the allocator's own events from ``torch.profiler`` (``memory.measure``): a second
instrument beside MemTracker's fake-tensor accounting, and the only measurement of the generation phase. The
planner's number is the single-GPU (ZeRO-0) HF-generate layout with the same shape, dtype, lengths,
checkpointing and LoRA. One fresh process per configuration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import measure_each, row, write_result  # noqa: E402

SHRINK = {"num_hidden_layers": 2, "hidden_size": 256, "vocab_size": 8192, "max_position_embeddings": 2048}
SMALL: dict[str, dict[str, Any]] = {  # the built-in shape each one shrinks, and the shrunk config
    "Llama-3-8B": {**SHRINK, "model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2,
                   "intermediate_size": 896, "tie_word_embeddings": False},
    "Qwen2.5-0.5B": {**SHRINK, "model_type": "qwen2", "num_attention_heads": 8, "num_key_value_heads": 2,
                     "intermediate_size": 1024, "tie_word_embeddings": True},
    "Mistral-7B": {**SHRINK, "model_type": "mistral", "num_attention_heads": 8, "num_key_value_heads": 2,
                   "intermediate_size": 896, "tie_word_embeddings": False},
    "Gemma-2-9B": {**SHRINK, "model_type": "gemma2", "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 64, "intermediate_size": 1024, "sliding_window": 4096},
    "opt-1.3b": {**SHRINK, "model_type": "opt", "num_attention_heads": 8, "ffn_dim": 1024,
                 "word_embed_proj_dim": 256, "do_layer_norm_before": True},
    "gpt2": {**SHRINK, "model_type": "gpt2", "num_attention_heads": 8, "bos_token_id": 0, "eos_token_id": 0},
}
# name, shrunk shape, dtype, attention, sequences, prompt, response, checkpointing, LoRA rank
CONFIGS = [
    ("llama bf16 flash full", "Llama-3-8B", "bf16", "flash", 4, 256, 256, False, 0),
    ("llama bf16 flash lora16 ckpt", "Llama-3-8B", "bf16", "flash", 4, 256, 256, True, 16),
    ("qwen2 bf16 flash full", "Qwen2.5-0.5B", "bf16", "flash", 4, 256, 256, False, 0),
    ("qwen2 fp32 flash full ckpt", "Qwen2.5-0.5B", "fp32", "flash", 4, 256, 256, True, 0),
    ("mistral bf16 sdpa full", "Mistral-7B", "bf16", "sdpa", 4, 128, 384, False, 0),
    ("gemma2 bf16 eager full", "Gemma-2-9B", "bf16", "eager", 4, 256, 256, False, 0),
    ("gemma2 bf16 eager lora16 ckpt", "Gemma-2-9B", "bf16", "eager", 8, 64, 192, True, 16),
    ("opt bf16 flash full", "opt-1.3b", "bf16", "flash", 4, 256, 256, False, 0),
    ("opt bf16 eager full ckpt", "opt-1.3b", "bf16", "eager", 8, 192, 64, True, 0),
    ("llama fp32 eager full", "Llama-3-8B", "fp32", "eager", 4, 128, 128, False, 0),
    ("gemma2 fp32 eager full", "Gemma-2-9B", "fp32", "eager", 4, 128, 128, False, 0),
    # held out in the first pass, then used to find the prefill's structure (allocation by allocation)
    ("qwen2 bf16 eager full", "Qwen2.5-0.5B", "bf16", "eager", 8, 128, 128, False, 0),
    ("llama bf16 flash lora8", "Llama-3-8B", "bf16", "flash", 16, 64, 64, False, 8),
    ("mistral bf16 eager lora16 ckpt", "Mistral-7B", "bf16", "eager", 2, 384, 128, True, 16),
    ("opt bf16 sdpa lora16", "opt-1.3b", "bf16", "sdpa", 6, 96, 160, False, 16),
    # held out: chosen before the prefill's structure was rewritten, measured once after it, and not tuned on
    ("held-out gemma2 bf16 eager full", "Gemma-2-9B", "bf16", "eager", 6, 160, 96, False, 0),
    ("held-out qwen2 fp32 flash lora8", "Qwen2.5-0.5B", "fp32", "flash", 8, 96, 64, False, 8),
    ("held-out llama bf16 eager full ckpt", "Llama-3-8B", "bf16", "eager", 4, 192, 64, True, 0),
    ("held-out mistral bf16 flash full", "Mistral-7B", "bf16", "flash", 12, 32, 224, False, 0),
    ("held-out opt fp32 flash lora16 ckpt", "opt-1.3b", "fp32", "flash", 6, 128, 64, True, 16),
    ("held-out gpt2 bf16 eager full", "gpt2", "bf16", "eager", 4, 256, 64, False, 0),
]
PHASES = ("generation", "scoring", "update", "optimizer_step")
TARGET = 0.05
# fp32 with eager attention: no deployment reader plans it (they compute in bf16/fp16) and the planner's eager
# terms count the probabilities' dtype copy that fp32 does not make; measured and reported, outside the target
OUTSIDE_TARGET = ("fp32 eager",)
# A CPU kernel's bytes the planner does not count, on one phase: generate's prefill applies the LM head to the last
# position only, a strided slice, and with a frozen head (LoRA) aten's matmul broadcasts the weight to a bmm,
# whose bf16 CPU kernel copies it once per sequence (fp32's does not; CUDA's bmm passes the broadcast operand's
# zero batch stride to the strided-batched GEMM, by PyTorch's source, not measured here).
# tests/test_memory_small_real.py pins the CPU kernel's behaviour.
CPU_ARTIFACT = {"generation": lambda r: r["dtype"] == "bf16" and r["lora_rank"] > 0}


def planned(shape: str, dtype: str, attn: str, batch: int, prompt: int, response: int, ckpt: bool,
            lora: int) -> dict[str, int]:
    """The measured step as the planner lays it out: one GPU, ZeRO-0, the model's dtype throughout, HF generate
    of every sequence of the micro-batch."""
    from memory.arch import arch_from_config
    from memory.deploy import Deployment, Engine, Role, Sharding, plan_deployment

    actor = Role("actor", arch_from_config(SMALL[shape], name=shape), trained=True, lora_rank=lora,
                 dtype_bytes=4 if dtype == "fp32" else 2)
    dep = Deployment(actor=actor, groups={"all": 1}, sharding=Sharding("zero0", mixed_precision=False),
                     engine=Engine("hf"), micro_batch=batch, prompt_len=prompt, response_len=response,
                     rollout_per_gpu=batch, gradient_checkpointing=ckpt, attn=attn, optimizer_impl="single_tensor")
    totals = plan_deployment(dep).groups[0].totals
    return {ph: totals[ph] for ph in PHASES}


def measure_one(shape: str, dtype: str, attn: str, batch: int, prompt: int, response: int, ckpt: bool,
                lora: int) -> dict:
    import torch

    from memory.memtrack import TrackSpec, measure_real

    torch.manual_seed(0)
    spec = TrackSpec(SMALL[shape], batch=batch, seq=prompt + response, gradient_checkpointing=ckpt,
                     lora_rank=lora, attn=attn, dtype=dtype)
    r = measure_real(spec, prompt)
    return {"peaks": r.peaks, "seconds": round(r.seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_small_real.json"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(measure_one(*CONFIGS[a.one][1:])))
        return 0
    rows = []
    try:
        for (name, *args), (_, meas) in zip(CONFIGS, measure_each(__file__, [c[0] for c in CONFIGS])):
            pred = planned(*args)
            rows.append({"name": name, "shape": args[0], "dtype": args[1], "attn": args[2], "batch": args[3],
                         "prompt": args[4], "response": args[5], "checkpointing": args[6], "lora_rank": args[7],
                         "measured": meas["peaks"], "predicted": pred,
                         "error": {ph: pred[ph] / meas["peaks"][ph] - 1 for ph in PHASES},
                         "in_target_set": not any(s in name for s in OUTSIDE_TARGET), "seconds": meas["seconds"]})
            rows[-1]["cpu_artifact_phases"] = [ph for ph, hit in CPU_ARTIFACT.items() if hit(rows[-1])]
            print(f"{name:30s} " + "  ".join(f"{ph} {rows[-1]['error'][ph]:+.1%}" for ph in PHASES), flush=True)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    write_result("memory_small_real", summary(rows), {"rows": rows}, path=Path(a.out))
    return 0


def summary(rows: list[dict]) -> list[dict]:
    """README row: the worst error over the configurations the planner claims (fp32 + eager reported apart)."""
    kept = [r for r in rows if r["in_target_set"]]

    def scored(r: dict) -> list[float]:
        return [abs(e) for ph, e in r["error"].items() if ph not in r["cpu_artifact_phases"]]

    errors = sorted(e for r in kept for e in scored(r))
    worst, median = errors[-1], errors[len(errors) // 2]
    worst_gen = max(abs(r["error"]["generation"]) for r in kept if "generation" not in r["cpu_artifact_phases"])
    held = [r for r in kept if r["name"].startswith("held-out")]
    worst_held = max(e for r in held for e in scored(r)) if held else float("nan")
    artifact = ", ".join(f"{r['name']} {r['error']['generation']:+.1%}" for r in rows if r["cpu_artifact_phases"])
    apart = "; ".join(f"{r['name']}: " + ", ".join(f"{ph} {r['error'][ph]:+.1%}" for ph in PHASES)
                      for r in rows if not r["in_target_set"])
    families = sorted({SMALL[r["shape"]]["model_type"] for r in kept})
    return [row("planner vs real CPU tensors (profiler replay), small configs, worst abs. error",
                round(100 * worst, 2), "%", f"within ±{TARGET:.0%}", worst <= TARGET,
                f"{len(kept)} configs of {len(families)} families ({', '.join(families)}) x 4 phases incl. "
                f"HF generate (worst {100 * worst_gen:.1f}%); median abs. error {100 * median:.2f}%; "
                f"{len(held)} held-out configs, worst {100 * worst_held:.1f}%; "
                f"outside the target, fp32 with eager attention: {apart}; bf16 LoRA generation, which holds the "
                f"CPU bf16 bmm's per-sequence copy of the frozen LM head: {artifact}")]


if __name__ == "__main__":
    sys.exit(main())
