"""Phase intervals on a shared clock (single process): the recorder, the analysis, the merged trace, the rule.

The multi-process side (real torchrun ranks, a skewed clock, a slowed rank) is in test_timeline_ddp.py.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from profiler.phases import PhaseTimer
from profiler.timeline import TimelineRecorder
from profiler.timeline_trace import main as timeline_main
from rlhf_core.runformat import clock
from rlhf_core.runformat.clock import ClockOffset, ntp_offset
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.runformat.timeline import (
    StepSpan,
    analyse,
    analyse_step,
    parse_steps,
    read_processes,
    read_timeline,
    wait_ns,
)
from rlhf_core.stability.rules import DetectorConfig
from rlhf_core.stability.rules.straggler import Straggler

MS = 1_000_000


def test_ntp_offset_is_exact_for_a_symmetric_link_and_bounded_by_half_the_round_trip() -> None:
    # reference clock 5 s ahead; 1 ms each way; the reference holds the message for 0.2 ms
    t1 = 1_000 * MS
    t2 = t1 + 5_000 * MS + 1 * MS
    t3 = t2 + MS // 5
    t4 = t3 - 5_000 * MS + 1 * MS
    assert ntp_offset(t1, t2, t3, t4) == (5_000 * MS, 1 * MS)
    # an asymmetric link (3 ms there, 1 ms back): the error stays within the uncertainty
    t2b = t1 + 5_000 * MS + 3 * MS
    t4b = t2b + MS // 5 - 5_000 * MS + 1 * MS
    offset, unc = ntp_offset(t1, t2b, t2b + MS // 5, t4b)
    assert abs(offset - 5_000 * MS) <= unc == 2 * MS


def test_debug_skew_applies_to_the_named_rank_only(monkeypatch) -> None:
    monkeypatch.setenv(clock.SKEW_ENV, "1:7000")
    monkeypatch.setenv("RANK", "1")
    assert clock._skew() == 7000
    monkeypatch.setenv("RANK", "0")
    assert clock._skew() == 0
    monkeypatch.setenv(clock.SKEW_ENV, "-5")
    assert clock._skew() == -5


def test_single_process_offset_is_zero() -> None:
    assert clock.measure_offset(0, 1) == ClockOffset(0, 0, "single-process", 0)


def _timed_run(run_dir: Path, steps: int = 3, **recorder: object) -> dict[int, dict]:
    rec = TimelineRecorder(run_dir, collective=("update",), **recorder)
    timer = PhaseTimer("cpu", track_memory=False, timeline=rec)
    records = {}
    for step in range(1, steps + 1):
        timer.start_step(step)
        with timer.phase("rollout"):
            time.sleep(0.004)
        for _ in range(2):
            with timer.phase("update"):
                time.sleep(0.002)
        records[step] = timer.end_step()
    timer.close()
    return records


def test_recorder_writes_intervals_that_match_the_phase_times(tmp_path: Path) -> None:
    before = time.time_ns()
    records = _timed_run(tmp_path, role="trainer", source="generic")
    after = time.time_ns()
    lines = [json.loads(x) for x in (tmp_path / "timeline.rank0.jsonl").read_text().splitlines()]
    head = lines[0]["process"]
    assert (head["rank"], head["role"], head["pid"], head["host"]) == (0, "trainer", os.getpid(), socket.gethostname())
    assert head["clock"]["offset_ns"] == 0 and head["clock"]["uncertainty_ns"] == 0
    assert head["collective"] == ["update"]
    tl = read_timeline(tmp_path)
    assert sorted(tl.steps[0]) == [1, 2, 3]
    for step, span in tl.steps[0].items():
        assert before <= span.t0 and span.end <= after
        names = [n for n, _, _ in span.phases]
        assert names == ["rollout", "update", "update"]
        starts = [s for _, s, _ in span.phases]
        assert starts == sorted(starts) and starts[0] >= span.t0
        rollout = sum(d for n, _, d in span.phases if n == "rollout")
        update = sum(d for n, _, d in span.phases if n == "update")
        assert rollout / 1e9 == pytest.approx(records[step]["time/rollout"], abs=2e-6)
        assert update / 1e9 == pytest.approx(records[step]["time/update"], abs=4e-6)
        assert span.dur / 1e9 == pytest.approx(records[step]["time/step"], abs=2e-6)


@pytest.mark.parametrize("header", ['{"process": {"rank": "x", "role": "reward"}}', '{"process": [1, 2]}'])
def test_a_header_not_understood_is_reported_and_the_steps_still_read(tmp_path: Path, header: str) -> None:
    _timed_run(tmp_path, role="trainer", source="generic")
    path = tmp_path / "timeline.rank0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([header, *lines[1:]]) + "\n")
    for steps in (None, (2, 3)):  # a full read and a range read
        tl = read_timeline(tmp_path, steps)
        assert tl.processes[0].role == "runner"  # the defaults
        assert sorted(tl.steps[0]) == ([1, 2, 3] if steps is None else [2, 3])
        assert tl.problems == [f"{path}:1: process header not understood; rank 0 shown with default identity"]
    assert read_processes(tmp_path)[0].role == "runner"


def test_recorder_buffers_lines_until_flush(tmp_path: Path) -> None:
    rec = TimelineRecorder(tmp_path)
    rec.record_step(1, 0.0, 0.001, [("rollout", 0.0, 0.001)])
    assert not (tmp_path / "timeline.rank0.jsonl").exists()  # no system call on the step path
    rec.close()
    assert len((tmp_path / "timeline.rank0.jsonl").read_text().splitlines()) == 2


def test_clock_offset_and_skew_are_applied(tmp_path: Path, monkeypatch) -> None:
    """A process whose clock runs 5 s ahead, with the offset measured as -5 s, writes rank 0's time."""
    monkeypatch.setattr(clock, "_SKEW_NS", 5_000 * MS)
    before = time.time_ns()
    _timed_run(tmp_path, steps=1, clock=ClockOffset(-5_000 * MS, 10_000, "ntp-ping-pong", 0))
    after = time.time_ns()
    span = read_timeline(tmp_path).steps[0][1]
    assert before <= span.t0 <= after


