"""Runner throughput with 1 process vs 2 torchrun processes (gloo) on this machine's 2 cores.

Same global batch (16 prompts x 16 new tokens per optimizer step): 1 process with ``--batch_size 16`` and
2 torch threads, against 2 processes with ``--batch_size 8`` each and 1 thread each (``--threads`` and
OMP_NUM_THREADS), so both use the two cores. A third setting, 1 process with 1 thread, shows what the second
thread buys. A fourth runs 1 process x 2 threads with ``OMP_WAIT_POLICY=PASSIVE``: the default (spinning)
OpenMP wait is fastest on an idle machine, but when other jobs share the two cores each thread burns its time
slices waiting for the other at every parallel region (10x slower steps were seen), which passive waiting
avoids at a cost on an idle machine.
Throughput = completion tokens of all ranks / wall time from the end of the last warm-up step to the end of
the last step, read from the run-level ``metrics.jsonl`` (rank 0 writes it after the all-reduce, so its
timestamps are the slowest rank's). Settings alternate within each repeat so they see the same load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import pairwise, row, spread, write_result  # noqa: E402

GLOBAL_BATCH = 16
NEW_TOKENS = 16
STEPS = 12
WARMUP_STEPS = 2
REPEATS = 3
# name -> (processes, threads per process, OMP_WAIT_POLICY or None for the default)
SETTINGS = {
    "1 process x 2 threads": (1, 2, None),
    "2 processes x 1 thread": (2, 1, None),
    "1 process x 1 thread": (1, 1, None),
    "1 process x 2 threads, OMP_WAIT_POLICY=PASSIVE": (1, 2, "PASSIVE"),
}


def run_once(procs: int, threads: int, wait_policy: str | None, run_dir: Path) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, str(ROOT / "train.py"), "--epochs", "1", "--steps_per_epoch", str(STEPS),
           "--batch_size", str(GLOBAL_BATCH // procs), "--max_new_tokens", str(NEW_TOKENS), "--ppo_epochs", "1",
           "--threads", str(threads), "--no_tensorboard", "--sample_interval", "0", "--seed", "0",
           "--run_dir", str(run_dir), "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{procs}-process run failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    reduced = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(reduced) != STEPS:
        raise SystemExit(f"expected {STEPS} records, got {len(reduced)}")
    # the reduced length is the mean over ranks; every rank has GLOBAL_BATCH // procs completions
    tokens = sum(r["response/length_mean"] * GLOBAL_BATCH for r in reduced[WARMUP_STEPS:])
    wall = reduced[-1]["time"] - reduced[WARMUP_STEPS - 1]["time"]
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "step_s": wall / (STEPS - WARMUP_STEPS)}


def main() -> int:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for i in range(REPEATS):
        for name, (procs, threads, policy) in SETTINGS.items():
            with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
                results[name].append(run_once(procs, threads, policy, Path(tmp) / "run"))
        print(f"repeat {i + 1}: " + ", ".join(f"{n}: {r[-1]['tokens_per_s']:.0f} tok/s"
                                               for n, r in results.items()), flush=True)
    tps = {name: [r["tokens_per_s"] for r in runs] for name, runs in results.items()}
    spreads = {name: spread(v) for name, v in tps.items()}
    for name, s in spreads.items():
        print(f"{name}: {s['median']:.0f} tok/s [{s['min']:.0f}-{s['max']:.0f}]")
    work = f"global batch {GLOBAL_BATCH} x {NEW_TOKENS} tokens, {STEPS - WARMUP_STEPS} timed steps"
    rows = [row(f"throughput, {name}", round(s["median"], 1), "tokens/s",
                notes=f"median of {s['n']}, range {s['min']:.0f}-{s['max']:.0f}; {work}")
            for name, s in spreads.items()]
    ratio_stats = {}
    for base in ("1 process x 2 threads", "1 process x 1 thread"):
        ratios, qs = pairwise(tps["2 processes x 1 thread"], tps[base])
        ratio_stats[base] = {"ratios": ratios, "spread": qs}
        print(f"2 processes / {base}: {qs['median']:.2f}x [{qs['min']:.2f}-{qs['max']:.2f}]")
        rows.append(row(f"2 processes x 1 thread / {base}", round(qs["median"], 2), "x",
                        notes=f"pairwise ratios {qs['min']:.2f}-{qs['max']:.2f}; no target: 2 shared cores, gloo"))
    details = {"setup": {"global_batch": GLOBAL_BATCH, "new_tokens": NEW_TOKENS, "steps": STEPS,
                         "warmup_steps": WARMUP_STEPS, "settings": SETTINGS},
               "runs": results, "spreads": spreads, "ratios": ratio_stats}
    write_result("ddp_scaling", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
