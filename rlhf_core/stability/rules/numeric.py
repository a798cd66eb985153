"""Numeric health of the update: non-finite values, one-step spikes, gradient explosion and frequent clipping."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from rlhf_core.stability.rules.base import (
    Alert,
    RollingQuantiles,
    Rule,
    Trigger,
    finite,
    is_alerting,
    num,
    rnd,
)
from rlhf_core.stability.rules.config import DetectorConfig
from rlhf_core.stability.rules.knobs import Knobs


class NonFinite(Rule):
    """NaN/Inf in losses, gradient norm, rewards, KL or policy statistics (verl skips such steps); and updates
    that a producer's finite guard skipped.

    A guard that drops a non-finite update (the runner restores the weights and logs finite values) leaves no
    NaN in the record: only its count of skipped optimizer steps (``skipped_key``) shows that the run is
    hitting non-finite values. The first step with a skip is a ``warning`` (the guard did its job once); skips
    on ``nonfinite_skip_steps`` steps of one episode are ``critical``. NaN values and skips have their own
    episodes, so an early skip warning does not silence a later NaN; when both come at once, the critical
    alert about the values names the skips too.
    """

    name = "nonfinite"

    def __init__(self, cfg: DetectorConfig):
        self.prefixes, self.ignore = cfg.nonfinite_prefixes, frozenset(cfg.nonfinite_ignore)
        self.trigger = Trigger(1, cfg.rearm_steps)
        self.skipped_key, self.skip_limit = cfg.skipped_key, cfg.nonfinite_skip_steps
        self.skip_trigger = Trigger(1, cfg.rearm_steps)
        self.skip_first: int | None = None  # first step with a skip in this episode
        self.skip_steps = 0                 # steps with a skip in this episode
        self.skip_total = 0.0               # optimizer steps skipped in this episode
        self.skip_critical = False          # this episode already had its critical alert
        self.knobs = Knobs(cfg.producer)

    def _keys(self, rec: Mapping[str, Any]) -> list[str]:
        listed = rec.get("nonfinite")
        keys = {str(k) for k in listed} if isinstance(listed, (list, tuple)) else set()
        for key in rec:
            if key.startswith(self.prefixes):
                value = num(rec, key)
                if value is not None and not math.isfinite(value):
                    keys.add(key)
        return sorted(k for k in keys if k.startswith(self.prefixes) and k not in self.ignore)

    def _suggestion(self) -> str:
        return (f"lower {self.knobs['learning_rate']} and check {self.knobs['max_grad_norm']}; check the reward "
                "function and the log-probs for NaN/Inf (fp16 overflow, log of 0, division by a zero std)")

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        keys = self._keys(rec)
        value = finite(rec, self.skipped_key)
        skipped = value if value is not None and value > 0 else 0.0
        if self.skip_trigger.armed and skipped:  # a new episode of skipped updates
            self.skip_first, self.skip_steps, self.skip_total, self.skip_critical = step, 0, 0.0, False
        if skipped:
            self.skip_steps += 1
            self.skip_total += skipped
        skip_start = self.skip_trigger.observe(bool(skipped), step)
        alerts = []
        if self.trigger.observe(bool(keys), step) is not None:
            note = f"; {skipped:g} optimizer step(s) skipped" if skipped else ""
            self.skip_critical = self.skip_critical or bool(skipped)
            alerts.append(Alert(self.name, "critical", step, f"non-finite values at step {step}: "
                                f"{', '.join(keys)}{note}", self._suggestion(),
                                {"keys": keys, **({"skipped": rnd(skipped)} if skipped else {})}))
        if skipped and not self.skip_critical and self.skip_steps >= self.skip_limit:
            self.skip_critical = True
            first = self.skip_first if self.skip_first is not None else step
            alerts.append(Alert(
                self.name, "critical", first,
                f"optimizer steps skipped for non-finite values on {self.skip_steps} steps from step {first} "
                f"({self.skip_total:g} in all, {skipped:g} at step {step}): the run keeps producing a non-finite "
                "loss, gradient or weights",
                self._suggestion() + "; the producer's skip events say which of the three went non-finite",
                {"key": self.skipped_key, "skipped_steps": self.skip_steps, "skipped_total": rnd(self.skip_total),
                 "skipped": rnd(skipped)}))
        elif skip_start is not None and not alerts:
            alerts.append(Alert(
                self.name, "warning", step,
                f"{skipped:g} optimizer step(s) skipped at step {step}: the producer dropped an update whose "
                "loss, gradient or weights were non-finite (the logged values are finite)",
                self._suggestion() + "; the producer's skip events say which of the three went non-finite",
                {"key": self.skipped_key, "skipped": rnd(skipped)}))
        return alerts


class Spike(Rule):
    """One value far above the robust spread of the previous window: median + k x IQR/1.349.

    Median and quartiles ignore earlier spikes (a mean/std window is inflated by every spike it holds), need
    only ``spike_min_history`` values, and forget a spike as soon as it leaves the window. For ``grad/norm``
    (never negative) the value must also be ``spike_min_ratio`` x the median, so a very steady norm does
    not call a 20% wiggle a spike.

    A loss spike is a ``warning`` only when the update felt it: the step's ``grad/norm`` is at least
    ``spike_loss_grad_ratio`` x its median (or no gradient norm is logged). Otherwise it is ``info``: RL
    surrogate losses (PPO/GRPO) sit near 0 and jump with the batch's composition (the lengths and rewards
    that happened to be drawn) without moving the policy.

    A gradient spike is ``info`` when clipping bounded the update (the producer's ``grad/clipped`` > 0, or
    the pre-clip norm above ``max_grad_norm``/``grad/max_norm``) *and* spikes are the run's routine (the
    window already holds ``spike_routine_count`` norms above ``spike_routine_ratio`` x its median): a learning
    run with heavy-tailed norms that clipping caps. An unclipped spike, or the first in a steady run, stays a
    ``warning``. Whether the policy moved is for the KL, entropy and loss-spike rules to say. A note does not
    use up the episode: the first later spike of it that is a warning is still reported.
    """

    def __init__(self, cfg: DetectorConfig, key: str):
        self.key = key
        self.name = {"grad/norm": "grad_spike", "loss/total": "loss_spike"}.get(key, f"spike:{key}")
        self.sigma, self.min_history, self.rel_floor = cfg.spike_sigma, cfg.spike_min_history, cfg.spike_min_rel_std
        self.min_ratio = cfg.spike_min_ratio if key == "grad/norm" else 0.0
        self.grad_ratio = cfg.spike_loss_grad_ratio
        self.max_norm, self.routine_ratio, self.routine_count = (
            cfg.max_grad_norm, cfg.spike_routine_ratio, cfg.spike_routine_count)
        self.window = RollingQuantiles(cfg.spike_window)
        self.grads = RollingQuantiles(cfg.spike_window) if key != "grad/norm" else None
        self.trigger = Trigger(1, cfg.rearm_steps)
        self.noted_only = False  # this episode has so far given only an info note
        self.knobs = Knobs(cfg.producer)

    def _severity(self, rec: Mapping[str, Any]) -> tuple[str, float | None]:
        """``warning`` when the step's gradient norm is also up (or unknown), else ``info``; and that ratio."""
        if self.grads is None:
            return "warning", None
        norm = finite(rec, "grad/norm")
        if norm is None or len(self.grads) < self.min_history or self.grads.median <= 0:
            return "warning", None
        ratio = norm / self.grads.median
        return ("warning" if ratio >= self.grad_ratio else "info"), ratio

    def _routine_clipped(self, value: float, median: float, rec: Mapping[str, Any]) -> dict[str, Any] | None:
        """For a gradient spike that clipping bounded in a run whose norm spikes routinely: the evidence
        (clip threshold, clipped fraction, earlier large norms); else None (the spike is a warning)."""
        if self.key != "grad/norm":
            return None
        limit = self.max_norm if self.max_norm is not None else finite(rec, "grad/max_norm")
        clipped = finite(rec, "grad/clipped")
        bounded = (clipped is not None and clipped > 0) or (limit is not None and 0 < limit < value)
        earlier = self.window.count_above(self.routine_ratio * median)
        if not bounded or earlier < self.routine_count:
            return None
        return {"max_grad_norm": limit, "clipped_frac": clipped, "earlier_large": earlier,
                "routine_ratio": self.routine_ratio}

    def _alert(self, first: int, step: int, value: float, median: float, sigma: float, z: float,
               rec: Mapping[str, Any]) -> Alert:
        severity, grad_ratio = self._severity(rec)
        what = "gradient norm" if self.key == "grad/norm" else self.key
        evidence = {"key": self.key, "value": rnd(value), "median": rnd(median), "sigma": rnd(sigma),
                    "z": rnd(z, 4), "window": len(self.window)}
        felt = ""
        if grad_ratio is not None:
            evidence["grad_norm_ratio"] = rnd(grad_ratio, 4)
            felt = f"; the gradient norm was {grad_ratio:.2g}x its median"
        suggestion = ("inspect the batch of this step (degenerate samples, extreme rewards); if spikes "
                      f"repeat, lower {self.knobs['learning_rate']} or skip steps whose gradient norm spikes")
        routine = self._routine_clipped(value, median, rec)
        if routine is not None:
            severity = "info"
            evidence.update(routine)
            cap = (f"max_grad_norm={routine['max_grad_norm']:g}" if routine["max_grad_norm"] is not None
                   else "the clip threshold")
            felt = (f"; clipping at {cap} bounded the update, and {routine['earlier_large']} of the "
                    f"previous {len(self.window)} norms were already above {self.routine_ratio:g}x "
                    "the median (this run's norm spikes routinely)")
            suggestion = ("a note: nothing to do while KL, entropy and the loss stay steady (their rules "
                          f"say when they do not); if the spikes grow, lower {self.knobs['learning_rate']}")
        return Alert(
            self.name, severity, first,
            f"{what} spiked to {value:.4g} at step {step} ({z:.1f} robust sigma above the median "
            f"{median:.4g} of the previous {len(self.window)} steps){felt}",
            suggestion,
            evidence,
        )

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        value = finite(rec, self.key)
        if value is None:
            return []
        out: list[Alert] = []
        if len(self.window) >= self.min_history:
            median = self.window.median
            sigma = max(self.window.sigma, self.rel_floor * abs(median), 1e-12)
            z = (value - median) / sigma
            bad = z > self.sigma and (self.min_ratio == 0.0 or value > self.min_ratio * median)
            first = self.trigger.observe(bad, step)
            # a note must not hide what follows: within an episode that so far gave only a note, a spike
            # that is a warning is still reported (once)
            if bad and (first is not None or self.noted_only):
                alert = self._alert(first if first is not None else step, step, value, median, sigma, z, rec)
                if first is not None or is_alerting(alert.severity):
                    out.append(alert)
                    self.noted_only = not is_alerting(alert.severity)
        self.window.push(value)
        if self.grads is not None and (norm := finite(rec, "grad/norm")) is not None:
            self.grads.push(norm)
        return out


