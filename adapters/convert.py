"""What every importer shares: write each source step once, in order, with live alerts, and a follow loop.

Importers read logs another tool writes (OpenRLHF's TensorBoard files, veRL's JSONL) and feed
``{step: {source_key: value}}`` batches to a :class:`StepSink`, which maps keys, writes records through
``RunWriter`` and never writes a step twice (a step at or below the last one written is counted and skipped,
which is what makes ``--follow`` and ``--resume`` safe).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rlhf_core.runformat.run_reader import Run, RunError, file_problem, summarize
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.analysis import LiveAlerts

Mapper = Callable[[Mapping[str, Any]], dict[str, Any]]


class SourceError(Exception):
    """A source that cannot be imported (missing, ambiguous, unreadable): reported as one line."""


def _resumable(out: Path) -> int | None:
    """The last step of the run at ``out`` that ``--resume`` continues (the reader leaves out records without an
    integer step); a run the reader cannot open is a :class:`SourceError` (the writer would otherwise fail on it
    halfway), what it could not use is a warning."""
    try:
        run = Run(out)
        if "resumed_at" in run.meta and not isinstance(run.meta["resumed_at"], list):
            raise RunError(f"{run.meta_path}: resumed_at is not a list")
        recs = run.metrics()
    except RunError as err:
        raise SourceError(f"cannot resume {out}: {err}") from None
    for name in ("metrics.jsonl", "events.jsonl", "system.jsonl"):  # the files the writer appends to
        why = file_problem(out / name)
        if why not in (None, "missing"):  # appending to a FIFO would block, to a folder or a loop fail midway
            raise SourceError(f"cannot resume {out}: {out / name} is {why}")
    for problem in summarize(run.problems()):
        print(f"rlhfkit import: warning: {problem}", file=sys.stderr)
    return max((r["step"] for r in recs), default=None)


def nothing_imported(summary: Mapping[str, Any]) -> bool:
    """True when an import wrote no step and found none already written (``--resume`` of a finished source)."""
    return not summary.get("steps") and not summary.get("skipped_steps")


class StepSink:
    """Maps and writes step records; each step at most once and in increasing order."""

    def __init__(self, writer: RunWriter, mapper: Mapper, *, alerts: bool = True, start_after: int | None = None):
        self.writer = writer
        self.mapper = mapper
        self.last_step = start_after
        self.written = 0
        self.skipped = 0
        self.nonfinite = 0
        self._live = LiveAlerts(writer) if alerts else None
        self.alerts = 0

    def write(self, step: int, values: Mapping[str, Any]) -> bool:
        """Write one step; False (and counted) when it is not after the last step written."""
        if self.last_step is not None and step <= self.last_step:
            self.skipped += 1
            return False
        record = self.writer.log(step, self.mapper(values))
        self.last_step = step
        self.written += 1
        if record.get("nonfinite"):
            self.nonfinite += 1
        if self._live is not None:
            self.alerts += len(self._live.update([record]))
        return True

    def write_many(self, by_step: Mapping[int, Mapping[str, Any]]) -> int:
        return sum(self.write(step, by_step[step]) for step in sorted(by_step))


def follow(poll: Callable[[bool], int], *, interval_s: float = 2.0, max_idle_s: float = 60.0,
           sleep: Callable[[float], None] = time.sleep) -> None:
    """Call ``poll(final=False)`` until nothing new arrived for ``max_idle_s``, then ``poll(final=True)``.

    Ctrl-C stops the loop the same clean way (the last complete steps are still written).
    """
    idle_since = time.monotonic()
    try:
        while True:
            if poll(False):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= max_idle_s:
                break
            sleep(interval_s)
    except KeyboardInterrupt:
        print("rlhfkit import: interrupted; writing what was read so far", file=sys.stderr)
    poll(True)


def open_writer(out: str | os.PathLike, *, source: str, config: Mapping[str, Any], overwrite: bool, resume: bool,
                tensorboard: bool = False) -> tuple[RunWriter, int | None]:
    """The output run, and the step to continue after when resuming an existing import."""
    out = Path(out)
    start_after = _resumable(out) if resume and os.path.lexists(out / "meta.json") else None
    if os.path.lexists(out / "meta.json") and not (overwrite or resume):
        raise SourceError(f"{out} already holds a run; pass --overwrite to replace it or --resume to continue it")
    writer = RunWriter(out, source=source, config=config, overwrite=overwrite and not resume, resume=resume,
                       tensorboard=tensorboard)
    return writer, start_after


def drive_import(writer: RunWriter, sink: StepSink, poll: Callable[[bool], int], *, follow_run: bool,
                 interval_s: float, max_idle_s: float,
                 extra: Callable[[], Mapping[str, Any]] = dict) -> dict[str, Any]:
    """Run one import to the end (or follow it until idle), record its summary in meta.json, return it.

    ``extra`` adds source-specific counts read after the last poll (late values, bad lines…).
    """
    with writer:
        if follow_run:
            follow(poll, interval_s=interval_s, max_idle_s=max_idle_s)
        else:
            poll(True)
        summary = {"out": str(writer.run_dir), "steps": sink.written, "last_step": sink.last_step,
                   "alerts": sink.alerts, "skipped_steps": sink.skipped, "nonfinite_steps": sink.nonfinite,
                   **extra()}
        writer.update_meta(import_summary=summary)
    return summary
