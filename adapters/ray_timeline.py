"""``rlhfkit import ray-timeline FILE --out RUN``: a Ray job's own task timeline as a kit run with a timeline.

Ray writes it with ``ray.timeline(filename=...)`` (task events are on by default in Ray 2.x; older clusters
needed ``RAY_PROFILING=1``). The file is a JSON list of Chrome trace events
(``ray/_private/profiling.py: chrome_tracing_dump``): per task one complete event ``cat="task::<Class>.<method>"``
(``name`` the method) on ``pid`` = the node and ``tid`` = the worker process (an actor lives in one worker),
``ts``/``dur`` in µs on that node's wall clock, plus ``task:execute``/``task:deserialize_arguments``/
``task:store_outputs``/``submit_task`` pieces, which are left out.

Each worker that ran a mapped method becomes a process of the run (``timeline.rank<N>.jsonl``, role from its
actor class), each mapped call a phase occurrence. Method names come from the frameworks' sources:

- OpenRLHF (``openrlhf/trainer/ray``): ``RolloutRayActor.generate``/``generate_responses`` (vLLM engines;
  ``LLMRayActor`` in older versions), ``ReferenceModelActor``/``RewardModelActor``/``CriticModelActor``/
  ``PolicyModelActor`` ``.forward`` (called through ``execute_batch``, so the class says which pass it is),
  ``PolicyModelActor.fit``/``CriticModelActor.fit`` (update), ``PolicyModelActor.broadcast_to_vllm`` and the
  engine's ``update_weight``/``update_weight_cuda_ipc`` (weight sync).
- veRL (``verl/workers/fsdp_workers.py``): ``generate_sequences``, ``compute_log_prob``, ``compute_ref_log_prob``,
  ``compute_values``, ``compute_rm_score``, ``update_actor``, ``update_critic``, ``update_weights``/
  ``rollout_mode`` (weight sync), on ``ActorRolloutRefWorker``/``CriticWorker``/``RewardModelWorker`` or, when
  roles are colocated, on ``WorkerDict`` with the role as prefix (``actor_rollout_generate_sequences``,
  ``ref_compute_ref_log_prob``, ``critic_update_critic``, ``rm_compute_rm_score``).

Steps: a Ray timeline has no step numbers. Overlapping update calls form one update wave; a step ends where the
first rollout call after its wave starts (so the weight sync after an update stays in its step). Clocks: Ray
stamps with each node's clock and measures no offset, so the processes carry offset 0 and method
``ray-node-clock``; multi-node jobs are only as aligned as their hosts' NTP.
"""
from __future__ import annotations

import argparse
import json
import sys
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.timeline import TimelineRecorder
from rlhf_core.runformat.clock import ClockOffset
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.runformat.timeline import union_ns

from .convert import SourceError

ROLLOUT, UPDATE = "rollout", "update"

# method -> phase, whatever the class
METHOD_PHASES = {
    "generate": ROLLOUT, "generate_responses": ROLLOUT, "generate_sequences": ROLLOUT,
    "add_requests": ROLLOUT, "get_responses": ROLLOUT,
    "compute_ref_log_prob": "ref_logprobs", "compute_log_prob": "old_logprobs",
    "compute_values": "values", "compute_rm_score": "reward",
    "update_actor": UPDATE, "update_critic": UPDATE, "fit": UPDATE,
    "broadcast_to_vllm": "weight_sync", "update_weight": "weight_sync", "update_weight_cuda_ipc": "weight_sync",
    "update_weights": "weight_sync", "rollout_mode": "weight_sync",
}
# OpenRLHF's forward passes (called through execute_batch): the class says which pass
CLASS_FORWARD = {
    "ReferenceModelActor": "ref_logprobs", "RewardModelActor": "reward", "CriticModelActor": "values",
    "PolicyModelActor": "old_logprobs",
}
CLASS_ROLES = {
    "RolloutRayActor": "rollout", "LLMRayActor": "rollout", "PolicyModelActor": "actor",
    "CriticModelActor": "critic", "ReferenceModelActor": "ref", "RewardModelActor": "reward",
    "ActorRolloutRefWorker": "actor_rollout", "AsyncActorRolloutRefWorker": "actor_rollout",
    "CriticWorker": "critic", "RewardModelWorker": "rm",
}
VERL_PREFIXES = ("actor_rollout_ref_", "actor_rollout_", "rollout_", "actor_", "critic_", "ref_", "rm_")


@dataclass
class RaySpan:
    """One mapped task: the worker it ran on, its actor class and role, the phase, start/end in ns."""

    node: str
    worker: str
    cls: str
    method: str
    role: str
    phase: str
    start: int
    end: int


