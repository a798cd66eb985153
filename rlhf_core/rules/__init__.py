"""The stability rules (docs/diagnose.md, "Rules"), one module per family; :func:`build_rules` assembles them
from a config."""
from __future__ import annotations

from .base import ALERTING, SEVERITIES, Alert, Rule, is_alerting
from .config import DetectorConfig
from .kl import KLBudget, KLExplosion, NegativeKL
from .layers import LayerDrift
from .numeric import GradClipping, GradExplosion, NonFinite, Spike
from .ppo import ClipFraction, CriticExplainedVariance, EntropyCollapse, PPORatioExtreme, PPORatioMean
from .reward import PatternCollapse, RewardHeldout, RewardKLEfficiency, RewardLengthHacking
from .rollout import RolloutLogprobMismatch
from .straggler import Straggler

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


__all__ = ["ALERTING", "SEVERITIES", "Alert", "DetectorConfig", "Rule", "Straggler", "build_rules", "is_alerting",
           "rule_names"]
