"""Every threshold, window and budget of the stability rules in one dataclass (defaults and their reasons:
docs/diagnose.md, "Rules").

Built from ``None``, a dict (e.g. a JSON file or the runner's config) or another ``DetectorConfig``;
an unknown key or a value of the wrong type is a one-line ``ValueError`` naming it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from rlhf_core.runformat.keys import SOURCES


@dataclass
class DetectorConfig:
    # shared
    rearm_steps: int = 50                 # healthy steps before a rule that fired may fire again
    disabled_rules: tuple[str, ...] = ()  # rule names to skip
    producer: str = "generic"             # meta.source of the run: suggestions name this producer's knobs

    # non-finite values (critical)
    # drift/: ||θ−θ0||/||θ0|| is NaN only when the weights are (its denominator is clamped); a pure-fp16 loop
    # whose first AdamW step made them NaN logged nothing else before it crashed (corpus, reinforce fp16)
    nonfinite_prefixes: tuple[str, ...] = ("loss/", "grad/norm", "reward/", "kl/", "policy/", "adv/", "value/",
                                           "drift/")
    nonfinite_ignore: tuple[str, ...] = ("value/explained_var",)  # NaN by definition when the returns are constant
    # skipped updates: the producer's per-step count of optimizer steps it dropped because the loss, the
    # gradient or the weights went non-finite (the runner's finite guard writes it as `skipped`; the values it
    # then logs are finite, so the keys above never show it): a warning at the first step with a skip, critical
    # once nonfinite_skip_steps steps of one episode had skips (no longer an odd batch: the run keeps hitting it)
    skipped_key: str = "skipped"
    nonfinite_skip_steps: int = 3

    # gradient / loss spike: value > median + spike_sigma * robust sigma (IQR/1.349) of the previous values
    spike_keys: tuple[str, ...] = ("grad/norm", "loss/total")
    spike_sigma: float = 6.0
    spike_window: int = 128
    spike_min_history: int = 8            # a handful of steps: a 64-step warm-up left short runs blind
    spike_min_rel_std: float = 0.05       # sigma floor as a fraction of |median| (a flat series is not spiky)
    spike_min_ratio: float = 5.0          # and, for grad/norm (never negative), value > 5x the median
    spike_loss_grad_ratio: float = 5.0    # a loss spike is a warning when grad/norm is also >= 5x its median
                                          # (the bar of a gradient spike); RL surrogate losses jump with the
                                          # batch drawn, so a jump the update did not feel is only a note
    # a gradient spike that clipping bounded (grad/clipped > 0, or without that key the pre-clip norm above
    # max_grad_norm) is a note (info), and so are a loss spike on such a step and a grad_explosion streak
    # clipped on every step (one shared test, numeric.Consequence); it becomes a warning when, on one of the
    # next spike_watch_steps records,
    # the policy visibly moved: against the median and robust sigma (IQR/1.349, floored at 5% of |median|) of
    # each key's previous <= spike_watch_window values (from spike_watch_min_history on), KL up by
    # spike_watch_sigma and to >= spike_watch_kl_ratio x its median, entropy down by spike_watch_sigma and by
    # >= spike_watch_entropy_drop of its median, loss/total off by spike_watch_sigma, or the mean PPO ratio off
    # by spike_watch_sigma and more than ratio_mean_dev from 1. 3 records: a warning stays within the 3 steps
    # the corpus benchmark allows after an outcome
    spike_watch_steps: int = 3
    spike_watch_window: int = 20
    spike_watch_min_history: int = 5
    spike_watch_sigma: float = 6.0
    spike_watch_kl_ratio: float = 2.0     # healthy runner runs at lr 1e-3: KL within 1.8x its median after a spike
    spike_watch_entropy_drop: float = 0.1  # ... and entropy within 4% of it

    # gradient explosion: pre-clip grad/norm sustained above grad_explosion_factor x the median of the
    # previous grad_explosion_window norms (its own baseline; no clip threshold needed)
    grad_explosion_factor: float = 5.0
    grad_explosion_window: int = 100
    grad_explosion_min_history: int = 3
    grad_explosion_patience: int = 3      # consecutive steps: one step is a spike, not an explosion
    # when clipping bounded every step of the streak, a burst is a note judged by its consequence like a
    # clipped spike (the spike_watch_* settings), unless it lasts this many steps: then clipping is setting every
    # step of the run, no longer absorbing a burst (the corpus's longest streak: 8 steps, a blown-up RLOO run)
    grad_explosion_sustained_steps: int = 10

    # frequent clipping (info): pre-clip norm > max_grad_norm on > grad_clip_frac of the last grad_clip_window
    max_grad_norm: float | None = None    # None: use the record's grad/max_norm when logged
    grad_clip_window: int = 50
    grad_clip_frac: float = 0.5
    grad_clip_min_steps: int = 10

    # KL to the reference, nats/token (k3, else k1). kl_budget: info above kl_note_frac x budget, critical
    # above it (None: off). kl_explosion: above kl_explosion_floor and kl_growth x the median of the previous
    # kl_growth_window values, or above kl_z_floor and kl_z sigma above the trend of the previous kl_window
    kl_keys: tuple[str, ...] = ("kl/ref_k3", "kl/ref_k1", "src/probe/kl_exact")  # last: an exact-KL probe (DPO)
    kl_budget: float | None = 1.0
    kl_note_frac: float = 0.5             # an info note past this fraction of the budget
    kl_explosion_floor: float = 0.1
    kl_growth: float = 4.0
    kl_growth_window: int = 10
    kl_z: float = 4.0
    kl_z_floor: float = 0.01              # nats/token: the trend test ignores jumps among values below this
    kl_trend_ratio: float = 2.0           # ... and the value must be this many times the trend's expectation:
                                          # under RL KL grows in spurts tens of percent above a fitted line
                                          # (healthy runner runs at lr 1e-3), an explosion multiplies it
    kl_window: int = 50
    kl_min_history: int = 10
    kl_patience: int = 2                  # consecutive steps (one noisy batch is not an explosion)
    kl_min_std: float = 1e-4              # nats/token: std floor, so a KL of exactly 0 is not infinitely sensitive
    kl_min_rel_std: float = 0.05

    # negative KL: batch-mean k1 below neg_kl_threshold for neg_kl_steps steps
    neg_kl_key: str = "kl/ref_k1"
    neg_kl_threshold: float = -0.01
    neg_kl_steps: int = 3

    # entropy collapse against H0 = the largest of the first entropy_baseline_steps values (before any drop)
    entropy_key: str = "policy/entropy"
    entropy_baseline_steps: int = 3
    entropy_early_steps: int = 200
    entropy_early_frac: float = 0.5
    entropy_min_frac: float = 0.1
    entropy_patience: int = 2             # consecutive low steps: one odd batch is not a collapse
    # while each of the last entropy_reward_window reward/mean values is above each of the first
    # entropy_baseline_steps ones, the fall is sharpening: the early fall a note, below entropy_min_frac a warning
    entropy_reward_window: int = 5

    # PPO ratio and clip fraction: sustained, since one batch of a few hundred tokens holds odd tokens
    ratio_mean_dev: float = 0.1
    ratio_mean_patience: int = 3
    ratio_max: float = 5.0
    ratio_min: float = 0.02
    ratio_patience: int = 4
    clipfrac_max: float = 0.3
    clipfrac_steps: int = 10

    # critic: explained variance below critic_ev_min for critic_steps informative steps after critic_warmup
    # of them; a step is informative when its reward std is at least critic_min_reward_std (else the return
    # variance is ~0 and explained variance is noise over ~0)
    critic_ev_min: float = -0.5           # advantages 1.5x noisier than with a constant baseline
    critic_steps: int = 20
    critic_warmup: int = 20
    critic_min_reward_std: float = 1e-3

    # reward hacking (a): reward-length correlation over a window while length grew vs the run's start
    length_baseline_steps: int = 10
    hack_window: int = 100
    hack_min_steps: int = 20              # pairs needed before the correlation is judged
    hack_corr: float = 0.5
    hack_length_growth: float = 0.2

    # reward hacking (b): reward gain per sqrt(KL) below reward_eff_frac of its early value
    reward_eff_frac: float = 0.25
    reward_eff_onset: float = 0.75        # the decline "began" after efficiency was last above this fraction
    reward_eff_early_steps: int = 20      # records before the early efficiency is measured
    reward_eff_smooth: int = 20           # records averaged for reward, KL and the early efficiency
    reward_eff_steps: int = 10            # consecutive low-efficiency steps before firing
    reward_eff_min_kl: float = 1e-3

    # reward hacking (c): the optimised reward up while a held-out reward (logged, not optimised) goes down
    heldout_keys: tuple[str, ...] = ("reward/heldout", "reward/heldout/mean")
    heldout_baseline_steps: int = 5       # records averaged for the start of both rewards
    heldout_window: int = 5               # trailing records averaged for their current level
    heldout_z: float = 3.0                # both moves must exceed this many standard errors of the start
    heldout_drop_frac: float = 0.1        # and the held-out reward must have lost this fraction of |start|
    heldout_patience: int = 2

    # pattern collapse: reward rising, length up, KL z-score high, within one window
    collapse_window: int = 50
    collapse_min_history: int = 20
    collapse_kl_z: float = 3.0
    collapse_length_growth: float = 0.2

    # layer drift: one block's drift > layer_drift_factor x the median of blocks
    layer_drift_factor: float = 10.0
    layer_drift_min: float = 1e-3         # ignore blocks that barely moved at all
    layer_drift_min_blocks: int = 3
    layer_drift_patience: int = 3

    # rollout vs trainer log-probs (rollout/* keys, rules/rollout.py): the sampler's log-probs of the sampled tokens
    # drift from the trainer's; warning/critical when a level is exceeded rollout_patience steps running
    rollout_diff_warn: float = 0.05       # mean |log π_trainer − log π_rollout|: 5x the healthy bf16 top (~1e-2)
    rollout_diff_critical: float = 0.1    # the level collapsed runs were reported to pass on their way up
    rollout_kl_warn: float = 2.5e-3       # nats/token (k3, else k1): k3 ≈ ½E[Δ²] ≈ (π/4..1)·(mean |Δ|)², so 0.05²
    rollout_kl_critical: float = 1e-2     # 0.1²: the KL twin of rollout_diff_critical
    rollout_patience: int = 3             # consecutive steps over a level: one odd batch is not a drift

    # stragglers (multi-rank runs): a rank slower than the other ranks' median by a factor and a gap
    straggler_factor: float = 1.5
    straggler_min_gap_s: float = 0.05
    straggler_steps: int = 3
    # stragglers among processes of different roles (the runner's --engine ray actors, adapters.ray_hook jobs),
    # from the phase intervals (timeline.rank<N>.jsonl): their phases differ, so each process's busy time in a
    # phase is compared with its *own* median over its previous <= straggler_baseline_window steps, never with
    # another role's (generation dominating a step is normal). Slow: > straggler_baseline_factor x that median
    # and > straggler_baseline_min_gap_s over it, with >= straggler_critical_frac of the excess on the step's
    # critical path (the step waited for it), straggler_steps steps running. A process slow from its first
    # step has no baseline to be slow against and is not reported
    straggler_baseline_window: int = 20   # steps: long enough that a slow episode does not become the baseline
                                          # before it is reported, short enough to follow a run's slow drift
    straggler_baseline_min_history: int = 3  # earlier steps needed (the median of 3 outvotes a warm-up step 1)
    straggler_baseline_factor: float = 1.5   # as straggler_factor; a healthy phase of seconds varies far less
    straggler_baseline_min_gap_s: float = 0.05  # healthy tiny-model Ray runs here: ms-long phases reach 2x their
                                                # median (2.1x: a 6 ms rollout at 12 ms), never 50 ms over it
    straggler_critical_frac: float = 0.5  # a slow phase hidden behind another process's work (off-policy
                                          # generation beside the update) delays nobody: not a straggler

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f.name, f.default, getattr(self, f.name)))
        if self.producer not in SOURCES:
            raise ValueError(f"detector config producer: expected one of {', '.join(SOURCES)}, got {self.producer!r}")
        for name in _FRACTIONS:
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"detector config {name}: expected a fraction in (0, 1], got {getattr(self, name)!r}")

    @classmethod
    def from_any(cls, config: DetectorConfig | Mapping[str, Any] | None) -> DetectorConfig:
        """A config from None (defaults), a dict (unknown keys are a ValueError) or a DetectorConfig."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"detector config must be a dict or DetectorConfig, not {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), known, 1))
                                 else "") for k in unknown]
            raise ValueError(f"unknown detector config key(s): {', '.join(hints)}")
        return cls(**dict(config))

    def replace(self, **changes: Any) -> DetectorConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SIGNED = ("neg_kl_threshold", "critic_ev_min")
_FRACTIONS = ("kl_note_frac", "grad_clip_frac", "spike_watch_entropy_drop", "straggler_critical_frac")
_OPTIONAL = ("kl_budget", "max_grad_norm")  # None switches them off / means "from the record"


def _checked(name: str, default: Any, value: Any) -> Any:
    """The value in the field's type, or a one-line ValueError naming the field."""
    if isinstance(default, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"detector config {name}: expected a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"detector config {name}: expected a string, got {value!r}")
        return value
    if value is None and (default is None or name in _OPTIONAL):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"detector config {name}: expected a finite number, got {value!r}")
    if isinstance(default, int):
        if int(value) != value or value < 1:
            raise ValueError(f"detector config {name}: expected a whole number >= 1, got {value!r}")
        return int(value)
    if value < 0 and name not in _SIGNED:
        raise ValueError(f"detector config {name}: expected a value >= 0, got {value!r}")
    return float(value)
