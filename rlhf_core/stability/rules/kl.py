"""KL to the reference: a spent budget (absolute levels, from step 1), sudden growth, and a negative estimate.

Healthy RLHF keeps the per-token KL (k3) to the reference small: the runs of the kit's corpus and of
published PPO/GRPO setups sit around 1e-4 to 0.1 nats/token, while runs that blew up reach 1 to 100+.
So an absolute level catches a blow-up from the first step, before any history exists, and a growth test
(several times the recent median, above a floor) catches it on its way up.
"""
from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from rlhf_core.stability.rules.base import Alert, RollingTrend, Rule, Trigger, finite, first_finite, rnd
from rlhf_core.stability.rules.config import DetectorConfig
from rlhf_core.stability.rules.knobs import Knobs


def _raise_kl(k: Knobs) -> str:
    return f"raise {k['kl_coef']} or lower {k['learning_rate']}"


class KLExplosion(Rule):
    """KL growing fast: above ``kl_explosion_floor`` and several times the median of the last few values
    (works from step 2), or above ``kl_z_floor``, far above the line fitted to the recent window and
    ``kl_trend_ratio`` times what the line expects (a jump off a steady trend, not one of the spurts of
    steady growth; the fit's residual spread sets the scale, so a lower floor suffices)."""

    name = "kl_explosion"

    def __init__(self, cfg: DetectorConfig):
        self.keys, self.floor, self.growth = cfg.kl_keys, cfg.kl_explosion_floor, cfg.kl_growth
        self.z_max, self.min_history, self.z_floor = cfg.kl_z, cfg.kl_min_history, cfg.kl_z_floor
        self.trend_ratio = cfg.kl_trend_ratio
        self.abs_floor, self.rel_floor = cfg.kl_min_std, cfg.kl_min_rel_std
        self.recent: deque[float] = deque(maxlen=cfg.kl_growth_window)
        self.history = RollingTrend(cfg.kl_window)
        self.trigger = Trigger(cfg.kl_patience, cfg.rearm_steps)
        self.first: tuple[float, float, str] | None = None
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        found = first_finite(rec, self.keys)
        if found is None:
            return []
        key, kl = found
        out: list[Alert] = []
        bad, why, ref = False, "", 0.0
        if kl > self.floor and self.recent:
            base = statistics.median(self.recent)
            if kl > self.growth * max(base, self.abs_floor):
                bad, why, ref = True, f"{kl / max(base, self.abs_floor):.3g}x the median of the previous " \
                                      f"{len(self.recent)} steps ({base:.4g})", base
        if not bad and kl > self.z_floor and len(self.history) >= self.min_history:
            z, expected, _ = self.history.zscore(kl, self.abs_floor, self.rel_floor)
            if z > self.z_max and kl > self.trend_ratio * max(expected, self.abs_floor):
                bad, why, ref = True, f"{z:.1f} sigma above its trend ({expected:.4g} expected)", expected
        if bad and self.trigger.streak == 0:
            self.first = (kl, ref, why)
        first = self.trigger.observe(bad, step)
        if first is not None and self.first is not None:
            kl0, ref0, why0 = self.first
            out.append(Alert(
                self.name, "warning", first,
                f"{key} is growing fast from step {first}: {kl0:.4g} nats/token, {why0}; {kl:.4g} at step {step}",
                _raise_kl(self.knobs),
                {"key": key, "value": rnd(kl0), "reference": rnd(ref0), "latest": rnd(kl), "floor": self.floor},
            ))
        self.recent.append(kl)
        self.history.push(kl)
        return out


class KLBudget(Rule):
    """KL above an absolute level: a warning the step it passes ``kl_budget``, critical when it has stayed past it
    for ``kl_patience`` steps, a note (``info``) past ``kl_note_frac`` of it.

    On by default (1 nat/token), so a run that blows up is named from its first step even when nobody set
    a budget; ``kl_budget=None`` turns it off. The lower level is only a note: healthy runs that learn can
    sit at half the budget for hundreds of steps; fast growth towards it is ``kl_explosion``'s warning. One step
    past the budget is a warning, not "roll back now": public healthy GRPO runs have single-step k3 spikes of
    1-5 nats/token that are gone the next step (docs/diagnose.md, "Real runs nobody here generated"), while a
    blow-up that the next step does not undo is critical.
    """

    name = "kl_budget"

    def __init__(self, cfg: DetectorConfig):
        self.keys, self.budget = cfg.kl_keys, cfg.kl_budget
        self.note = None if cfg.kl_budget is None else cfg.kl_note_frac * cfg.kl_budget
        self.note_trigger = Trigger(1, cfg.rearm_steps)
        self.warn_trigger = Trigger(1, cfg.rearm_steps)
        self.crit_trigger = Trigger(cfg.kl_patience, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        found = first_finite(rec, self.keys) if self.budget is not None else None
        if found is None or self.note is None or self.budget is None:
            return []
        key, kl = found
        over = kl > self.budget
        critical = self.crit_trigger.observe(over, step)
        warned = self.warn_trigger.observe(over, step) is not None
        noted = self.note_trigger.observe(kl > self.note, step) is not None
        evidence = {"key": key, "value": rnd(kl), "budget": self.budget, "note_level": rnd(self.note)}
        if critical is not None:  # dated when it became critical: the warning already marks where it began
            return [Alert(
                self.name, "critical", step, f"{key} has exceeded the KL budget {self.budget:g} nats/token "
                f"for {self.crit_trigger.streak} steps from step {critical}: {kl:.4g} at step {step}",
                f"roll back to a checkpoint from before step {critical}, then {_raise_kl(self.knobs)}",
                {**evidence, "steps_over": self.crit_trigger.streak})]
        if warned:  # past both levels at once: one warning, not a note too
            return [Alert(
                self.name, "warning", step, f"{key} = {kl:.4g} at step {step} exceeds the KL budget "
                f"{self.budget:g} nats/token (critical if it stays past it for {self.crit_trigger.patience} steps)",
                f"watch the next steps; if KL stays high, {_raise_kl(self.knobs)}", evidence)]
        if noted:
            return [Alert(
                self.name, "info", step, f"{key} = {kl:.4g} at step {step} is past {self.note:g} nats/token, "
                f"{self.note / self.budget:.0%} of the KL budget {self.budget:g}",
                f"{_raise_kl(self.knobs)} before the budget is spent", evidence)]
        return []


class NegativeKL(Rule):
    """Batch-mean k1 below zero for several steps: the samples did not come from the policy being scored."""

    name = "negative_kl"

    def __init__(self, cfg: DetectorConfig):
        self.key, self.threshold = cfg.neg_kl_key, cfg.neg_kl_threshold
        self.trigger = Trigger(cfg.neg_kl_steps, cfg.rearm_steps)
        self.recent: list[float] = []
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        kl = finite(rec, self.key)
        if kl is None:
            return []
        bad = kl < self.threshold
        self.recent = (self.recent + [kl])[-self.trigger.patience:] if bad else []
        first = self.trigger.observe(bad, step)
        if first is None:
            return []
        return [Alert(
            self.name, "warning", first,
            f"{self.key} below {self.threshold:g} nats/token for {self.trigger.streak} steps from step {first} "
            f"(latest {kl:.4g})",
            "check sampling settings: log-probs must come from the distribution that was sampled, so generate "
            f"at temperature 1{self.knobs.setting('temperature', 1)} and without top-k/top-p, min-length or "
            "repetition penalties (or score with the same settings); a negative KL estimate rewards the policy "
            "for drifting",
            {"key": self.key, "values": [rnd(v) for v in self.recent], "threshold": self.threshold},
        )]
