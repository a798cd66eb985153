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
    first_finite,
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


def clip_evidence(rec: Mapping[str, Any], max_norm: float | None) -> dict[str, Any] | None:
    """Whether clipping bounded this record's update: the evidence (clip threshold, clipped fraction), else None.

    The producer's ``grad/clipped`` says it when logged (the runner's is the fraction of its minibatch updates
    that were clipped, while ``grad/norm`` is their mean, which can stay under the threshold); otherwise a
    pre-clip ``grad/norm`` above the threshold (``max_norm``, else the record's ``grad/max_norm``) was clipped."""
    norm = finite(rec, "grad/norm")
    limit = max_norm if max_norm is not None else finite(rec, "grad/max_norm")
    clipped = finite(rec, "grad/clipped")
    if clipped is not None:
        bounded = clipped > 0
    else:
        bounded = norm is not None and limit is not None and 0 < limit < norm
    return {"max_grad_norm": limit, "clipped_frac": clipped} if bounded else None


class _Watch:
    """A bounded update waiting for its consequence: the alert it becomes, the baselines of the watched keys
    before it, and how many records are left to look at."""

    __slots__ = ("step", "alert", "baselines", "left")

    def __init__(self, step: int, alert: Alert, baselines: dict[str, tuple[float, float]], left: int):
        self.step, self.alert, self.baselines, self.left = step, alert, baselines, left


