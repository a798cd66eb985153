"""veRL adapter: convert the JSONL that veRL's ``file`` logger writes (``{"step": N, "data": {...}}`` lines).

Lines are read with the run reader's incremental cursor, so a half-written last line waits for the next poll
and a malformed line (bad JSON, nested too deeply, not UTF-8, too long) is reported with its line number and
skipped; nothing else is dropped. A source with no veRL record at all (random bytes, an empty file, another
tool's JSONL) is an error before anything is written, not a run with 0 steps; with ``--follow`` the import
waits for records and fails only when none arrived before ``--max-idle``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rlhf_core.runformat.run_reader import JsonlCursor, file_problem

from .convert import SourceError, StepSink, drive_import, nothing_imported, open_writer
from .mapping import map_verl

MAX_PRINTED = 5  # bad-line warnings printed one by one; the rest are counted in one line at the end
RECORD_FORMAT = '{"step": int, "data": {...}}'


class _NumberedCursor(JsonlCursor):
    """The reader's cursor, returning (line number, record) so a bad record can be reported where it is."""

    def _collect(self, rec: dict, line_no: int) -> tuple[int, dict]:
        return line_no, rec


class _VerlPoll:
    """Reads new lines into pending veRL records; writes them once a sink is attached (after the source was
    found to hold at least one record, so a source that holds none leaves no run behind)."""

    def __init__(self, path: Path, sink: StepSink | None = None):
        self.cursor = _NumberedCursor(path)
        self.sink = sink
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.records = 0
        self.not_verl = 0
        self.first_not_verl: str | None = None
        self.reported = 0
        self.printed = 0
        self.held: list[str] | None = None  # warnings kept back while the source is checked, not yet printed

    @property
    def bad(self) -> int:
        return self.not_verl + self.cursor.bad_lines

    def _warn(self, message: str) -> None:
        if self.printed < MAX_PRINTED:
            if self.held is not None:
                self.held.append(message)
            else:
                print(f"rlhfkit import: {message}", file=sys.stderr)
        self.printed += 1

    def check(self) -> None:
        """Read what the source holds now; no record at all is a :class:`SourceError` (one line, no warnings
        printed before it), otherwise the warnings held back are printed."""
        self.held = []
        self.read()
        held, self.held = self.held, None
        if not self.pending:
            raise SourceError(self.no_records())
        for message in held:
            print(f"rlhfkit import: {message}", file=sys.stderr)

    def read(self) -> int:
        """Parse the lines written since the last read into :attr:`pending`; the number of new records."""
        before = len(self.pending)
        for line_no, line in self.cursor.read_new():
            step, data = line.get("step"), line.get("data")
            if type(step) is not int or not isinstance(data, dict):
                self.not_verl += 1
                where = f"{self.cursor.path}:{line_no}"
                self.first_not_verl = self.first_not_verl or where
                self._warn(f"{where}: not a veRL record ({RECORD_FORMAT}); skipped")
                continue
            self.pending.append((step, data))
        for problem in self.cursor.problems[self.reported:]:
            self._warn(str(problem))
        self.reported = len(self.cursor.problems)
        self.records += len(self.pending) - before
        return len(self.pending) - before

    def __call__(self, final: bool) -> int:
        self.read()
        assert self.sink is not None, "attach a sink before polling"
        wrote = sum(self.sink.write(step, data) for step, data in self.pending)
        self.pending = []
        if final:
            if self.cursor.pending_bytes():
                print(f"rlhfkit import: {self.cursor.path}: torn last line (no newline); skipped", file=sys.stderr)
            if self.cursor.oversized:
                print(f"rlhfkit import: warning: {self.cursor.report()[-1]}", file=sys.stderr)
            if self.printed > MAX_PRINTED:
                print(f"rlhfkit import: … and {self.printed - MAX_PRINTED} more bad line(s) not shown",
                      file=sys.stderr)
        return wrote

    def no_records(self) -> str:
        """Why the source holds nothing to import, in one line."""
        lines = self.cursor.line_no
        problems = [p for p in self.cursor.problems if p.line is not None]
        first = f"line {problems[0].line}: {problems[0].message.split(';')[0]}" if problems else None
        if first is None and self.first_not_verl:
            first = f"line {self.first_not_verl.rsplit(':', 1)[-1]}: not {RECORD_FORMAT}"
        detail = f"; {self.bad:,} bad, first {first}" if first else ""
        return f"{self.cursor.path}: no veRL records ({RECORD_FORMAT} per line) in {lines:,} complete line(s){detail}"


def import_verl(path: str | os.PathLike, out: str | os.PathLike, *, follow_run: bool = False,
                interval_s: float = 2.0, max_idle_s: float = 60.0, overwrite: bool = False, resume: bool = False,
                alerts: bool = True) -> dict[str, Any]:
    """Convert (or keep converting, with ``follow_run``) a veRL JSONL log into the run ``out``."""
    path = Path(path)
    why = file_problem(path)
    if why == "missing" and not follow_run:
        raise SourceError(f"{path}: no such file")
    if why not in (None, "missing"):
        raise SourceError(f"{path}: is {why}, not a veRL JSONL log")
    poll = _VerlPoll(path)
    if not follow_run:
        poll.check()
    writer, start_after = open_writer(out, source="verl", config={"imported_from": os.path.realpath(path)},
                                      overwrite=overwrite, resume=resume, tensorboard=True)
    poll.sink = StepSink(writer, map_verl, alerts=alerts, start_after=start_after)
    summary = drive_import(writer, poll.sink, poll, follow_run=follow_run, interval_s=interval_s,
                           max_idle_s=max_idle_s, extra=lambda: {"bad_lines": poll.bad})
    if nothing_imported(summary):
        raise SourceError(poll.no_records() + f"; {out} holds no steps")
    return summary
