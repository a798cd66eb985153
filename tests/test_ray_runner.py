"""``--engine ray``: the runner's step over Ray actors on this machine, against the local runner.

The in-process runs share one small local cluster (module fixture); the interrupt test runs ``train.py`` as a
process of its own, which starts and stops its own cluster. Each Ray run starts four actor processes that import
torch: tens of seconds on two shared cores, hence ``slow``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.timeline import read_timeline
from rlhf_core.train.config import parse_args

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--batch_size", "2", "--max_new_tokens", "5", "--steps_per_epoch", "3", "--epochs", "1", "--sample_interval",
        "0", "--no_tensorboard", "--ppo_epochs", "2", "--seed", "11", "--adaptive_kl", "--kl_target", "0.01"]
ROLES = {0: "trainer", 1: "rollout", 2: "reference", 3: "reward"}


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items()
            if k != "time" and not k.startswith(("time/", "mem/", "sys/", "throughput/", "src/weight_sync"))}


def spans(run_dir: Path, rank: int, phase: str) -> dict[int, list[tuple[int, int]]]:
    """{step: [(start, end) ns]} of one process's occurrences of ``phase``."""
    tl = read_timeline(run_dir)
    return {step: [(s, s + d) for name, s, d in span.phases if name == phase]
            for step, span in tl.steps[rank].items()}


