"""One clock for every process of a run: the wall clock of rank 0.

Each process reads its own wall clock (``time.time_ns``); hosts disagree by milliseconds (NTP) to seconds (no
NTP, containers). At start-up every rank measures its offset to rank 0 NTP-style over the run's existing
``torch.distributed`` process group: rank r sends its time t1, rank 0 notes t2 on receipt and t3 on reply,
rank r notes t4. Then ``offset = ((t2 - t1) + (t3 - t4)) / 2`` and the true offset lies within half the round
trip ``((t4 - t1) - (t3 - t2)) / 2`` of it, whatever the asymmetry of the link: that half round trip is the
uncertainty recorded with it. The round with the shortest round trip is kept. A single process has offset 0
and uncertainty 0 by definition.

``RLHFKIT_DEBUG_CLOCK_SKEW_NS`` adds a fixed skew to this process's wall clock (tests use it to give one rank
a "host" whose clock is seconds off and check that the measured offset removes it): ``<ns>`` for every process,
``<rank>:<ns>`` for the process whose ``RANK`` is ``<rank>`` only.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

SKEW_ENV = "RLHFKIT_DEBUG_CLOCK_SKEW_NS"
ROUNDS = 8


def _skew() -> int:
    value = os.environ.get(SKEW_ENV, "")
    rank, sep, ns = value.rpartition(":")
    if sep and rank.strip() != os.environ.get("RANK", "0"):
        return 0
    try:
        return int(ns or 0)
    except ValueError:
        return 0


_SKEW_NS = _skew()


def wall_ns() -> int:
    """This process's wall clock in ns since the epoch (plus the debug skew, if any)."""
    return time.time_ns() + _SKEW_NS


@dataclass(frozen=True)
class ClockOffset:
    """``rank0_time ≈ local wall_ns() + offset_ns``, true within ±``uncertainty_ns``."""

    offset_ns: int = 0
    uncertainty_ns: int = 0
    method: str = "single-process"
    reference_rank: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ntp_offset(t1: int, t2: int, t3: int, t4: int) -> tuple[int, int]:
    """(offset, uncertainty) of one ping-pong: t1/t4 on the measuring clock, t2/t3 on the reference clock."""
    offset = ((t2 - t1) + (t3 - t4)) // 2
    half_rtt = max(0, (t4 - t1) - (t3 - t2)) // 2
    return offset, half_rtt


def measure_offset(rank: int, world_size: int, group: Any = None, rounds: int = ROUNDS) -> ClockOffset:
    """Every rank's offset to rank 0, measured over ``group`` (gloo: CPU tensors, host time stamps).

    A collective: every rank of the group must call it. Rank 0 serves the other ranks one after another
    (``rounds`` round trips each, ~0.1 ms apiece on one host); ranks > 0 return their own offset.
    """
    if world_size <= 1:
        return ClockOffset()
    import torch
    import torch.distributed as dist

    buf = torch.zeros(2, dtype=torch.int64)
    if rank == 0:
        for peer in range(1, world_size):
            for _ in range(rounds):
                dist.recv(buf, src=peer, group=group)
                t2 = wall_ns()
                buf[0] = t2
                buf[1] = wall_ns()
                dist.send(buf, dst=peer, group=group)
        return ClockOffset(0, 0, "reference", 0)
    best: tuple[int, int] | None = None
    for _ in range(rounds):
        t1 = wall_ns()
        buf[0] = t1
        dist.send(buf, dst=0, group=group)
        dist.recv(buf, src=0, group=group)
        t4 = wall_ns()
        offset, unc = ntp_offset(t1, int(buf[0]), int(buf[1]), t4)
        if best is None or unc < best[1]:
            best = (offset, unc)
    assert best is not None
    return ClockOffset(best[0], best[1], "ntp-ping-pong", 0)
