"""A small API that turns any PyTorch training loop (plain, Lightning Fabric, …) into a kit run.

    import adapters.generic as kit

    with kit.run("runs/my_loop", config={"lr": 1e-5}) as run:
        for step in range(1, n + 1):
            with run.phase("rollout"):
                ...
            with run.phase("update"):
                loss.backward()
                run.capture_grads(policy)          # optional: per-block norms before clipping
                clip_grad_norm_(policy.parameters(), 1.0)
                opt.step(); opt.zero_grad()
            run.log(step, {"loss/total": loss.item(), "my_metric": 3}, model=policy, ref_model=ref)

``log`` keeps canonical keys as they are and stores any other name as ``src/<name>``; with ``model`` it adds
gradient norms (when gradients are present or were captured) and drift against ``ref_model`` (or, without
one, against the weights first seen by :meth:`KitRun.snapshot` / the first ``log``).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from profiler.phases import PhaseTimer
from profiler.timeline import TimelineRecorder
from rlhf_core.runformat.clock import ClockOffset
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.analysis import LiveAlerts
from rlhf_core.stability.detectors import Alert
from rlhf_core.train import distributed as dist_utils
from rlhf_core.train.probes import block_drift, block_grad_norms, kl_estimates, layer_metrics, param_snapshot

from .extras import Extras, TraceSpec, trace_schedule
from .mapping import MAPPERS

__all__ = ["run", "KitRun", "kl_estimates"]


class KitRun:
    """One run being written by a custom loop: phases, step records with probes, live alerts."""

    def __init__(self, writer: RunWriter, *, device: str = "cpu", alerts: bool = True,
                 diagnoser_config: Mapping[str, Any] | None = None, mapping: str = "none",
                 timeline: TimelineRecorder | None = None):
        if mapping not in MAPPERS:
            raise ValueError(f"unknown mapping {mapping!r}; choose from {', '.join(MAPPERS)}")
        self.writer = writer
        self._map = MAPPERS[mapping]
        self._timer = PhaseTimer(device, timeline=timeline)
        self._in_step = False
        self._grads: tuple[float, dict[str, float]] | None = None
        self._start_params: dict[int, dict[str, torch.Tensor]] = {}
        self._live = LiveAlerts(writer, diagnoser_config) if alerts and writer.is_main else None
        self._extras: Extras | None = None

    @property
    def alerts(self) -> list[Alert]:
        """The alerts raised so far (each is also an event in ``events.jsonl``)."""
        return self._live.alerts if self._live is not None else []

    @property
    def run_dir(self) -> Path:
        return self.writer.run_dir

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the current step (``time/<name>``); the first phase of a step starts its clock."""
        if not self._in_step:
            self._timer.start_step()
            self._in_step = True
        with self._timer.phase(name):
            yield

    def capture_grads(self, model: torch.nn.Module) -> None:
        """Per-block gradient norms now (call after backward, before clipping, for pre-clip norms)."""
        self._grads = block_grad_norms(model)

    def snapshot(self, model: torch.nn.Module) -> None:
        """Remember the model's current (trainable) weights as the reference for drift."""
        self._start_params[id(model)] = param_snapshot(model, trainable_only=True)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, *, model: torch.nn.Module | None = None,
            ref_model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Write the record of ``step``: mapped metrics, phase times, and probes of the models given."""
        record: dict[str, Any] = {}
        if self._in_step:
            record.update(self._timer.end_step(step))
            self._in_step = False
        record.update(self._map(dict(metrics or {})))
        if model is not None:
            record.update(self._probes(model, ref_model))
        self._grads = None
        rec = self.writer.log(step, record)
        if self._live is not None:
            self._live.update([rec])
        if self._extras is not None:
            self._extras.step()
        return rec

    def _probes(self, model: torch.nn.Module, ref_model: torch.nn.Module | None) -> dict[str, float]:
        out: dict[str, float] = {}
        grads = self._grads
        if grads is None and any(p.grad is not None for p in model.parameters()):
            grads = block_grad_norms(model)
        if grads is not None and grads[1]:
            out["grad/norm"] = grads[0]
            out.update(layer_metrics("grad", grads[1]))
        if ref_model is not None:
            ref = {n: p.detach() for n, p in ref_model.named_parameters()}
        else:
            if id(model) not in self._start_params:
                self.snapshot(model)
            ref = self._start_params[id(model)]
        rel, per_block = block_drift(model, ref)
        if per_block:
            out["drift/rel"] = rel
            out.update(layer_metrics("drift", per_block))
        return out

    def event(self, step: int | None, kind: str, **fields: Any) -> dict[str, Any]:
        """A notable event in ``events.jsonl`` (``RunWriter.event``)."""
        return self.writer.event(step, kind, **fields)

@contextlib.contextmanager
def run(
    run_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    source: str = "generic",
    overwrite: bool = False,
    resume: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "cpu",
    mapping: str = "none",
    system_interval_s: float | None = 1.0,
    trace_steps: int | TraceSpec | None = None,
    trace_options: Mapping[str, Any] | None = None,
    alerts: bool = True,
    diagnoser_config: Mapping[str, Any] | None = None,
    role: str = "worker",
    collective_phases: tuple[str, ...] = (),
    exchange_waits: bool = False,
) -> Iterator[KitRun]:
    """Open a run directory for a custom loop; the final status (finished/failed/interrupted) is always written.

    ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` set by torchrun or accelerate. The system
    sampler (``system.jsonl``, main process) reads CPU, RSS and GPUs every ``system_interval_s`` (1 s, as in the
    TRL adapter and the runner; None turns it off); ``trace_steps``/``trace_options`` as in the TRL adapter.
    Phase intervals go to ``timeline.rank<N>.jsonl`` labelled with ``role``; with an initialised
    ``torch.distributed`` group every rank measures its clock offset to rank 0 here (so every rank must call
    ``run``). ``collective_phases`` names the phases that hold a collective (where ranks wait for each other,
    docs/timeline.md); ``exchange_waits`` also puts each rank's measured waits in its records
    (``wait/<phase>``): one small all-reduce per logged step, so only for loops where every rank logs every step.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    trace = trace_schedule(trace_steps) if trace_steps is not None else None
    if mapping not in MAPPERS:  # checked before anything is written
        raise ValueError(f"unknown mapping {mapping!r}; choose from {', '.join(MAPPERS)}")
    with RunWriter(run_dir, source=source, config=config, rank=rank, world_size=world_size, device=device,
                   overwrite=overwrite, resume=resume,
                   extra_meta={"adapter": {"name": "adapters.generic", "trace": trace}}) as writer:
        clock, group = _clock_of(rank, world_size)
        recorder = TimelineRecorder(writer.run_dir, rank=rank, world_size=world_size, role=role, clock=clock,
                                    collective=collective_phases, exchange_waits=exchange_waits, group=group,
                                    source=source)
        kit_run = KitRun(writer, device=device, alerts=alerts, diagnoser_config=diagnoser_config, mapping=mapping,
                         timeline=recorder)
        kit_run._extras = Extras(writer, interval_s=system_interval_s, schedule=trace, device=device,
                                 step_offset=1, trace_options=trace_options)
        try:
            yield kit_run
        finally:
            kit_run._extras.close()
            kit_run._timer.close()


def _clock_of(rank: int, world_size: int) -> tuple[Any, Any]:
    """(clock offset to rank 0, CPU process group) when a torch.distributed group is up; else a lone clock."""
    dist = torch.distributed
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return ClockOffset(), None
    info = dist_utils.DistInfo(rank, world_size)
    return dist_utils.measure_clock_offset(info), dist_utils.host_group(info)
