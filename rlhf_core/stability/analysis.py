"""One analysis of a run (torch-free): the rule configuration and the alerts, the same everywhere.

Holistic Trace Analysis puts one object over a trace; this module does the same for a run's stability. Every
consumer (``rlhfkit diagnose``, ``rlhfkit report``, the dashboard) and every live producer (the runner, the TRL
callback, ``adapters.generic``, the importers) builds its rules through :func:`rule_config`, so one run gives
the same alerts in all of them: defaults, then what the run's ``meta.json`` says (its KL budget, clip norm,
producer and the detector settings the producer was given), then the caller's overrides.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.runformat.keys import SOURCES
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.timeline import Process, StepAnalysis, analyse_step, read_processes, read_timeline
from rlhf_core.stability.detectors import Alert, DetectorConfig, Diagnoser, per_step_ranks
from rlhf_core.stability.rules import ActorStraggler

if TYPE_CHECKING:
    from rlhf_core.runformat.run_writer import RunWriter

__all__ = ["Analysis", "LiveAlerts", "META_KEY", "RunAnalysis", "diagnose_run", "rule_config"]

ConfigLike = DetectorConfig | Mapping[str, Any] | None

META_KEY = "detector"
"""``meta.json`` key holding the detector settings a producer was given (only the ones it changed)."""

# config keys a producer records that carry a rule setting; TRL keeps its TrainingArguments under "args"
_FROM_RUN_CONFIG = ("kl_budget", "max_grad_norm")


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _settings_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Rule settings the run itself states: its config's budget and clip norm, its producer, its detector dict."""
    values: dict[str, Any] = {}
    config = meta.get("config")
    if isinstance(config, Mapping):
        args = config.get("args")
        scopes = [config, args] if isinstance(args, Mapping) else [config]
        for scope in scopes:
            for key in _FROM_RUN_CONFIG:
                value = _positive(scope.get(key))
                if value is not None:
                    values[key] = value
    source = meta.get("source")
    if isinstance(source, str) and source in SOURCES and "producer" in DetectorConfig.__dataclass_fields__:
        values["producer"] = source
    stated = meta.get(META_KEY)
    if isinstance(stated, Mapping):
        values.update(stated)
    return values


def rule_config(meta: Mapping[str, Any] | None = None, overrides: ConfigLike = None) -> DetectorConfig:
    """Defaults < the run's ``meta.json`` < ``overrides`` (the user's flags). A bad override is a one-line
    ValueError; a bad setting inside a run's meta is dropped rather than making the run unreadable."""
    stated = _settings_of(meta) if isinstance(meta, Mapping) else {}
    try:
        base = DetectorConfig.from_any(stated)
    except ValueError:
        valid = {}
        for key, value in stated.items():  # keep each setting that is valid on its own
            try:
                DetectorConfig.from_any({key: value})
            except ValueError:
                continue
            valid[key] = value
        base = DetectorConfig.from_any(valid)
    if overrides is None:
        return base
    if isinstance(overrides, DetectorConfig):
        return overrides
    if not isinstance(overrides, Mapping):
        raise ValueError(f"detector config must be a dict or DetectorConfig, not {type(overrides).__name__}")
    DetectorConfig.from_any(dict(overrides))  # names the bad key, if any, before it is merged
    merged = dict(overrides)
    if "disabled_rules" in merged:
        merged["disabled_rules"] = tuple(base.disabled_rules) + tuple(merged["disabled_rules"])
    return base.replace(**merged)


class Analysis:
    """The rules over one run's records, fed in step order; each alert is labelled with the run it belongs to."""

    def __init__(self, meta: Mapping[str, Any] | None = None, overrides: ConfigLike = None,
                 run_id: str | None = None):
        self.meta = dict(meta or {})
        self.run_id = run_id if run_id is not None else (str(self.meta["run_id"]) if "run_id" in self.meta else None)
        self.config = rule_config(self.meta, overrides)
        self.diagnoser = Diagnoser(self.config)

    def _label(self, alerts: list[Alert]) -> list[Alert]:
        for alert in alerts:
            alert.run = self.run_id
        return alerts

    def update(self, records: Iterable[Mapping[str, Any]]) -> list[Alert]:
        """Alerts that fire on these records."""
        return self._label(self.diagnoser.update(records))

    def update_ranks(self, step: int, per_rank: Mapping[int, Mapping[str, Any]]) -> list[Alert]:
        """Straggler alerts from one step's per-rank records."""
        return self._label(self.diagnoser.update_ranks(step, per_rank))

    def update_intervals(self, step: int, analysis: StepAnalysis, processes: Mapping[int, Process]) -> list[Alert]:
        """Straggler alerts from one step's analysed phase intervals."""
        return self._label(self.diagnoser.update_intervals(step, analysis, processes))

    @property
    def alerts(self) -> list[Alert]:
        return self.diagnoser.alerts

    @property
    def problems(self) -> list[str]:
        return self.diagnoser.problems

    @property
    def records_seen(self) -> int:
        return self.diagnoser.records_seen


