"""Trace windows say what they cost and when they never ran; the report shows both, with hints in the words of
the producer that wrote the run, and throughput derived from a cumulative token count."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import adapters.generic as kit
from profiler import report
from profiler.tracing import TraceSession
from rlhf_core.runformat.keys import CumulativeRate
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter


def _work(steps: int, session: Any | None = None, run: Any | None = None) -> None:
    """A few small matmul steps: enough ops for a trace, milliseconds each."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    for step in range(1, steps + 1):
        if run is not None:
            with run.phase("update"):
                model(torch.randn(8, 32)).sum().backward()
            run.log(step, {"loss/total": 1.0})
        else:
            model(torch.randn(8, 32)).sum().backward()
            session.step()


def test_default_window_is_cheap_and_says_what_its_export_cost(tmp_path: Path) -> None:
    with TraceSession(tmp_path, wait=0, warmup=1, active=1) as s:
        _work(2, s)
    (win,) = s.windows
    assert {"trace", "ops_json", "folded", "phases", "export"} <= set(win["files"])
    assert not {"stacks", "memory_html"} & set(win["files"])  # the slow artefacts are opt-in
    assert not list(tmp_path.glob("*.memory.html")) and not list(tmp_path.glob("*.stacks.folded"))
    info = json.loads((tmp_path / f"{win['stem']}.export.json").read_text())
    assert info["steps"] == [1] and info["rank"] == 0
    assert {"collect", "trace", "ops_json", "folded", "phases"} <= set(info["export_s"])
    assert all(v >= 0 for v in info["export_s"].values())
    assert info["total_s"] == pytest.approx(sum(info["export_s"].values()), abs=1e-3)
    assert info["bytes"]["trace"] == (tmp_path / f"{win['stem']}.pt.trace.json.gz").stat().st_size > 0
    assert info["options"] == {"with_stack": False, "record_shapes": True, "profile_memory": True,
                               "memory_timeline": False}


def test_memory_timeline_needs_asking_even_with_stacks(tmp_path: Path) -> None:
    with TraceSession(tmp_path / "a", wait=0, warmup=1, active=1, with_stack=True) as s:
        _work(2, s)
    files = set(s.windows[0]["files"])
    assert "stacks" in files and "memory_html" not in files


def test_memory_timeline_turns_on_what_it_needs(tmp_path: Path) -> None:
    with TraceSession(tmp_path, wait=0, warmup=1, active=1, memory_timeline=True, profile_memory=False) as s:
        _work(2, s)
    assert {"stacks", "memory_html"} <= set(s.windows[0]["files"])
    assert "<html" in next(tmp_path.glob("*.memory.html")).read_text()[:2000].lower()


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in Run(run_dir).events() if e["kind"] == "trace"]


def test_a_window_past_the_end_of_the_run_is_a_warning_and_an_event(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="profiler.tracing"), \
            RunWriter(tmp_path / "run", source="generic", tensorboard=False) as w, \
            TraceSession(w.traces_dir, wait=1, warmup=1, active=2, step_offset=1, writer=w) as s:
        _work(2, s)
    assert not s.windows and not (tmp_path / "run" / "traces").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["rlhfkit: no trace window ran: the run ended at step 2, before the window that records "
                     "steps 3-4 (wait 1, warm-up 1, active 2); start it earlier or train longer"]
    (event,) = _events(tmp_path / "run")
    assert event["rule"] == "window_missed" and event["severity"] == "warning" and event["step"] == 2
    assert event["data"]["windows_written"] == 0 and event["data"]["next_window_first_step"] == 3


def test_some_of_repeated_windows_missed(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="profiler.tracing"), \
            TraceSession(tmp_path, wait=0, warmup=1, active=1, repeat=3) as s:
        _work(3, s)
    assert len(s.windows) == 1
    missed = s.missed()
    assert missed is not None and missed["message"].startswith("2 of 3 trace windows never ran")
    assert missed["next_window_first_step"] == 3
    assert len(caplog.records) == 1


def test_no_warning_when_the_window_ran_or_the_run_failed(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="profiler.tracing"):
        with TraceSession(tmp_path / "a", wait=0, warmup=1, active=1) as ran:
            _work(2, ran)
        with pytest.raises(RuntimeError), TraceSession(tmp_path / "b", wait=5, warmup=1, active=1):
            raise RuntimeError("training broke")
    assert ran.missed() is None and not caplog.records


