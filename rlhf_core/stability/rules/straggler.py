"""Stragglers in multi-process runs: one rank slower than the others, step after step, in one phase
(:class:`Straggler`), or one process of a run of different roles (Ray actors) slower than it used to be,
with the others waiting for it (:class:`ActorStraggler`)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rlhf_core.runformat.keys import PHASES
from rlhf_core.runformat.timeline import Process, StepAnalysis
from rlhf_core.stability.rules.base import Alert, RollingQuantiles, Trigger, finite, rnd
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


def _overlap_ns(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Summed overlap of two lists of (start, end) intervals (each list's own intervals do not overlap)."""
    return sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


class ActorStraggler:
    """Fed each step's analysed phase intervals (:class:`~rlhf_core.runformat.timeline.StepAnalysis` of the
    ``timeline.rank<N>.jsonl`` files) of a run whose processes play different roles: the runner's
    ``--engine ray`` actors (trainer, rollout, reference, reward), an ``adapters.ray_hook`` job.

    Such processes run different phases, so :class:`Straggler` has nothing to compare across them, and comparing
    one role with another would blame generation for dominating the step, which is normal in RLHF. Instead each
    process's busy time in each of its phases is compared with *its own* median over its previous
    ``straggler_baseline_window`` steps: slow when above ``straggler_baseline_factor`` x that median and more
    than ``straggler_baseline_min_gap_s`` over it, with at least ``straggler_critical_frac`` of the excess on the
    step's critical path (the step waited for it); reported after ``straggler_steps`` such steps running, dated
    at the first. The evidence names who waited: each other process's measured wait (its wait phases, e.g. the
    Ray trainer's ``actor_wait``, and collective waits) during the slow phase's stretches of the critical path.
    """

    name = "straggler"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.history: dict[tuple[int, str], RollingQuantiles] = {}
        self.triggers: dict[tuple[int, str], Trigger] = {}
        # per slow streak: the baseline when it began (median, steps), and the ns each other rank waited on it since
        self.streaks: dict[tuple[int, str], tuple[float, int, dict[int, int]]] = {}

    @staticmethod
    def applies(processes: Mapping[int, Process]) -> bool:
        """Only runs of processes with different roles: ranks of one role (torchrun, TRL) are compared with each
        other by :class:`Straggler`, and a single process has nobody to keep waiting."""
        return len({p.role for p in processes.values()}) >= 2

    def update_intervals(self, step: int, analysis: StepAnalysis, processes: Mapping[int, Process]) -> list[Alert]:
        if not self.applies(processes):
            return []
        cfg = self.cfg
        critical: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for rank, phase, start, dur in analysis.critical_path:
            if phase != "(gap)":
                critical.setdefault((rank, phase), []).append((start, start + dur))
        waits: dict[int, list[tuple[int, int]]] = {}  # rank -> its waiting intervals in this step
        for rank, items in analysis.occurrences.items():
            for o in items:
                if o.wait > 0:
                    waits.setdefault(rank, []).append((o.start, o.start + o.wait))
        out: list[Alert] = []
        for phase, by_rank in sorted(analysis.phase_busy.items()):
            for rank, busy_ns in sorted(by_rank.items()):
                proc = processes.get(rank)
                if proc is None or phase in proc.waits:  # a wait phase is never busy
                    continue
                key = (rank, phase)
                busy = busy_ns / 1e9
                history = self.history.get(key)
                if history is None:
                    history = self.history[key] = RollingQuantiles(cfg.straggler_baseline_window)
                    self.triggers[key] = Trigger(cfg.straggler_steps, cfg.rearm_steps)
                base, n = history.median, len(history)
                history.push(busy)
                spans = critical.get(key, [])
                bad = (n >= cfg.straggler_baseline_min_history and busy > cfg.straggler_baseline_factor * base
                       and busy - base > cfg.straggler_baseline_min_gap_s
                       and sum(e - s for s, e in spans) / 1e9 >= cfg.straggler_critical_frac * (busy - base))
                if bad:
                    streak = self.streaks.setdefault(key, (base, n, {}))
                    for other, intervals in waits.items():
                        if other != rank and (ns := _overlap_ns(intervals, spans)):
                            streak[2][other] = streak[2].get(other, 0) + ns
                else:
                    self.streaks.pop(key, None)
                trigger = self.triggers[key]
                first = trigger.observe(bad, step)
                if first is not None:
                    out.append(self._alert(key, proc, busy, first, trigger.streak, spans, processes))
        return out

    def _alert(self, key: tuple[int, str], proc: Process, busy: float, first: int, streak: int,
               spans: list[tuple[int, int]], processes: Mapping[int, Process]) -> Alert:
        """The alert, with the baseline from before the streak (later medians hold its slow steps)."""
        rank, phase = key
        base, n, by_rank = self.streaks[key]
        waited = sorted(by_rank.items(), key=lambda kv: -kv[1])
        who = [{"rank": r, "role": processes[r].role if r in processes else "?", "seconds": rnd(ns / 1e9, 4)}
               for r, ns in waited]
        if who:
            held = "; " + ", ".join(f"rank {w['rank']} ({w['role']}) waited {w['seconds']:.3g} s" for w in who) + (
                f" for it over these {streak} steps")
        else:  # nobody recorded a wait for it (the Ray actors wait for the trainer idle, not in a wait phase)
            held = f"; on the step's critical path for {sum(e - s for s, e in spans) / 1e9:.3g} s"
        evidence: dict[str, Any] = {
            "rank": rank, "role": proc.role, "phase": phase, "time_s": rnd(busy), "baseline_s": rnd(base),
            "ratio": rnd(busy / base, 4) if base > 0 else None, "steps": streak,
            "critical_s": rnd(sum(e - s for s, e in spans) / 1e9), "waited": who,
            "basis": f"busy time (phase intervals) vs its own median over the {n} steps before step {first}"}
        return Alert(
            self.name, "warning", first,
            f"rank {rank} ({proc.role}) became slow in phase {phase}: {busy:.3g} s busy vs its own median of "
            f"{base:.3g} s over the {n} steps before, for {streak} steps from step {first}{held}",
            f"check what changed for the {proc.role} process (rank {rank}) from step {first}: its host/GPU "
            "(thermal throttling, other jobs or actors placed on it, memory pressure), its placement, and whether "
            "its work grew (longer prompts or completions)",
            evidence,
            rank=rank,
        )