class RunAnalysis:
    """The analysis of a run directory: ``alerts()`` reads what was appended since the last call, so it serves a
    finished run and a live one alike."""

    def __init__(self, run: Run | str | Path, overrides: ConfigLike = None):
        self.run = run if isinstance(run, Run) else Run(run)
        self.analysis = Analysis(self.run.meta, overrides, run_id=self.run.run_id)
        self._rows = 0
        self._rank_rows: dict[int, int] = {}
        self._interval_step = 0  # the last step whose phase intervals the straggler rule has seen
        self._timeline_problems: dict[str, None] = {}  # what the timeline reader skipped, each once, in order

    @property
    def config(self) -> DetectorConfig:
        return self.analysis.config

    def alerts(self) -> list[Alert]:
        """Every alert so far, sorted by the step where the trouble began."""
        records = self.run.metrics()
        self.analysis.update(records[self._rows:])
        self._rows = len(records)
        if self.run.world_size > 1:
            per_rank = self.run.rank_metrics()
            fresh = {r: recs[self._rank_rows.get(r, 0):] for r, recs in per_rank.items()}
            self._rank_rows = {r: len(recs) for r, recs in per_rank.items()}
            for step, by_rank in per_step_ranks(fresh):
                self.analysis.update_ranks(step, by_rank)
        self._intervals()
        return sorted(self.analysis.alerts, key=lambda a: (a.step, a.rule))

    def _intervals(self) -> None:
        """Feed the straggler rule the phase intervals of the steps completed since the last call, for runs of
        processes with different roles (Ray actors) only: their per-step records cannot be compared across
        processes. A live run's newest step may still lack a process's line, so it waits for the next call."""
        if self.analysis.diagnoser.actor_straggler is None or not ActorStraggler.applies(read_processes(self.run.path)):
            return
        timeline = read_timeline(self.run.path, (self._interval_step + 1, 2 ** 62))
        self._timeline_problems.update(dict.fromkeys(timeline.problems))
        last = [max(by_step) for by_step in timeline.steps.values() if by_step]
        if not last:
            return
        live = self.run.status == "running" and not self.run.process_gone()
        limit = min(last) - 1 if live else max(last)
        collective, waits = timeline.collective, timeline.waits
        for step in timeline.step_numbers():
            if step > limit:
                break
            spans = {rank: by_step[step] for rank, by_step in timeline.steps.items() if step in by_step}
            self.analysis.update_intervals(step, analyse_step(step, spans, collective, waits=waits),
                                           timeline.processes)
            self._interval_step = step

    def problems(self) -> list[str]:
        """What the reader could not read, then the records the rules had to skip."""
        return [str(p) for p in self.run.problems()] + list(self._timeline_problems) + self.analysis.problems

    @property
    def records_seen(self) -> int:
        return self.analysis.records_seen


class LiveAlerts(Analysis):
    """A producer's live alerts: the rules over each record it writes, each alert written to ``events.jsonl``.

    The producer's own detector settings go into ``meta.json`` (key :data:`META_KEY`), so a later
    ``rlhfkit diagnose`` or the dashboard rebuilds exactly these rules.
    """

    def __init__(self, writer: RunWriter, overrides: Mapping[str, Any] | None = None, rank: int | None = None):
        """``rank`` labels the alerts of a producer that feeds one rank's own records (not run-level ones)."""
        self.writer, self.rank, self._writing = writer, rank, True
        if overrides and writer.is_main:
            writer.update_meta(**{META_KEY: dict(overrides)})
        meta = writer.meta if writer.is_main else {}
        super().__init__(meta, None if writer.is_main else overrides,
                         run_id=str(meta.get("run_id", writer.run_dir.name)))

    def _label(self, alerts: list[Alert]) -> list[Alert]:
        for alert in super()._label(alerts):
            if self.rank is not None and alert.rank is None:
                alert.rank = self.rank
            if self._writing:
                self.writer.event(**alert.to_event())
        return alerts

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Feed records written before a resume: the rules catch up, their alerts are in events.jsonl already."""
        self._writing = False
        try:
            self.update(records)
        finally:
            self._writing = True


def diagnose_run(run: Run | str | Path, overrides: ConfigLike = None) -> list[Alert]:
    """Every alert of a run directory: record rules and, for multi-process runs, the straggler rule (per-rank
    records across ranks; phase intervals against each process's own past for runs of different roles)."""
    return RunAnalysis(run, overrides).alerts()
