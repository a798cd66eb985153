"""TraceSession on a small workload shaped like a PPO step, and the report over the run it leaves."""
import gzip
import json
import logging

import pytest
import torch

from profiler import report
from profiler.flamegraph import read_folded
from profiler.phases import PhaseTimer
from profiler.sampler import SystemSampler
from profiler.tracing import TraceSession
from rlhf_core.runformat.run_writer import RunWriter

PHASES = ("rollout", "reward", "update", "optimizer")


def _loop(writer, timer, session, steps):
    # milliseconds of work per phase: the fixed cost of a phase boundary (timer + profiler ranges) must stay
    # small next to it, as in a real step, or the phases-add-up check measures scheduling noise
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        timer.start_step()
        with timer.phase("rollout"):
            x = torch.randn(256, 128)
            with torch.no_grad():
                y = model(x)
        with timer.phase("reward"):
            score = y.mean(-1)
        with timer.phase("update"):
            (model(x).mean(-1) - score).square().mean().backward()
        with timer.phase("optimizer"):
            opt.step()
            opt.zero_grad()
        rec = timer.end_step()
        rec["throughput/tokens_per_s"] = 256 / rec["time/step"]
        if writer is not None:
            writer.log(step, rec)
        session.step()


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """wait 1, warmup 1, active 2 over 5 steps: one window (steps 2-3) with the opt-in artefacts too, with the
    sampler running."""
    run_dir = tmp_path_factory.mktemp("prof") / "run"
    with (RunWriter(run_dir, source="generic", tensorboard=False) as w, SystemSampler(w, 0.05, nvml=False),
          TraceSession(w.traces_dir, wait=1, warmup=1, active=2, repeat=1, with_stack=True,
                       memory_timeline=True) as session):
        _loop(w, PhaseTimer("cpu"), session, 5)
    return run_dir, session


def test_one_window_with_every_artefact(profiled_run):
    run_dir, session = profiled_run
    assert len(session.windows) == 1
    win = session.windows[0]
    assert win["steps"] == [2, 3] and win["stem"] == "rank0_steps000002-000003"
    expected = {"trace", "ops_json", "ops_txt", "folded", "flame_svg", "stacks", "memory_html", "phases", "export"}
    assert expected <= set(win["files"]), win
    names = sorted(p.name for p in (run_dir / "traces").iterdir())
    assert names == sorted(f"rank0_steps000002-000003{s}" for s in (
        ".pt.trace.json.gz", ".ops.json", ".ops.txt", ".folded", ".flame.svg", ".stacks.folded", ".memory.html",
        ".phases.json", ".export.json"))


def test_trace_is_gzip_json_with_the_phase_ranges(profiled_run):
    run_dir, _ = profiled_run
    (trace,) = (run_dir / "traces").glob("*.pt.trace.json.gz")
    with gzip.open(trace, "rt") as fh:
        data = json.load(fh)
    ranges = [e for e in data["traceEvents"] if str(e.get("name", "")).startswith("phase/")]
    assert {e["name"] for e in ranges} == {f"phase/{p}" for p in PHASES}
    assert len(ranges) == 2 * len(PHASES)  # two active steps
    assert any(e.get("name") == "[memory]" for e in data["traceEvents"])


def test_op_table_text_and_json(profiled_run):
    run_dir, _ = profiled_run
    rows = json.loads(next((run_dir / "traces").glob("*.ops.json")).read_text())
    ops = {r["name"]: r for r in rows if r["kind"] == "op"}
    assert "aten::addmm" in ops and ops["aten::addmm"]["count"] >= 2 and ops["aten::addmm"]["self_cpu_us"] > 0
    assert {r["kind"] for r in rows} >= {"op", "range"}
    assert "aten::addmm" in next((run_dir / "traces").glob("*.ops.txt")).read_text()


