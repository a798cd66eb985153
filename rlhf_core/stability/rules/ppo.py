"""PPO update health: policy entropy, importance ratios, clip fraction and the critic's explained variance."""
from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from rlhf_core.stability.rules.base import Alert, Rule, Trigger, finite, first_finite, rnd
from rlhf_core.stability.rules.config import DetectorConfig
from rlhf_core.stability.rules.knobs import Knobs


def _smaller_steps(k: Knobs) -> str:
    return f"lower {k['learning_rate']}, use fewer PPO epochs per batch ({k['ppo_epochs']}) or a smaller clip " \
           f"range ({k['clip_range']})"


class EntropyCollapse(Rule):
    """Entropy far below its starting value H0: early (< half of H0 within the first steps) or ever (< 10%).

    H0 is the largest of the first few values, not their mean: a policy that collapses from step 2 would
    otherwise drag its own baseline down. Judged from the second value on (H0 so far is the max seen).

    What the fall means depends on the reward. A policy that sharpens on what it is rewarded for loses entropy
    while ``reward/mean`` rises: public healthy PPO/GRPO runs on GSM8K fall below H0/2 within 10-55 steps and to
    0.03-0.3 H0 later while their score climbs (docs/diagnose.md, "Real runs nobody here generated"). So while
    every one of the last ``entropy_reward_window`` values of ``reward/mean`` is above every one of its first
    ``entropy_baseline_steps`` (a rise no batch-to-batch noise makes), the early fall is a note and the fall below
    ``entropy_min_frac`` a warning; with a flat or falling reward (nothing learned for the exploration lost, or
    nothing to tell) they stay a warning and critical. A reward bought with KL past ``kl_note_frac`` of the budget
    is not sharpening but the over-optimisation signature (the policy collapsing onto what the reward model
    over-scores), and with no KL logged (GRPO at beta 0) the two cannot be told apart: then the fall keeps its
    severity too (the corpus's beta-0 GRPO runs that hack a sentiment reward rise in reward as they collapse).
    """

    name = "entropy_collapse"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.seen = 0
        self.h0: float | None = None
        self.first_step: int | None = None
        self.early = Trigger(cfg.entropy_patience, cfg.rearm_steps)
        self.late = Trigger(cfg.entropy_patience, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)
        self.reward_start: list[float] = []
        self.reward_recent: deque[float] = deque(maxlen=cfg.entropy_reward_window)
        self.kl_limit = None if cfg.kl_budget is None else cfg.kl_note_frac * cfg.kl_budget
        self.kl: float | None = None

    def _reward_rise(self) -> tuple[float, float] | None:
        """(first mean, recent mean) of the reward when every recent value is above every first one, else None."""
        if len(self.reward_start) < self.cfg.entropy_baseline_steps or \
                len(self.reward_recent) < self.cfg.entropy_reward_window:
            return None
        if self.kl is None or (self.kl_limit is not None and self.kl > self.kl_limit):
            return None  # without a KL to the reference, learning and over-optimisation look the same
        if min(self.reward_recent) <= max(self.reward_start):
            return None
        return statistics.fmean(self.reward_start), statistics.fmean(self.reward_recent)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        kl = first_finite(rec, self.cfg.kl_keys)
        if kl is not None:
            self.kl = kl[1]
        reward = finite(rec, "reward/mean")
        if reward is not None:
            if len(self.reward_start) < self.cfg.entropy_baseline_steps:
                self.reward_start.append(reward)
            self.reward_recent.append(reward)
        h = finite(rec, self.cfg.entropy_key)
        if h is None:
            return []
        if self.first_step is None:
            self.first_step = step
        self.seen += 1
        if self.seen <= self.cfg.entropy_baseline_steps:
            self.h0 = h if self.h0 is None else max(self.h0, h)
            if self.seen == 1:
                return []
        if self.h0 is None or self.h0 <= 0:
            return []
        out: list[Alert] = []
        rise = self._reward_rise()
        in_early = step - self.first_step < self.cfg.entropy_early_steps
        early_bad = in_early and h < self.cfg.entropy_early_frac * self.h0
        first = self.early.observe(early_bad, step)
        if first is not None:
            out.append(self._alert("info" if rise else "warning", first, h, self.cfg.entropy_early_frac,
                                   f" within the first {self.cfg.entropy_early_steps} steps", rise))
        first = self.late.observe(h < self.cfg.entropy_min_frac * self.h0, step)
        if first is not None:
            out.append(self._alert("warning" if rise else "critical", first, h, self.cfg.entropy_min_frac, "",
                                   rise))
        return out

    def _alert(self, severity: str, first: int, h: float, frac: float, when: str,
               rise: tuple[float, float] | None) -> Alert:
        assert self.h0 is not None
        evidence: dict[str, Any] = {"key": self.cfg.entropy_key, "value": rnd(h), "h0": rnd(self.h0),
                                    "threshold_frac": frac, "ratio": rnd(h / self.h0, 4)}
        message = (f"policy entropy fell below {frac:g} x its initial value{when}: {h:.4g} vs H0 = {self.h0:.4g} "
                   f"(from step {first})")
        suggestion = (f"raise {self.knobs['entropy_coef']} or {self.knobs['temperature']}, lower "
                      f"{self.knobs['learning_rate']}; a collapsing entropy often comes with reward hacking, so read "
                      "some samples")
        if rise is not None:
            evidence.update(reward_start=rnd(rise[0]), reward_recent=rnd(rise[1]))
            message += (f", while the reward rose from {rise[0]:.4g} to {rise[1]:.4g}: the policy is sharpening on "
                        "what it is rewarded for")
            suggestion = (f"if the reward stalls while entropy keeps falling, raise {self.knobs['entropy_coef']} or "
                          f"{self.knobs['temperature']}; read some samples to rule out reward hacking")
        return Alert(self.name, severity, first, message, suggestion, evidence)


