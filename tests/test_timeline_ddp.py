"""Phase intervals of real torchrun ranks (CPU, gloo) on one clock, one rank's clock skewed by 5 s.

The runner: ``--debug_slow_rank 1 --debug_slow_seconds 1.0`` makes rank 1 sleep in its rollout each step, and
``RLHFKIT_DEBUG_CLOCK_SKEW_NS=1:5000000000`` puts rank 1's wall clock 5 s ahead, as on a host without NTP. The
offset measured at start-up must bring the ranks back together (they leave each collective at the same
instant), rank 0 must show the wait in ``advantages`` (its first collective) and rank 1 must be the straggler.

``adapters.generic`` is run the same way by this file as a script (a loop with its own all-reduce).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKEW_NS = 5_000_000_000
SLOW_S = 1.0
# the wait rank 0 must show: half the injected delay, because rank 0's own rollout (the same work as rank 1's before
# its sleep) runs slower on a loaded 2-core machine and eats into the wait; 0.3 s with a 0.05 s margin failed there
MIN_WAIT_S = SLOW_S / 2


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RLHFKIT_DEBUG_CLOCK_SKEW_NS=f"1:{SKEW_NS}")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("timeline_ddp") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--epochs", "1", "--steps_per_epoch", "4", "--batch_size", "2",
           "--max_new_tokens", "6", "--no_tensorboard", "--sample_interval", "0",
           "--debug_slow_rank", "1", "--debug_slow_seconds", str(SLOW_S), "--run_dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"2-rank run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return run_dir


def test_each_rank_records_its_identity_and_measured_offset(ddp_run: Path) -> None:
    from rlhf_core.runformat.timeline import read_timeline

    tl = read_timeline(ddp_run)
    assert sorted(tl.processes) == [0, 1]
    p0, p1 = tl.processes[0], tl.processes[1]
    assert (p0.role, p1.role) == ("runner", "runner") and p0.pid != p1.pid and p0.host == p1.host
    assert p0.clock["offset_ns"] == 0 and p0.clock["method"] == "reference"
    assert p1.clock["method"] == "ntp-ping-pong" and p1.wall_skew_ns == SKEW_NS
    # the measured offset undoes the skew, to within its own uncertainty (plus a little scheduling slack)
    assert abs(p1.clock["offset_ns"] + SKEW_NS) <= p1.clock["uncertainty_ns"] + 5_000_000
    assert p1.clock["uncertainty_ns"] < 50_000_000
    assert tl.collective == frozenset({"advantages", "update", "optimizer"})
    assert all(sorted(tl.steps[r]) == [1, 2, 3, 4] for r in (0, 1))


def test_intervals_are_aligned_across_ranks(ddp_run: Path) -> None:
    """Both ranks leave each collective-bound phase together: on the aligned clock their ends agree to within a
    few ms; rank 1's raw clock was 5 s off."""
    from rlhf_core.runformat.timeline import read_timeline

    tl = read_timeline(ddp_run)
    for step in range(1, 5):
        ends = {}
        for rank in (0, 1):
            ph = tl.steps[rank][step].phases
            name, start, dur = next(p for p in ph if p[0] == "advantages")
            ends[rank] = start + dur
        assert abs(ends[0] - ends[1]) < 30_000_000, (step, ends)


def test_the_slowed_rank_is_the_straggler_and_the_other_shows_the_wait(ddp_run: Path) -> None:
    from rlhf_core.runformat.timeline import analyse, read_timeline

    report = analyse(read_timeline(ddp_run))
    for s in report.steps:
        assert s.phase_wait["advantages"][0] >= MIN_WAIT_S * 1e9
        assert s.wait[1] < s.wait[0] / 2 and s.phase_busy["rollout"][1] >= SLOW_S * 1e9
        assert s.critical_path[0][:2] == (1, "rollout")
    assert report.slowest_per_phase()["rollout"]["rank"] == 1
    per_rank = report.per_rank()
    assert per_rank[0]["wait_s"] >= 4 * MIN_WAIT_S and per_rank[0]["wait_share"] > 2 * per_rank[1]["wait_share"]
    assert report.critical_path_share()[0]["rank"] == 1 and report.critical_path_share()[0]["phase"] == "rollout"
    # the live exchange wrote the same waits into the rank records
    recs = [json.loads(x) for x in (ddp_run / "metrics.rank0.jsonl").read_text().splitlines()]
    assert all(r["wait/advantages"] >= MIN_WAIT_S and r["wait/total"] >= r["wait/advantages"] for r in recs)
    for r, s in zip(recs, report.steps):
        assert r["wait/advantages"] == pytest.approx(s.phase_wait["advantages"][0] / 1e9, abs=0.01)