def _span(step: int, t0: int, phases: list[tuple[str, int]]) -> StepSpan:
    out, t = [], t0
    for name, dur in phases:
        out.append((name, t, dur * MS))
        t += dur * MS
    return StepSpan(step, t0, t - t0, out)


def test_waits_busy_idle_critical_path_and_bubbles() -> None:
    """Rank 1's rollout is 300 ms longer; rank 0 enters the collective 'advantages' first and waits for it."""
    r0 = _span(1, 0, [("rollout", 10), ("advantages", 305), ("update", 20)])
    r1 = _span(1, 0, [("rollout", 310), ("advantages", 5), ("update", 20)])
    a = analyse_step(1, {0: r0, 1: r1}, frozenset({"advantages", "update"}))
    assert a.wait == {0: 300 * MS, 1: 0}
    assert a.busy == {0: 35 * MS, 1: 335 * MS}
    for rank in (0, 1):
        assert a.busy[rank] + a.wait[rank] + a.idle[rank] == a.window == 335 * MS
    path = [(r, n) for r, n, _, _ in a.critical_path]
    assert path[:2] == [(1, "rollout"), (1, "advantages")] and path[2][1] == "update"  # both ranks end update together
    assert sum(d for _, _, _, d in a.critical_path) == a.window
    assert a.bubbles == [(0, 10 * MS, 300 * MS, "waiting in advantages")]
    assert wait_ns(0, 5, 100) == 5 and wait_ns(100, 5, 0) == 0


def test_a_wait_phase_is_all_waiting_and_the_critical_path_follows_what_it_waited_for(tmp_path: Path) -> None:
    """A Ray-style driver: rank 0 waits 200 ms for the actors' results (rank 1's rollout, then rank 2's reward
    of it, which ends last), then updates. The wait is waiting, not idle, and the path runs back through the
    reward to the rollout that fed it."""
    r0 = StepSpan(1, 0, 230 * MS, [("actor_wait", 0, 200 * MS), ("update", 200 * MS, 30 * MS)])
    r1 = StepSpan(1, 5 * MS, 150 * MS, [("rollout", 5 * MS, 150 * MS)])
    r2 = StepSpan(1, 160 * MS, 39 * MS, [("reward", 160 * MS, 39 * MS)])
    a = analyse_step(1, {0: r0, 1: r1, 2: r2}, frozenset(), waits=frozenset({"actor_wait"}))
    assert a.wait[0] == 200 * MS and a.busy[0] == 30 * MS and a.idle[0] == 0
    assert [(r, n) for r, n, _, _ in a.critical_path if n != "(gap)"] == [(1, "rollout"), (2, "reward"), (0, "update")]
    plain = analyse_step(1, {0: r0, 1: r1, 2: r2}, frozenset())  # without the header's waits it is busy time
    assert plain.wait[0] == 0 and plain.busy[0] == 230 * MS
    rec = TimelineRecorder(tmp_path, rank=0, world_size=3, role="trainer", waits=("actor_wait",))
    rec.record_step(1, 0.0, 0.23, [("actor_wait", 0.0, 0.2), ("update", 0.2, 0.23)])
    rec.flush()
    timeline = read_timeline(tmp_path)
    assert timeline.waits == {"actor_wait"}
    assert analyse(timeline).steps[0].wait[0] == 200 * MS


