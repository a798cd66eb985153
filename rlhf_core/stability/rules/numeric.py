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


class _Watch:
    """A clipped gradient spike waiting for its consequence: the baselines of the watched keys at the spike
    and how many records are left to look at."""

    __slots__ = ("step", "alert", "baselines", "left")

    def __init__(self, step: int, alert: Alert, baselines: dict[str, tuple[float, float]], left: int):
        self.step, self.alert, self.baselines, self.left = step, alert, baselines, left


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

    A gradient spike is judged by its consequence. Unclipped (no clip threshold, or the producer's
    ``grad/clipped`` is 0) the whole step went into the weights: a ``warning`` at once. Clipped (``grad/clipped``
    > 0; without that key, the pre-clip norm above ``max_grad_norm``/``grad/max_norm``) the update was capped:
    an ``info`` note now, and a ``warning`` (dated at the spike) if within the next ``spike_watch_steps``
    records the policy visibly moved: KL, entropy, the loss or the mean PPO ratio far off its own recent
    median. A note does not use up the episode: a later spike that is a warning is still reported, once.
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
        # what a clipped gradient spike is watched for: each key's recent values and the open watches
        self.kl_keys, self.entropy_key = cfg.kl_keys, cfg.entropy_key
        self.watch_steps, self.watch_min = cfg.spike_watch_steps, cfg.spike_watch_min_history
        self.watch_sigma, self.watch_kl_ratio = cfg.spike_watch_sigma, cfg.spike_watch_kl_ratio
        self.watch_drop, self.ratio_dev = cfg.spike_watch_entropy_drop, cfg.ratio_mean_dev
        self.kl_floor, self.kl_abs_floor = cfg.kl_z_floor, cfg.kl_min_std
        self.recent: dict[str, RollingQuantiles] = (
            {k: RollingQuantiles(cfg.spike_watch_window) for k in ("kl", "entropy", "loss", "ratio")}
            if key == "grad/norm" else {})
        self.watches: deque[_Watch] = deque(maxlen=max(1, cfg.spike_watch_steps + 1))

    def _severity(self, rec: Mapping[str, Any]) -> tuple[str, float | None]:
        """``warning`` when the step's gradient norm is also up (or unknown), else ``info``; and that ratio."""
        if self.grads is None:
            return "warning", None
        norm = finite(rec, "grad/norm")
        if norm is None or len(self.grads) < self.min_history or self.grads.median <= 0:
            return "warning", None
        ratio = norm / self.grads.median
        return ("warning" if ratio >= self.grad_ratio else "info"), ratio

    def _clipped(self, value: float, rec: Mapping[str, Any]) -> dict[str, Any] | None:
        """For a gradient spike that clipping bounded: the evidence (clip threshold, clipped fraction); else None.

        The producer's ``grad/clipped`` says it when logged (the runner's is the fraction of its minibatch
        updates that were clipped, while ``grad/norm`` is their mean, which can stay under the threshold);
        otherwise a pre-clip norm above the threshold was clipped."""
        if self.key != "grad/norm":
            return None
        limit = self.max_norm if self.max_norm is not None else finite(rec, "grad/max_norm")
        clipped = finite(rec, "grad/clipped")
        bounded = clipped > 0 if clipped is not None else (limit is not None and 0 < limit < value)
        return {"max_grad_norm": limit, "clipped_frac": clipped} if bounded else None

    def _values(self, rec: Mapping[str, Any]) -> dict[str, float]:
        """The watched keys of a record that are logged: KL (k3, else k1, else a probe), entropy, loss, ratio."""
        out = {}
        found = first_finite(rec, self.kl_keys)
        if found is not None:
            out["kl"] = found[1]
        for name, key in (("entropy", self.entropy_key), ("loss", "loss/total"), ("ratio", "policy/ratio_mean")):
            value = finite(rec, key)
            if value is not None:
                out[name] = value
        return out

    def _baselines(self) -> dict[str, tuple[float, float]]:
        """Median and robust sigma of each watched key with enough history (floored like the spike's own)."""
        out = {}
        for name, window in self.recent.items():
            if len(window) >= self.watch_min:
                median = window.median
                floor = self.kl_abs_floor if name == "kl" else 1e-12
                out[name] = (median, max(window.sigma, self.rel_floor * abs(median), floor))
        return out

    def _moved(self, values: Mapping[str, float], baselines: Mapping[str, tuple[float, float]]) -> str | None:
        """What moved far from its baseline on this record (a phrase for the message), or None."""
        k = self.watch_sigma
        for name, value in values.items():
            if name not in baselines:
                continue
            median, sigma = baselines[name]
            z = (value - median) / sigma
            if name == "kl" and z > k and value > self.kl_floor and value >= self.watch_kl_ratio * max(
                    median, self.kl_abs_floor):
                return f"KL {value:.4g} ({value / max(median, self.kl_abs_floor):.3g}x its median {median:.4g})"
            if name == "entropy" and -z > k and value < (1 - self.watch_drop) * median:
                return f"entropy {value:.4g} ({1 - value / median:.0%} below its median {median:.4g})"
            if name == "loss" and abs(z) > k:
                return f"loss {value:.4g} ({abs(z):.1f} robust sigma from its median {median:.4g})"
            if name == "ratio" and abs(z) > k and abs(value - 1) > self.ratio_dev:
                return f"mean PPO ratio {value:.4g} (median {median:.4g})"
        return None

    def _alert(self, first: int, step: int, value: float, median: float, sigma: float, z: float,
               rec: Mapping[str, Any], clipped: dict[str, Any] | None) -> Alert:
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
        if self.key == "grad/norm" and clipped is None:
            felt = "; no clipping bounded it, so the whole step went into the weights"
            suggestion += f", or set {self.knobs['max_grad_norm']}"
        elif clipped is not None:
            severity = "info"
            evidence.update(clipped)
            cap = (f"max_grad_norm={clipped['max_grad_norm']:g}" if clipped["max_grad_norm"] is not None
                   else "the clip threshold")
            felt = (f"; clipping at {cap} bounded the update (a note: it becomes a warning if KL, entropy, the "
                    f"loss or the PPO ratio jump within {self.watch_steps} steps)")
            suggestion = ("a note: nothing to do while KL, entropy and the loss stay steady; if spikes grow or "
                          f"repeat, lower {self.knobs['learning_rate']}")
        return Alert(
            self.name, severity, first,
            f"{what} spiked to {value:.4g} at step {step} ({z:.1f} robust sigma above the median "
            f"{median:.4g} of the previous {len(self.window)} steps){felt}",
            suggestion,
            evidence,
        )

    def _consequence(self, step: int, values: Mapping[str, float]) -> list[Alert]:
        """The open watches look at this record: the first that sees the policy move becomes a warning."""
        for watch in list(self.watches):
            moved = self._moved(values, watch.baselines)
            if moved is not None:
                self.watches.clear()
                self.noted_only = False
                note = watch.alert
                return [Alert(
                    self.name, "warning", note.step,
                    note.message.split("; clipping", 1)[0]
                    + f"; clipping capped the update, but the policy moved: {moved} at step {step}",
                    f"inspect the batch of step {watch.step} (degenerate samples, extreme rewards); lower "
                    f"{self.knobs['learning_rate']} or {self.knobs['max_grad_norm']}, or skip steps whose "
                    "gradient norm spikes",
                    {**note.evidence, "moved_at": step, "moved": moved},
                )]
            watch.left -= 1
        while self.watches and self.watches[0].left <= 0:
            self.watches.popleft()
        return []

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        out: list[Alert] = []
        values = self._values(rec) if self.recent else {}
        if self.watches:
            out += self._consequence(step, values)
        value = finite(rec, self.key)
        if value is not None:
            out += self._spike(step, value, rec)
            self.window.push(value)
        for name, v in values.items():
            self.recent[name].push(v)
        if self.grads is not None and (norm := finite(rec, "grad/norm")) is not None:
            self.grads.push(norm)
        return out

    def _spike(self, step: int, value: float, rec: Mapping[str, Any]) -> list[Alert]:
        if len(self.window) < self.min_history:
            return []
        median = self.window.median
        sigma = max(self.window.sigma, self.rel_floor * abs(median), 1e-12)
        z = (value - median) / sigma
        bad = z > self.sigma and (self.min_ratio == 0.0 or value > self.min_ratio * median)
        first = self.trigger.observe(bad, step)
        # a note must not hide what follows: within an episode that so far gave only a note, a spike that is a
        # warning is still reported (once), and a clipped one is watched for its consequence
        if not bad or (first is None and not self.noted_only):
            return []
        clipped = self._clipped(value, rec)
        alert = self._alert(first if first is not None else step, step, value, median, sigma, z, rec, clipped)
        if clipped is not None and self.watch_steps > 0:
            self.watches.append(_Watch(step, alert, self._baselines(), self.watch_steps))
        if first is None and not is_alerting(alert.severity):
            return []
        self.noted_only = not is_alerting(alert.severity)
        if not self.noted_only:
            self.watches.clear()
        return [alert]


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
