"""The stability rules (docs/diagnose.md, "Rules"), one module per family; :func:`build_rules` assembles them
from a config."""
from __future__ import annotations

from rlhf_core.stability.rules.base import ALERTING, SEVERITIES, Alert, Rule, is_alerting
from rlhf_core.stability.rules.config import DetectorConfig
from rlhf_core.stability.rules.kl import KLBudget, KLExplosion, NegativeKL
from rlhf_core.stability.rules.layers import LayerDrift
from rlhf_core.stability.rules.numeric import GradClipping, GradExplosion, NonFinite, Spike
from rlhf_core.stability.rules.ppo import (
    ClipFraction,
    CriticExplainedVariance,
    EntropyCollapse,
    PPORatioExtreme,
    PPORatioMean,
)
from rlhf_core.stability.rules.reward import PatternCollapse, RewardHeldout, RewardKLEfficiency, RewardLengthHacking
from rlhf_core.stability.rules.rollout import RolloutLogprobMismatch
from rlhf_core.stability.rules.straggler import ActorStraggler, Straggler

_RECORD_RULES = (NonFinite, GradExplosion, GradClipping, KLExplosion, KLBudget, NegativeKL, EntropyCollapse,
                 PPORatioMean, PPORatioExtreme, ClipFraction, CriticExplainedVariance, RewardLengthHacking,
                 RewardKLEfficiency, RewardHeldout, PatternCollapse, LayerDrift, RolloutLogprobMismatch)


def build_rules(cfg: DetectorConfig) -> list[Rule]:
    """One instance of every record rule (spike rules per ``spike_keys``) minus ``disabled_rules``."""
    rules: list[Rule] = [NonFinite(cfg)] + [Spike(cfg, key) for key in cfg.spike_keys]
    rules += [cls(cfg) for cls in _RECORD_RULES if cls is not NonFinite]
    return [r for r in rules if r.name not in cfg.disabled_rules]


def rule_names(cfg: DetectorConfig | None = None) -> list[str]:
    """Names an alert's ``rule`` can take (what ``disabled_rules`` accepts)."""
    cfg = cfg or DetectorConfig()
    return [r.name for r in build_rules(cfg.replace(disabled_rules=()))] + [Straggler.name]


__all__ = ["ALERTING", "SEVERITIES", "ActorStraggler", "Alert", "DetectorConfig", "Rule", "Straggler", "build_rules",
           "is_alerting", "rule_names"]
