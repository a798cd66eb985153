"""Wall time of ``make train_smoke``'s command, process start-up included: what a new user waits for.

Runs ``python train.py --epochs 2 --steps_per_epoch 6 --batch_size 2 --max_new_tokens 10`` into a temporary
run directory several times (the first run also builds the tiny model if the cache is cold, so one untimed
warm-up run goes first) and reports the median with its spread.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, spread, write_result

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 5
TARGET_S = 30.0
SMOKE_ARGS = ["--epochs", "2", "--steps_per_epoch", "6", "--batch_size", "2", "--max_new_tokens", "10"]


def smoke_once(run_dir: Path) -> float:
    """Seconds for one smoke training run, from process launch to exit."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "train.py"), *SMOKE_ARGS, "--run_dir", str(run_dir), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return elapsed


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench_smoke_") as tmp:
        run_dir = Path(tmp) / "smoke"
        warmup = smoke_once(run_dir)
        times = [smoke_once(run_dir) for _ in range(REPEATS)]
    s = spread(times)
    print(f"smoke run: median {s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f}, n={s['n']}); "
          f"warm-up {warmup:.2f} s")
    rows = [row("train_smoke wall time (start-up included)", round(s["median"], 2), "s", f"< {TARGET_S:.0f} s",
                s["median"] < TARGET_S, f"median of {s['n']}, range {s['min']:.2f}-{s['max']:.2f} s")]
    details = {"command": ["python", "train.py", *SMOKE_ARGS, "--run_dir", "<tmp>", "--overwrite"],
               "times_s": times, "spread": s, "warmup_s": warmup, "cpu_threads": os.cpu_count()}
    write_result("smoke", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
