"""Phase timer: wall time and peak memory of each RLHF phase within a step.

Each phase is a ``torch.profiler.record_function`` range named ``phase/<name>`` (so traces and flame graphs
show it); its time lands in the step record as ``time/<phase>`` and its peak as ``mem/<phase>_peak_bytes``.

Why it is built this way:
- CUDA work is asynchronous, so on CUDA the phase edges are CUDA events on the current stream, resolved with
  one synchronisation in :meth:`PhaseTimer.end_step` (no per-phase sync, so phases keep overlapping with
  the host as in an uninstrumented run). On the CPU a host clock is exact and nothing is synchronised.
- Peaks: on CUDA ``torch.cuda.max_memory_allocated`` reset at each phase start; on the CPU the process RSS
  at each phase end (with ``--profile`` the trace's allocator events give the op-level peak, see
  :mod:`profiler.trace_analysis`). On Linux the RSS is one ``pread`` of ``/proc/self/statm`` (~2 µs in a loop,
  ~15 µs between a step's ops: a system call, here in a VM, also costs the ops after it) instead of psutil
  (~25 µs). It is read at most once per ``RSS_MAX_AGE_S`` (5 ms): a phase ending sooner after the last
  reading reports that reading. Reading at every phase end cost ~1% of a tiny-model step (15 phases in 18 ms);
  phases of real models last longer than 5 ms and each still gets a reading of its own.
- The ``record_function`` range is opened only while a profiler is recording: outside a trace window it
  would cost ~10 µs per phase and show up nowhere.
- A phase that occurs several times in a step (PPO minibatches) accumulates its time and keeps its max peak.
- With a :class:`profiler.timeline.TimelineRecorder` each occurrence's start and end also go to the run's
  timeline (``timeline.rank<N>.jsonl``) on the shared clock: on the CPU the two ``perf_counter`` readings the
  phase takes anyway, appended to a list; on CUDA the phase's events, placed on the host clock at the step's
  one synchronisation (the end event completed just before it returned).
"""
from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

import psutil
import torch

from rlhf_core.runformat.keys import phase_mem_key, phase_time_key

if TYPE_CHECKING:
    from .timeline import TimelineRecorder

RANGE_PREFIX = "phase/"
RSS_MAX_AGE_S = 0.005
_profiling = torch.autograd._profiler_enabled


class RssReader:
    """Resident set size of this process, read as cheaply as the platform allows."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._pid = -1
        self._fd: int | None = None
        self._memory_info = psutil.Process().memory_info

    def _open(self) -> None:
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._pid = os.getpid()

    def __call__(self) -> int:
        if self._pid != os.getpid():  # first call, or a forked child: /proc/self was the parent's
            self._open()
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                self._fd = None
        return self._memory_info().rss

    def __del__(self) -> None:
        try:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
        except (OSError, AttributeError, TypeError):  # at interpreter exit ``os`` may already be torn down
            pass


class _NullPhase:
    """The context of a disabled timer: does nothing, so the bare runner pays nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL = _NullPhase()


class _Phase:
    """One timed phase occurrence (a class, not a generator: cheaper on the hot path)."""

    __slots__ = ("timer", "name", "_range", "_t0", "_ev0")

    def __init__(self, timer: PhaseTimer, name: str):
        self.timer = timer
        self.name = name
        self._range: Any = None

    def __enter__(self) -> None:
        # the host clock brackets the profiler range too: inside a trace window opening and closing a range
        # costs tens of µs, which belongs to the phase (the phases still add up to the step)
        self._t0 = time.perf_counter()
        timer = self.timer
        if timer._cuda:
            if timer.track_memory:
                torch.cuda.reset_peak_memory_stats(timer.device)
            self._ev0 = timer._event()
        if _profiling():
            self._range = torch.profiler.record_function(RANGE_PREFIX + self.name)
            self._range.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._range is not None:
            self._range.__exit__(*exc)
        elapsed = time.perf_counter() - self._t0
        timer = self.timer
        if timer._cuda:
            timer._pending.append((self.name, self._ev0, timer._event()))
            if timer.track_memory:
                timer._peak(self.name, torch.cuda.max_memory_allocated(timer.device))
        else:
            timer._times[self.name] = timer._times.get(self.name, 0.0) + elapsed
            if timer._spans is not None:
                timer._spans.append((self.name, self._t0, self._t0 + elapsed))
            if timer.track_memory:
                timer._peak(self.name, timer._rss_at(self._t0 + elapsed))