class PPORatioMean(Rule):
    """Mean importance ratio far from 1 for several steps: the updates move the policy a lot, or old log-probs
    are stale (one batch off is common in healthy small-batch runs)."""

    name = "ppo_ratio"

    def __init__(self, cfg: DetectorConfig):
        self.dev = cfg.ratio_mean_dev
        self.trigger = Trigger(cfg.ratio_mean_patience, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        ratio = finite(rec, "policy/ratio_mean")
        if ratio is None:
            return []
        first = self.trigger.observe(abs(ratio - 1) > self.dev, step)
        if first is None:
            return []
        return [Alert(
            self.name, "warning", first, f"mean PPO ratio more than {self.dev:g} from 1 for {self.trigger.streak} "
            f"steps from step {first} ({ratio:.4g} at step {step})",
            f"{_smaller_steps(self.knobs)}; check that old log-probs are computed by the same model and settings "
            "as sampling",
            {"ratio_mean": rnd(ratio), "max_deviation": self.dev},
        )]


class PPORatioExtreme(Rule):
    """Token ratios above ratio_max or below ratio_min step after step: some tokens' probabilities moved by far
    more than the clip range allows. Single batches with one such token are common in healthy runs (the max
    over a few hundred tokens is heavy-tailed); a streak of ``ratio_patience`` is not.

    What a streak means depends on the bulk of the tokens. When the clip fraction passed ``clipfrac_max`` on a
    step of the streak (or is not logged), the updates are pushing the whole batch past the clip: ``critical``.
    When it stayed under it, the extremes are a few tail tokens that the clipped objective bounds (veRL's
    dual-clip ``clip_ratio_c`` and truncated importance sampling bound the rest): an ``info`` note, which
    becomes ``critical`` (once, dated at the streak's start) if the clip fraction passes the bar while the
    streak goes on or in a later streak of the same episode.
    """

    name = "ppo_ratio_extreme"

    def __init__(self, cfg: DetectorConfig):
        self.hi, self.lo = cfg.ratio_max, cfg.ratio_min
        self.patience, self.clipfrac_limit = cfg.ratio_patience, cfg.clipfrac_max
        self.trigger = Trigger(cfg.ratio_patience, cfg.rearm_steps)
        self.bulk: float | None = None  # the largest clip fraction of the current streak (None: not logged)
        self.noted_only = False         # this episode has so far given only an info note
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        rmax, rmin = finite(rec, "policy/ratio_max"), finite(rec, "policy/ratio_min")
        if rmax is None and rmin is None:
            return []
        high = rmax is not None and rmax > self.hi
        low = rmin is not None and rmin < self.lo
        frac = finite(rec, "policy/clipfrac")
        if (high or low) and self.trigger.streak == 0:
            self.bulk = None
        if (high or low) and frac is not None:
            self.bulk = frac if self.bulk is None else max(self.bulk, frac)
        first = self.trigger.observe(high or low, step)
        bulk_moved = self.bulk is None or self.bulk > self.clipfrac_limit
        if first is None and not (self.noted_only and (high or low) and self.trigger.streak >= self.patience
                                  and bulk_moved):
            return []
        start = first if first is not None else (self.trigger.start if self.trigger.start is not None else step)
        parts = ([f"ratio_max {rmax:.4g} > {self.hi:g}"] if high else []) + \
                ([f"ratio_min {rmin:.4g} < {self.lo:g}"] if low else [])
        evidence: dict[str, Any] = {"ratio_max_limit": self.hi, "ratio_min_limit": self.lo}
        if rmax is not None:
            evidence["ratio_max"] = rnd(rmax)
        if rmin is not None:
            evidence["ratio_min"] = rnd(rmin)
        message = (f"extreme PPO ratios for {self.trigger.streak} steps from step {start}; at step {step}: "
                   f"{'; '.join(parts)}")
        suggestion = (f"{_smaller_steps(self.knobs)}; check for a mismatch between sampling and training "
                      "log-probs (dropout left on, different dtype or attention mask)")
        if self.bulk is not None:
            evidence.update(clipfrac_max=rnd(self.bulk), clipfrac_limit=self.clipfrac_limit)
        if bulk_moved:
            self.noted_only = False
            if self.bulk is not None:
                message += f"; up to {self.bulk:.3g} of the tokens clipped"
            return [Alert(self.name, "critical", start, message, suggestion, evidence)]
        self.noted_only = True
        return [Alert(
            self.name, "info", start,
            message + f"; but at most {self.bulk:.3g} of the tokens were clipped (not over {self.clipfrac_limit:g}): "
            "a few tail tokens, which the clipped objective bounds (a note: critical if the clip fraction "
            "follows)",
            "a note: nothing to do while the clip fraction, KL and entropy stay steady; a dual clip bound for "
            "negative advantages (veRL's clip_ratio_c) caps such tokens' loss",
            evidence,
        )]


class ClipFraction(Rule):
    """Too many tokens clipped for several steps: each update is trying to move further than the clip allows."""

    name = "clipfrac"

    def __init__(self, cfg: DetectorConfig):
        self.limit = cfg.clipfrac_max
        self.trigger = Trigger(cfg.clipfrac_steps, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        frac = finite(rec, "policy/clipfrac")
        if frac is None:
            return []
        first = self.trigger.observe(frac > self.limit, step)
        if first is None:
            return []
        return [Alert(
            self.name, "warning", first,
            f"PPO clip fraction above {self.limit:g} for {self.trigger.streak} steps from step {first} "
            f"(latest {frac:.3g})",
            _smaller_steps(self.knobs), {"clipfrac": rnd(frac), "limit": self.limit, "steps": self.trigger.streak},
        )]


class CriticExplainedVariance(Rule):
    """The value head explains none of the return variance for many steps: advantages are mostly noise.

    Only informative steps count: when every sample of a batch got the same reward (reward std ~0) the
    returns hardly vary and explained variance is noise divided by ~0 (the runner logged -256 on such steps
    of a stable run). The first ``critic_warmup`` informative steps are not judged: a fresh value head
    needs them to learn (veRL's ``trainer.critic_warmup``, OpenRLHF's actor freezing steps).
    """

    name = "critic"

    def __init__(self, cfg: DetectorConfig):
        self.limit, self.warmup, self.min_std = cfg.critic_ev_min, cfg.critic_warmup, cfg.critic_min_reward_std
        self.trigger = Trigger(cfg.critic_steps, cfg.rearm_steps)
        self.informative = 0
        self.low = float("inf")
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        ev = finite(rec, "value/explained_var")
        reward_std = finite(rec, "reward/std")
        if ev is None or (reward_std is not None and reward_std < self.min_std):
            return []
        self.informative += 1
        if self.informative <= self.warmup:
            return []
        bad = ev < self.limit
        if bad:  # lowest value of the current bad streak, for the evidence
            self.low = min(self.low, ev) if self.trigger.streak else ev
        first = self.trigger.observe(bad, step)
        if first is None:
            return []
        k = self.knobs
        return [Alert(
            self.name, "warning", first,
            f"critic explained variance below {self.limit:g} for {self.trigger.streak} informative steps from step "
            f"{first} (latest {ev:.3g}, lowest {self.low:.3g})",
            f"warm up the critic before the policy ({k['critic_warmup']}), raise {k['critic_lr']} or "
            f"{k['vf_coef']}, and normalise rewards/advantages",
            {"explained_var": rnd(ev), "lowest": rnd(self.low), "limit": self.limit, "steps": self.trigger.streak},
        )]
