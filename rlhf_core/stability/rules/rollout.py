"""Rollout vs trainer: the sampler's log-probs of the sampled tokens drift from the trainer's.

When generation runs in another engine or precision (vLLM/SGLang, bf16 sampling, a cached decode), the
trainer scores tokens the sampler drew from a slightly different distribution. A small, flat mismatch is
precision noise (bf16 vs fp32: mean |Δ log p| ~1e-3 to 1e-2); a growing one means the update is off-policy and
runs have collapsed after it, which is why TRL, veRL and OpenRLHF added truncated importance sampling.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from rlhf_core.stability.rules.base import Alert, Rule, Trigger, num, rnd
from rlhf_core.stability.rules.config import DetectorConfig

# mean |Δ log p| first; veRL's |Δ p| (probabilities, ≤ ~|Δ log p| for small gaps, so the same levels fire later,
# never earlier) only where no log-prob difference is logged
DIFF_KEYS = ("rollout/logprob_diff_mean", "rollout/prob_diff_mean")
KL_KEYS = ("rollout/kl_k3", "rollout/kl_k1")

# what to do, in each producer's own option names (read from its source; rules/knobs.py does the same for the
# common knobs). TRL and OpenRLHF log these keys only with their IS correction already on, so tighten it there.
_FIX: dict[str, str] = {
    "rlhf_core": "sample in the trainer's precision: drop --rollout_dtype or set it to --dtype (the old log-probs "
                 "are already the trainer's recompute while the mismatch is measured)",
    "trl": "keep vLLM's dtype equal to the trainer's; the importance-sampling correction is on (TRL logs these "
           "keys only with vllm_importance_sampling_correction=True), so tighten it: "
           "vllm_importance_sampling_mode='token_mask' or 'sequence_mask' (drops outliers rather than reweighting "
           "them) and a lower vllm_importance_sampling_clip_max",
    "openrlhf": "keep vLLM's dtype equal to the trainer's; the IS correction is on (vllm_kl is only logged with "
                "--algo.advantage.is_correction_enable, --enable_vllm_is_correction before v0.10.2), so tighten "
                "--algo.advantage.is_correction_threshold or filter with --algo.advantage.is_correction_type "
                "icepop or seq-mask-tis",
    "verl": "keep the rollout dtype equal to the actor's and enable (or tighten) truncated importance sampling: "
            "algorithm.rollout_correction.rollout_is=token with rollout_is_threshold=2.0, rollout_rs to reject "
            "outlier sequences, without bypass_mode (which reuses the rollout log-probs as the old ones)",
}
_GENERIC = ("sample and train in the same precision (fp32 logits / LM head in the inference engine), correct with "
            "truncated importance sampling (TRL: vllm_importance_sampling_correction; veRL: "
            "algorithm.rollout_correction.rollout_is; OpenRLHF: --algo.advantage.is_correction_enable), and "
            "recompute the old log-probs with the trainer rather than reusing the sampler's")


def suggestion(producer: str) -> str:
    """What to do, in the producer's own option names."""
    return _FIX.get(producer, _GENERIC)


def _value(rec: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, float] | None:
    """The first of ``keys`` present; a non-finite value (NaN, Inf, or listed under ``nonfinite``) reads as +inf:
    log-probs that cannot be compared are past any threshold."""
    listed = rec.get("nonfinite")
    bad = {str(k) for k in listed} if isinstance(listed, (list, tuple)) else set()
    for key in keys:
        value = num(rec, key)
        if value is not None:
            return key, value if math.isfinite(value) else math.inf
        if key in bad:
            return key, math.inf
    return None


def _ev(value: float) -> float | None:
    """Evidence value: JSON has no Inf, so a non-finite one is null (the message says "inf")."""
    return rnd(value) if math.isfinite(value) else None


class RolloutLogprobMismatch(Rule):
    """Mean |log π_trainer − log π_rollout| or KL(π_rollout ‖ π_trainer) over a level for a few steps running."""

    name = "rollout_logprob_mismatch"

    def __init__(self, cfg: DetectorConfig):
        self.suggestion = suggestion(cfg.producer)
        self.levels = {"warning": (cfg.rollout_diff_warn, cfg.rollout_kl_warn),
                       "critical": (cfg.rollout_diff_critical, cfg.rollout_kl_critical)}
        self.triggers = {sev: Trigger(cfg.rollout_patience, cfg.rearm_steps) for sev in self.levels}
        self.recent: deque[tuple[int, dict[str, float]]] = deque(maxlen=cfg.rollout_patience)

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        found = [f for f in (_value(rec, DIFF_KEYS), _value(rec, KL_KEYS)) if f is not None]
        if not found:
            return []
        self.recent.append((step, {key: value for key, value in found}))
        fired: dict[str, tuple[int, list[tuple[str, float, float]]]] = {}
        for severity, limits in self.levels.items():
            over = [(key, value, limit) for (key, value), limit in zip(found, self._limits(found, limits))
                    if value > limit]
            first = self.triggers[severity].observe(bool(over), step)
            if first is not None:
                fired[severity] = (first, over)
        if "critical" in fired:  # both at once: the critical one says it all
            fired.pop("warning", None)
        return [self._alert(severity, first, step, over) for severity, (first, over) in fired.items()]

    @staticmethod
    def _limits(found: list[tuple[str, float]], limits: tuple[float, float]) -> list[float]:
        diff_limit, kl_limit = limits
        return [diff_limit if key in DIFF_KEYS else kl_limit for key, _ in found]

    def _alert(self, severity: str, first: int, step: int, over: list[tuple[str, float, float]]) -> Alert:
        what = ", ".join(f"{key} = {value:.4g} > {limit:g}" for key, value, limit in over)
        streak = [(s, values) for s, values in self.recent if s >= first]
        return Alert(
            self.name, severity, first,
            f"rollout and trainer log-probs of the sampled tokens disagree from step {first} "
            f"({len(streak)} steps running; at step {step}: {what}): the update is off-policy by more than "
            "precision noise",
            self.suggestion,
            {"keys": [key for key, _, _ in over], "values": {key: _ev(value) for key, value, _ in over},
             "thresholds": {key: limit for key, _, limit in over},
             "series": {str(s): {k: _ev(v) for k, v in values.items()} for s, values in streak}},
        )