class GradExplosion(Rule):
    """The pre-clip gradient norm sustained far above its own baseline (the median of the previous window).

    Clipping hides an explosion from the update but not from the norm, so the pre-clip norm's growth is the
    signal; it needs no clip threshold and works from the fourth step.
    """

    name = "grad_explosion"

    def __init__(self, cfg: DetectorConfig):
        self.factor, self.min_history = cfg.grad_explosion_factor, cfg.grad_explosion_min_history
        self.baseline = RollingQuantiles(cfg.grad_explosion_window)
        self.trigger = Trigger(cfg.grad_explosion_patience, cfg.rearm_steps)
        self.onset: tuple[float, float] | None = None
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        norm = finite(rec, "grad/norm")
        if norm is None:
            return []
        out: list[Alert] = []
        if len(self.baseline) >= self.min_history:
            base = self.baseline.median
            bad = base > 0 and norm > self.factor * base
            if bad and self.trigger.streak == 0:
                self.onset = (norm, base)
            first = self.trigger.observe(bad, step)
            if first is not None and self.onset is not None:
                norm0, base0 = self.onset
                out.append(Alert(
                    self.name, "warning", first,
                    f"pre-clip gradient norm above {self.factor:g}x its baseline for {self.trigger.streak} steps "
                    f"from step {first}: {norm0:.4g} vs a median of {base0:.4g} before; {norm:.4g} at step {step}",
                    f"lower {self.knobs['learning_rate']} or lengthen the warm-up; inspect the batches of these "
                    "steps (extreme rewards or advantages)",
                    {"value": rnd(norm0), "baseline": rnd(base0), "ratio": rnd(norm0 / base0, 4),
                     "latest": rnd(norm), "factor": self.factor, "steps": self.trigger.streak},
                ))
        self.baseline.push(norm)
        return out


