"""Building blocks every stability rule shares: the alert, episode triggers and bounded rolling windows.

Rules see records one at a time and keep only bounded state (windows of at most a few hundred values),
so feeding a live run step by step costs O(new records x window), never a re-scan of the history.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "critical")
ALERTING = ("warning", "critical")  # "info" is a note (e.g. frequent clipping), never a warning


def is_alerting(severity: str) -> bool:
    """True for the severities that mean trouble (what a health verdict or a CI gate should count)."""
    return severity in ALERTING


@dataclass
class Alert:
    """One finding: which rule, how bad, the step where the trouble began, why (evidence) and what to do."""

    rule: str
    severity: str
    step: int
    message: str
    suggestion: str
    evidence: dict[str, Any] = field(default_factory=dict)
    rank: int | str | None = None
    run: str | None = None  # the run's id, so alerts of overlaid runs stay apart

    def to_event(self) -> dict[str, Any]:
        """Keyword arguments for ``RunWriter.event`` (kind ``alert``)."""
        data = dict(self.evidence)
        data["suggestion"] = self.suggestion
        data["first_step"] = self.step
        if self.rank is not None:
            data["rank"] = self.rank
        return {"step": self.step, "kind": "alert", "rule": self.rule, "severity": self.severity,
                "message": self.message, "data": data}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def num(rec: Mapping[str, Any], key: str) -> float | None:
    """The value of ``key`` as a float (NaN/Inf kept), or None when absent or not numeric."""
    value: Any = rec.get(key)
    kind = type(value)
    if kind is float:  # the common case first: this runs for every key of every record
        return value
    if kind is int:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        item = getattr(value, "item", None)
        if not callable(item):
            return None
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
    return float(value)


def finite(rec: Mapping[str, Any], key: str) -> float | None:
    """Like :func:`num` but None for NaN/Inf too: the non-finite rule reports those, the others skip them."""
    value = num(rec, key)
    return value if value is not None and math.isfinite(value) else None


def first_finite(rec: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, float] | None:
    """The first of ``keys`` with a finite value (e.g. ``kl/ref_k3`` and, failing that, ``kl/ref_k1``)."""
    for key in keys:
        value = finite(rec, key)
        if value is not None:
            return key, value
    return None


def rnd(x: float, digits: int = 6) -> float:
    """Evidence values: plain, short floats (numpy scalars would not serialise as numbers everywhere)."""
    return float(f"{float(x):.{digits}g}")


class Trigger:
    """Fires once per episode: after ``patience`` consecutive bad steps, then stays quiet until the signal
    has been healthy for ``rearm`` consecutive steps. Reports the first step of the bad streak."""

    def __init__(self, patience: int = 1, rearm: int = 50):
        self.patience, self.rearm = max(1, int(patience)), max(1, int(rearm))
        self.armed = True
        self.streak = 0
        self.start: int | None = None
        self.healthy = 0

    def observe(self, bad: bool, step: int) -> int | None:
        """The first step of the streak when the rule should fire now, else None."""
        if not bad:
            self.streak = 0
            if not self.armed:
                self.healthy += 1
                if self.healthy >= self.rearm:
                    self.armed = True
            return None
        self.healthy = 0
        if self.streak == 0:
            self.start = step
        self.streak += 1
        if self.armed and self.streak >= self.patience:
            self.armed = False
            return self.start
        return None


class RollingStats:
    """Mean and standard deviation of the last ``size`` values, exact at every step.

    Pushes are O(1) (sliding Welford); the sums are recomputed over the window (two passes, O(size)) every
    ``size`` pushes and whenever the spread has fallen a millionfold since the last recompute: that is when
    removing a huge value (a 1e8 spike, the tail of a level shift) has cancelled almost all of ``m2`` and
    its rounding error would otherwise dominate. So a spike stops counting once it leaves the window.
    """

    _DROP = 1e-6

    def __init__(self, size: int):
        self.size = int(size)
        self.values: deque[float] = deque()
        self.mean = 0.0
        self._m2 = 0.0
        self._m2_ref = 0.0
        self._pushes = 0

    def __len__(self) -> int:
        return len(self.values)

    def push(self, x: float) -> None:
        if len(self.values) == self.size:
            self._remove(self.values.popleft())
        self.values.append(x)
        n = len(self.values)
        delta = x - self.mean
        self.mean += delta / n
        self._m2 += delta * (x - self.mean)
        self._pushes += 1
        if self._pushes % self.size == 0 or self._m2 < self._DROP * self._m2_ref:
            self._recompute()
        else:
            self._m2_ref = max(self._m2_ref, self._m2)

    def _remove(self, x: float) -> None:
        n = len(self.values)  # already without x
        if n == 0:
            self.mean, self._m2 = 0.0, 0.0
            return
        delta = x - self.mean
        self.mean -= delta / n
        self._m2 = max(0.0, self._m2 - delta * (x - self.mean))

    def _recompute(self) -> None:
        n = len(self.values)
        self.mean = math.fsum(self.values) / n if n else 0.0
        self._m2 = math.fsum((v - self.mean) ** 2 for v in self.values)
        self._m2_ref = self._m2

    @property
    def std(self) -> float:
        n = len(self.values)
        return math.sqrt(self._m2 / (n - 1)) if n > 1 else 0.0

    def zscore(self, x: float, abs_floor: float = 0.0, rel_floor: float = 0.0) -> tuple[float, float]:
        """(z, sigma used) of ``x`` against the window; sigma is floored so a flat history is not infinitely
        sensitive (a constant loss followed by a 0.1% wiggle is not a spike)."""
        sigma = max(self.std, abs_floor, rel_floor * abs(self.mean), 1e-12)
        return (x - self.mean) / sigma, sigma


class RollingQuantiles:
    """Median and quartiles of the last ``size`` values: a sorted copy of the window is kept by bisection
    (O(log size) search plus a memmove per push), so order statistics are exact lookups and one huge value
    moves them by one rank at most (robust baselines that work from a handful of steps)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.values: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def push(self, x: float) -> None:
        if len(self.values) == self.size:
            del self._sorted[bisect_left(self._sorted, self.values.popleft())]
        self.values.append(x)
        insort(self._sorted, x)

    def quantile(self, q: float) -> float:
        """Linear-interpolated ``q`` quantile of the window (0.0 when empty)."""
        s = self._sorted
        if not s:
            return 0.0
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def count_above(self, x: float) -> int:
        """How many values of the window exceed ``x``."""
        return len(self._sorted) - bisect_right(self._sorted, x)

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def sigma(self) -> float:
        """Robust standard deviation: interquartile range / 1.349 (exact for a normal sample)."""
        return (self.quantile(0.75) - self.quantile(0.25)) / 1.349


