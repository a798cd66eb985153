"""``--engine ray``: the runner's step over Ray actors on this machine, against the local runner.

The in-process runs share one small local cluster (module fixture); the interrupt test runs ``train.py`` as a
process of its own, which starts and stops its own cluster. Each Ray run starts four actor processes that import
torch: tens of seconds on two shared cores, hence ``slow``, and the tests share runs (module fixtures) where one
run can answer several questions.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from devtools.headless import wait_for
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


@pytest.fixture(scope="module")
def sync_runs(cluster, tmp_path_factory) -> dict[str, Path]:
    """Three runs of one config (2 epochs x 4 steps): local; on Ray, its first epoch (``ray_epoch1``, a copy kept
    before the resume); the same Ray run resumed for the second epoch (``ray``). Each Ray run starts four actor
    processes that import torch, so the tests of synchronous metrics, resume and a healthy diagnosis share these."""
    from rlhf_core.train.runner import train

    root = tmp_path_factory.mktemp("sync")
    args = [*BASE, "--steps_per_epoch", "4"]
    full = train(parse_args([*args, "--epochs", "2", "--run_dir", str(root / "local")]))
    part = train(parse_args([*args, "--epochs", "1", "--run_dir", str(root / "ray"), "--engine", "ray"]))
    assert full.status == part.status == "finished"
    shutil.copytree(root / "ray", root / "ray_epoch1")
    resumed = train(parse_args(["--resume", str(root / "ray"), "--epochs", "2"]))
    assert resumed.status == "finished"
    return {"local": root / "local", "ray_epoch1": root / "ray_epoch1", "ray": root / "ray"}


@pytest.fixture(scope="module")
def slow_run(cluster, tmp_path_factory) -> Path:
    """Ray actors on bundles of their own, 7 steps; the rollout actor (timeline rank 1) sleeps 0.3 s inside its
    phase from step 4 on."""
    from rlhf_core.train.runner import train

    run_dir = tmp_path_factory.mktemp("slow") / "run"
    result = train(parse_args([*BASE, "--steps_per_epoch", "7", "--run_dir", str(run_dir), "--engine", "ray",
                               "--ray_placement", "separate", "--debug_slow_rank", "1",
                               "--debug_slow_seconds", "0.3", "--debug_slow_from_step", "4"]))
    assert result.status == "finished"
    return run_dir


def _diagnose(run_dir: Path, capsys) -> list[dict]:
    """``rlhfkit diagnose RUN --json``: the alerts."""
    from rlhf_core.cli.diagnose import main as diagnose_main

    capsys.readouterr()
    assert diagnose_main([str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# The two diagnosis tests come first in the file: the runs they judge by their timing are made while no other
# test runs (``exclusive``, conftest.py); the tests after them reuse the same runs.
@pytest.mark.slow
@pytest.mark.exclusive
def test_diagnose_of_a_healthy_ray_run_has_no_straggler(sync_runs, capsys):
    """Synchronous, resumed once: every actor is on the critical path every step, the generation the longest of
    them, and the new actors' first step after the resume is no straggler either."""
    assert [a for a in _diagnose(sync_runs["ray"], capsys) if a["rule"] == "straggler"] == []


@pytest.mark.slow
@pytest.mark.exclusive
def test_diagnose_names_an_actor_that_became_slow_and_the_trainer_that_waited(slow_run, capsys):
    alerts = [a for a in _diagnose(slow_run, capsys) if a["rule"] == "straggler"]
    assert [(a["step"], a["rank"], a["evidence"]["role"], a["evidence"]["phase"]) for a in alerts] == [
        (4, 1, "rollout", "rollout")], alerts
    ev = alerts[0]["evidence"]
    assert ev["time_s"] >= 0.3 > 0.1 > ev["baseline_s"]
    assert ev["waited"][0]["rank"] == 0 and ev["waited"][0]["seconds"] >= 3 * 0.3  # the trainer, in actor_wait
    assert "rank 0 (trainer) waited" in alerts[0]["message"]