class Consequence:
    """Did an update that clipping bounded still move the policy? The one test that ``grad_spike``,
    ``loss_spike`` and ``grad_explosion`` share, so that all three judge a clipped event the same way.

    It keeps the recent values of KL (k3, else k1, else a probe), entropy, ``loss/total`` and the mean PPO
    ratio. ``open`` freezes their median and robust sigma (floored like a spike's) when the event happens;
    ``check`` then looks at the next ``spike_watch_steps`` records for one far off those baselines
    (docs/diagnose.md, "A clipped spike is a note unless the policy moved"); ``hold`` keeps a watch open while
    the event goes on (a gradient explosion that lasts)."""

    def __init__(self, cfg: DetectorConfig):
        self.kl_keys, self.entropy_key = cfg.kl_keys, cfg.entropy_key
        self.steps, self.min_history = cfg.spike_watch_steps, cfg.spike_watch_min_history
        self.sigma, self.kl_ratio = cfg.spike_watch_sigma, cfg.spike_watch_kl_ratio
        self.drop, self.ratio_dev = cfg.spike_watch_entropy_drop, cfg.ratio_mean_dev
        self.rel_floor, self.kl_floor, self.kl_abs_floor = cfg.spike_min_rel_std, cfg.kl_z_floor, cfg.kl_min_std
        self.recent = {k: RollingQuantiles(cfg.spike_watch_window) for k in ("kl", "entropy", "loss", "ratio")}
        self.watches: deque[_Watch] = deque(maxlen=max(1, cfg.spike_watch_steps + 1))

    def values(self, rec: Mapping[str, Any]) -> dict[str, float]:
        """The watched keys of a record that are logged."""
        out = {}
        found = first_finite(rec, self.kl_keys)
        if found is not None:
            out["kl"] = found[1]
        for name, key in (("entropy", self.entropy_key), ("loss", "loss/total"), ("ratio", "policy/ratio_mean")):
            value = finite(rec, key)
            if value is not None:
                out[name] = value
        return out

    def push(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.recent[name].push(value)

    def baselines(self) -> dict[str, tuple[float, float]]:
        """Median and robust sigma of each watched key with enough history (floored at 5% of |median|)."""
        out = {}
        for name, window in self.recent.items():
            if len(window) >= self.min_history:
                median = window.median
                floor = self.kl_abs_floor if name == "kl" else 1e-12
                out[name] = (median, max(window.sigma, self.rel_floor * abs(median), floor))
        return out

    def moved(self, values: Mapping[str, float], baselines: Mapping[str, tuple[float, float]]) -> str | None:
        """What moved far from its baseline on this record (a phrase for the message), or None."""
        k = self.sigma
        for name, value in values.items():
            if name not in baselines:
                continue
            median, sigma = baselines[name]
            z = (value - median) / sigma
            if name == "kl" and z > k and value > self.kl_floor and value >= self.kl_ratio * max(
                    median, self.kl_abs_floor):
                return f"KL {value:.4g} ({value / max(median, self.kl_abs_floor):.3g}x its median {median:.4g})"
            if name == "entropy" and -z > k and value < (1 - self.drop) * median:
                return f"entropy {value:.4g} ({1 - value / median:.0%} below its median {median:.4g})"
            if name == "loss" and abs(z) > k:
                return f"loss {value:.4g} ({abs(z):.1f} robust sigma from its median {median:.4g})"
            if name == "ratio" and abs(z) > k and abs(value - 1) > self.ratio_dev:
                return f"mean PPO ratio {value:.4g} (median {median:.4g})"
        return None

    @property
    def active(self) -> bool:
        return bool(self.watches)

    def open(self, step: int, alert: Alert, baselines: dict[str, tuple[float, float]] | None = None) -> None:
        """Watch the next records for the consequence of the event ``alert`` notes (baselines: now's)."""
        if self.steps > 0:
            self.watches.append(_Watch(step, alert, self.baselines() if baselines is None else baselines,
                                       self.steps))

    def hold(self) -> None:
        """The event goes on: the open watches count their records from now."""
        for watch in self.watches:
            watch.left = self.steps

    def clear(self) -> None:
        self.watches.clear()

    def check(self, values: Mapping[str, float]) -> tuple[_Watch, str] | None:
        """The open watches look at this record: the first that sees the policy move (and what moved), else
        None. A move closes every watch; a watch that saw its records without one is dropped."""
        for watch in list(self.watches):
            moved = self.moved(values, watch.baselines)
            if moved is not None:
                self.watches.clear()
                return watch, moved
            watch.left -= 1
        while self.watches and self.watches[0].left <= 0:
            self.watches.popleft()
        return None


def _moved_alert(rule: str, watch: _Watch, moved: str, step: int, suggestion: str) -> Alert:
    """The warning a clipped event's note becomes when the policy moved: dated at the event, saying what moved."""
    note = watch.alert
    return Alert(rule, "warning", note.step,
                 note.message.split("; clipping", 1)[0]
                 + f"; clipping capped the update, but the policy moved: {moved} at step {step}",
                 suggestion, {**note.evidence, "moved_at": step, "moved": moved})


class Spike(Rule):
    """One value far above the robust spread of the previous window: median + k x IQR/1.349.

    Median and quartiles ignore earlier spikes (a mean/std window is inflated by every spike it holds), need
    only ``spike_min_history`` values, and forget a spike as soon as it leaves the window. For ``grad/norm``
    (never negative) the value must also be ``spike_min_ratio`` x the median, so a very steady norm does
    not call a 20% wiggle a spike.

    A loss spike matters only when the update felt it: the step's ``grad/norm`` is at least
    ``spike_loss_grad_ratio`` x its median. Otherwise, or with no gradient norm logged, it is ``info``: RL
    surrogate losses (PPO/GRPO) sit near 0 and jump with the batch's composition (the lengths and rewards
    that happened to be drawn) without moving the policy; public GRPO logs without a gradient norm jump from
    0 to 1e-3 this way on healthy runs (docs/diagnose.md, "Real runs nobody here generated"). A series held at
    exactly 0 has no scale at all and is not judged.

    A spike the update felt is judged by its consequence (:class:`Consequence`). Unclipped (no clip threshold,
    or the producer's ``grad/clipped`` is 0) the whole step went into the weights: a ``warning`` at once.
    Clipped (:func:`clip_evidence`) the update was capped: an ``info`` note now, and a ``warning`` (dated at the
    spike) if within the next ``spike_watch_steps`` records the policy visibly moved. A note does not use up
    the episode: a later spike that is a warning is still reported, once.
    """

    def __init__(self, cfg: DetectorConfig, key: str):
        self.key = key
        self.name = {"grad/norm": "grad_spike", "loss/total": "loss_spike"}.get(key, f"spike:{key}")
        self.sigma, self.min_history, self.rel_floor = cfg.spike_sigma, cfg.spike_min_history, cfg.spike_min_rel_std
        self.min_ratio = cfg.spike_min_ratio if key == "grad/norm" else 0.0
        self.grad_ratio = cfg.spike_loss_grad_ratio
        self.max_norm = cfg.max_grad_norm
        self.window = RollingQuantiles(cfg.spike_window)
        self.grads = RollingQuantiles(cfg.spike_window) if key != "grad/norm" else None
        self.trigger = Trigger(1, cfg.rearm_steps)
        self.noted_only = False  # this episode has so far given only an info note
        self.knobs = Knobs(cfg.producer)
        self.watch_steps = cfg.spike_watch_steps
        # what a clipped spike is watched for; only the gradient norm and the loss have a gradient to clip
        self.consequence = Consequence(cfg) if key in ("grad/norm", "loss/total") else None

    def _severity(self, rec: Mapping[str, Any]) -> tuple[str, float | None]:
        """``warning`` when the step's gradient norm is also up (or has too short a history to say), ``info`` when
        it is not or is not logged; and that ratio."""
        if self.grads is None:
            return "warning", None
        norm = finite(rec, "grad/norm")
        if norm is None:
            return "info", None
        if len(self.grads) < self.min_history or self.grads.median <= 0:
            return "warning", None
        ratio = norm / self.grads.median
        return ("warning" if ratio >= self.grad_ratio else "info"), ratio

    def _alert(self, first: int, step: int, value: float, median: float, sigma: float, z: float,
               rec: Mapping[str, Any]) -> tuple[Alert, bool]:
        """The alert of a spike, and whether it is a clipped one to watch for its consequence."""
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
        clipped = clip_evidence(rec, self.max_norm) if self.consequence is not None else None
        watch = clipped is not None and severity == "warning"
        if self.key == "grad/norm" and clipped is None:
            felt = "; no clipping bounded it, so the whole step went into the weights"
            suggestion += f", or set {self.knobs['max_grad_norm']}"
        elif watch and clipped is not None:
            severity = "info"
            evidence.update(clipped)
            cap = (f"max_grad_norm={clipped['max_grad_norm']:g}" if clipped["max_grad_norm"] is not None
                   else "the clip threshold")
            felt += (f"; clipping at {cap} bounded the update (a note: it becomes a warning if KL, entropy, the "
                     f"loss or the PPO ratio jump within {self.watch_steps} steps)")
            suggestion = ("a note: nothing to do while KL, entropy and the loss stay steady; if spikes grow or "
                          f"repeat, lower {self.knobs['learning_rate']}")
        return Alert(
            self.name, severity, first,
            f"{what} spiked to {value:.4g} at step {step} ({z:.1f} robust sigma above the median "
            f"{median:.4g} of the previous {len(self.window)} steps){felt}",
            suggestion,
            evidence,
        ), watch

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        out: list[Alert] = []
        c = self.consequence
        values = c.values(rec) if c is not None else {}
        if c is not None and c.active and (found := c.check(values)) is not None:
            self.noted_only = False
            watch, moved = found
            out.append(_moved_alert(
                self.name, watch, moved, step,
                f"inspect the batch of step {watch.step} (degenerate samples, extreme rewards); lower "
                f"{self.knobs['learning_rate']} or {self.knobs['max_grad_norm']}, or skip steps whose "
                "gradient norm spikes"))
        value = finite(rec, self.key)
        if value is not None:
            out += self._spike(step, value, rec)
            self.window.push(value)
        if c is not None:
            c.push(values)
        if self.grads is not None and (norm := finite(rec, "grad/norm")) is not None:
            self.grads.push(norm)
        return out

    def _spike(self, step: int, value: float, rec: Mapping[str, Any]) -> list[Alert]:
        if len(self.window) < self.min_history:
            return []
        median = self.window.median
        if median == 0 and self.window.sigma == 0:
            return []  # a series held at exactly 0 (a loss rounded to 4 decimals, ~1e-5) has no scale to judge by
        sigma = max(self.window.sigma, self.rel_floor * abs(median))
        z = (value - median) / sigma
        bad = z > self.sigma and (self.min_ratio == 0.0 or value > self.min_ratio * median)
        first = self.trigger.observe(bad, step)
        # a note must not hide what follows: within an episode that so far gave only a note, a spike that is a
        # warning is still reported (once), and a clipped one is watched for its consequence
        if not bad or (first is None and not self.noted_only):
            return []
        alert, watch = self._alert(first if first is not None else step, step, value, median, sigma, z, rec)
        if watch and self.consequence is not None:
            self.consequence.open(step, alert)
        if first is None and not is_alerting(alert.severity):
            return []
        self.noted_only = not is_alerting(alert.severity)
        if not self.noted_only and self.consequence is not None:
            self.consequence.clear()
        return [alert]


class GradExplosion(Rule):
    """The pre-clip gradient norm sustained far above its own baseline (the median of the previous window).

    Clipping hides an explosion from the update but not from the norm, so the pre-clip norm's growth is the
    signal; it needs no clip threshold and works from the fourth step. Like a spike it is judged by its
    consequence (:class:`Consequence`): when clipping bounded every step of the streak, a short burst is an
    ``info`` note that becomes a ``warning`` (dated at its first step) if the policy moved during it or within
    ``spike_watch_steps`` records after it, or if it lasts ``grad_explosion_sustained_steps`` (then clipping is
    setting every step: no longer a burst). An unclipped step in the streak is a ``warning`` at once.
    """

    name = "grad_explosion"

    def __init__(self, cfg: DetectorConfig):
        self.factor, self.min_history = cfg.grad_explosion_factor, cfg.grad_explosion_min_history
        self.patience, self.sustained = cfg.grad_explosion_patience, cfg.grad_explosion_sustained_steps
        self.baseline = RollingQuantiles(cfg.grad_explosion_window)
        self.trigger = Trigger(cfg.grad_explosion_patience, cfg.rearm_steps)
        self.max_norm = cfg.max_grad_norm
        self.onset: tuple[float, float] | None = None
        self.consequence = Consequence(cfg)
        self.onset_baselines: dict[str, tuple[float, float]] = {}
        self.streak_values: list[dict[str, float]] = []  # watched values of the streak's later records
        self.streak_clipped = True   # clipping bounded every step of the current streak
        self.noted_only = False      # this episode has so far given only an info note
        self.knobs = Knobs(cfg.producer)

    def _alert(self, severity: str, first: int, step: int, norm: float, why: str) -> Alert:
        assert self.onset is not None
        norm0, base0 = self.onset
        if severity == "info":
            suggestion = ("a note: nothing to do while KL, entropy and the loss stay steady; if it lasts or "
                          f"repeats, lower {self.knobs['learning_rate']}")
        else:
            suggestion = (f"lower {self.knobs['learning_rate']} or lengthen the warm-up; inspect the batches of "
                          "these steps (extreme rewards or advantages)")
        return Alert(
            self.name, severity, first,
            f"pre-clip gradient norm above {self.factor:g}x its baseline for {self.trigger.streak} steps "
            f"from step {first}: {norm0:.4g} vs a median of {base0:.4g} before; {norm:.4g} at step {step}{why}",
            suggestion,
            {"value": rnd(norm0), "baseline": rnd(base0), "ratio": rnd(norm0 / base0, 4),
             "latest": rnd(norm), "factor": self.factor, "steps": self.trigger.streak},
        )

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        c = self.consequence
        values = c.values(rec)
        norm = finite(rec, "grad/norm")
        out: list[Alert] = []
        bad = False
        if norm is not None and len(self.baseline) >= self.min_history:
            base = self.baseline.median
            bad = base > 0 and norm > self.factor * base
            if bad and self.trigger.streak == 0:  # a new streak: what the policy looked like before it
                self.onset, self.onset_baselines = (norm, base), c.baselines()
                self.streak_values, self.streak_clipped = [], True
            elif bad:
                self.streak_values.append(values)
            if bad:
                self.streak_clipped = self.streak_clipped and clip_evidence(rec, self.max_norm) is not None
            first = self.trigger.observe(bad, step)
            judged = first is not None or (self.noted_only and bad and self.trigger.streak >= self.patience)
            if judged and self.onset is not None:
                out += self._judge(first, step, norm)
        if not bad and c.active and (found := c.check(values)) is not None:
            self.noted_only = False
            watch, moved = found
            out.append(_moved_alert(
                self.name, watch, moved, step,
                f"lower {self.knobs['learning_rate']} or {self.knobs['max_grad_norm']}; inspect the batches of "
                f"the steps from {watch.step} (extreme rewards or advantages)"))
        if norm is not None:
            self.baseline.push(norm)
        c.push(values)
        return out

    def _judge(self, first: int | None, step: int, norm: float) -> list[Alert]:
        """A streak long enough to count, on this record: a warning, an info note, or (a noted one going on)
        nothing yet."""
        c = self.consequence
        start = self.trigger.start if self.trigger.start is not None else step
        moved = next((m for v in self.streak_values if (m := c.moved(v, self.onset_baselines)) is not None), None)
        why = ""
        if not self.streak_clipped:
            why = "; clipping did not bound every step of it"
        elif moved is not None:
            why = f"; clipping capped the updates, but the policy moved: {moved}"
        elif self.trigger.streak >= self.sustained:
            why = f"; clipped on every step, but for {self.trigger.streak} steps running: not a burst"
        if why:
            self.noted_only = False
            c.clear()
            return [self._alert("warning", start, step, norm, why)]
        if self.trigger.streak == self.patience:  # a new clipped burst: note it (once an episode) and watch it
            note = self._alert("info", start, step, norm,
                               f"; clipping bounded every step (a note: it becomes a warning if KL, entropy, the "
                               f"loss or the PPO ratio jump within {c.steps} steps after it, or if it lasts "
                               f"{self.sustained} steps)")
            c.clear()
            c.open(start, note, self.onset_baselines)
            if first is not None:
                self.noted_only = True
                return [note]
            return []
        c.hold()
        return []


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
