"""``adapters.ray_hook``: the kit's sampler and phase recorder in every worker of a real Ray job.

The Ray tests start a local Ray instance in this process (2 CPUs) with the hook in the job's ``runtime_env``;
the workers get a clock 3 s ahead (``RLHFKIT_DEBUG_CLOCK_SKEW_NS``), so a phase lands where the driver saw the
call only if the measured offset is applied.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from adapters import ray_hook
from profiler.timeline_trace import main as timeline_main
from rlhf_core.runformat.clock import SKEW_ENV, wall_ns
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.timeline import read_timeline

SKEW_NS = 3_000_000_000


def test_phase_names_map_to_the_kits() -> None:
    assert [ray_hook.kit_phase(n) for n in ("generate", "generate_sequences", "train", "sync", "ref")] == [
        "rollout", "rollout", "update", "weight_sync", "ref_logprobs"]
    assert ray_hook.kit_phase("tokenize") == "tokenize"  # unknown names are kept


def test_clock_server_measures_a_skewed_clock() -> None:
    server = ray_hook.ClockServer()
    try:
        off = ray_hook.measure_udp(server.address("127.0.0.1"), now=lambda: wall_ns() + SKEW_NS)
        assert off is not None and off.method == "udp-ping-pong"
        # the true offset is exactly -SKEW_NS; NTP's bound: within half the round trip (+1 for the rounding)
        assert abs(off.offset_ns + SKEW_NS) <= off.uncertainty_ns + 1
        assert off.uncertainty_ns < 50_000_000
        wrong = server.address("127.0.0.1").rsplit(":", 1)[0] + ":" + "ab" * 16
        assert ray_hook.measure_udp(wrong, rounds=2, timeout_s=0.05) is None  # another job's token: no reply
    finally:
        server.close()


def _phases(tl, rank: int) -> dict[int, list[str]]:
    return {step: [n for n, _, _ in span.phases] for step, span in tl.steps[rank].items()}


def test_steps_given_counted_and_late(tmp_path: Path, monkeypatch) -> None:
    """Explicit steps, a late phase of an earlier step (its line is rewritten whole), and counted steps."""
    rec = ray_hook.Recorder(tmp_path, rank=0, role="driver", system_interval_s=None)
    monkeypatch.setattr(ray_hook, "_recorder", rec)
    for step in (1, 2):
        with ray_hook.phase("generate", step=step):
            time.sleep(0.002)
    with ray_hook.phase("sync", step=1):
        pass
    rec.close()
    tl = read_timeline(tmp_path)
    assert _phases(tl, 0) == {1: ["rollout", "weight_sync"], 2: ["rollout"]}
    assert tl.steps[0][1].phases[0][2] >= 2_000_000 and tl.processes[0].role == "driver"
    assert len((tmp_path / "timeline.rank0.jsonl").read_text().splitlines()) == 4  # header + 3 phase ends

    other = tmp_path / "counted"
    a, b = ray_hook.Recorder(other, system_interval_s=None), ray_hook.Recorder(other, system_interval_s=None)
    assert (a.rank, b.rank) == (1, 2)  # workers claim distinct ranks after the driver's 0
    monkeypatch.setattr(ray_hook, "_recorder", a)
    for name in ("generate", "reward", "generate", "reward", "generate"):
        with ray_hook.phase(name):
            pass
    a.close()
    b.close()
    assert _phases(read_timeline(other), 1) == {1: ["rollout", "reward"], 2: ["rollout", "reward"], 3: ["rollout"]}
    assert set(ray_hook.read_workers(other)) == {1, 2}


def test_a_phase_too_late_to_rewrite_its_step_is_dropped(tmp_path: Path, monkeypatch) -> None:
    rec = ray_hook.Recorder(tmp_path, rank=0, role="driver", system_interval_s=None)
    monkeypatch.setattr(ray_hook, "_recorder", rec)
    for step in range(1, ray_hook.KEEP_STEPS + 3):
        with ray_hook.phase("generate", step=step):
            pass
    for step in (1, 2, 3):  # 1 and 2 were let go: a line of "sync" alone would replace their phases
        with ray_hook.phase("sync", step=step):
            pass
    rec.close()
    steps = _phases(read_timeline(tmp_path), 0)
    assert steps[1] == steps[2] == ["rollout"] and steps[3] == ["rollout", "weight_sync"]
    assert len(steps) == ray_hook.KEEP_STEPS + 2


def test_phase_without_the_kit_does_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ray_hook, "_recorder", None)
    with ray_hook.phase("generate", step=1):
        pass
    monkeypatch.setenv(ray_hook.RUN_DIR_ENV, str(tmp_path / "file" / "run"))
    (tmp_path / "file").write_text("not a directory")
    ray_hook.setup()  # what a worker does with a run directory it cannot write: no exception
    assert ray_hook._recorder is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("rlhfkit: Ray setup hook off") and "continues" in err[0]


def test_job_writes_meta_and_the_runtime_env(tmp_path: Path) -> None:
    """The driver side alone: the runtime_env it hands to ray.init, rank 0's phases, the status at the end."""
    with ray_hook.job(tmp_path / "ok", base={"env_vars": {"A": "1"}, "pip": ["x"]}, system_interval_s=0.05) as env:
        assert env["worker_process_setup_hook"] == ray_hook.HOOK and env["pip"] == ["x"]
        assert env["env_vars"]["A"] == "1" and env["env_vars"][ray_hook.RUN_DIR_ENV] == str(tmp_path / "ok")
        assert ray_hook.measure_udp(env["env_vars"][ray_hook.CLOCK_ENV]) is not None  # the clock answers
        assert json.loads((tmp_path / "ok" / "meta.json").read_text())["status"] == "running"
        with ray_hook.phase("generate", step=1):
            time.sleep(0.06)
    meta = json.loads((tmp_path / "ok" / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["ray"]["steps"] == 1 and meta["ray"]["workers"] == 0
    assert read_timeline(tmp_path / "ok").processes[0].role == "driver"
    assert {r["rank"] for r in Run(tmp_path / "ok").system()} == {0}
    with pytest.raises(ValueError, match="boom"), ray_hook.job(tmp_path / "bad"):
        raise ValueError("boom")
    meta = json.loads((tmp_path / "bad" / "meta.json").read_text())
    assert (meta["status"], meta["reason"]) == ("failed", "ValueError: boom")
    with pytest.raises(ValueError, match="setup_hook"):
        ray_hook.runtime_env(tmp_path / "other", base={"worker_process_setup_hook": "mine.setup"})


class Generator:
    def generate(self, step: int) -> int:
        with ray_hook.phase("generate", step=step):
            time.sleep(0.05)
        return step

    def hook_state(self) -> tuple[str | None, bool]:
        import os

        return os.environ.get(ray_hook.RUN_DIR_ENV), ray_hook._recorder is not None


class Trainer:
    def train(self, step: int) -> None:
        with ray_hook.phase("train", step=step):
            time.sleep(0.03)
        with ray_hook.phase("sync", step=step):
            time.sleep(0.01)


@pytest.mark.slow
def test_a_real_ray_job(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    run_dir, blocker = tmp_path / "run", tmp_path / "blocker"
    blocker.write_text("a file where the failing actor's run directory should be")
    env = ray_hook.runtime_env(run_dir, base={"env_vars": {SKEW_ENV: str(SKEW_NS)}}, system_interval_s=0.2,
                               config={"test": True})
    calls: list[tuple[int, int, int]] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
        gen, trainer = ray.remote(Generator).remote(), ray.remote(Trainer).remote()
        broken = ray.remote(Generator).options(
            runtime_env={"env_vars": {ray_hook.RUN_DIR_ENV: str(blocker / "run")}}).remote()
        for step in (1, 2, 3):
            before = time.time_ns()
            assert ray.get(gen.generate.remote(step)) == step
            calls.append((step, before, time.time_ns()))
            ray.get(trainer.train.remote(step))
        assert ray.get([broken.generate.remote(s) for s in (1, 2)]) == [1, 2]  # the job goes on without the kit
        assert ray.get(broken.hook_state.remote()) == (str(blocker / "run"), False)  # the hook ran there, and gave up
        time.sleep(0.5)  # a few system samples at 0.2 s
        assert Run(run_dir).meta["status"] == "running"
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():  # ray.init installs its own; later tests in this process expect ours
            signal.signal(sig, handler)
        summary = ray_hook.finish()

    tl = read_timeline(run_dir)
    by_role = {p.role: r for r, p in tl.processes.items()}
    assert set(by_role) == {"Generator", "Trainer"}  # one process per actor with phases; idle workers have none
    g, t = by_role["Generator"], by_role["Trainer"]
    assert _phases(tl, g) == {s: ["rollout"] for s in (1, 2, 3)}
    assert _phases(tl, t) == {s: ["update", "weight_sync"] for s in (1, 2, 3)}
    assert all(span.phases[0][2] >= 0.05e9 for span in tl.steps[g].values())
    clock = tl.processes[g].clock
    assert clock["method"] == "udp-ping-pong" and abs(clock["offset_ns"] + SKEW_NS) <= clock["uncertainty_ns"] + 1
    for step, before, after in calls:  # on the driver's clock, inside the driver's view of the call
        start = tl.steps[g][step].phases[0][1]
        assert before - clock["uncertainty_ns"] - 1 <= start <= after

    workers = ray_hook.read_workers(run_dir)
    assert workers[0]["role"] == "driver" and workers[g]["role"] == "Generator" and workers[t]["role"] == "Trainer"
    assert workers[g]["pid"] == tl.processes[g].pid and workers[g]["node_id"] and workers[g]["worker_id"]
    sampled = {r["rank"] for r in Run(run_dir).system()}
    assert {0, g, t} <= sampled  # the driver and both actors' workers sampled CPU and memory

    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["status"], meta["source"], meta["adapter"]["name"]) == ("finished", "generic", "adapters.ray_hook")
    assert summary is not None and summary["timeline_processes"] == 2 and summary["workers"] >= 2
    rows = Run(run_dir).metrics()  # per step from the timeline: the window and the time any process ran a phase
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["steps"] == 3
    assert all(r["time/rollout"] >= 0.05 and r["time/update"] >= 0.03 and r["time/weight_sync"] >= 0.01
               and r["time/step"] >= r["time/rollout"] + r["time/update"] for r in rows)
    assert meta["ray"] == summary and meta["config"] == {"test": True}

    out = tmp_path / "trace.json"
    assert timeline_main([str(run_dir), "--out", str(out), "--json"]) == 0
    names = [e["args"]["name"] for e in json.loads(out.read_text())["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"]
    assert any("(Generator)" in n for n in names) and any("(Trainer)" in n for n in names)
    from dashboard.callbacks import timeline_outputs
    from dashboard.data import RunCache

    fig, rows, _, _ = timeline_outputs(RunCache(tmp_path).get("run"), None, "all")  # the Timeline tab
    assert {y for tr in fig["data"] for y in tr["y"]} == {f"rank {g} (Generator)", f"rank {t} (Trainer)"}
    assert {r["rank"] for r in rows} == {g, t}
