"""Capture TRL's ``ProfilingContext`` timings, which never reach ``Trainer.log``/``on_log``.

TRL times its phases (generation, rewards, log-prob passes, ``compute_loss``…) with
``trl.extras.profiling.ProfilingContext`` and sends the durations only to W&B/MLflow/Trackio. Wrapping the
class's ``_log_metrics`` hands each (name, start, end) to the listeners registered here first, on every rank,
then calls TRL's own method unchanged. The wrapper is installed while at least one listener is registered.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .mapping import trl_profile_phase

Listener = Callable[[str, float, float], None]

_lock = threading.Lock()
_listeners: list[Listener] = []
_original = None


def _profiling_class():
    try:
        from trl.extras.profiling import ProfilingContext
    except ImportError:
        return None
    return ProfilingContext


def add_listener(fn: Listener) -> bool:
    """Register ``fn(name, start, end)`` (perf_counter seconds); False when TRL is not installed."""
    global _original
    cls = _profiling_class()
    if cls is None:
        return False
    with _lock:
        if _original is None:
            original = cls._log_metrics

            def _log_metrics(self, duration: float) -> None:
                end = time.perf_counter()
                for listener in list(_listeners):
                    listener(self.name, end - duration, end)
                return original(self, duration)

            cls._log_metrics = _log_metrics
            _original = original
        _listeners.append(fn)
    return True


def remove_listener(fn: Listener) -> None:
    """Unregister ``fn``; the last one out restores TRL's method."""
    global _original
    with _lock:
        if fn in _listeners:
            _listeners.remove(fn)
        if not _listeners and _original is not None:
            cls = _profiling_class()
            if cls is not None:
                cls._log_metrics = _original
            _original = None


@dataclass
class Span:
    name: str
    start: float
    end: float

    @property
    def short(self) -> str:
        """Name without the trainer class: ``transformers.generate`` for ``GRPOTrainer.transformers.generate``."""
        return self.name.partition(".")[2] or self.name

    def inside(self, other: Span) -> bool:
        return other.start <= self.start and self.end <= other.end and self is not other


def phase_times(spans: list[Span]) -> tuple[dict[str, float], float, dict[str, float]]:
    """Per-phase seconds of one step, seconds spent preparing inputs, and raw per-name totals.

    A log-prob pass inside ``compute_loss`` belongs to the update; outside it, it is the reference (and, when
    TRL needs them, old-policy) log-probs of the rollout.
    """
    loss_spans = [s for s in spans if s.short == "compute_loss"]
    phases: dict[str, float] = {}
    raw: dict[str, float] = {}
    prepare = 0.0
    for span in spans:
        dur = span.end - span.start
        raw[span.short] = raw.get(span.short, 0.0) + dur
        if span.short == "_prepare_inputs":
            prepare += dur
            continue
        phase = trl_profile_phase(span.name)
        if phase is None:
            continue
        if phase == "ref_logprobs" and any(span.inside(s) for s in loss_spans):
            continue
        phases[phase] = phases.get(phase, 0.0) + dur
    return phases, prepare, raw
