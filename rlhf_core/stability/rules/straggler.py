"""Stragglers in multi-process runs: one rank slower than the others, step after step, in one phase."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rlhf_core.runformat.keys import PHASES
from rlhf_core.stability.rules.base import Alert, Trigger, finite, rnd
from rlhf_core.stability.rules.config import DetectorConfig

_ORDER = {f"time/{phase}": i for i, phase in enumerate(PHASES)}


def _medians_of_others(values: Mapping[int, float]) -> dict[int, float]:
    """For each rank the median of the *other* ranks' values, from one sort: O(n log n), not O(n²) (256 ranks).

    Leaving out the value at sorted position p shifts the positions after it by one, so the median of the
    others is read straight off the sorted list (the same arithmetic as ``statistics.median``).
    """
    items = sorted(values.items(), key=lambda kv: kv[1])
    vals = [v for _, v in items]
    half, odd = divmod(len(vals) - 1, 2)
    out = {}
    for p, (rank, _) in enumerate(items):
        hi = vals[half] if half < p else vals[half + 1]
        if odd:
            out[rank] = hi
        else:
            lo = vals[half - 1] if half - 1 < p else vals[half]
            out[rank] = (lo + hi) / 2
    return out


class Straggler:
    """Fed the per-rank timings of each step (``time/step`` and ``time/<phase>``).

    A rank is slow in a phase when its time exceeds the median of the *other* ranks by ``straggler_factor``
    and by at least ``straggler_min_gap_s``; it is reported after ``straggler_steps`` consecutive slow steps.
    The other ranks' median (rather than all ranks') keeps the test meaningful with two ranks.

    Ranks wait for a straggler at the next collective, so with few ranks the waiting rank looks slow in a
    *later* phase by about the straggler's excess. A rank's slow phase is therefore excused when another rank
    was slow in an earlier phase (PHASES order) of the same step by at least half as much.

    When the records carry measured waits (``wait/<phase>``, ``wait/total``: from the phase intervals, see
    docs/timeline.md) the rule compares *busy* times instead, ``time/<phase> - wait/<phase>`` (``time/step -
    wait/total`` for the step): the waiting rank's wait is then measured, not guessed, so nothing is excused.
    """

    name = "straggler"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.triggers: dict[tuple[int, str], Trigger] = {}

    @staticmethod
    def _waiting(key: str, rank: int, slow: Mapping[tuple[str, int], float]) -> bool:
        """True when another rank was slow in an earlier phase of this step by at least half as much."""
        order = _ORDER.get(key)
        if order is None:
            return False
        need = 0.5 * slow[(key, rank)]
        return any(other != rank and _ORDER.get(k, order) < order and e >= need for (k, other), e in slow.items())

    @staticmethod
    def _times(per_rank: Mapping[int, Mapping[str, Any]]) -> tuple[dict[str, dict[int, float]], bool]:
        """{time key: {rank: seconds}} of the step, less each rank's measured waits when the records have them.

        One pass over each record with a fast path for plain floats: at 256 ranks this runs ~2,500 times a step.
        """
        measured = any(key.startswith("wait/") for rec in per_rank.values() for key in rec)
        times: dict[str, dict[int, float]] = {}
        for rank, rec in per_rank.items():
            rank = int(rank)
            for key, value in rec.items():
                if not key.startswith("time/"):
                    continue
                if type(value) is not float or not math.isfinite(value):
                    value = finite(rec, key)
                    if value is None:
                        continue
                if measured:  # busy time: the phase (the step) less the rank's wait in it (its total wait)
                    wkey = "wait/total" if key == "time/step" else "wait/" + key[5:]
                    wait = rec.get(wkey)
                    if type(wait) is not float:
                        wait = finite(rec, wkey)
                    if wait is not None and 0 < wait < math.inf:
                        value -= wait
                by_rank = times.get(key)
                if by_rank is None:
                    by_rank = times[key] = {}
                by_rank[rank] = value
        return times, measured

    def update_ranks(self, step: int, per_rank: Mapping[int, Mapping[str, float]]) -> list[Alert]:
        times, measured = self._times(per_rank)
        medians = {(key, rank): med for key, by_rank in times.items() if len(by_rank) >= 2
                   for rank, med in _medians_of_others(by_rank).items()}
        factor, gap = self.cfg.straggler_factor, self.cfg.straggler_min_gap_s
        slow = {(key, rank): times[key][rank] - med for (key, rank), med in medians.items()
                if times[key][rank] > factor * med and times[key][rank] - med > gap}  # (key, rank) -> excess s
        out: list[tuple[str, int, Alert]] = []
        triggers = self.triggers
        for (key, rank), median in medians.items():
            value = times[key][rank]
            bad = (key, rank) in slow and (measured or not self._waiting(key, rank, slow))
            trigger = triggers.get((rank, key))
            if trigger is None:
                trigger = triggers[(rank, key)] = Trigger(self.cfg.straggler_steps, self.cfg.rearm_steps)
            first = trigger.observe(bad, step)
            if first is None:
                continue
            phase = key[len("time/"):]
            evidence = {"rank": rank, "phase": phase, "time_s": rnd(value), "median_s": rnd(median),
                        "ratio": rnd(value / median, 4) if median > 0 else None, "steps": trigger.streak}
            if measured:
                evidence["basis"] = "busy time (phase intervals; measured waits subtracted)"
            out.append((key, rank, Alert(
                self.name, "warning", first,
                f"rank {rank} is slow in {'the whole step' if phase == 'step' else f'phase {phase}'}: "
                f"{value:.3g} s{' busy' if measured else ''} vs a median of {median:.3g} s on the other ranks for "
                f"{trigger.streak} steps "
                f"from step {first}",
                f"check the host/GPU of rank {rank} (thermal throttling, other jobs, a slower link), its data "
                "loading, and whether its batches hold longer sequences (balance batches by length)",
                evidence,
                rank=rank,
            )))
        return [alert for _, _, alert in sorted(out, key=lambda x: x[:2])]  # the order of (time key, rank)
