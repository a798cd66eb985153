"""Building blocks every stability rule shares: the alert, episode triggers and bounded rolling windows.

Rules see records one at a time and keep only bounded state (windows of at most a few hundred values),
so feeding a live run step by step costs O(new records x window), never a re-scan of the history.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

SEVERITIES = ("warning", "critical")


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
    value = rec.get(key)
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
    """Mean and standard deviation of the last ``size`` values in O(1) per value (sliding Welford)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.values: deque[float] = deque()
        self.mean = 0.0
        self._m2 = 0.0

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

    def _remove(self, x: float) -> None:
        n = len(self.values)  # already without x
        if n == 0:
            self.mean, self._m2 = 0.0, 0.0
            return
        delta = x - self.mean
        self.mean -= delta / n
        self._m2 = max(0.0, self._m2 - delta * (x - self.mean))

    @property
    def std(self) -> float:
        n = len(self.values)
        return math.sqrt(self._m2 / (n - 1)) if n > 1 else 0.0

    def zscore(self, x: float, abs_floor: float = 0.0, rel_floor: float = 0.0) -> tuple[float, float]:
        """(z, sigma used) of ``x`` against the window; sigma is floored so a flat history is not infinitely
        sensitive (a constant loss followed by a 0.1% wiggle is not a spike)."""
        sigma = max(self.std, abs_floor, rel_floor * abs(self.mean), 1e-12)
        return (x - self.mean) / sigma, sigma


class RollingTrend:
    """Least-squares line through the last ``size`` values, in O(1) per value (sliding sums, re-summed
    exactly once per window so rounding cannot accumulate over a 100k-step run).

    Used for KL, which grows steadily under RL (Gao et al. 2022): a steady rise is expected, a jump above the
    trend is not.
    """

    def __init__(self, size: int):
        self.size = int(size)
        self.values: deque[float] = deque()
        self._sy = self._sty = self._syy = 0.0
        self._pushes = 0

    def __len__(self) -> int:
        return len(self.values)

    def push(self, y: float) -> None:
        if len(self.values) == self.size:
            y0 = self.values.popleft()
            self._sty -= self._sy - y0  # every remaining value moves one position down
            self._sy -= y0
            self._syy -= y0 * y0
        self._sty += len(self.values) * y
        self._sy += y
        self._syy += y * y
        self.values.append(y)
        self._pushes += 1
        if self._pushes % self.size == 0:
            self._resum()

    def _resum(self) -> None:
        self._sy = math.fsum(self.values)
        self._sty = math.fsum(i * v for i, v in enumerate(self.values))
        self._syy = math.fsum(v * v for v in self.values)

    @property
    def mean(self) -> float:
        return self._sy / len(self.values) if self.values else 0.0

    def zscore(self, x: float, abs_floor: float = 0.0, rel_floor: float = 0.0) -> tuple[float, float, float]:
        """(z, expected, sigma) of ``x`` against the fitted line extended one step; sigma is the residual
        spread of the fit, floored like :meth:`RollingStats.zscore`."""
        n = len(self.values)
        mean = self.mean
        slope, spread = 0.0, 0.0
        if n >= 3:
            t_mean = (n - 1) / 2
            stt = n * (n * n - 1) / 12
            sty = self._sty - t_mean * self._sy
            slope = sty / stt
            ss_res = max(0.0, self._syy - n * mean * mean - slope * sty)
            spread = math.sqrt(ss_res / (n - 2))
            expected = mean + slope * (n - t_mean)
        else:
            expected = mean
        sigma = max(spread, abs_floor, rel_floor * abs(mean), 1e-12)
        return (x - expected) / sigma, expected, sigma


class Rule(ABC):
    """A stability rule fed one record at a time (in step order); returns the alerts that fire now."""

    name = "rule"

    @abstractmethod
    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        """Alerts that fire on this record (usually none)."""
