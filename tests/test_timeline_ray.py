"""``rlhfkit import ray-timeline``: OpenRLHF/veRL actor methods mapped to phases, on Ray's real timeline format.

The real-job test runs this file as a script: a local Ray instance with actors named and called like
OpenRLHF's (``RolloutRayActor.generate``, ``ReferenceModelActor.forward``, ``RewardModelActor.forward``,
``PolicyModelActor.fit`` / ``broadcast_to_vllm``, ``RolloutRayActor.update_weight``), three steps, then
``ray.timeline(filename=...)``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.importers import main as import_main
from adapters.ray_timeline import classify, step_bounds, task_spans
from profiler.timeline_trace import main as timeline_main
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.timeline import read_timeline

ROOT = Path(__file__).resolve().parent.parent
# the generation's sleep, 6x the update's: their phase shares keep that order on a busy machine (a parallel run)
ROLLOUT_S = 0.3


def test_method_names_map_to_phases_and_roles() -> None:
    assert classify("RolloutRayActor", "generate") == ("rollout", "rollout")
    assert classify("ReferenceModelActor", "execute_batch") == ("ref", "ref_logprobs")
    assert classify("RewardModelActor", "forward") == ("reward", "reward")
    assert classify("CriticModelActor", "fit") == ("critic", "update")
    assert classify("PolicyModelActor", "broadcast_to_vllm") == ("actor", "weight_sync")
    assert classify("PolicyModelActor", "append") == ("actor", None)
    assert classify("WorkerDict", "actor_rollout_generate_sequences") == ("actor_rollout", "rollout")
    assert classify("WorkerDict", "actor_rollout_compute_log_prob") == ("actor_rollout", "old_logprobs")
    assert classify("WorkerDict", "ref_compute_ref_log_prob") == ("ref", "ref_logprobs")
    assert classify("WorkerDict", "critic_update_critic") == ("critic", "update")
    assert classify("WorkerDict", "rm_compute_rm_score") == ("rm", "reward")
    assert classify("ActorRolloutRefWorker", "update_weights") == ("actor_rollout", "weight_sync")


def _event(cls: str, method: str, ts_ms: float, dur_ms: float, worker: str) -> dict:
    """A task event as ``ray/_private/profiling.py`` writes it (µs; node as pid, worker as tid)."""
    return {"cat": f"task::{cls}.{method}", "name": method, "pid": "10.0.0.1", "tid": f"worker:{worker}",
            "ts": ts_ms * 1000.0, "dur": dur_ms * 1000.0, "ph": "X", "cname": "generic_work",
            "args": {"name": method, "task_id": "t"}}


def _verl_events() -> list[dict]:
    """Two veRL steps on a colocated WorkerDict (one worker) plus a critic worker."""
    ev = []
    for k in range(2):
        t = 1_000.0 * k
        ev += [_event("WorkerDict", "actor_rollout_generate_sequences", t, 400, "a"),
               _event("WorkerDict", "ref_compute_ref_log_prob", t + 410, 50, "a"),
               _event("WorkerDict", "actor_rollout_compute_log_prob", t + 470, 50, "a"),
               _event("CriticWorker", "compute_values", t + 410, 60, "c"),
               _event("WorkerDict", "actor_rollout_update_actor", t + 600, 200, "a"),
               _event("CriticWorker", "update_critic", t + 600, 150, "c"),
               _event("WorkerDict", "actor_rollout_rollout_mode", t + 820, 30, "a")]
        ev.append({"cat": "task:execute", "name": "task:execute", "pid": "10.0.0.1", "tid": "worker:a",
                   "ts": t * 1000.0, "dur": 1.0, "ph": "X"})
    return ev


def test_steps_end_where_the_next_rollout_starts() -> None:
    spans = task_spans(_verl_events())
    assert len(spans) == 14  # task:execute pieces are not phases
    assert step_bounds(spans) == [1_000 * 1_000_000]  # ns: step 2 begins with its generation


def test_import_of_a_verl_timeline(tmp_path: Path, capsys) -> None:
    src = tmp_path / "timeline.json"
    src.write_text(json.dumps(_verl_events()))
    run_dir = tmp_path / "run"
    assert import_main(["ray-timeline", str(src), "--out", str(run_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["processes"] == 2
    tl = read_timeline(run_dir)
    roles = {p.role for p in tl.processes.values()}
    assert roles == {"actor_rollout", "critic"}  # the colocated worker takes the first role it ran
    a = next(r for r, p in tl.processes.items() if p.name.startswith("WorkerDict"))
    names = [n for n, _, _ in tl.steps[a][1].phases]
    assert names == ["rollout", "ref_logprobs", "old_logprobs", "update", "weight_sync"]
    assert tl.steps[a][2].phases[0][1] == 1_000 * 1_000_000  # ns on the shared clock, exactly Ray's µs
    run = Run(run_dir)
    assert [r["time/rollout"] for r in run.metrics()] == pytest.approx([0.4, 0.4])
    assert [r["time/step"] for r in run.metrics()] == pytest.approx([0.85, 0.85])
    assert import_main(["ray-timeline", str(src), "--out", str(run_dir)]) == 2  # exists, no --overwrite
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert import_main(["ray-timeline", str(bad), "--out", str(tmp_path / "r2")]) == 2


def _ray_job(path: str) -> None:
    """A tiny OpenRLHF-shaped Ray job (names from openrlhf/trainer/ray); writes ray.timeline() to ``path``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class RolloutRayActor:
        def generate(self, n: int) -> int:
            time.sleep(ROLLOUT_S)
            return n

        def update_weight(self, name: str) -> None:
            time.sleep(0.01)

    @ray.remote
    class ReferenceModelActor:
        def forward(self, n: int) -> int:
            time.sleep(0.02)
            return n

    @ray.remote
    class RewardModelActor:
        def forward(self, n: int) -> int:
            time.sleep(0.02)
            return n

    @ray.remote
    class PolicyModelActor:
        def fit(self) -> None:
            time.sleep(0.05)

        def broadcast_to_vllm(self) -> None:
            time.sleep(0.02)

    engine, ref, rm, policy = (RolloutRayActor.remote(), ReferenceModelActor.remote(), RewardModelActor.remote(),
                               PolicyModelActor.remote())
    for step in range(3):
        ray.get(engine.generate.remote(step))
        ray.get([ref.forward.remote(step), rm.forward.remote(step)])
        ray.get(policy.fit.remote())
        ray.get([policy.broadcast_to_vllm.remote(), engine.update_weight.remote("w")])
    time.sleep(1.5)  # task events reach the GCS asynchronously
    ray.timeline(filename=path)
    ray.shutdown()