def test_report_names_the_slowest_rank_per_phase(tmp_path: Path) -> None:
    from rlhf_core.runformat.timeline import Process, Timeline

    steps = {0: {}, 1: {}, 2: {}}
    for s in range(1, 6):
        t0 = s * 1000 * MS
        steps[0][s] = _span(s, t0, [("rollout", 10), ("update", 50)])
        steps[1][s] = _span(s, t0, [("rollout", 12), ("update", 48)])
        steps[2][s] = _span(s, t0, [("rollout", 40), ("update", 20)])  # enters update 30 ms late
    tl = Timeline({r: Process(r, role="runner", collective=frozenset({"update"})) for r in steps}, steps)
    report = analyse(tl)
    slowest = report.slowest_per_phase()
    assert slowest["rollout"]["rank"] == 2 and slowest["rollout"]["steps"] == 5
    assert slowest["rollout"]["excess_over_median_s"] == pytest.approx(0.029, abs=1e-9)
    per_rank = report.per_rank()
    assert per_rank[0]["wait_s"] == pytest.approx(5 * 0.030) and per_rank[2]["wait_s"] == 0
    assert report.critical_path_share()[0] == {"rank": 2, "phase": "rollout", "seconds": pytest.approx(0.2),
                                               "share": pytest.approx(40 / 60)}


def test_parse_steps() -> None:
    assert parse_steps("3:7") == (3, 7) and parse_steps("5") == (5, 5) and parse_steps(None) is None
    assert parse_steps(":4") == (0, 4) and parse_steps("9:")[0] == 9
    with pytest.raises(ValueError):
        parse_steps("a:b")


def _two_rank_run(run_dir: Path) -> None:
    """Two ranks' files written in one process (as two producers would), rank 1 slow in rollout. Both map the
    synthetic times through one (perf, wall) anchor: each its own would put them a preemption apart."""
    RunWriter(run_dir, source="generic", world_size=2, tensorboard=False).close()
    wall0 = clock.wall_ns()
    for rank, slow in ((0, 0.0), (1, 0.03)):
        rec = TimelineRecorder(run_dir, rank=rank, world_size=2, collective=("update",))
        rec.anchor(0.0, wall0)
        for step in range(1, 4):
            base = 10.0 + step
            rec.record_step(step, base, base + 0.05, [("rollout", base, base + 0.01 + slow),
                                                      ("update", base + 0.01 + slow, base + 0.05)])
        rec.close()