@pytest.mark.slow
def test_a_slowed_actor_is_on_the_critical_path_and_the_trainer_shows_the_wait(slow_run):
    from rlhf_core.runformat.timeline import analyse

    report = analyse(read_timeline(slow_run, steps=(4, 7)))  # the steps of the 0.3 s rollouts
    per_rank = report.per_rank()
    assert per_rank[0]["wait_share"] > 0.5 and per_rank[0]["idle_share"] < 0.2  # the trainer waits for its actors
    assert all(per_rank[r]["wait_s"] == 0 for r in (1, 2, 3))
    top = report.critical_path_share()[0]
    assert (top["rank"], top["phase"]) == (1, "rollout") and top["share"] > 0.5


@pytest.mark.slow
def test_sync_mode_gives_the_local_runners_metrics(sync_runs, capsys):
    ray_dir = sync_runs["ray_epoch1"]
    a, b = Run(sync_runs["local"]).metrics()[:4], Run(ray_dir).metrics()
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        ca, cb = comparable(ra), comparable(rb)
        assert ca.keys() == cb.keys()
        for key, value in ca.items():
            assert cb[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (ra["step"], key)
    assert b[1]["kl/coef"] != b[0]["kl/coef"]  # the adaptive controller moved, identically

    run = Run(ray_dir)
    meta = run.meta
    assert meta["status"] == "finished" and meta["engine"] == "ray" and meta["config"]["engine"] == "ray"
    assert Run(sync_runs["local"]).meta["engine"] == "local"
    actors = meta["ray"]["actors"]
    assert set(actors) == set(ROLES.values()) and len({a["pid"] for a in actors.values()}) == 4
    lm_bytes = b[0]["src/weight_sync_bytes"]
    assert lm_bytes == meta["ray"]["weight_sync_bytes"] > 0
    for rec in b:
        assert {f"time/{p}" for p in ("rollout", "reward", "ref_logprobs", "update", "weight_sync")} <= set(rec)

    tl = read_timeline(ray_dir)
    assert {r: p.role for r, p in tl.processes.items()} == ROLES
    assert {p.pid for p in tl.processes.values()} == {a["pid"] for a in actors.values()}
    assert all(p.clock.get("method") in ("ray-ping-pong", "single-process") for p in tl.processes.values())
    # synchronous: each generation starts after the previous step's update and weight sync
    rollout, update = spans(ray_dir, 1, "rollout"), spans(ray_dir, 0, "update")
    assert not any(overlaps(rollout[s + 1], update[s]) for s in (1, 2, 3))
    assert all(spans(ray_dir, 1, "weight_sync")[s] for s in (1, 2, 3, 4))

    from profiler.timeline_trace import main as timeline_main

    capsys.readouterr()
    out = ray_dir.parent / "trace.json"
    assert timeline_main([str(ray_dir), "--out", str(out), "--json"]) == 0
    events = json.loads(out.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    assert sum(any(f"({role})" in n for n in names) for role in ROLES.values()) == 4


@pytest.mark.slow
def test_a_resumed_ray_run_continues_the_same_computation(sync_runs):
    a, b = Run(sync_runs["local"]).metrics(), Run(sync_runs["ray"]).metrics()
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key, value in comparable(ra).items():
            assert rb[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (ra["step"], key)
    run = Run(sync_runs["ray"])
    assert run.meta["engine"] == "ray" and len(run.meta["resumed_at"]) == 1
    assert {rank: sorted(steps) for rank, steps in read_timeline(sync_runs["ray"]).steps.items()} == {
        rank: list(range(1, 9)) for rank in ROLES}


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


def _interrupt(run_dir: Path, sig: int, env: dict[str, str] | None = None, extra: Sequence[str] = (),
               steps: int = 2) -> None:
    """``train.py --engine ray`` in a process of its own, sent ``sig`` once it logged ``steps`` steps; checks that
    it ended ``interrupted`` with exit code 130 and one line. ``env=None``: the run starts its own cluster (checked
    while it runs), which is gone soon after."""
    cmd = [sys.executable, "train.py", *BASE, "--steps_per_epoch", "200", "--run_dir", str(run_dir),
           "--engine", "ray", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= steps:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if env is None:
            assert _session_processes(proc.pid), "no Ray processes of this driver were found while it ran"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    meta = Run(run_dir).meta
    assert meta["status"] == "interrupted"
    assert meta["reason"] == ("SIGTERM" if sig == signal.SIGTERM else "KeyboardInterrupt")
    assert steps <= len(Run(run_dir).metrics()) < 200
    if env is None:  # the raylet and workers exit just after the driver
        wait_for(lambda: not _session_processes(proc.pid), timeout=20, interval=0.5)


def _alive(pids: list[int]) -> list[int]:
    """The processes that still run (a zombie its parent has not reaped yet has exited)."""
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted_and_stops_the_cluster_it_started(tmp_path):
    _interrupt(tmp_path / "stopped", signal.SIGTERM)


@pytest.fixture(scope="module")
def joined_async_run(cluster, tmp_path_factory) -> Path:
    """An off-policy run (``--off_policy_steps 1``, actors on bundles of their own, a rollout actor slowed to 0.3 s
    a step so that the overlap is certain on a busy machine) that joins the module's cluster through
    ``RAY_ADDRESS`` (``ray start``, ``ray job submit``), stopped with Ctrl-C after four steps."""
    import ray

    run_dir = tmp_path_factory.mktemp("joined") / "run"
    _interrupt(run_dir, signal.SIGINT, env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
               extra=["--off_policy_steps", "1", "--ray_placement", "separate", "--debug_slow_rank", "1",
                      "--debug_slow_seconds", "0.3"], steps=4)
    return run_dir


@pytest.mark.slow
def test_off_policy_mode_overlaps_generation_with_the_update(joined_async_run):
    run = Run(joined_async_run)
    recs = run.metrics()
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)) and len(recs) >= 4
    for rec in recs:
        assert all(math.isfinite(rec[k]) for k in ("loss/total", "reward/mean", "kl/ref_k3", "grad/norm",
                                                   "rollout/logprob_diff_max"))
    # step 1 samples the weights it trains; later steps sample weights one update old
    assert recs[0]["rollout/logprob_diff_max"] < 1e-4
    assert all(r["rollout/logprob_diff_max"] > 1e-4 for r in recs[1:])
    assert run.meta["ray"]["off_policy_steps"] == 1
    assert run.meta["ray"]["placement"] == "separate" and len(run.meta["ray"]["bundles"]) == 4
    rollout, update = spans(joined_async_run, 1, "rollout"), spans(joined_async_run, 0, "update")
    assert all(overlaps(rollout[s + 1], update[s]) for s in (1, 2, 3))


@pytest.mark.slow
def test_ctrl_c_of_a_run_on_a_running_cluster_stops_its_actors_and_leaves_the_cluster(joined_async_run):
    """The run joined the cluster (``RAY_ADDRESS``); Ctrl-C ended the run (exit 130, ``interrupted``: checked in
    the fixture), its four actors and its placement group, and the cluster keeps running."""
    import ray

    actors = Run(joined_async_run).meta["ray"]["actors"]
    assert len(actors) == 4
    wait_for(lambda: not _alive([a["pid"] for a in actors.values()]), timeout=20, interval=0.5)
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
    # the placement group is removed asynchronously
    wait_for(lambda: ray.available_resources().get("CPU") == 2, timeout=20, interval=0.5)


def test_an_address_with_no_cluster_is_one_line(tmp_path):
    """A stale RAY_ADDRESS fails in seconds with one line, not after Ray's minutes of retries; no run is left."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    out = subprocess.run([sys.executable, "train.py", "--engine", "ray", "--run_dir", str(tmp_path / "r")], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers there "
                                                        "(Connection refused)")
    assert not (tmp_path / "r").exists()


def test_only_a_host_and_port_with_nothing_listening_is_refused_early():
    import socket

    from rlhf_core.train.experience import RunnerError
    from rlhf_core.train.ray_engine import _check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        _check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
        port = server.getsockname()[1]
    with pytest.raises(RunnerError, match=f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there"):
        _check_reachable(f"127.0.0.1:{port}")
    for address in ("auto", "ray://head:10001", "head"):  # Ray's to resolve
        _check_reachable(address)
    try:
        server6 = socket.socket(socket.AF_INET6)
        server6.bind(("::1", 0))
    except OSError:  # no IPv6 loopback here
        return
    with server6:
        server6.listen()
        _check_reachable(f"[::1]:{server6.getsockname()[1]}")