def test_diagnose_uses_the_measured_waits(ddp_run: Path) -> None:
    from rlhf_core.stability.analysis import diagnose_run

    alerts = [a for a in diagnose_run(ddp_run) if a.rule == "straggler"]
    assert {a.rank for a in alerts} == {1}
    assert (1, "rollout") in {(a.rank, a.evidence["phase"]) for a in alerts}
    assert all(a.evidence.get("basis", "").startswith("busy") for a in alerts)


def test_merged_trace_is_valid_chrome_json_with_one_process_per_rank(ddp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    proc = subprocess.run([sys.executable, "-m", "rlhf_core.cli.main", "timeline", str(ddp_run), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Slowest rank per phase" in proc.stdout and "warning" not in proc.stderr
    with out.open() as fh:
        trace = json.load(fh)
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms" and isinstance(events, list)
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs[0].startswith("rank 0 (runner)") and procs[1].startswith("rank 1 (runner)")
    assert procs[2] == "critical path" and len(procs) == 3
    for e in events:
        assert isinstance(e["name"], str) and isinstance(e["pid"], int) and e["ph"] in "XiM"
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0 and isinstance(e["tid"], int)
    phases = {(e["pid"], e["name"]) for e in events if e["ph"] == "X" and e["cat"] == "phase"}
    assert {(r, "rollout") for r in (0, 1)} <= phases
    markers = sorted((e["pid"], e["name"]) for e in events if e["ph"] == "i")
    assert markers == [(r, f"step {s}") for r in (0, 1) for s in range(1, 5)]
    waits = [e for e in events if e["ph"] == "X" and e["cat"] == "wait" and e["name"] == "wait (advantages)"]
    assert {e["pid"] for e in waits} == {0} and min(e["dur"] for e in waits) >= MIN_WAIT_S * 1e6


# ------------------------------------------------------------------ adapters.generic under torchrun
def _generic_loop(run_dir: str) -> None:
    """Run by each torchrun rank: rank 1 sleeps in rollout; 'update' holds an all-reduce."""
    import torch
    import torch.distributed as dist

    import adapters.generic as kit

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with kit.run(run_dir, config={"loop": "timeline"}, role="learner", collective_phases=("update",),
                 exchange_waits=True, alerts=False) as run:
        for step in range(1, 4):
            with run.phase("rollout"):
                time.sleep(0.01 + (0.2 if rank == 1 else 0.0))
            with run.phase("update"):
                t = torch.ones(4)
                dist.all_reduce(t)
            run.log(step, {"loss/total": float(t.sum())})
    dist.destroy_process_group()


def test_generic_adapter_ranks_record_aligned_intervals_and_waits(tmp_path: Path) -> None:
    run_dir = tmp_path / "generic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from rlhf_core.runformat.timeline import analyse, read_timeline

    tl = read_timeline(run_dir)
    assert {p.role for p in tl.processes.values()} == {"learner"} and sorted(tl.processes) == [0, 1]
    assert abs(tl.processes[1].clock["offset_ns"] + SKEW_NS) < 50_000_000
    report = analyse(tl)
    for s in report.steps:
        assert s.phase_wait["update"][0] >= 0.15e9 and 1 not in s.phase_wait.get("update", {})
        ends = [next(st + d for n, st, d in tl.steps[r][s.step].phases if n == "update") for r in (0, 1)]
        assert abs(ends[0] - ends[1]) < 30_000_000
    recs = [json.loads(x) for x in (run_dir / "metrics.rank0.jsonl").read_text().splitlines()]
    assert all(r["wait/update"] >= 0.15 for r in recs)


if __name__ == "__main__":
    _generic_loop(sys.argv[1])