class RollingTrend:
    """Least-squares line through the last ``size`` values, exact at every step in O(1) amortised per value.

    Used for KL, which grows steadily under RL (Gao et al. 2022): a steady rise is expected, a jump above the
    trend is not. Sliding sums are kept of the values' deviations from a pivot and recomputed over the window
    (pivot = the window's mean) every ``size`` pushes, when removing a value has cancelled a millionth of the
    sum of squares away (a 1e8 spike leaving), or when the window's mean has moved far from the pivot
    compared with its spread (the window is past a 1e6 -> 1 level shift): the cases where running sums
    would otherwise carry the rounding error of values no longer in the window.
    """

    _DROP = 1e-6
    _DRIFT = 1e4

    def __init__(self, size: int):
        self.size = int(size)
        self.values: deque[float] = deque()
        self._pivot = 0.0
        self._s = self._st = self._ss = 0.0  # sums of d, i*d and d*d with d = value - pivot, i = position
        self._ss_ref = 0.0
        self._pushes = 0

    def __len__(self) -> int:
        return len(self.values)

    def push(self, y: float) -> None:
        if len(self.values) == self.size:
            d0 = self.values.popleft() - self._pivot
            self._st -= self._s - d0  # every remaining value moves one position down
            self._s -= d0
            self._ss -= d0 * d0
        d = y - self._pivot
        self._st += len(self.values) * d
        self._s += d
        self._ss += d * d
        self.values.append(y)
        self._pushes += 1
        n = len(self.values)
        mean_d = self._s / n
        spread = max(self._ss / n - mean_d * mean_d, 0.0)
        if (self._pushes % self.size == 0 or self._ss < self._DROP * self._ss_ref
                or mean_d * mean_d > self._DRIFT * spread + 1e-300):
            self._recompute()
        else:
            self._ss_ref = max(self._ss_ref, self._ss)

    def _recompute(self) -> None:
        n = len(self.values)
        self._pivot = math.fsum(self.values) / n if n else 0.0
        dev = [v - self._pivot for v in self.values]
        self._s = math.fsum(dev)
        self._st = math.fsum(i * d for i, d in enumerate(dev))
        self._ss = math.fsum(d * d for d in dev)
        self._ss_ref = self._ss

    @property
    def mean(self) -> float:
        return self._pivot + self._s / len(self.values) if self.values else 0.0

    def zscore(self, x: float, abs_floor: float = 0.0, rel_floor: float = 0.0) -> tuple[float, float, float]:
        """(z, expected, sigma) of ``x`` against the fitted line extended one step; sigma is the residual
        spread of the fit, floored like :meth:`RollingStats.zscore`."""
        n = len(self.values)
        mean = self.mean
        spread = 0.0
        expected = mean
        if n >= 3:
            t_mean = (n - 1) / 2
            mean_d = self._s / n
            stt = n * (n * n - 1) / 12
            cov = self._st - t_mean * self._s
            slope = cov / stt
            ss_res = max(0.0, self._ss - n * mean_d * mean_d - slope * cov)
            spread = math.sqrt(ss_res / (n - 2))
            expected = mean + slope * (n - t_mean)
        sigma = max(spread, abs_floor, rel_floor * abs(mean), 1e-12)
        return (x - expected) / sigma, expected, sigma


class Rule(ABC):
    """A stability rule fed one record at a time (in step order); returns the alerts that fire now."""

    name = "rule"

    @abstractmethod
    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        """Alerts that fire on this record (usually none)."""
