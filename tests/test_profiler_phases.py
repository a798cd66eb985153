"""PhaseTimer: phase times add up to the step, peaks are recorded, ranges reach the profiler, off means off."""
import time

import pytest
import torch

from profiler.phases import PhaseTimer

PHASES = ("rollout", "reward", "update", "optimizer")


def _workload_step(timer: PhaseTimer, model: torch.nn.Module, opt: torch.optim.Optimizer, minibatches: int = 2,
                   batch: int = 32) -> dict:
    timer.start_step()
    with timer.phase("rollout"):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            y = model(x)
    with timer.phase("reward"):
        score = y.mean(-1)
    for _ in range(minibatches):
        with timer.phase("update"):
            loss = (model(x).mean(-1) - score).square().mean()
            loss.backward()
        with timer.phase("optimizer"):
            opt.step()
            opt.zero_grad()
    return timer.end_step()


@pytest.fixture()
def model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    return model, torch.optim.Adam(model.parameters())


def test_phase_times_add_up_to_step_time(model_and_opt):
    # summed over a short run, best of three runs: a preemption of this shared 2-core CPU between two phases (seen
    # in CI with other jobs running: 6 ms of a 48 ms run) is not the timer's error; a timer that loses time
    # outside its phases loses it in every run
    timer = PhaseTimer("cpu")
    gaps = []
    for _ in range(3):
        recs = [_workload_step(timer, *model_and_opt, batch=512) for _ in range(3)]
        phases = sum(r[f"time/{p}"] for r in recs for p in PHASES)
        steps = sum(r["time/step"] for r in recs)
        assert steps > 0 and all(r["time/step"] >= sum(r[f"time/{p}"] for p in PHASES) for r in recs)
        gaps.append(abs(phases - steps) / steps)
        if gaps[-1] <= 0.05:
            break
    assert min(gaps) <= 0.05, gaps


def test_peaks_are_recorded(model_and_opt):
    timer = PhaseTimer("cpu")
    four = _workload_step(timer, *model_and_opt, minibatches=4)
    for p in PHASES:
        assert four[f"mem/{p}_peak_bytes"] > 0
    assert four["mem/peak_bytes"] == max(four[f"mem/{p}_peak_bytes"] for p in PHASES)


def test_a_repeated_phase_accumulates_time():
    timer = PhaseTimer("cpu")
    timer.start_step()
    for _ in range(4):
        with timer.phase("update"):
            time.sleep(0.01)
    rec = timer.end_step()
    assert rec["time/update"] >= 0.04
    assert rec["time/update"] <= rec["time/step"]


def test_track_memory_off_writes_no_memory_keys(model_and_opt):
    rec = _workload_step(PhaseTimer("cpu", track_memory=False), *model_and_opt)
    assert not [k for k in rec if k.startswith("mem/")]
    assert set(PHASES) <= {k[len("time/"):] for k in rec}


def test_disabled_timer_keeps_only_the_step_time(model_and_opt):
    assert list(_workload_step(PhaseTimer("cpu", enabled=False), *model_and_opt)) == ["time/step"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _workload_step(PhaseTimer("cpu", enabled=False), *model_and_opt)
    assert not [e for e in prof.events() if e.name.startswith("phase/")]


def test_start_step_clears_the_previous_step(model_and_opt):
    timer = PhaseTimer("cpu")
    _workload_step(timer, *model_and_opt)
    timer.start_step()
    with timer.phase("rollout"):
        pass
    rec = timer.end_step()
    assert "time/update" not in rec and "time/rollout" in rec


def test_a_failing_phase_is_still_timed():
    timer = PhaseTimer("cpu")
    timer.start_step()
    with pytest.raises(ValueError), timer.phase("reward"):
        raise ValueError("bad reward")
    assert "time/reward" in timer.end_step()


def test_phases_are_profiler_ranges(model_and_opt):
    timer = PhaseTimer("cpu", track_memory=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _workload_step(timer, *model_and_opt)
    names = {e.name for e in prof.events()}
    assert {f"phase/{p}" for p in PHASES} <= names


def test_rss_reader_matches_psutil():
    import psutil

    from profiler.phases import RssReader

    rss = RssReader()()
    assert abs(rss - psutil.Process().memory_info().rss) < 64 * 2**20


def test_rss_is_read_at_most_once_per_max_age_on_the_cpu(monkeypatch):
    """Phases ending soon after the last reading reuse it; one ending later than the max age reads again."""
    import time

    import profiler.phases as phases

    monkeypatch.setattr(phases, "RSS_MAX_AGE_S", 0.2)  # wide, so a busy machine cannot make it flaky
    timer = phases.PhaseTimer("cpu")
    readings = iter(range(1, 100))
    calls = []
    timer._rss = lambda: calls.append(1) or next(readings) * 1000
    timer.start_step()
    for name in ("rollout", "reward", "values"):
        with timer.phase(name):
            pass
    time.sleep(0.25)
    with timer.phase("advantages"):
        pass
    rec = timer.end_step()
    assert len(calls) == 2
    assert rec["mem/rollout_peak_bytes"] == rec["mem/reward_peak_bytes"] == rec["mem/values_peak_bytes"] == 1000
    assert rec["mem/advantages_peak_bytes"] == 2000