def test_import_of_a_real_ray_job(tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray")
    src = tmp_path / "ray_timeline.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, __file__, str(src)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert import_main(["ray-timeline", str(src), "--out", str(run_dir)]) == 0
    tl = read_timeline(run_dir)
    assert sorted(p.role for p in tl.processes.values()) == ["actor", "ref", "reward", "rollout"]
    assert tl.step_numbers() == [1, 2, 3]
    phases = {n for by_step in tl.steps.values() for span in by_step.values() for n, _, _ in span.phases}
    assert phases == {"rollout", "ref_logprobs", "reward", "update", "weight_sync"}
    rollout = next(r for r, p in tl.processes.items() if p.role == "rollout")
    for step in (1, 2, 3):
        names = [n for n, _, _ in tl.steps[rollout][step].phases]
        assert names == ["rollout", "weight_sync"]  # the engine's weight update stays in its step
        assert tl.steps[rollout][step].phases[0][2] >= ROLLOUT_S * 1e9
    out = tmp_path / "trace.json"
    assert timeline_main([str(run_dir), "--out", str(out), "--json"]) == 0
    shares = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["phase_share"]
    assert shares["rollout"] > shares["update"] > 0 and 0 < shares["weight_sync"] < 0.5
    events = json.loads(out.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {n.split(" ")[2].strip("()") for pid, n in names.items() if pid < 4} == {"actor", "ref", "reward",
                                                                                  "rollout"}
    rows = Run(run_dir).metrics()
    assert len(rows) == 3 and all(r["time/rollout"] >= ROLLOUT_S and r["time/weight_sync"] > 0 for r in rows)


if __name__ == "__main__":
    _ray_job(sys.argv[1])