def overlaps(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def test_importing_the_runner_does_not_import_ray():
    code = ("import sys; import rlhf_core.train.runner, rlhf_core.cli.train; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_engine_flags(tmp_path, capsys):
    cfg = parse_args(["--engine", "ray", "--ray_placement", "separate", "--off_policy_steps", "1",
                      "--run_dir", str(tmp_path / "r")])
    assert (cfg.engine, cfg.ray_placement, cfg.off_policy_steps) == ("ray", "separate", 1)
    for argv, flag in ((["--off_policy_steps", "1"], "--off_policy_steps"),
                       (["--engine", "ray", "--off_policy_steps", "2"], "--off_policy_steps"),
                       (["--engine", "spark"], "--engine")):
        with pytest.raises(SystemExit):
            parse_args([*argv, "--run_dir", str(tmp_path / "r")])
        assert f"argument {flag}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster():
    """One quiet two-CPU local cluster for the in-process runs (the runner then leaves it running)."""
    import ray

    from rlhf_core.train.ray_engine import _init_ray

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert _init_ray(parse_args(["--engine", "ray", "--run_dir", "unused"]))
    yield
    ray.shutdown()
    for sig, handler in handlers.items():  # ray.init installs its own; later tests in this process expect ours
        signal.signal(sig, handler)


@pytest.mark.slow
def test_sync_mode_gives_the_local_runners_metrics(tmp_path, cluster, capsys):
    from rlhf_core.train.runner import train

    local = train(parse_args([*BASE, "--run_dir", str(tmp_path / "local")]))
    remote = train(parse_args([*BASE, "--run_dir", str(tmp_path / "ray"), "--engine", "ray"]))
    assert local.status == remote.status == "finished"
    a, b = Run(tmp_path / "local").metrics(), Run(tmp_path / "ray").metrics()
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        ca, cb = comparable(ra), comparable(rb)
        assert ca.keys() == cb.keys()
        for key, value in ca.items():
            assert cb[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (ra["step"], key)
    assert b[1]["kl/coef"] != b[0]["kl/coef"]  # the adaptive controller moved, identically

    run = Run(tmp_path / "ray")
    meta = run.meta
    assert meta["status"] == "finished" and meta["engine"] == "ray" and meta["config"]["engine"] == "ray"
    assert Run(tmp_path / "local").meta["engine"] == "local"
    actors = meta["ray"]["actors"]
    assert set(actors) == set(ROLES.values()) and len({a["pid"] for a in actors.values()}) == 4
    lm_bytes = b[0]["src/weight_sync_bytes"]
    assert lm_bytes == meta["ray"]["weight_sync_bytes"] > 0
    for rec in b:
        assert {f"time/{p}" for p in ("rollout", "reward", "ref_logprobs", "update", "weight_sync")} <= set(rec)

    tl = read_timeline(tmp_path / "ray")
    assert {r: p.role for r, p in tl.processes.items()} == ROLES
    assert {p.pid for p in tl.processes.values()} == {a["pid"] for a in actors.values()}
    assert all(p.clock.get("method") in ("ray-ping-pong", "single-process") for p in tl.processes.values())
    # synchronous: each generation starts after the previous step's update and weight sync
    rollout, update = spans(tmp_path / "ray", 1, "rollout"), spans(tmp_path / "ray", 0, "update")
    assert not any(overlaps(rollout[s + 1], update[s]) for s in (1, 2))
    assert all(spans(tmp_path / "ray", 1, "weight_sync")[s] for s in (1, 2, 3))

    from profiler.timeline_trace import main as timeline_main

    capsys.readouterr()
    out = tmp_path / "trace.json"
    assert timeline_main([str(tmp_path / "ray"), "--out", str(out), "--json"]) == 0
    events = json.loads(out.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    assert sum(any(f"({role})" in n for n in names) for role in ROLES.values()) == 4


@pytest.mark.slow
def test_off_policy_mode_overlaps_generation_with_the_update(tmp_path, cluster):
    from rlhf_core.train.runner import train

    run_dir = tmp_path / "async"
    # a slow rollout actor (0.3 s a step) makes the overlap certain on a busy machine
    result = train(parse_args([*BASE, "--steps_per_epoch", "4", "--run_dir", str(run_dir), "--engine", "ray",
                               "--off_policy_steps", "1", "--ray_placement", "separate",
                               "--debug_slow_rank", "1", "--debug_slow_seconds", "0.3"]))
    assert result.status == "finished"
    run = Run(run_dir)
    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for rec in recs:
        assert all(math.isfinite(rec[k]) for k in ("loss/total", "reward/mean", "kl/ref_k3", "grad/norm",
                                                   "rollout/logprob_diff_max"))
    # step 1 samples the weights it trains; later steps sample weights one update old
    assert recs[0]["rollout/logprob_diff_max"] < 1e-4
    assert all(r["rollout/logprob_diff_max"] > 1e-4 for r in recs[1:])
    assert run.meta["status"] == "finished" and run.meta["ray"]["off_policy_steps"] == 1
    assert run.meta["ray"]["placement"] == "separate" and len(run.meta["ray"]["bundles"]) == 4
    rollout, update = spans(run_dir, 1, "rollout"), spans(run_dir, 0, "update")
    assert all(overlaps(rollout[s + 1], update[s]) for s in (1, 2, 3))


@pytest.mark.slow
def test_a_slowed_actor_is_on_the_critical_path_and_the_trainer_shows_the_wait(tmp_path, cluster):
    from rlhf_core.runformat.timeline import analyse
    from rlhf_core.train.runner import train

    run_dir = tmp_path / "slow"
    result = train(parse_args([*BASE, "--run_dir", str(run_dir), "--engine", "ray", "--ray_placement", "separate",
                               "--debug_slow_rank", "1", "--debug_slow_seconds", "0.3"]))
    assert result.status == "finished"
    report = analyse(read_timeline(run_dir))
    per_rank = report.per_rank()
    assert per_rank[0]["wait_share"] > 0.5 and per_rank[0]["idle_share"] < 0.2  # the trainer waits for its actors
    assert all(per_rank[r]["wait_s"] == 0 for r in (1, 2, 3))
    top = report.critical_path_share()[0]
    assert (top["rank"], top["phase"]) == (1, "rollout") and top["share"] > 0.5  # the 0.3 s rollouts


def _diagnose(run_dir: Path, capsys) -> list[dict]:
    """``rlhfkit diagnose RUN --json``: the alerts."""
    from rlhf_core.cli.diagnose import main as diagnose_main

    capsys.readouterr()
    assert diagnose_main([str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.exclusive  # which phases are slow is the point: no other test's load (conftest.py)
def test_diagnose_names_an_actor_that_became_slow_and_the_trainer_that_waited(tmp_path, cluster, capsys):
    from rlhf_core.train.runner import train

    run_dir = tmp_path / "slow_rollout"
    # the rollout actor (timeline rank 1) sleeps 0.3 s inside its phase from step 4 on
    result = train(parse_args([*BASE, "--steps_per_epoch", "7", "--run_dir", str(run_dir), "--engine", "ray",
                               "--debug_slow_rank", "1", "--debug_slow_seconds", "0.3",
                               "--debug_slow_from_step", "4"]))
    assert result.status == "finished"
    alerts = [a for a in _diagnose(run_dir, capsys) if a["rule"] == "straggler"]
    assert [(a["step"], a["rank"], a["evidence"]["role"], a["evidence"]["phase"]) for a in alerts] == [
        (4, 1, "rollout", "rollout")], alerts
    ev = alerts[0]["evidence"]
    assert ev["time_s"] >= 0.3 > 0.1 > ev["baseline_s"]
    assert ev["waited"][0]["rank"] == 0 and ev["waited"][0]["seconds"] >= 3 * 0.3  # the trainer, in actor_wait
    assert "rank 0 (trainer) waited" in alerts[0]["message"]


@pytest.mark.slow
@pytest.mark.exclusive  # which phases are slow is the point: no other test's load (conftest.py)
def test_diagnose_of_a_healthy_ray_run_has_no_straggler(tmp_path, cluster, capsys):
    from rlhf_core.train.runner import train

    run_dir = tmp_path / "healthy"
    # synchronous: every actor is on the critical path every step, the generation the longest of them
    result = train(parse_args([*BASE, "--steps_per_epoch", "7", "--run_dir", str(run_dir), "--engine", "ray"]))
    assert result.status == "finished"
    assert [a for a in _diagnose(run_dir, capsys) if a["rule"] == "straggler"] == []


@pytest.mark.slow
def test_a_resumed_ray_run_continues_the_same_computation(tmp_path, cluster):
    from rlhf_core.train.runner import train

    args = [*BASE, "--steps_per_epoch", "2"]
    full = train(parse_args([*args, "--epochs", "2", "--run_dir", str(tmp_path / "full")]))
    train(parse_args([*args, "--epochs", "1", "--run_dir", str(tmp_path / "part"), "--engine", "ray"]))
    resumed = train(parse_args(["--resume", str(tmp_path / "part"), "--epochs", "2"]))
    assert full.status == resumed.status == "finished"
    a, b = Run(tmp_path / "full").metrics(), Run(tmp_path / "part").metrics()
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key, value in comparable(ra).items():
            assert rb[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (ra["step"], key)
    run = Run(tmp_path / "part")
    assert run.meta["engine"] == "ray" and len(run.meta["resumed_at"]) == 1
    assert {rank: sorted(steps) for rank, steps in read_timeline(tmp_path / "part").steps.items()} == {
        rank: [1, 2, 3, 4] for rank in ROLES}


@pytest.mark.slow
def test_a_dying_actor_fails_the_run_and_says_which(tmp_path, cluster):
    from rlhf_core.train.ray_engine import EngineError
    from rlhf_core.train.runner import train

    calls: list[int] = []

    def reward_that_dies(prompts, responses):
        calls.append(1)
        if len(calls) == 2:
            os._exit(1)
        return [0.0] * len(responses)

    run_dir = tmp_path / "dies"
    with pytest.raises(EngineError, match="the reward actor died"):
        train(parse_args([*BASE, "--run_dir", str(run_dir), "--engine", "ray"]), reward_that_dies)
    meta = Run(run_dir).meta
    assert meta["status"] == "failed" and "the reward actor died" in meta["reason"]
    assert [r["step"] for r in Run(run_dir).metrics()] == [1]


def _session_processes(driver_pid: int) -> list[psutil.Process]:
    """Ray processes of the cluster a driver started (its session folder ends with the driver's pid)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"_{driver_pid}/" in cmd or cmd.endswith(f"_{driver_pid}"):
            out.append(proc)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_marks_the_run_interrupted_and_stops_the_cluster(tmp_path, sig):
    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "train.py", *BASE, "--steps_per_epoch", "200", "--run_dir", str(run_dir),
           "--engine", "ray"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert _session_processes(proc.pid), "no Ray processes of this driver were found while it ran"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    meta = Run(run_dir).meta
    assert meta["status"] == "interrupted"
    assert meta["reason"] == ("SIGTERM" if sig == signal.SIGTERM else "KeyboardInterrupt")
    assert 2 <= len(Run(run_dir).metrics()) < 200
    for _ in range(40):  # the raylet and workers exit just after the driver
        if not _session_processes(proc.pid):
            break
        time.sleep(0.5)
    assert not _session_processes(proc.pid)