def test_flame_graph_files_name_the_phases(profiled_run):
    run_dir, _ = profiled_run
    stacks = read_folded(next((run_dir / "traces").glob("*[0-9].folded")))
    assert {f"phase/{p}" for p in PHASES} <= {f for s in stacks for f in s}
    assert {s[0] for s in stacks} == {"ProfilerStep*"}  # Python frames around the loop are not double counted
    svg = next((run_dir / "traces").glob("*.flame.svg")).read_text()
    assert svg.startswith("<svg") and all(f"phase/{p}" in svg for p in ("rollout", "update", "optimizer"))
    py = read_folded(next((run_dir / "traces").glob("*.stacks.folded")))
    assert any("linear.py" in s[-1] and "forward" in s[-1] for s in py)  # export_stacks: Python frames


def test_memory_timeline_and_phase_memory(profiled_run):
    run_dir, _ = profiled_run
    assert "<html" in next((run_dir / "traces").glob("*.memory.html")).read_text()[:2000].lower()
    phases = json.loads(next((run_dir / "traces").glob("*.phases.json")).read_text())
    assert set(phases) == set(PHASES)
    for row in phases.values():
        assert row["count"] == 2 and row["total_ms"] > 0
    assert phases["update"]["alloc_peak_bytes"]["cpu"] > 0


def test_report_over_the_profiled_run(profiled_run, capsys):
    run_dir, _ = profiled_run
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    for needle in ("Phases", "rollout", "optimizer", "Slowest steps", "Top ops", "aten::addmm", "system:"):
        assert needle in out
    assert report.main([str(run_dir), "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["phase"] for r in data["phases"]] == list(PHASES)
    assert len(data["trace"]["ops"]) == 3 and all(r["kind"] == "op" for r in data["trace"]["ops"])
    assert all(r["trace_alloc_peak_bytes"] for r in data["phases"] if r["phase"] != "reward")
    assert sum(r["share"] for r in data["phases"]) == pytest.approx(1.0, abs=0.05)
    assert data["system"]["samples"] >= 1 and data["throughput"]["tokens_per_s_mean"] > 0
    assert {r["step"]: r["traced"] for r in data["slowest"]} == {0: False, 1: False, 2: True, 3: True, 4: False}


def test_a_window_cut_short_by_the_end_of_the_run_is_still_saved(tmp_path):
    with TraceSession(tmp_path, wait=0, warmup=1, active=5, with_stack=False, profile_memory=False) as s:
        _loop(None, PhaseTimer("cpu", track_memory=False), s, 3)
    assert len(s.windows) == 1 and s.windows[0]["steps"] == [1, 2]
    assert {"trace", "ops_json", "folded", "phases"} <= set(s.windows[0]["files"])
    assert "stacks" not in s.windows[0]["files"]  # with_stack=False: no Python stacks, no memory timeline


def test_a_failing_artefact_does_not_stop_the_others(tmp_path, monkeypatch, caplog):
    import torch.cuda._memory_viz as viz

    def broken(*a, **k):
        raise RuntimeError("viz broke")

    monkeypatch.setattr(viz, "profile_plot", broken)
    with (caplog.at_level(logging.WARNING, logger="profiler.tracing"),
          TraceSession(tmp_path, wait=0, warmup=1, active=1, with_stack=True, memory_timeline=True) as s):
        _loop(None, PhaseTimer("cpu"), s, 2)
    files = s.windows[0]["files"]
    assert "memory_html" not in files and {"trace", "ops_json", "folded", "stacks"} <= set(files)
    assert "viz broke" in caplog.text


@pytest.mark.parametrize("kw", [dict(active=0), dict(wait=-1), dict(repeat=-2), dict(warmup=1.5)])
def test_bad_schedule_is_refused(tmp_path, kw):
    with pytest.raises(ValueError, match="profile"):
        TraceSession(tmp_path, **kw)


def test_step_outside_the_session_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="outside"):
        TraceSession(tmp_path).step()


def test_a_window_opened_by_the_last_step_writes_nothing(tmp_path):
    # repeat=0 (forever) with wait 0: the runner's step() after the last step opens a window nobody fills
    with TraceSession(tmp_path, wait=1, warmup=0, active=1, repeat=0, with_stack=False, profile_memory=False) as s:
        _loop(None, PhaseTimer("cpu", track_memory=False), s, 3)
    assert [w["steps"] for w in s.windows] == [[1]]
    assert [p.name for p in tmp_path.glob("*.pt.trace.json.gz")] == ["rank0_steps000001-000001.pt.trace.json.gz"]
