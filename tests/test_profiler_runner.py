"""The profiler inside the real PPO runner: phase times, the sampler, ``--profile`` traces and the report."""
import gzip
import json

import pytest

from profiler import report
from rlhf_core.runformat.run_reader import Run
from rlhf_core.train.runner import LOCAL_PHASES as PHASES  # the local runner's phases (no weight_sync)


def test_phase_times_of_a_short_run_add_up_to_the_step_time(smoke_run_dir):
    # Summed over the run (the criterion): one OS preemption between two phases of one step on a
    # shared CPU is not the timer's error. Per step, the phases can never exceed the step they sit in.
    records = Run(smoke_run_dir).metrics()
    assert len(records) == 4
    total_phases = total_steps = 0.0
    for rec in records:
        phases = sum(rec[f"time/{p}"] for p in PHASES if f"time/{p}" in rec)
        assert phases <= rec["time/step"], rec["step"]
        assert {f"time/{p}" for p in PHASES} <= set(rec) and rec["mem/peak_bytes"] > 0
        total_phases += phases
        total_steps += rec["time/step"]
    assert abs(total_phases - total_steps) <= 0.05 * total_steps


def test_sampler_ran_at_its_rate_and_stopped_with_the_run(smoke_run_dir):
    run = Run(smoke_run_dir)
    samples = run.system()
    start, end = run.meta["start_time"], run.meta["end_time"]
    assert samples and {"cpu/process_percent", "mem/rss_bytes"} <= set(samples[0])
    assert start <= samples[0]["time"] and samples[-1]["time"] <= end  # stopped before the run was closed
    assert len(samples) <= (end - start) / 0.2 + 2  # --sample_interval 0.2, plus the reading at stop()
    periodic = [r["time"] for r in samples[:-1]]
    if len(periodic) >= 3:
        gaps = sorted(b - a for a, b in zip(periodic, periodic[1:]))
        assert gaps[len(gaps) // 2] == pytest.approx(0.2, abs=0.1)


def test_report_of_the_smoke_run(smoke_run_dir, capsys):
    assert report.main([str(smoke_run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["phase"] for r in data["phases"]] == list(PHASES)
    assert abs(data["untimed"]["share"]) < 0.05
    assert data["throughput"]["tokens_per_s_mean"] > 0 and len(data["slowest"]) == 4


@pytest.mark.slow
def test_train_with_profile_writes_a_trace_window(tmp_path, capsys):
    from rlhf_core.cli.train import main

    # the default trace leaves out the Python stacks, which make the export of a generate() window take tens of
    # seconds here (--profile_full adds them; covered on a small workload in test_profiler_tracing.py)
    run_dir = tmp_path / "run"
    rc = main(["--epochs", "1", "--steps_per_epoch", "3", "--batch_size", "1", "--ppo_epochs", "1",
               "--max_new_tokens", "3", "--sample_interval", "0", "--no_tensorboard", "--run_dir", str(run_dir),
               "--profile", "--profile_wait", "1", "--profile_warmup", "1", "--profile_active", "1"])
    assert rc == 0
    traces = sorted((run_dir / "traces").glob("*.pt.trace.json.gz"))
    assert [t.name for t in traces] == ["rank0_steps000003-000003.pt.trace.json.gz"]
    with gzip.open(traces[0], "rt") as fh:
        names = {e.get("name") for e in json.load(fh)["traceEvents"]}
    assert {f"phase/{p}" for p in PHASES} <= names
    folded = (run_dir / "traces" / "rank0_steps000003-000003.folded").read_text()
    assert "phase/rollout" in folded and "phase/update" in folded
    capsys.readouterr()
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "rank0_steps000003-000003.pt.trace.json.gz" in out and "Top ops by self_cpu time" in out and "aten::" in out
    assert "trace export: " in out and not list((run_dir / "traces").glob("*.stacks.folded"))


def test_profile_full_and_a_window_the_run_never_reached(tmp_path, monkeypatch, capsys, caplog):
    import profiler.tracing
    from rlhf_core.cli.train import main

    opened = []

    def recording(*args, **kwargs):
        session = real(*args, **kwargs)
        opened.append((kwargs, session))
        return session

    real = profiler.tracing.TraceSession
    monkeypatch.setattr(profiler.tracing, "TraceSession", recording)
    run_dir = tmp_path / "run"
    rc = main(["--epochs", "1", "--steps_per_epoch", "2", "--batch_size", "1", "--ppo_epochs", "1",
               "--max_new_tokens", "3", "--sample_interval", "0", "--no_tensorboard", "--run_dir", str(run_dir),
               "--profile", "--profile_full", "--profile_wait", "2"])
    assert rc == 0
    ((kwargs, session),) = opened
    assert kwargs["with_stack"] is kwargs["memory_timeline"] is True and kwargs["writer"] is not None
    assert not session.windows and not (run_dir / "traces").exists()
    (event,) = [e for e in Run(run_dir).events() if e["kind"] == "trace"]
    assert event["step"] == 2 and "records steps 4-5" in event["message"]
    assert [r.getMessage()[:28] for r in caplog.records if r.name == "profiler.tracing"] == [
        "rlhfkit: no trace window ran"]
    capsys.readouterr()
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "trace: no trace window ran" in out and "train with --profile" not in out
