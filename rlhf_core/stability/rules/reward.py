"""Reward hacking and pattern collapse: reward that rises for the wrong reasons.

(a) reward tracks response length while length grew (Singhal et al. 2023, "A Long Way to Go");
(b) reward gained per sqrt(KL) spent falls far below its early value (Gao et al. 2022: the proxy keeps
rising while the true reward turns down); (c) the optimised reward rising while a held-out reward that
the run logs but does not optimise falls (the same, measured directly); (d) reward rising, length up and
KL jumping at once (Zheng et al. 2023, "Secrets of RLHF I": pattern collapse).
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_core.stability.rules.base import Alert, RollingTrend, Rule, Trigger, finite, first_finite, rnd
from rlhf_core.stability.rules.config import DetectorConfig
from rlhf_core.stability.rules.knobs import Knobs

_LENGTH_KEY, _REWARD_KEY = "response/length_mean", "reward/mean"


def _mean(values: Any) -> float:
    return float(sum(values) / len(values))


class RewardLengthHacking(Rule):
    """Reward correlates with length over the window while length grew past its early level."""

    name = "reward_hacking_length"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.baseline: list[float] = []
        self.recent: deque[float] = deque(maxlen=cfg.length_baseline_steps)
        self.pairs: deque[tuple[float, float]] = deque(maxlen=cfg.hack_window)
        self.trigger = Trigger(1, cfg.rearm_steps)
        self.min_pairs = min(cfg.hack_min_steps, cfg.hack_window)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        reward, length = finite(rec, _REWARD_KEY), finite(rec, _LENGTH_KEY)
        if reward is None or length is None:
            return []
        if len(self.baseline) < self.cfg.length_baseline_steps:
            self.baseline.append(length)
        self.recent.append(length)
        self.pairs.append((reward, length))
        if len(self.pairs) < self.min_pairs:
            return []
        base, now = _mean(self.baseline), _mean(self.recent)
        growth = now / base - 1 if base > 0 else 0.0
        corr = 0.0
        if growth > self.cfg.hack_length_growth:  # the correlation is computed only when length grew
            arr = np.asarray(self.pairs)
            if arr[:, 0].std() > 0 and arr[:, 1].std() > 0:
                corr = float(np.corrcoef(arr[:, 0], arr[:, 1])[0, 1])
        first = self.trigger.observe(growth > self.cfg.hack_length_growth and corr > self.cfg.hack_corr, step)
        if first is None:
            return []
        return [Alert(
            self.name, "warning", first,
            f"reward follows response length (correlation {corr:.2f} over the last {len(self.pairs)} steps) while "
            f"length grew {growth:.0%} (from {base:.4g} to {now:.4g})",
            "the reward model likely favours longer answers: add a length penalty or normalise the reward by "
            "length, and check the reward model for length bias",
            {"correlation": rnd(corr, 4), "window": len(self.pairs), "length_start": rnd(base),
             "length_now": rnd(now), "length_growth": rnd(growth, 4)},
        )]


class RewardKLEfficiency(Rule):
    """Reward gained per sqrt(KL) spent drops well below its early value: KL is bought without reward."""

    name = "reward_hacking_kl"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.r0_values: list[float] = []
        self.rewards: deque[float] = deque(maxlen=cfg.reward_eff_smooth)
        self.kls: deque[float] = deque(maxlen=cfg.reward_eff_smooth)
        self.seen = 0
        self.early_effs: list[float] = []
        self.early: float | None = None
        self.early_step: int | None = None
        self.onset: int | None = None
        self.trigger = Trigger(cfg.reward_eff_steps, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        reward, found = finite(rec, _REWARD_KEY), first_finite(rec, self.cfg.kl_keys)
        if reward is None or found is None:
            return []
        self.seen += 1
        if len(self.r0_values) < self.cfg.reward_eff_smooth:
            self.r0_values.append(reward)
        self.rewards.append(reward)
        self.kls.append(max(found[1], 0.0))
        kl = _mean(self.kls)
        if self.seen < self.cfg.reward_eff_early_steps or kl < self.cfg.reward_eff_min_kl:
            return []
        r0 = _mean(self.r0_values)
        gain = _mean(self.rewards) - r0
        eff = gain / math.sqrt(kl)
        if self.early is None and gain <= 2 * statistics.pstdev(self.r0_values):
            return []  # no real reward gain yet (< 2 sd of the first rewards): noise over noise sets no bar
        if self.early is None:  # the early value: median over a span, one noisy step must not set the bar
            self.early_effs.append(eff)
            if len(self.early_effs) == self.cfg.reward_eff_smooth:
                median = statistics.median(self.early_effs)
                if median > 0:
                    self.early, self.early_step = median, step
                else:
                    self.early_effs.clear()
            return []
        if eff >= self.cfg.reward_eff_onset * self.early:
            self.onset = None
        elif self.onset is None:
            self.onset = step
        first = self.trigger.observe(eff < self.cfg.reward_eff_frac * self.early, step)
        if first is None:
            return []
        start = min(first, self.onset) if self.onset is not None else first
        return [Alert(
            self.name, "warning", start,
            f"reward gain per sqrt(KL) fell to {eff:.3g}, below {self.cfg.reward_eff_frac:g} x its early value "
            f"{self.early:.3g} (step {self.early_step}); KL is now {kl:.4g}",
            "the policy spends KL without matching reward gains (over-optimising the reward model): pick an "
            f"earlier checkpoint, stop early or raise {self.knobs['kl_coef']}, and read samples for reward hacking",
            {"efficiency": rnd(eff, 4), "early_efficiency": rnd(self.early, 4), "early_step": self.early_step,
             "reward_gain": rnd(gain), "kl": rnd(kl), "decline_from_step": start},
        )]


class RewardHeldout(Rule):
    """The optimised reward rises while a held-out reward goes down: reward hacking in its plainest form
    (Gao et al. 2022: the proxy keeps rising while the gold reward turns down). Needs a held-out reward in
    the records (``reward/heldout``: a second reward the run computes but does not optimise).

    Both moves are measured against the first ``heldout_baseline_steps`` values in standard errors of a
    difference of means, so the rule is scale-free; the held-out reward must also have lost
    ``heldout_drop_frac`` of its starting level, so a tiny but steady decline does not count.
    """

    name = "reward_hacking_heldout"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.base_r: list[float] = []
        self.base_h: list[float] = []
        self.trail_r: deque[float] = deque(maxlen=cfg.heldout_window)
        self.trail_h: deque[float] = deque(maxlen=cfg.heldout_window)
        self.trigger = Trigger(cfg.heldout_patience, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    @staticmethod
    def _z(delta: float, start: list[float], n_now: int) -> float:
        mean = _mean(start)
        sd = max(statistics.pstdev(start), 1e-6 * (1 + abs(mean)))
        return delta / (sd * math.sqrt(1 / len(start) + 1 / n_now))

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        reward, found = finite(rec, _REWARD_KEY), first_finite(rec, self.cfg.heldout_keys)
        if reward is None or found is None:
            return []
        key, held = found
        if len(self.base_r) < self.cfg.heldout_baseline_steps:
            self.base_r.append(reward)
            self.base_h.append(held)
            return []
        self.trail_r.append(reward)
        self.trail_h.append(held)
        r0, h0 = _mean(self.base_r), _mean(self.base_h)
        gain, drop = _mean(self.trail_r) - r0, h0 - _mean(self.trail_h)
        n = len(self.trail_r)
        bad = (self._z(gain, self.base_r, n) > self.cfg.heldout_z and self._z(drop, self.base_h, n) > self.cfg.heldout_z
               and drop > self.cfg.heldout_drop_frac * abs(h0))
        first = self.trigger.observe(bad, step)
        if first is None:
            return []
        return [Alert(
            self.name, "warning", first,
            f"the optimised reward rose by {gain:.3g} (from {r0:.3g}) while the held-out {key} fell by {drop:.3g} "
            f"(from {h0:.3g}) by step {step}",
            "the policy is exploiting the optimised reward: keep a checkpoint from before step "
            f"{first}, raise {self.knobs['kl_coef']} or lower {self.knobs['learning_rate']}, and read samples",
            {"key": key, "reward_start": rnd(r0), "reward_now": rnd(r0 + gain), "heldout_start": rnd(h0),
             "heldout_now": rnd(h0 - drop)},
        )]


class PatternCollapse(Rule):
    """Reward rising, length up and KL jumping within one window (Secrets of RLHF I)."""

    name = "pattern_collapse"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.kl = RollingTrend(cfg.collapse_window)
        self.rewards: deque[float] = deque(maxlen=cfg.collapse_window)
        self.lengths: deque[float] = deque(maxlen=cfg.collapse_window)
        self.edge = max(3, cfg.collapse_window // 10)
        self.min_history = min(cfg.collapse_min_history, cfg.collapse_window)
        self.trigger = Trigger(1, cfg.rearm_steps)
        self.knobs = Knobs(cfg.producer)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        reward, length = finite(rec, _REWARD_KEY), finite(rec, _LENGTH_KEY)
        found = first_finite(rec, self.cfg.kl_keys)
        if reward is None or length is None or found is None:
            return []
        kl = found[1]
        self.rewards.append(reward)
        self.lengths.append(length)
        out: list[Alert] = []
        if len(self.kl) >= self.min_history:
            z, _, _ = self.kl.zscore(kl, self.cfg.kl_min_std, self.cfg.kl_min_rel_std)
            half = len(self.rewards) // 2
            rewards = list(self.rewards)
            rise = _mean(rewards[half:]) - _mean(rewards[:half])
            lengths = list(self.lengths)
            start, now = _mean(lengths[: self.edge]), _mean(lengths[-self.edge:])
            growth = now / start - 1 if start > 0 else 0.0
            bad = z > self.cfg.collapse_kl_z and rise > 0 and growth > self.cfg.collapse_length_growth
            first = self.trigger.observe(bad, step)
            if first is not None:
                out.append(Alert(
                    self.name, "warning", first,
                    f"pattern collapse at step {step}: reward rising (+{rise:.3g} over {len(rewards)} steps), "
                    f"length up {growth:.0%} and KL z-score {z:.1f}",
                    f"the policy found a pattern the reward model likes: raise {self.knobs['kl_coef']}, lower "
                    f"{self.knobs['learning_rate']}, and read samples for repetition or boilerplate",
                    {"kl": rnd(kl), "kl_z": rnd(z, 4), "reward_rise": rnd(rise), "length_growth": rnd(growth, 4),
                     "window": len(rewards)},
                ))
        self.kl.push(kl)
        return out
