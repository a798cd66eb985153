"""Measured peak tensor memory of a region of code, on CPU or CUDA.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching allocator's own
counter; the baseline is ``memory_allocated()`` at region start, so the peak is absolute).

CPU: RSS cannot see a tensor freed back to a cached arena, nor tell tensors from the interpreter and
libraries, so we replay the allocator's own events. ``torch.profiler`` with ``profile_memory=True`` records a
``[memory]`` event (``+bytes`` / ``-bytes``) for every CPU allocation and free inside the region; the running
sum of those events is the live tensor memory allocated in the region and its maximum is the region's peak
*increment*. Tensors that existed before the region are invisible to the profiler (their frees are not
reported either), so the caller states them as ``baseline_bytes``: usually :func:`tensor_bytes` of the
models, gradients and optimizer state alive at region start. Absolute peak = baseline + increment.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from profiler.kineto_log import quiet_kineto

CPU_METHOD = ("torch.profiler(profile_memory=True): peak of live CPU tensor bytes allocated in the region "
              "+ declared baseline")
CUDA_METHOD = "torch.cuda.max_memory_allocated (absolute, after reset_peak_memory_stats)"


@dataclass
class PeakResult:
    """Peak of one measured region. ``peak_bytes`` = ``baseline_bytes`` + ``delta_peak_bytes``."""

    peak_bytes: int = 0
    delta_peak_bytes: int = 0
    baseline_bytes: int = 0
    end_delta_bytes: int = 0  # bytes allocated in the region and still alive when it ended
    seconds: float = 0.0
    device: str = "cpu"
    method: str = CPU_METHOD
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _storages(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, torch.nn.Module):
        for t in list(obj.parameters()) + list(obj.buffers()):
            yield from _storages(t)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    yield v
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _storages(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _storages(v)


def tensor_bytes(*objs: Any, device: str | torch.device | None = None) -> int:
    """Bytes of the distinct storages held by tensors, modules (params, buffers, grads) and optimizers.

    Shared storages (tied embeddings, views) count once. With ``device`` only storages on that device type.
    """
    want = torch.device(device).type if device is not None else None
    seen: set[tuple[str, int]] = set()
    total = 0
    for obj in objs:
        for t in _storages(obj):
            if want is not None and t.device.type != want:
                continue
            st = t.untyped_storage()
            key = (t.device.type, st.data_ptr())
            if st.data_ptr() == 0 or key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
    return total


def _cpu_allocations(prof, range_prefix: str | None) -> list[tuple[int, int, int, int, str | None]]:
    """CPU allocator events in time order: (time ns, allocation id, address, signed bytes, the innermost enclosing
    ``record_function`` range whose name starts with ``range_prefix``, without the prefix; None outside one)."""
    allocs = []
    stack: list[tuple[Any, str | None]] = [(e, None) for e in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        ev, rng = stack.pop()
        if range_prefix is not None and ev.name.startswith(range_prefix):
            rng = ev.name[len(range_prefix):]
        stack.extend((c, rng) for c in ev.children)
        if ev.typed[0] == _EventType.Allocation and ev.typed[1].device.type == "cpu":
            allocs.append((ev.start_time_ns, ev.typed[1].allocation_id, ev.typed[1].ptr, ev.typed[1].alloc_size, rng))
    allocs.sort(key=lambda a: a[:4])
    return allocs


def cpu_allocation_events(prof) -> list[tuple[int, int, int, int]]:
    """The profile's CPU allocator events in time order: (time ns, allocation id, address, signed bytes)."""
    return [a[:4] for a in _cpu_allocations(prof, None)]


def cpu_peaks_by_range(prof, range_prefix: str, baseline_bytes: int = 0) -> dict[str, int]:
    """Most bytes alive during each ``record_function`` range named ``range_prefix + name`` (ranges of one name
    pooled): the baseline plus the running sum of the profile's CPU allocations and frees (frees of blocks
    allocated before the profile are skipped, as in :func:`track_peak`), read at every allocation inside it."""
    live = baseline_bytes
    mine: dict[int, int] = {}
    peaks: dict[str, int] = {}
    for _, _, ptr, size, rng in _cpu_allocations(prof, range_prefix):
        if size > 0:
            mine[ptr] = size
            live += size
            if rng is not None:
                peaks[rng] = max(peaks.get(rng, 0), live)
        elif ptr in mine:
            live -= mine.pop(ptr)
    return peaks


def _cpu_peak_from_profile(prof) -> tuple[int, int, int, int]:
    """(peak increment, end increment, allocations seen, foreign frees ignored) of the CPU allocations.

    Only blocks allocated inside the region count: the profiler also reports frees of blocks allocated in an
    earlier profiled region, and those belong to the baseline, not to this region.
    """
    allocs = cpu_allocation_events(prof)
    live = peak = foreign = 0
    mine: dict[int, int] = {}
    for _, _, ptr, size in allocs:
        if size > 0:
            mine[ptr] = size
            live += size
            peak = max(peak, live)
        elif ptr in mine:
            live -= mine.pop(ptr)
        else:
            foreign += 1
    return peak, live, len(allocs), foreign


@contextmanager
def track_peak(device: str | torch.device = "cpu", baseline_bytes: int | None = None) -> Iterator[PeakResult]:
    """Measure the region under ``with``; the yielded :class:`PeakResult` is filled in when it exits.

    On CUDA ``baseline_bytes`` is ignored (the allocator knows it). On CPU it defaults to 0: pass the bytes of
    tensors alive at region start to get an absolute peak.
    """
    dev = torch.device(device)
    result = PeakResult(device=str(dev))
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        result.baseline_bytes = int(torch.cuda.memory_allocated(dev))
        torch.cuda.reset_peak_memory_stats(dev)
        result.method = CUDA_METHOD
        yield result
        torch.cuda.synchronize(dev)
        result.peak_bytes = int(torch.cuda.max_memory_allocated(dev))
        result.delta_peak_bytes = result.peak_bytes - result.baseline_bytes
        result.end_delta_bytes = int(torch.cuda.memory_allocated(dev)) - result.baseline_bytes
    elif dev.type == "cpu":

        result.baseline_bytes = int(baseline_bytes or 0)
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with quiet_kineto():
            prof.__enter__()
        try:
            yield result
        finally:
            with quiet_kineto():
                prof.__exit__(None, None, None)
        peak, end, n, foreign = _cpu_peak_from_profile(prof)
        result.delta_peak_bytes, result.end_delta_bytes = peak, end
        result.peak_bytes = result.baseline_bytes + peak
        result.extra.update(memory_events=n, baseline_frees_ignored=foreign)
    else:
        raise ValueError(f"cannot measure tensor memory on device type {dev.type!r} (cpu or cuda)")
    result.seconds = time.perf_counter() - t0


def measure_peak(fn: Callable[[], Any], device: str | torch.device = "cpu",
                 baseline_bytes: int | None = None) -> tuple[Any, PeakResult]:
    """Run ``fn()`` inside :func:`track_peak`; returns (its result, the peak)."""
    with track_peak(device, baseline_bytes) as res:
        out = fn()
    return out, res


def peaks_by_phase(phases: Iterable[tuple[str, Callable[[], Any]]], device: str | torch.device = "cpu",
                   baseline: Callable[[], int] | None = None) -> dict[str, PeakResult]:
    """Measure named callables in order; ``baseline()`` is asked for the live bytes before each one."""
    out: dict[str, PeakResult] = {}
    for name, fn in phases:
        _, out[name] = measure_peak(fn, device, baseline() if baseline else None)
    return out
