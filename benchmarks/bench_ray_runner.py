"""The runner on Ray vs the local runner, same work: steps per second and the weight sync's share of a step.

Three modes on the tiny model (batch 4, 16 new tokens, 2 PPO epochs, one torch thread per process):
``--engine local``; ``--engine ray`` colocated and synchronous (the same numbers as local, so the difference is
the engine's cost: four processes, object-store transfers, the weight sync); ``--engine ray --off_policy_steps 1``
(generation of step t+1 overlaps the update of step t). One small local Ray cluster (2 logical CPUs) serves
both Ray modes; the modes run in turn, ``ROUNDS`` times in alternating order, so each saw the same load.

Steps per second: from the wall-clock ``time`` of consecutive step records (everything between two steps
counts), the first ``WARMUP`` intervals of each run dropped; median with min/max over the pooled intervals.
Weight-sync share: ``time/weight_sync`` (the trainer's put into the object store plus the rollout actor's
fetch and copy) over the step interval, per step.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, spread, write_result

ARGS = ["--batch_size", "4", "--max_new_tokens", "16", "--ppo_epochs", "2", "--epochs", "1", "--steps_per_epoch",
        "16", "--sample_interval", "0", "--no_tensorboard", "--seed", "5"]
MODES = {"local": ["--engine", "local"], "ray_colocated": ["--engine", "ray", "--ray_placement", "colocated"],
         "ray_off_policy": ["--engine", "ray", "--ray_placement", "colocated", "--off_policy_steps", "1"]}
ROUNDS = 2
WARMUP = 3


def one_run(mode: str, run_dir: Path) -> dict:
    from rlhf_core.runformat.run_reader import Run
    from rlhf_core.train.config import parse_args
    from rlhf_core.train.runner import train

    cfg = parse_args([*ARGS, *MODES[mode], "--run_dir", str(run_dir)])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(cfg)
    wall = time.perf_counter() - t0
    assert result.status == "finished", result.status
    recs = Run(run_dir).metrics()
    intervals = [b["time"] - a["time"] for a, b in zip(recs, recs[1:])][WARMUP:]
    shares = [r.get("time/weight_sync", 0.0) / dt for r, dt in zip(recs[WARMUP + 1:], intervals)]
    return {"intervals_s": intervals, "sync_share": shares, "wall_s": wall,
            "sync_bytes": recs[-1].get("src/weight_sync_bytes"),
            "rollout_s": [r["time/rollout"] for r in recs[WARMUP + 1:]],
            "update_s": [r["time/update"] for r in recs[WARMUP + 1:]]}


def main() -> int:
    import ray

    from rlhf_core.train.config import parse_args
    from rlhf_core.train.ray_engine import _init_ray

    t0 = time.perf_counter()
    _init_ray(parse_args(["--engine", "ray", "--run_dir", "unused"]))
    cluster_s = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
            for k in range(ROUNDS):
                order = list(MODES) if k % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    runs[mode].append(one_run(mode, Path(tmp) / f"{mode}_{k}"))
    finally:
        ray.shutdown()
    stats = {}
    for mode, rs in runs.items():
        rates = [1.0 / dt for r in rs for dt in r["intervals_s"]]
        stats[mode] = {"steps_per_s": spread(rates), "sync_share": spread([s for r in rs for s in r["sync_share"]]),
                       "wall_s": [r["wall_s"] for r in rs], "sync_bytes": rs[0]["sync_bytes"],
                       "rollout_s": spread([x for r in rs for x in r["rollout_s"]]),
                       "update_s": spread([x for r in rs for x in r["update_s"]])}
        s = stats[mode]["steps_per_s"]
        print(f"{mode}: {s['median']:.2f} steps/s (min {s['min']:.2f}, max {s['max']:.2f}, n={s['n']}); "
              f"weight sync {100 * stats[mode]['sync_share']['median']:.1f}% of a step")
    local, sync, off = (stats[m]["steps_per_s"] for m in MODES)
    share = stats["ray_colocated"]["sync_share"]
    mb = (stats["ray_colocated"]["sync_bytes"] or 0) / 2**20
    note = f"median over {local['n']} steps after warm-up ({ROUNDS} runs), range"
    rows = [
        row("local runner steps/s", round(local["median"], 2), "steps/s", notes=f"{note} "
            f"{local['min']:.2f}-{local['max']:.2f}; tiny model, batch 4 x 16 tokens"),
        row("ray colocated (sync) steps/s", round(sync["median"], 2), "steps/s", notes=f"{note} "
            f"{sync['min']:.2f}-{sync['max']:.2f}; {sync['median'] / local['median']:.2f}x local; same metrics"),
        row("ray one-step-off-policy steps/s", round(off["median"], 2), "steps/s", notes=f"{note} "
            f"{off['min']:.2f}-{off['max']:.2f}; {off['median'] / sync['median']:.2f}x ray sync"),
        row("ray weight_sync share of a step", round(100 * share["median"], 1), "%", notes=f"median, range "
            f"{100 * share['min']:.1f}-{100 * share['max']:.1f}%; {mb:.2f} MiB per sync (fp32 LM weights)"),
    ]
    details = {"args": ARGS, "modes": MODES, "rounds": ROUNDS, "warmup_intervals_dropped": WARMUP,
               "ray_cluster_start_s": cluster_s, "stats": stats,
               "wall_ratio_ray_sync_over_local_startup_included": statistics.median(
                   [x / y for x, y in zip(stats["ray_colocated"]["wall_s"], stats["local"]["wall_s"])])}
    write_result("ray_runner", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
