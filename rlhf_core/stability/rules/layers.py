"""Layer drift: one block moving away from the reference far more than the others."""
from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from rlhf_core.stability.rules.base import Alert, Rule, Trigger, finite, rnd
from rlhf_core.stability.rules.config import DetectorConfig

_PREFIX = "drift/layer/"


class LayerDrift(Rule):
    """A block's relative drift above ``layer_drift_factor`` x the median of the blocks that moved."""

    name = "layer_drift"

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.triggers: dict[str, Trigger] = {}

    def update(self, step: int, rec: Mapping[str, Any]) -> list[Alert]:
        drift = {k[len(_PREFIX):]: v for k in rec if k.startswith(_PREFIX) and (v := finite(rec, k)) is not None}
        moved = [v for v in drift.values() if v > 0]  # frozen blocks (LoRA, frozen embeddings) do not count
        if len(moved) < self.cfg.layer_drift_min_blocks:
            return []
        median = statistics.median(moved)
        out: list[Alert] = []
        for block, value in drift.items():
            bad = value > self.cfg.layer_drift_min and value > self.cfg.layer_drift_factor * median
            trigger = self.triggers.setdefault(block, Trigger(self.cfg.layer_drift_patience, self.cfg.rearm_steps))
            first = trigger.observe(bad, step)
            if first is None:
                continue
            out.append(Alert(
                self.name, "warning", first,
                f"block {block} drifted {value / median:.1f}x the median of {len(moved)} blocks "
                f"({value:.4g} vs {median:.4g}) since step {first}",
                f"one block moves much more than the rest: lower its learning rate or freeze it, and look at its "
                f"gradient norms (grad/layer/{block})",
                {"block": block, "drift": rnd(value), "median": rnd(median), "ratio": rnd(value / median, 4),
                 "blocks": len(moved)},
            ))
        return out