class GradClipping(Rule):
    """Pre-clip gradient norm above the clip threshold on most recent steps: a note, not a fault.

    Frequent clipping is normal with a tight ``max_grad_norm``; it only means the real step size is set by the
    threshold rather than by the learning rate. Severity ``info``: it never counts as a warning.
    """

    name = "grad_clipping"

    def __init__(self, cfg: DetectorConfig):
        self.max_norm = cfg.max_grad_norm
        self.window, self.frac, self.min_steps = cfg.grad_clip_window, cfg.grad_clip_frac, cfg.grad_clip_min_steps
        self.clipped: deque[bool] = deque(maxlen=self.window)
        self.peak: deque[tuple[int, float]] = deque()  # monotone queue: the max norm of the window
        self.steps: deque[int] = deque(maxlen=self.window)
        self.trigger = Trigger(1, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        norm = finite(rec, "grad/norm")
        limit = self.max_norm if self.max_norm is not None else finite(rec, "grad/max_norm")
        if norm is None or limit is None or limit <= 0:
            return []
        if len(self.steps) == self.window and self.peak and self.peak[0][0] == self.steps[0]:
            self.peak.popleft()
        self.steps.append(step)
        self.clipped.append(norm > limit)
        while self.peak and self.peak[-1][1] <= norm:
            self.peak.pop()
        self.peak.append((step, norm))
        n, over = len(self.clipped), sum(self.clipped)
        bad = n >= self.min_steps and over > self.frac * n
        first = self.trigger.observe(bad, step)
        if first is None:
            return []
        return [Alert(
            self.name, "info", step,
            f"gradient norm above max_grad_norm={limit:g} on {over} of the last {n} steps (peak {self.peak[0][1]:.4g})",
            f"clipping sets the step size here: if that is not intended, raise {self.knobs['max_grad_norm']} or "
            f"lower {self.knobs['learning_rate']}",
            {"max_grad_norm": limit, "clipped": over, "window": n, "fraction": rnd(over / n, 4),
             "peak_norm": rnd(self.peak[0][1])},
        )]