class PhaseTimer:
    """Times the phases of one optimizer step: ``start_step()``, ``with phase(name):`` …, ``end_step()``.

    ``enabled=False`` makes phases no-ops and ``end_step`` return only ``time/step`` (a host clock, not
    synchronised): the bare runner the overhead benchmark compares against, still able to report throughput.
    """

    def __init__(self, device: torch.device | str = "cpu", track_memory: bool = True, enabled: bool = True,
                 timeline: TimelineRecorder | None = None):
        self.device = torch.device(device)
        self.timeline = timeline if enabled else None
        self._spans: list[tuple[str, float, float]] | None = [] if self.timeline is not None else None
        self._step: int | None = None
        self.track_memory = track_memory
        self.enabled = enabled
        self._cuda = self.device.type == "cuda"
        self._rss = RssReader()
        self._rss_value = 0
        self._rss_time = -math.inf
        self._times: dict[str, float] = {}
        self._peaks: dict[str, int] = {}
        self._pending: list[tuple[str, Any, Any]] = []
        self._pool: list[Any] = []
        self._used = 0
        self._step_start: float | None = None
        self._step_ev: Any = None

    def _event(self) -> Any:
        """A recorded CUDA timing event from a pool reused across steps (events are cheap but not free)."""
        if self._used == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        ev = self._pool[self._used]
        self._used += 1
        ev.record()
        return ev

    def _rss_at(self, now: float) -> int:
        """The process RSS, read again only if the last reading is ``RSS_MAX_AGE_S`` old."""
        if now - self._rss_time >= RSS_MAX_AGE_S:
            self._rss_value = self._rss()
            self._rss_time = now
        return self._rss_value

    def _peak(self, name: str, value: int) -> None:
        if value > self._peaks.get(name, -1):
            self._peaks[name] = int(value)

    def start_step(self, step: int | None = None) -> None:
        """Begin a step (``step`` numbers its timeline line; else the recorder counts): clears the previous
        step's numbers."""
        if not self.enabled:
            self._step_start = time.perf_counter()
            return
        self._step = step
        if self._spans is not None and self.timeline is not None:
            self._spans.clear()
            self.timeline.anchor()
        self._times.clear()
        self._peaks.clear()
        self._pending.clear()
        self._used = 0
        self._step_ev = self._event() if self._cuda else None
        self._step_start = time.perf_counter()

    def phase(self, name: str) -> Any:
        """Context manager timing one occurrence of phase ``name`` (a ``record_function`` range too)."""
        if not self.enabled:
            return _NULL
        return _Phase(self, name)

    def add_span(self, name: str, start: float, end: float) -> None:
        """A phase occurrence timed elsewhere (``perf_counter`` seconds), for the timeline only: producers that
        get their phases from a framework's own timers (TRL's ProfilingContext) place them with the others."""
        if self._spans is not None:
            self._spans.append((name, start, end))

    def end_step(self, step: int | None = None) -> dict[str, float]:
        """Metrics of the step just finished: ``time/step``, ``time/<phase>``, ``mem/<phase>_peak_bytes``,
        ``mem/peak_bytes`` (and ``wait/*`` when the timeline exchanges waits). On CUDA this is the one point
        that waits for the device."""
        if not self.enabled:
            return {} if self._step_start is None else {"time/step": time.perf_counter() - self._step_start}
        out: dict[str, float] = {}
        step_end = time.perf_counter()
        if self._cuda:
            end = self._event()
            end.synchronize()
            synced = time.perf_counter()
            for name, ev0, ev1 in self._pending:
                self._times[name] = self._times.get(name, 0.0) + ev0.elapsed_time(ev1) / 1000.0
                if self._spans is not None:
                    self._spans.append((name, synced - ev0.elapsed_time(end) / 1000.0,
                                        synced - ev1.elapsed_time(end) / 1000.0))
            if self._step_ev is not None:
                out["time/step"] = self._step_ev.elapsed_time(end) / 1000.0
                if self._step_start is not None:
                    self._step_start, step_end = synced - out["time/step"], synced
            self._pending.clear()
        elif self._step_start is not None:
            out["time/step"] = step_end - self._step_start
        out.update({phase_time_key(k): v for k, v in self._times.items()})
        out.update({phase_mem_key(k): v for k, v in self._peaks.items()})
        if self._peaks:
            out["mem/peak_bytes"] = max(self._peaks.values())
        if self.timeline is not None and self._spans is not None and self._step_start is not None:
            out.update(self.timeline.record_step(step if step is not None else self._step, self._step_start,
                                                 step_end, self._spans))
        return out

    def close(self) -> None:
        """Write what the timeline still buffers (a no-op without one)."""
        if self.timeline is not None:
            self.timeline.close()
