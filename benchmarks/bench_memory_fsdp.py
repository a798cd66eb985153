"""Planner's FSDP per-GPU prediction vs torch's FSDPMemTracker on a fake process group, real-size models.

    python benchmarks/bench_memory_fsdp.py [--quick] [--replan] [--out benchmarks/results/memory_fsdp.json]

Each configuration is one rank of an N-GPU FSDP2 job (``fully_shard`` per decoder layer and on the root, fp32
sharded parameters computed in bf16, fp32 gradient reduction, single-tensor AdamW with fp32 states), built on
fake tensors and a ``fake`` process group and measured by
``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`` in three regions: scoring (no-grad forward to
fp32 log-probs), update (forward + backward of a policy-gradient loss) and the optimizer step
(memory.memtrack.measure_fsdp). The planner's number is the same step as a ``fsdp_full`` mixed-precision
deployment over N GPUs with fp32 stored weights (veRL's actor), ``optimizer_impl="single_tensor"``.

Rows marked ``shaped_model`` were measured while the FSDP terms of memory.deploy were being written (the
root unit stays gathered; a layer's gather, prefetch and fp32 reduce-scatter input live only during that
layer's backward, after the head's backward has freed part of its tensors; the start of the forward holds
the root's all-gather buffer twice; LoRA adapters are sharded in fp32; single-tensor AdamW steps per-parameter
shards): the Llama-3-8B LoRA-64 row exposed the adapter term, the Mistral and Qwen2.5-1.5B rows were seen
while the head-backward rule was chosen. The other rows were measured only with the final terms: the check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import measure_each, row, write_result  # noqa: E402

# name, built-in model, GPUs, micro-batch, sequence, checkpointing, LoRA rank, shaped the model
CONFIGS = [
    ("qwen2.5-0.5b full 8 GPUs b4 s1024", "Qwen2.5-0.5B", 8, 4, 1024, False, 0, True),
    ("qwen2.5-7b full ckpt 8 GPUs b2 s2048", "Qwen2.5-7B", 8, 2, 2048, True, 0, True),
    ("llama-3-8b full 8 GPUs b1 s1024", "Llama-3-8B", 8, 1, 1024, False, 0, True),
    ("llama-3-8b full ckpt 64 GPUs b2 s2048", "Llama-3-8B", 64, 2, 2048, True, 0, True),
    ("qwen2.5-7b lora16 ckpt 8 GPUs b2 s2048", "Qwen2.5-7B", 8, 2, 2048, True, 16, True),
    ("mistral-7b full ckpt 16 GPUs b4 s1024", "Mistral-7B", 16, 4, 1024, True, 0, True),
    ("qwen2.5-1.5b full 8 GPUs b8 s1024", "Qwen2.5-1.5B", 8, 8, 1024, False, 0, True),
    ("llama-3-8b lora64 ckpt 16 GPUs b4 s1024", "Llama-3-8B", 16, 4, 1024, True, 64, True),
    ("qwen2.5-3b full ckpt 4 GPUs b8 s1024", "Qwen2.5-3B", 4, 8, 1024, True, 0, False),
    ("qwen2.5-14b lora32 ckpt 2 GPUs b8 s1024", "Qwen2.5-14B", 2, 8, 1024, True, 32, False),
    ("qwen2.5-1.5b lora16 4 GPUs b4 s2048", "Qwen2.5-1.5B", 4, 4, 2048, False, 16, False),
    ("llama-3-8b full ckpt 32 GPUs b4 s4096", "Llama-3-8B", 32, 4, 4096, True, 0, False),
]
# Gemma-2 is not here: this transformers refuses SDPA for Gemma2ForCausalLM, and the planner's FSDP terms
# are family-independent (the root unit and decoder-layer units come from memory.arch's counts).
PHASES = ("scoring", "update", "optimizer_step")


def planned(model: str, gpus: int, batch: int, seq: int, ckpt: bool, lora: int) -> dict[str, int]:
    from memory.arch import load_arch
    from memory.deploy import Deployment, Engine, Role, Sharding, plan_deployment

    actor = Role("actor", load_arch(model), trained=True, lora_rank=lora, storage_bytes=4)
    dep = Deployment(actor=actor, groups={"all": gpus}, sharding=Sharding("fsdp_full", mixed_precision=True),
                     engine=Engine("hf"), micro_batch=batch, prompt_len=seq // 2, response_len=seq - seq // 2,
                     rollout_per_gpu=1, gradient_checkpointing=ckpt, attn="flash", optimizer_impl="single_tensor")
    t = plan_deployment(dep).groups[0].totals
    return {ph: t[ph] for ph in PHASES}


def measure_one(model: str, gpus: int, batch: int, seq: int, ckpt: bool, lora: int) -> dict:
    from memory.arch import builtin_config
    from memory.memtrack import TrackSpec, measure_fsdp

    spec = TrackSpec(builtin_config(model), batch=batch, seq=seq, gradient_checkpointing=ckpt, lora_rank=lora,
                     attn="flash")
    r = measure_fsdp(spec, gpus)
    return {"peaks": r.peaks, "seconds": round(r.seconds, 1), "max_rss_bytes": r.max_rss_bytes,
            "breakdown": r.breakdown}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_fsdp.json"))
    p.add_argument("--quick", action="store_true", help="first configuration only")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--replan", action="store_true",
                   help="keep the measurements in --out (they are deterministic) and recompute the planner's side")
    a = p.parse_args()
    if a.replan:
        rows = json.loads(Path(a.out).read_text())["details"]["rows"]
        for r in rows:
            r["predicted"] = planned(r["model"], r["gpus"], r["batch"], r["seq"], r["checkpointing"], r["lora_rank"])
            r["error"] = {ph: r["predicted"][ph] / r["measured"][ph] - 1 for ph in PHASES}
        return _report(rows, Path(a.out))
    if a.one is not None:
        print(json.dumps(measure_one(*CONFIGS[a.one][1:7])))
        return 0
    rows = []
    configs = CONFIGS[:1] if a.quick else CONFIGS
    try:
        for (name, *args), (_, meas) in zip(configs, measure_each(__file__, [c[0] for c in configs])):
            pred = planned(*args[:6])
            rows.append({"name": name, "model": args[0], "gpus": args[1], "batch": args[2], "seq": args[3],
                         "checkpointing": args[4], "lora_rank": args[5], "shaped_model": args[6],
                         "measured": meas["peaks"], "predicted": pred,
                         "error": {ph: pred[ph] / meas["peaks"][ph] - 1 for ph in PHASES},
                         "breakdown": meas["breakdown"], "seconds": meas["seconds"],
                         "max_rss_bytes": meas["max_rss_bytes"]})
            print(f"measured {name} in {meas['seconds']:.0f} s", file=sys.stderr, flush=True)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return _report(rows, Path(a.out))


def _report(rows: list[dict], out: Path) -> int:
    for r in rows:
        print(f"{r['name']:40s} " + "  ".join(
            f"{ph} {r['measured'][ph] / 2**30:6.2f} GiB pred {r['predicted'][ph] / 2**30:6.2f} ({r['error'][ph]:+.1%})"
            for ph in PHASES) + f"  [{r['seconds']:.0f} s, RSS {r['max_rss_bytes'] / 2**30:.2f} GiB]")
    worst = max(abs(e) for r in rows for e in r["error"].values())
    held = [abs(e) for r in rows if not r["shaped_model"] for e in r["error"].values()]
    print(f"worst |error| {worst:.1%} over {len(rows)} configurations x 3 phases"
          + (f"; held-out rows: worst {max(held):.1%}" if held else ""))
    details = {"rows": rows, "worst_abs_error": worst, "worst_abs_error_held_out": max(held) if held else None}
    write_result("memory_fsdp", summary(details), details, path=out)
    return 0


def summary(details: dict) -> list[dict]:
    """README row: the planner's FSDP per-GPU phases against FSDPMemTracker, worst over all and held-out rows."""
    rows, worst, held = details["rows"], details["worst_abs_error"], details["worst_abs_error_held_out"]
    return [row("planner vs FSDPMemTracker (fake process group, FSDP2), worst abs. error", round(100 * worst, 2), "%",
                "within ±10%", worst <= 0.10,
                f"{len(rows)} real-size configs (0.5B-14B, 2-64 GPUs, with/without checkpointing, LoRA) x 3 phases; "
                + (f"rows measured after the FSDP terms were written: worst {100 * held:.1f}%"
                   if held is not None else "no held-out rows"))]


if __name__ == "__main__":
    sys.exit(main())
