"""What Ulysses sequence parallelism adds to one GPU's model step, at the first out-of-memory point of each
multi-GPU veRL LoRA script.

    python benchmarks/bench_memory_ulysses.py [--out benchmarks/results/memory_ulysses.json]

Why: every multi-GPU veRL LoRA script (memory/published.json, family verl-lora) runs Ulysses SP 2 and runs out of
memory 15-18 GiB per GPU earlier than planned (bench_memory_published.py, details.missing_at_boundaries), while
the same models at SP 1 are not under-counted. This measures whether Ulysses itself holds that memory in the
model step. At each script's first out-of-memory batch (the row's SP-group micro-batch at the measured lengths
the row is planned at), torch's MemTracker under FakeTensorMode measures one rank of SP 2 as veRL runs it
(memory/memtrack.py: the packed row split in two, veRL's all-to-all around attention, log-probs all-gathered)
and, as the reference, one GPU holding the same tokens without sequence parallelism (half the sequences, SP 1).
Both are the HF model with LoRA r=32 on every projection, checkpointing and bf16; the planner's numbers are
for the same single-rank layout (bench_memory_memtracker.planned) with ``sequence_parallel`` set. Each
measurement in its own subprocess, one at a time: 4 minutes at 14B, about 15 at 72B, on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_memory_memtracker import planned  # noqa: E402
from benchmarks.common import measure_isolated, row, write_result  # noqa: E402

# the first out-of-memory row of each multi-GPU LoRA script (all run Ulysses SP 2)
ROWS = ("verl-Qwen2.5-14B-Instruct-lora-2xH100-b59", "verl-Qwen2.5-32B-Instruct-lora-4xH100-b46",
        "verl-Qwen2.5-72B-Instruct-lora-8xH100-b23")
RUNS = [(r, sp) for r in ROWS for sp in (1, 2)]
PHASES = ("scoring", "update")


def setup(row_id: str) -> dict:
    """The row's model step as veRL's reader plans it: model, SP-group micro-batch, SP degree, packed length."""
    from benchmarks.bench_memory_published import deployment

    rows = {r["id"]: r for r in json.loads((ROOT / "memory/published.json").read_text())["rows"]}
    dep = deployment(rows[row_id])
    return {"row": row_id, "model": dep.actor.arch.name, "group_micro_batch": dep.micro_batch,
            "sequence_parallel": dep.sequence_parallel, "seq": dep.seq, "lora_rank": dep.actor.lora_rank,
            "checkpointing": dep.gradient_checkpointing}


def measure_one(row_id: str, sp: int) -> dict:
    """One rank of SP ``sp``; SP 1 holds the same tokens (the group's micro-batch / the row's SP degree)."""
    from memory.arch import builtin_config
    from memory.memtrack import TrackSpec, measure

    s = setup(row_id)
    batch = s["group_micro_batch"] if sp > 1 else s["group_micro_batch"] // s["sequence_parallel"]
    spec = TrackSpec(builtin_config(s["model"]), batch=batch, seq=s["seq"], lora_rank=s["lora_rank"],
                     gradient_checkpointing=s["checkpointing"], attn="flash", sequence_parallel=sp)
    r = measure(spec)
    return {"peaks": r.peaks, "batch": batch, "seconds": round(r.seconds, 1), "max_rss_bytes": r.max_rss_bytes}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_ulysses.json"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--replan", action="store_true",
                   help="keep the measurements in --out (they are deterministic) and recompute the planner's side")
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(measure_one(*RUNS[a.one])))
        return 0
    measured: dict[tuple[str, int], dict] = {}
    if a.replan:
        for r in json.loads(Path(a.out).read_text())["details"]["rows"]:
            for sp in (1, 2):
                measured[r["row"], sp] = {"peaks": r[f"measured_sp{sp}"], "batch": r["batches"][sp - 1],
                                          "seconds": r["seconds"][sp - 1]}
    for k, (row_id, sp) in enumerate(RUNS):
        if (row_id, sp) in measured:
            continue
        try:
            measured[row_id, sp] = measure_isolated(__file__, k)
        except RuntimeError as err:
            print(f"{row_id} SP {sp}: {err}", file=sys.stderr)
            return 1
        print(f"measured {row_id} SP {sp} in {measured[row_id, sp]['seconds']:.0f} s", file=sys.stderr, flush=True)
    return _report(measured, Path(a.out))


def _report(measured: dict[tuple[str, int], dict], out_path: Path) -> int:
    from benchmarks.bench_memory_published import missing_at_boundaries

    published = json.loads((ROOT / "memory/published.json").read_text())["rows"]
    windows = {w["first_oom"]: w for w in missing_at_boundaries(published)}
    rows = []
    for row_id in ROWS:
        s = setup(row_id)
        m1, m2 = measured[row_id, 1], measured[row_id, 2]
        tokens = -(-m2["batch"] * s["seq"] // 2)
        w = windows[row_id]
        out = {**s, "tokens_per_gpu": tokens, "batches": [m1["batch"], m2["batch"]],
               "measured_sp1": m1["peaks"], "measured_sp2": m2["peaks"],
               "planned_sp2": {ph: v for ph, v in planned(s["model"], m2["batch"], s["seq"], s["checkpointing"],
                                                          s["lora_rank"], "flash", 2).items() if ph in PHASES},
               "seconds": [m1["seconds"], m2["seconds"]],
               "missing_window_bytes": [w["missing_bytes_low"], w["missing_bytes_high"]]}
        out["ulysses_bytes"] = {ph: m2["peaks"][ph] - m1["peaks"][ph] for ph in PHASES}
        out["planned_error_sp2"] = {ph: out["planned_sp2"][ph] / m2["peaks"][ph] - 1 for ph in PHASES}
        rows.append(out)
        print(f"{s['model']:12s} {tokens:6d} tokens/GPU: Ulysses SP 2 adds "
              + ", ".join(f"{ph} {out['ulysses_bytes'][ph] / 2**20:+.0f} MiB" for ph in PHASES)
              + f" (the boundary lacks {w['missing_bytes_low'] / 2**30:.1f}-{w['missing_bytes_high'] / 2**30:.1f} GiB);"
              " planner vs SP 2 " + ", ".join(f"{ph} {out['planned_error_sp2'][ph]:+.2%}" for ph in PHASES))
    most = max(max(r["ulysses_bytes"].values()) for r in rows)
    worst = max(abs(e) for r in rows for e in r["planned_error_sp2"].values())
    least_missing = min(r["missing_window_bytes"][0] for r in rows)
    summary = [
        row("Ulysses SP 2 at the veRL LoRA scripts' out-of-memory points: most added per GPU (model step)",
            round(most / 2**30, 3), "GiB", "", None,
            f"{', '.join(r['model'] for r in rows)} at their first out-of-memory batch, against one GPU with the "
            f"same tokens at SP 1; the boundaries lack at least {least_missing / 2**30:.1f} GiB"),
        row("planner vs MemTracker, one Ulysses SP 2 rank, worst abs. error", round(100 * worst, 2), "%",
            "within ±10%", worst <= 0.10, "scoring and update peaks of the same three steps"),
    ]
    write_result("memory_ulysses", summary, {"rows": rows}, path=out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