def test_generic_run_records_the_missed_window_and_the_report_shows_it(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    with kit.run(run_dir, trace_steps=3, system_interval_s=None, alerts=False) as run:
        _work(2, run=run)
    (event,) = _events(run_dir)
    assert "steps 3-5" in event["message"]
    data = report.build_report(Run(run_dir))
    assert data["trace"] is None and data["trace_missed"] == [event["message"]]
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "trace: no trace window ran" in out and "top ops: no trace\n" in out
    assert "kit.run(..., trace_steps=N)" not in out  # it asked for a trace: told why there is none instead


def test_report_shows_the_export_cost_of_a_generic_run(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    with kit.run(run_dir, trace_steps=1, system_interval_s=None, alerts=False) as run:
        _work(3, run=run)
    assert not _events(run_dir)
    data = report.build_report(Run(run_dir))
    export = data["trace_export"]
    assert export["windows"] == 1 and export["total_s"] == pytest.approx(export["latest"]["total_s"])
    parts = export["latest"]["parts_s"]
    assert "ops_json" in parts and list(parts.values()) == sorted(parts.values(), reverse=True)
    assert export["latest"]["bytes"] > 0
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "trace export: " in out and "not in any step time" in out


def test_export_sidecars_of_two_ranks_and_windows(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunWriter(run_dir, source="generic", tensorboard=False) as w:
        w.log(1, {"time/step": 0.1})
    traces = run_dir / "traces"
    traces.mkdir()
    for rank, first, seconds in ((0, 1, 2.0), (0, 5, 3.0), (1, 1, 4.0), (1, 5, 0.5)):
        stem = f"rank{rank}_steps{first:06d}-{first:06d}"
        (traces / f"{stem}.pt.trace.json").write_text('{"traceEvents": []}')
        (traces / f"{stem}.export.json").write_text(json.dumps(
            {"rank": rank, "total_s": seconds, "export_s": {"trace": seconds}, "bytes": {"trace": 10}}))
    (traces / "rank0_steps000009-000009.pt.trace.json").write_text('{"traceEvents": []}')
    (traces / "rank0_steps000009-000009.export.json").write_text('["not", "an", "export"]')
    export = report.trace_exports(Run(run_dir), problems := [])
    assert export is not None and export["windows"] == 2 and export["total_s"] == pytest.approx(5.0)
    assert not problems  # a foreign sidecar is left out, not an error


@pytest.mark.parametrize("source, needle", [
    ("rlhf_core", "--profile"), ("trl", "profile_trainer(trainer, run_dir, trace_steps=N)"),
    ("transformers", "RLHFKitCallback(..., trace_steps=N)"), ("generic", "kit.run(..., trace_steps=N)"),
    ("import", "not available from an imported run"), ("verl", "not available from an imported run"),
    ("openrlhf", "not available from an imported run"), ("tensorboard", "not available from an imported run"),
])
def test_trace_hint_names_what_the_producer_understands(source: str, needle: str) -> None:
    hint = report.trace_hint(source)
    assert needle in hint
    assert ("--profile" in hint) == (source == "rlhf_core")


def test_throughput_from_a_cumulative_token_count(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    counts = [100, 100, 300, 300, 300, 600]  # a generation every 2-3 steps (num_iterations > 1)
    with RunWriter(run_dir, source="trl", tensorboard=False) as w:
        for step, count in enumerate(counts, 1):
            w.log(step, {"time/step": 0.5, "src/num_tokens": count})
    data = report.build_report(Run(run_dir))
    # 100 tokens in step 1; 200 over steps 2-3; 300 over steps 4-6
    assert data["throughput"]["tokens_per_s_mean"] == pytest.approx((200 + 200 + 200) / 3)
    assert data["throughput"]["source"] == "src/num_tokens over time/step"
    assert report.main([str(run_dir)]) == 0
    assert "tokens/s mean, 200.0 median (from src/num_tokens over time/step)" in capsys.readouterr().out


def test_cumulative_rate_edges() -> None:
    rate = CumulativeRate(start=None)
    rate.add_time(1.0)
    assert rate.update(50) is None  # no base yet (a resumed run)
    rate.add_time(2.0)
    assert rate.update(150) == pytest.approx(50.0)
    rate.add_time(1.0)
    assert rate.update(10) is None  # counter started over
    rate.add_time(float("nan"))
    rate.add_time(1.0)
    assert rate.update(float("inf")) is None
    assert rate.update(20) == pytest.approx(10.0)


def test_kit_run_samples_the_system_by_default(tmp_path: Path) -> None:
    with kit.run(tmp_path / "on", alerts=False) as run:
        _work(1, run=run)
    with kit.run(tmp_path / "off", alerts=False, system_interval_s=None) as run:
        _work(1, run=run)
    records = Run(tmp_path / "on").system()
    assert records and records[0]["mem/rss_bytes"] > 0
    assert not (tmp_path / "off" / "system.jsonl").exists()
