"""Stability detectors over run records (torch-free): the public entry point is :class:`Diagnoser`.

Each alert names its rule, severity, the first step where the trouble began, the evidence and a suggestion
in plain words. The same code runs over a finished list of records (:func:`diagnose`) and incrementally over
a live one. Runs and producers reach it through :mod:`rlhf_core.stability.analysis`, which builds the rule settings
from the run's meta so every view gets the same alerts. The rules themselves live in :mod:`rlhf_core.stability.rules`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rlhf_core.runformat.timeline import Process, StepAnalysis
from rlhf_core.stability.rules import (
    SEVERITIES,
    ActorStraggler,
    Alert,
    DetectorConfig,
    Straggler,
    build_rules,
    rule_names,
)
from rlhf_core.stability.rules.base import num

__all__ = ["SEVERITIES", "Alert", "DetectorConfig", "Diagnoser", "diagnose", "per_step_ranks", "rule_names"]

ConfigLike = DetectorConfig | Mapping[str, Any] | None


class Diagnoser:
    """Runs every rule over records fed in step order; each rule fires once per episode of trouble.

    State is bounded by the rules' windows, so ``update`` costs O(new records x window) however long the run.
    Records without a numeric ``step`` are skipped and noted in :attr:`problems`.
    """

    def __init__(self, config: ConfigLike = None):
        self.config = DetectorConfig.from_any(config)
        unknown = sorted(set(self.config.disabled_rules) - set(rule_names()))
        if unknown:
            raise ValueError(f"disabled_rules: unknown rule(s) {', '.join(unknown)}; known: {', '.join(rule_names())}")
        self.rules = build_rules(self.config)
        self.straggler = Straggler(self.config) if Straggler.name not in self.config.disabled_rules else None
        self.actor_straggler = (ActorStraggler(self.config) if ActorStraggler.name not in self.config.disabled_rules
                                else None)
        self.alerts: list[Alert] = []
        self.problems: list[str] = []
        self.records_seen = 0

    def update(self, records: Iterable[Mapping[str, Any]]) -> list[Alert]:
        """Alerts that fire on these records (also appended to :attr:`alerts`)."""
        new: list[Alert] = []
        for rec in records:
            step = num(rec, "step") if isinstance(rec, Mapping) else None
            if step is None or step != step:
                self.problems.append(f"record without a numeric step skipped: {str(rec)[:80]}")
                continue
            self.records_seen += 1
            for rule in self.rules:
                new.extend(rule.update(int(step), rec))
        self.alerts.extend(new)
        return new

    def update_ranks(self, step: int, per_rank: Mapping[int, Mapping[str, float]]) -> list[Alert]:
        """Straggler alerts from one step's per-rank records (``time/step``, ``time/<phase>``)."""
        if self.straggler is None:
            return []
        new = self.straggler.update_ranks(int(step), per_rank)
        self.alerts.extend(new)
        return new

    def update_intervals(self, step: int, analysis: StepAnalysis, processes: Mapping[int, Process]) -> list[Alert]:
        """Straggler alerts from one step's analysed phase intervals (runs of processes with different roles)."""
        if self.actor_straggler is None:
            return []
        new = self.actor_straggler.update_intervals(int(step), analysis, processes)
        self.alerts.extend(new)
        return new

    @property
    def has_critical(self) -> bool:
        return any(a.severity == "critical" for a in self.alerts)


def diagnose(records: Iterable[Mapping[str, Any]], config: ConfigLike = None) -> list[Alert]:
    """Every alert over a finished list of records."""
    d = Diagnoser(config)
    d.update(records)
    return d.alerts


def per_step_ranks(
    rank_records: Mapping[int, Sequence[Mapping[str, Any]]],
) -> list[tuple[int, dict[int, Mapping[str, Any]]]]:
    """Per-rank records regrouped by step (steps in order): what :meth:`Diagnoser.update_ranks` takes."""
    by_step: dict[int, dict[int, Mapping[str, Any]]] = {}
    for rank, recs in rank_records.items():
        for rec in recs:
            step = num(rec, "step")
            if step is not None and step == step:
                by_step.setdefault(int(step), {})[int(rank)] = rec
    return sorted(by_step.items())