def classify(cls: str, method: str) -> tuple[str, str | None]:
    """(role, phase or None) of ``<cls>.<method>``."""
    role = CLASS_ROLES.get(cls, cls)
    if cls == "WorkerDict":  # veRL colocated roles: <role>_<method>
        for prefix in VERL_PREFIXES:
            if method.startswith(prefix) and method[len(prefix):] in METHOD_PHASES:
                return prefix[:-1], METHOD_PHASES[method[len(prefix):]]
        return cls, METHOD_PHASES.get(method)
    if method in ("forward", "execute_batch") and cls in CLASS_FORWARD:
        return role, CLASS_FORWARD[cls]
    return role, METHOD_PHASES.get(method)


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """The trace events of a ``ray.timeline()`` file (a JSON list, or an object with ``traceEvents``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except OSError as err:
        raise SourceError(f"{p}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise SourceError(f"{p}: not JSON ({err})") from None
    if isinstance(data, dict):
        data = data.get("traceEvents")
    if not isinstance(data, list):
        raise SourceError(f"{p}: not a Chrome trace (expected a list of events)")
    return [e for e in data if isinstance(e, dict)]


def task_spans(events: Iterable[dict[str, Any]]) -> list[RaySpan]:
    """The mapped task events, in start order."""
    out = []
    for e in events:
        cat = e.get("cat")
        if e.get("ph") != "X" or not isinstance(cat, str) or not cat.startswith("task::"):
            continue
        ts, dur = e.get("ts"), e.get("dur")
        if not isinstance(ts, (int, float)) or not isinstance(dur, (int, float)):
            continue
        cls, _, method = cat[len("task::"):].rpartition(".")
        role, phase = classify(cls, method)
        if phase is None:
            continue
        start = round(float(ts) * 1000)
        out.append(RaySpan(str(e.get("pid")), str(e.get("tid")), cls, method, role, phase, start,
                           start + round(float(dur) * 1000)))
    out.sort(key=lambda s: s.start)
    return out


def step_bounds(spans: list[RaySpan]) -> list[int]:
    """Step ends: the first rollout start after each update wave (overlapping update calls are one wave)."""
    waves: list[list[int]] = []
    for s in (s for s in spans if s.phase == UPDATE):
        if waves and s.start <= waves[-1][1]:
            waves[-1][1] = max(waves[-1][1], s.end)
        else:
            waves.append([s.start, s.end])
    rollouts = sorted(s.start for s in spans if s.phase == ROLLOUT)
    bounds: list[int] = []
    for _, end in waves:
        nxt = next((t for t in rollouts if t >= end), None)
        if nxt is not None and (not bounds or nxt > bounds[-1]):
            bounds.append(nxt)
    return bounds


def import_ray_timeline(source: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the run (per-actor timeline files, per-actor phase times, a run-level record per step)."""


    spans = task_spans(load_events(source))
    if not spans:
        raise SourceError(f"{source}: no task events of known RLHF actor methods (see docs/timeline.md)")
    bounds = step_bounds(spans)
    workers: dict[tuple[str, str], int] = {}
    for s in spans:
        workers.setdefault((s.node, s.worker), len(workers))
    by_step: dict[int, dict[int, list[RaySpan]]] = {}
    for s in spans:
        step = bisect_right(bounds, s.start) + 1
        by_step.setdefault(step, {}).setdefault(workers[(s.node, s.worker)], []).append(s)
    world = len(workers)
    info = {idx: next(s for s in spans if (s.node, s.worker) == key) for key, idx in workers.items()}
    writers = [RunWriter(out, source="import", rank=r, world_size=world, tensorboard=False, overwrite=overwrite,
                         config={"importer": "ray-timeline", "source": str(source)})
               for r in range(world)]
    clock = ClockOffset(0, 0, "ray-node-clock", 0)
    try:
        for r in range(world):
            first = info[r]
            rec = TimelineRecorder(out, rank=r, world_size=world, role=first.role, clock=clock, source="ray",
                                   host=first.node, pid=0, name=f"{first.cls} on {first.node} {first.worker[:20]}")
            rec.anchor(0.0, 0)
            for step in sorted(by_step):
                items = by_step[step].get(r)
                if not items:
                    continue
                t0, t1 = min(s.start for s in items), max(s.end for s in items)
                rec.record_step(step, t0 / 1e9, t1 / 1e9, [(s.phase, s.start / 1e9, s.end / 1e9) for s in items])
                times: dict[str, float] = {}
                for s in items:
                    times[f"time/{s.phase}"] = times.get(f"time/{s.phase}", 0.0) + (s.end - s.start) / 1e9
                writers[r].log(step, times)
            rec.close()
        for step in sorted(by_step):
            items = [s for per in by_step[step].values() for s in per]
            reduced = {"time/step": (max(s.end for s in items) - min(s.start for s in items)) / 1e9}
            for phase in sorted({s.phase for s in items}):
                reduced[f"time/{phase}"] = union_ns([(s.start, s.end) for s in items if s.phase == phase]) / 1e9
            writers[0].log_reduced(step, reduced)
    finally:
        for w in reversed(writers):
            w.close()
    return {"run_dir": str(out), "steps": len(by_step), "processes": world,
            "roles": sorted({info[r].role for r in info}), "tasks": len(spans)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit import ray-timeline",
                                description="Convert a ray.timeline() file into a kit run with a timeline.")
    p.add_argument("source", help="the JSON file ray.timeline(filename=...) wrote")
    p.add_argument("--out", help="run directory to write (default: runs/<file name without .json>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    args = p.parse_args(argv)
    out = args.out or str(Path("runs") / Path(args.source).stem)
    try:
        summary = import_ray_timeline(args.source, out, overwrite=args.overwrite)
    except (SourceError, FileExistsError) as err:
        print(f"rlhfkit import: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
