"""Planner vs torch's MemTracker (FakeTensorMode) for real-size models: scoring, update, optimizer step.

    python benchmarks/bench_memory_memtracker.py [--quick] [--out benchmarks/results/memory_memtracker.json]

Each configuration is measured in its own subprocess (a fresh allocator, and the RSS of one measurement),
one at a time. The planner's number for a phase is the single-GPU (ZeRO-0), pure-bf16, HF-generate layout
with the same model, batch, length, checkpointing and LoRA as the measured step (memory/memtrack.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import measure_each, row, write_result  # noqa: E402

# name, built-in model, micro-batch, sequence, checkpointing, LoRA rank, attention
CONFIGS = [
    ("qwen2.5-0.5b full b4 s1024", "Qwen2.5-0.5B", 4, 1024, False, 0, "flash"),
    ("qwen2.5-1.5b full ckpt b8 s1024", "Qwen2.5-1.5B", 8, 1024, True, 0, "flash"),
    ("qwen2.5-7b lora16 ckpt b2 s2048", "Qwen2.5-7B", 2, 2048, True, 16, "flash"),
    ("llama-3-8b full ckpt b1 s1024", "Llama-3-8B", 1, 1024, True, 0, "flash"),
    ("llama-3-8b lora16 b1 s2048", "Llama-3-8B", 1, 2048, False, 16, "flash"),
    ("mistral-7b lora64 ckpt b4 s1024", "Mistral-7B", 4, 1024, True, 64, "flash"),
    ("opt-1.3b full b4 s1024", "opt-1.3b", 4, 1024, False, 0, "flash"),
    ("gpt2-large full eager b4 s1024", "gpt2-large", 4, 1024, False, 0, "eager"),
]


def planned(model: str, batch: int, seq: int, ckpt: bool, lora: int, attn: str,
            sequence_parallel: int = 1) -> dict[str, int]:
    """The measured step as the planner lays it out: one GPU, ZeRO-0, pure bf16 (``sequence_parallel`` GPUs
    sharing the micro-batch's tokens, Ulysses)."""
    from memory.arch import load_arch
    from memory.deploy import Deployment, Engine, Role, Sharding, plan_deployment

    arch = load_arch(model)
    actor = Role("actor", arch, trained=True, lora_rank=lora)
    dep = Deployment(actor=actor, groups={"all": sequence_parallel}, sharding=Sharding("zero0", mixed_precision=False),
                     engine=Engine("hf"), micro_batch=batch, prompt_len=seq // 2, response_len=seq - seq // 2,
                     rollout_per_gpu=1, gradient_checkpointing=ckpt, attn=attn, optimizer_impl="single_tensor",
                     sequence_parallel=sequence_parallel)
    t = plan_deployment(dep).groups[0].totals
    return {"scoring": t["scoring"], "update": t["update"], "optimizer_step": t["optimizer_step"]}


def measure_one(model: str, batch: int, seq: int, ckpt: bool, lora: int, attn: str) -> dict:
    from memory.arch import builtin_config
    from memory.memtrack import TrackSpec, measure

    cfg = builtin_config(model)
    spec = TrackSpec(cfg, batch=batch, seq=seq, gradient_checkpointing=ckpt, lora_rank=lora,
                     attn=attn)
    r = measure(spec)
    return {"peaks": r.peaks, "seconds": round(r.seconds, 1), "max_rss_bytes": r.max_rss_bytes,
            "breakdown": r.breakdown}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_memtracker.json"))
    p.add_argument("--quick", action="store_true", help="first two configurations only")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--replan", action="store_true",
                   help="keep the measurements in --out (they are deterministic) and recompute the planner's side")
    a = p.parse_args()
    if a.replan:
        data = json.loads(Path(a.out).read_text())
        for r in data["details"]["rows"]:
            r["predicted"] = planned(r["model"], r["batch"], r["seq"], r["checkpointing"], r["lora_rank"], r["attn"])
            r["error"] = {ph: r["predicted"][ph] / r["measured"][ph] - 1 for ph in r["predicted"]}
        return _report(data["details"]["rows"], Path(a.out))
    if a.one is not None:
        print(json.dumps(measure_one(*CONFIGS[a.one][1:])))
        return 0
    rows = []
    configs = CONFIGS[:2] if a.quick else CONFIGS
    try:
        for (name, *args), (_, meas) in zip(configs, measure_each(__file__, [c[0] for c in configs])):
            pred = planned(*args)
            err = {ph: pred[ph] / meas["peaks"][ph] - 1 for ph in pred}
            rows.append({"name": name, "model": args[0], "batch": args[1], "seq": args[2],
                         "checkpointing": args[3], "lora_rank": args[4], "attn": args[5], "measured": meas["peaks"],
                         "predicted": pred, "error": err, "seconds": meas["seconds"],
                         "max_rss_bytes": meas["max_rss_bytes"]})
            print(f"measured {name} in {meas['seconds']:.0f} s", file=sys.stderr, flush=True)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return _report(rows, Path(a.out))


def _report(rows: list[dict], out: Path) -> int:
    for r in rows:
        print(f"{r['name']:36s} " + "  ".join(
            f"{ph} {r['measured'][ph] / 2**30:6.2f} GiB pred {r['predicted'][ph] / 2**30:6.2f} ({r['error'][ph]:+.1%})"
            for ph in r["predicted"]) + f"  [{r['seconds']:.0f} s, RSS {r['max_rss_bytes'] / 2**30:.2f} GiB]")
    worst = max(abs(e) for r in rows for e in r["error"].values())
    print(f"worst |error| {worst:.1%} over {len(rows)} configurations x 3 phases")
    write_result("memory_memtracker", summary(rows), {"rows": rows, "worst_abs_error": worst}, path=out)
    return 0


def summary(rows: list[dict]) -> list[dict]:
    """README rows: the worst and median error of the planner against MemTracker over every phase."""
    errors = sorted(abs(e) for r in rows for e in r["error"].values())
    worst, median = errors[-1], errors[len(errors) // 2]
    return [row("planner vs MemTracker (FakeTensorMode), worst abs. error", round(100 * worst, 2), "%",
                "within ±10%", worst <= 0.10,
                f"{len(rows)} real-size configs x 3 phases (scoring, update, optimizer step); median abs. error "
                f"{100 * median:.2f}%")]


if __name__ == "__main__":
    sys.exit(main())
