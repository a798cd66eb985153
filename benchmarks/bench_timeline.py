"""Phase intervals: what recording them costs per phase and per step, and whether a 256-rank run stays usable.

- Overhead: ``PhaseTimer`` with and without a :class:`profiler.timeline.TimelineRecorder`, the same loop of
  9-phase steps (no memory reads, so the difference is the recorder's), alternating blocks timed in CPU time;
  the cost per step of the live wait exchange (one MAX all-reduce) between two gloo processes.
- Scale: a synthetic run of 256 ranks × 10k steps written through ``RunWriter`` (per-rank records with
  ``time/*`` and ``wait/*``, the reduced ``metrics.jsonl``) and ``TimelineRecorder`` (one timeline file per
  rank); rank 7 is slow in rollout from mid-run. Timed: reading the per-rank records, ``diagnose_run``, and
  ``rlhfkit timeline RUN --steps`` over 100 steps of all 256 ranks as a fresh process (target < 10 s).

``python benchmarks/bench_timeline.py [--ranks N] [--steps N] [--repeats N] [--keep DIR]``
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pairwise, row, spread, write_result

ROOT = Path(__file__).resolve().parent.parent
PHASES = [("rollout", 0.40), ("reward", 0.02), ("ref_logprobs", 0.05), ("old_logprobs", 0.05), ("values", 0.005),
          ("advantages", 0.01), ("update", 0.25), ("optimizer", 0.03), ("logging", 0.01)]
COLLECTIVE = ("advantages", "update", "optimizer")
SLOW_RANK = 7


# ------------------------------------------------------------------------------------------ overhead
def _loop(timer, steps: int) -> float:
    """CPU seconds of ``steps`` empty 9-phase steps (CPU time: the other jobs on the shared cores preempt us,
    which wall time would count)."""
    names = [p for p, _ in PHASES]
    t0 = time.process_time()
    for step in range(1, steps + 1):
        timer.start_step(step)
        for name in names:
            with timer.phase(name):
                pass
        timer.end_step()
    return time.process_time() - t0


def overhead(pairs: int = 15, steps: int = 1000) -> dict[str, dict[str, float]]:
    """Per-step and per-phase cost of the recorder (µs): alternating blocks of the same loop without and with
    it, the difference of each pair (so both saw the same machine), median over the pairs."""
    from profiler.phases import PhaseTimer
    from profiler.timeline import TimelineRecorder

    with tempfile.TemporaryDirectory() as tmp:
        base = PhaseTimer("cpu", track_memory=False)
        with_tl = PhaseTimer("cpu", track_memory=False, timeline=TimelineRecorder(Path(tmp), collective=COLLECTIVE))
        _loop(base, 200), _loop(with_tl, 200)  # warm-up
        plain, timed = [], []
        for _ in range(pairs):
            plain.append(_loop(base, steps) / steps * 1e6)
            timed.append(_loop(with_tl, steps) / steps * 1e6)
        with_tl.close()
    diffs = [t - p for t, p in zip(timed, plain)]
    return {"step_plain_us": spread(plain), "step_timeline_us": spread(timed),
            "extra_per_step_us": spread(diffs), "extra_per_phase_us": spread([d / len(PHASES) for d in diffs]),
            "ratio": pairwise(timed, plain)[1]}


def _exchange_worker(rank: int, port: int, calls: int, out: str) -> None:
    import torch.distributed as dist

    from profiler.timeline import TimelineRecorder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with tempfile.TemporaryDirectory() as tmp:
        rec = TimelineRecorder(tmp, rank=rank, world_size=2, collective=COLLECTIVE, exchange_waits=True)
        phases = [[n, i * 1000, 900] for i, (n, _) in enumerate(PHASES)] + [["update", 10_000, 900]] * 8
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            rec._exchange(0, phases)
            times.append((time.perf_counter() - t0) * 1e6)
    if rank == 0:
        Path(out).write_text(" ".join(f"{t:.2f}" for t in times))
    dist.destroy_process_group()


def exchange_cost(calls: int = 300) -> dict[str, float]:
    """µs per step of the live wait exchange (2 gloo ranks, 19 collective occurrences), median of blocks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.txt")
        mp.spawn(_exchange_worker, args=(port, calls, out), nprocs=2, join=True)
        times = [float(x) for x in Path(out).read_text().split()][calls // 10:]
    blocks = [float(np.median(times[i::5])) for i in range(5)]
    return spread(blocks)


# ------------------------------------------------------------------------------------------ scale
def write_synthetic(run_dir: Path, ranks: int, steps: int, seed: int = 0) -> float:
    """A run of ``ranks`` × ``steps`` (see the module docstring); returns the seconds writing took."""
    from profiler.timeline import TimelineRecorder
    from rlhf_core.runformat.clock import ClockOffset
    from rlhf_core.runformat.run_writer import RunWriter

    rng = np.random.default_rng(seed)
    names = [p for p, _ in PHASES]
    mean = np.array([d for _, d in PHASES])
    coll = np.array([n in COLLECTIVE for n in names])
    t0 = time.perf_counter()
    writers = [RunWriter(run_dir, source="generic", config={"synthetic": "timeline"}, rank=r, world_size=ranks,
                         tensorboard=False, overwrite=True) for r in range(ranks)]
    recorders = [TimelineRecorder(run_dir, rank=r, world_size=ranks, role="trainer", collective=COLLECTIVE,
                                  clock=ClockOffset(int(rng.integers(-2e6, 2e6)), 50_000, "ntp-ping-pong", 0))
                 for r in range(ranks)]
    for rec in recorders:
        rec.anchor(0.0, 1_800_000_000 * 10**9 - rec.clock.offset_ns)
    now = 0.0
    loss = 1.0
    for step in range(1, steps + 1):
        dur = mean * np.exp(rng.normal(0, 0.05, (ranks, len(names))))
        if step > steps // 2:
            dur[SLOW_RANK, 0] *= 2.0
        t = now + rng.uniform(0, 0.002, ranks)
        start = t.copy()
        spans = np.empty((ranks, len(names), 2))
        waits = np.zeros((ranks, len(names)))
        for j in range(len(names)):
            if coll[j]:
                last = t.max()
                waits[:, j] = last - t
                spans[:, j, 0], t = t, last + dur[:, j]
            else:
                spans[:, j, 0], t = t, t + dur[:, j]
            spans[:, j, 1] = t
        now = t.max() + 0.003
        loss += float(rng.normal(0, 0.01))
        sums = {f"time/{n}": 0.0 for n in names}
        for r in range(ranks):
            rec = {f"time/{n}": float(spans[r, j, 1] - spans[r, j, 0]) for j, n in enumerate(names)}
            rec.update({f"wait/{n}": float(waits[r, j]) for j, n in enumerate(names) if coll[j]})
            rec["wait/total"] = float(waits[r].sum())
            rec["time/step"] = float(t[r] - start[r])
            writers[r].log(step, rec)
            recorders[r].record_step(step, float(start[r]), float(t[r]),
                                     [(n, float(spans[r, j, 0]), float(spans[r, j, 1])) for j, n in enumerate(names)])
            for k in sums:
                sums[k] += rec[k]
        reduced = {k: v / ranks for k, v in sums.items()}
        reduced.update({"loss/total": loss, "reward/mean": 0.5 + 0.1 * np.tanh(step / 1000), "kl/ref_k3": 0.01})
        writers[0].log_reduced(step, reduced)
    for rec in recorders:
        rec.close()
    for w in reversed(writers):
        w.close()
    return time.perf_counter() - t0


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        out.append(time.perf_counter() - t0)
    return out, value


def scale(run_dir: Path, ranks: int, steps: int, repeats: int, window: int = 100) -> tuple[list, dict]:
    from rlhf_core.runformat.run_reader import Run
    from rlhf_core.runformat.timeline import analyse, read_timeline
    from rlhf_core.stability.analysis import diagnose_run

    write_s = write_synthetic(run_dir, ranks, steps)
    size = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())
    read_s, n = timed(lambda: sum(len(v) for v in Run(run_dir).rank_metrics().values()), repeats)
    diag_s, alerts = timed(lambda: diagnose_run(run_dir), repeats)
    stragglers = sorted({(a.rank, a.evidence.get("phase")) for a in alerts if a.rule == "straggler"})
    lo = steps // 2 + 1
    rng = f"{lo}:{lo + window - 1}"
    out = run_dir / "merged.trace.json"
    cmd = [sys.executable, "-m", "rlhf_core.cli.main", "timeline", str(run_dir), "--steps", rng, "--out", str(out),
           "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    cpu: list[float] = []

    def merge() -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)

    merge_s, _ = timed(merge, repeats)
    parts = {}
    t0 = time.perf_counter()
    tl = read_timeline(run_dir, (lo, lo + window - 1))
    parts["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = analyse(tl)
    parts["analyse_s"] = time.perf_counter() - t0
    slow = report.slowest_per_phase()["rollout"]
    rows = [
        row(f"write {ranks} ranks x {steps} steps (RunWriter + TimelineRecorder)", round(write_s, 1), "s",
            notes=f"once; {ranks * steps / write_s:.0f} rank-steps/s; {size / 2**20:.0f} MiB on disk"),
        row(f"read per-rank records ({ranks} x {steps})", round(spread(read_s)["median"], 2), "s",
            notes=_notes(read_s) + f"; {n} records"),
        row(f"diagnose_run ({ranks} x {steps})", round(spread(diag_s)["median"], 2), "s",
            notes=_notes(diag_s) + f"; straggler alerts {stragglers}"),
        row(f"rlhfkit timeline, {ranks} ranks x {window} steps (fresh process)", round(spread(merge_s)["median"], 2),
            "s", "< 10 s", spread(merge_s)["median"] < 10,
            notes=_notes(merge_s) + f"; CPU time median {spread(cpu)['median']:.2f} s (the 2 shared cores "
                                    f"were loaded: wall > CPU); trace {out.stat().st_size / 2**20:.0f} MiB; "
                                    f"slowest rollout rank "
                                    f"{slow['rank']} in {slow['steps']}/{slow['of_steps']} steps"),
    ]
    details = {"write_s": write_s, "bytes": size, "read_s": read_s, "diagnose_s": diag_s, "merge_s": merge_s,
               "merge_cpu_s": cpu, "load_average": os.getloadavg(),
               "merge_parts_in_process": parts, "stragglers": stragglers, "slowest_rollout": slow}
    return rows, details


def _notes(values: list[float]) -> str:
    s = spread(values)
    return f"median of {s['n']}: min {s['min']:.2f} max {s['max']:.2f} s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="write the synthetic run here and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    over = overhead()
    exch = exchange_cost()
    rows = [
        row("timeline recorder cost per phase", round(over["extra_per_phase_us"]["median"], 2), "µs",
            notes=f"min {over['extra_per_phase_us']['min']:.2f} max {over['extra_per_phase_us']['max']:.2f}, "
                  f"n={over['extra_per_phase_us']['n']} CPU-time pairs of 1000 9-phase steps; per step "
                  f"{over['extra_per_step_us']['median']:.1f} µs (phases + one buffered JSON line)"),
        row("live wait exchange per step (2 gloo ranks)", round(exch["median"], 1), "µs",
            notes=f"min {exch['min']:.1f} max {exch['max']:.1f}, medians of 5 blocks; one MAX all-reduce "
                  "of 514 int64"),
    ]
    details: dict = {"overhead": over, "exchange_us": exch}
    if args.keep:
        run_dir = Path(args.keep)
        scale_rows, details["scale"] = scale(run_dir, args.ranks, args.steps, args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            scale_rows, details["scale"] = scale(Path(tmp) / "run", args.ranks, args.steps, args.repeats)
    rows += scale_rows
    for r in rows:
        print(f"{r['metric']}: {r['value']} {r['unit']} ({r['notes']})")
    write_result("timeline", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
