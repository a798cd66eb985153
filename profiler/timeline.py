"""TimelineRecorder: one process's phase intervals on the run's shared clock, in ``timeline.rank<N>.jsonl``.

:class:`profiler.phases.PhaseTimer` hands it each step's phases as (name, start, end) on the monotonic
``perf_counter`` (durations stay exact); the recorder maps them onto the wall clock through an anchor taken
at each step start (one ``time_ns`` + ``perf_counter`` pair, so wall-clock slewing cannot accumulate within a
run) and adds the clock offset measured against rank 0 at start-up (:mod:`rlhf_core.runformat.clock`).

Why it is cheap: a phase only appends a tuple to a list (the timer already read the clock); a step becomes one
JSON line kept in memory and written with the others every ``FLUSH_EVERY_S`` or ``FLUSH_LINES`` lines, so a
step costs no system call. A crash loses at most that last second of intervals, never metrics.

With ``exchange_waits`` (the runner under torchrun) the recorder also measures, at the end of each step, how
long this rank waited in each collective-bound phase for the last rank to enter it: one MAX all-reduce of the
phase start times (:func:`rlhf_core.runformat.timeline.wait_ns` defines the wait). The step record then carries
``wait/<phase>`` and ``wait/total`` (seconds), which the straggler rule subtracts from the phase times.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rlhf_core.runformat import clock as _clock
from rlhf_core.runformat.clock import ClockOffset, wall_ns
from rlhf_core.runformat.timeline import FORMAT, timeline_file, wait_ns

FLUSH_EVERY_S = 1.0
FLUSH_LINES = 256
MAX_EXCHANGED = 512  # collective-phase occurrences per step whose waits are exchanged live
_MISSING = -(2 ** 62)

Span = tuple[str, float, float]


def _start_of(span: Span) -> float:
    return span[1]


class TimelineRecorder:
    """Buffered writer of one process's step and phase intervals (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1, role: str = "runner",
                 clock: ClockOffset | None = None, collective: Iterable[str] = (), waits: Iterable[str] = (),
                 exchange_waits: bool = False,
                 group: Any = None, source: str | None = None, host: str | None = None, pid: int | None = None,
                 name: str = ""):
        """``host``/``pid``/``name`` default to this process's; importers set those of the process they replay."""
        self.path = Path(run_dir) / timeline_file(rank)
        self.rank, self.world_size, self.role = int(rank), int(world_size), role
        self.clock = clock or ClockOffset()
        self.collective = frozenset(collective)
        self.exchange_waits = bool(exchange_waits) and self.world_size > 1
        self.group = group
        self._lines: list[str] = [json.dumps({"process": {
            "format": FORMAT, "rank": self.rank, "world_size": self.world_size, "role": role,
            "host": host if host is not None else socket.gethostname(),
            "pid": pid if pid is not None else os.getpid(), "name": name, "source": source,
            "clock": self.clock.as_dict(), "collective": sorted(self.collective), "waits": sorted(waits),
            "wall_skew_ns": _clock._SKEW_NS,
        }, "time_ns": wall_ns()}, separators=(",", ":")) + "\n"]
        self._last_flush = time.perf_counter()
        self._fh: Any = None
        self._step = 0
        self._quoted: dict[str, str] = {}
        self.anchor()

    def anchor(self, perf_s: float | None = None, wall: int | None = None) -> None:
        """Re-read the (wall, perf_counter) pair that maps monotonic times onto the shared clock; a producer
        that replays times recorded elsewhere (an importer, a synthetic run) passes its own pair."""
        self._perf0 = time.perf_counter() if perf_s is None else perf_s
        self._wall0 = (wall_ns() if wall is None else wall) + self.clock.offset_ns

    def to_ns(self, perf_s: float) -> int:
        """A ``perf_counter`` reading as ns on rank 0's wall clock."""
        return self._wall0 + round((perf_s - self._perf0) * 1e9)

    def record_step(self, step: int | None, start: float, end: float, spans: Sequence[Span]) -> dict[str, float]:
        """Buffer one step (times from ``perf_counter``); returns its ``wait/*`` metrics when exchanging."""
        self._step = int(step) if step is not None else self._step + 1
        t0 = self.to_ns(start)
        phases = [(name, round((s - start) * 1e6), round((e - s) * 1e6))
                  for name, s, e in sorted(spans, key=_start_of)]
        waits = self._exchange(t0, phases) if self.exchange_waits else {}
        quoted = self._quoted  # the line is formatted by hand: json.dumps would be most of a step's cost
        for name, _, _ in phases:
            if name not in quoted:
                quoted[name] = json.dumps(name)
        body = ",".join([f"[{quoted[n]},{s},{d}]" for n, s, d in phases])
        self._lines.append(f'{{"step":{self._step},"t0":{t0},"dur":{round((end - start) * 1e6)},"ph":[{body}]}}\n')
        now = time.perf_counter()
        if len(self._lines) >= FLUSH_LINES or now - self._last_flush >= FLUSH_EVERY_S:
            self.flush()
        return waits

    def _exchange(self, t0: int, phases: Sequence[Sequence[Any]]) -> dict[str, float]:
        """``wait/<phase>`` of this rank: one MAX all-reduce of the collective-phase start times (in ns).

        Slot 0/1 carry the occurrence count and its negation, so every rank learns whether all ranks ran the
        same collective phases (else no rank reports waits for the step); the tensor has a fixed size so a
        mismatch can never deadlock the collective.
        """
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return {}
        occ = [(p[0], t0 + p[1] * 1000, p[2] * 1000) for p in phases if p[0] in self.collective][:MAX_EXCHANGED]
        buf = torch.full((MAX_EXCHANGED + 2,), _MISSING, dtype=torch.int64)
        buf[0], buf[1] = len(occ), -len(occ)
        if occ:
            buf[2: 2 + len(occ)] = torch.tensor([s for _, s, _ in occ], dtype=torch.int64)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        if int(buf[0]) != -int(buf[1]):
            return {}
        last = buf[2: 2 + len(occ)].tolist()
        out: dict[str, float] = {}
        total = 0
        for (name, s, d), m in zip(occ, last):
            w = wait_ns(s, d, m)
            total += w
            key = f"wait/{name}"
            out[key] = out.get(key, 0.0) + w / 1e9
        out["wait/total"] = total / 1e9
        return out

    def flush(self) -> None:
        """Write the buffered lines in one ``write``."""
        self._last_flush = time.perf_counter()
        if not self._lines:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
        self._fh.write("".join(self._lines))
        self._fh.flush()
        self._lines.clear()

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
