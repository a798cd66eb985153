"""The optional parts every in-process adapter starts the same way: system sampler and scheduled traces."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from rlhf_core.runformat.run_writer import RunWriter

TraceSpec = tuple[int, int, int] | tuple[int, int, int, int]


def trace_schedule(spec: int | TraceSpec) -> dict[str, int]:
    """``N`` traces N steps after one wait and one warm-up step; or give ``(wait, warmup, active[, repeat])``."""
    if isinstance(spec, bool) or not isinstance(spec, (int, tuple, list)):
        raise ValueError("trace_steps must be N or (wait, warmup, active[, repeat])")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError("trace_steps must be >= 1")
        return {"wait": 1, "warmup": 1, "active": spec, "repeat": 1}
    if len(spec) not in (3, 4):
        raise ValueError("trace_steps must be N or (wait, warmup, active[, repeat])")
    values = [int(v) for v in spec] + [1] * (4 - len(spec))
    if min(values) < 0 or values[2] < 1:
        raise ValueError("trace_steps needs wait, warmup >= 0 and active >= 1")
    return dict(zip(("wait", "warmup", "active", "repeat"), values))


class Extras:
    """The profiler's system sampler (``system.jsonl``, main process only) and a scheduled torch.profiler
    session (Chrome traces and op tables under ``traces/``); either may be off. Call :meth:`step` once per
    optimizer step and :meth:`close` at the end (both safe when nothing was started). ``trace_options`` go to
    ``TraceSession``: its defaults leave out the slow artefacts; ``{"with_stack": True}`` adds the Python stacks,
    ``{"memory_timeline": True}`` those and the memory timeline HTML, ``{"profile_memory": False}`` makes it
    cheaper still.
    A requested window the run never reached is a warning line and a ``trace`` event at :meth:`close`."""

    def __init__(self, writer: RunWriter, *, interval_s: float | None, schedule: dict[str, int] | None,
                 device: str, step_offset: int = 0, trace_options: Mapping[str, Any] | None = None):
        self._stack = contextlib.ExitStack()
        self.sampler: Any = None
        self.tracer: Any = None
        try:
            if interval_s is not None and writer.is_main:
                from profiler.sampler import SystemSampler

                self.sampler = self._stack.enter_context(SystemSampler(writer, interval_s))
            if schedule is not None:
                from profiler.tracing import TraceSession

                self.tracer = self._stack.enter_context(TraceSession(
                    writer.traces_dir, wait=schedule["wait"], warmup=schedule["warmup"], active=schedule["active"],
                    repeat=schedule["repeat"], device=device, rank=writer.rank, step_offset=step_offset,
                    writer=writer, **dict(trace_options or {})))
        except BaseException:
            self._stack.close()
            raise

    def step(self) -> None:
        if self.tracer is not None:
            self.tracer.step()

    def close(self) -> None:
        self._stack.close()