def test_cli_writes_a_valid_chrome_trace_with_a_process_per_rank(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _two_rank_run(run)
    out = tmp_path / "trace.json"
    assert timeline_main([str(run), "--out", str(out), "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert analysis["slowest_per_phase"]["rollout"]["rank"] == 1
    assert analysis["per_rank"]["0"]["wait_s"] == pytest.approx(3 * 0.03, abs=1e-5)
    assert analysis["trace"] == str(out)
    trace = json.loads(out.read_text())
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert set(names) == {0, 1, 2} and names[2] == "critical path" and names[1].startswith("rank 1 (runner)")
    slices = [e for e in events if e["ph"] == "X"]
    assert all(isinstance(e["ts"], float) and e["dur"] >= 0 and e["tid"] in (0, 1) for e in slices)
    assert {e["pid"] for e in slices if e["cat"] == "phase"} == {0, 1}
    waits = [e for e in slices if e["cat"] == "wait"]
    assert {e["pid"] for e in waits} == {0} and all(e["dur"] == pytest.approx(30_000, abs=2) for e in waits)
    markers = [e for e in events if e["ph"] == "i"]
    assert sorted((e["pid"], e["name"]) for e in markers) == [(r, f"step {s}") for r in (0, 1) for s in (1, 2, 3)]
    assert min(e["ts"] for e in slices) == 0.0


def test_cli_step_range_and_exit_codes(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _two_rank_run(run)
    assert timeline_main([str(run), "--steps", "2:2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == [2]
    assert timeline_main([str(run), "--steps", "7:9"]) == 1
    assert timeline_main([str(run), "--steps", "x"]) == 2
    assert timeline_main([str(tmp_path / "missing")]) == 2
    assert timeline_main([str(run)]) == 0
    printed = capsys.readouterr().out
    assert "Slowest rank per phase" in printed and "waiting in update" in printed


def test_torch_profiler_trace_is_merged_on_the_shared_clock(tmp_path: Path, monkeypatch) -> None:
    """A rank whose clock is 3 s ahead: its Kineto events and its phases land on the same aligned instant."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(clock, "_SKEW_NS", 3_000 * MS)
    run = tmp_path / "run"
    RunWriter(run, source="generic", tensorboard=False).close()
    rec = TimelineRecorder(run, clock=ClockOffset(-3_000 * MS, 0, "ntp-ping-pong", 0))
    timer = PhaseTimer("cpu", track_memory=False, timeline=rec)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        timer.start_step(1)
        with timer.phase("rollout"):
            time.sleep(0.02)
        timer.end_step()
    timer.close()
    raw = run / "traces" / "rank0_steps000001-000001.pt.trace.json"
    raw.parent.mkdir(exist_ok=True)
    prof.export_chrome_trace(str(raw))
    (run / "traces" / (raw.name + ".gz")).write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    out = tmp_path / "t.json"
    assert timeline_main([str(run), "--out", str(out), "--json"]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    ours = next(e for e in events if e.get("cat") == "phase" and e["name"] == "rollout")
    kineto = next(e for e in events if e.get("name") == "phase/rollout")
    assert kineto["pid"] == 0 and kineto["tid"] >= 10
    # µs: Kineto's range lies inside our phase slice (the range opens just after the phase's clock reading,
    # the first one of a profile a few ms later), not 3 s away
    assert ours["ts"] - 2_000 <= kineto["ts"] and kineto["ts"] + kineto["dur"] <= ours["ts"] + ours["dur"] + 2_000
    assert any(e["ph"] == "M" and e["name"] == "thread_name" and e["args"]["name"].startswith("torch.profiler")
               for e in events)


def _rec(rank: int, times: dict[str, float], waits: dict[str, float] | None = None) -> dict:
    rec = {"step": 1, "rank": rank, **{f"time/{k}": v for k, v in times.items()}}
    rec["time/step"] = sum(times.values())
    if waits is not None:
        rec.update({f"wait/{k}": v for k, v in waits.items()})
        rec["wait/total"] = sum(waits.values())
    return rec


def test_straggler_rule_uses_measured_waits() -> None:
    """Rank 0 is slow in rollout (+0.8 s), rank 1 in reward (+0.6 s); rank 1 still reaches the collective first
    and waits 0.2 s there. By durations alone rank 1's slow reward is excused as a likely wait for rank 0's
    earlier slowness; with the measured waits both stragglers are named and rank 1's wait is not blamed."""
    cfg = DetectorConfig(straggler_steps=1)
    times = {0: {"rollout": 1.0, "reward": 0.1, "advantages": 0.01},
             1: {"rollout": 0.2, "reward": 0.7, "advantages": 0.21}}
    waits = {0: {"advantages": 0.0}, 1: {"advantages": 0.2}}
    by_duration = Straggler(cfg).update_ranks(1, {r: _rec(r, times[r]) for r in times})
    assert {(a.rank, a.evidence["phase"]) for a in by_duration} == {(0, "rollout")}
    measured = Straggler(cfg).update_ranks(1, {r: _rec(r, times[r], waits[r]) for r in times})
    assert {(a.rank, a.evidence["phase"]) for a in measured} == {(0, "rollout"), (1, "reward")}
    assert all("busy" in a.message and a.evidence["basis"].startswith("busy") for a in measured)
    reward = next(a for a in measured if a.evidence["phase"] == "reward")
    assert reward.evidence["time_s"] == pytest.approx(0.7) and reward.evidence["median_s"] == pytest.approx(0.1)


def test_phase_share_is_the_union_over_processes() -> None:
    from rlhf_core.runformat.timeline import Process, Timeline, union_ns

    assert union_ns([(0, 10), (5, 20), (30, 40)]) == 30 and union_ns([]) == 0
    steps = {0: {1: _span(1, 0, [("rollout", 60), ("weight_sync", 40)])},
             1: {1: _span(1, 0, [("rollout", 80), ("weight_sync", 20)])}}
    report = analyse(Timeline({r: Process(r) for r in steps}, steps))
    assert report.phase_share() == {"rollout": pytest.approx(0.8), "weight_sync": pytest.approx(0.4)}
