"""veRL adapter: convert the JSONL that veRL's ``file`` logger writes (``{"step": N, "data": {...}}`` lines).

Lines are read with the run reader's incremental cursor, so a half-written last line waits for the next poll
and a malformed line is reported with its line number and skipped; nothing else is dropped.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rlhf_core.run_reader import JsonlCursor

from .convert import SourceError, StepSink, drive_import, open_writer
from .mapping import map_verl


class _NumberedCursor(JsonlCursor):
    """The reader's cursor, returning (line number, record) so a bad record can be reported where it is."""

    def _collect(self, rec: dict, line_no: int) -> tuple[int, dict]:
        return line_no, rec


class _VerlPoll:
    def __init__(self, path: Path, sink: StepSink):
        self.cursor = _NumberedCursor(path)
        self.sink = sink
        self.reported = 0
        self.bad = 0

    def __call__(self, final: bool) -> int:
        wrote = 0
        for line_no, line in self.cursor.read_new():
            step, data = line.get("step"), line.get("data")
            if not isinstance(step, int) or isinstance(step, bool) or not isinstance(data, dict):
                self.bad += 1
                print(f"rlhfkit import: {self.cursor.path}:{line_no}: not a veRL record "
                      "({\"step\": int, \"data\": {...}}); skipped", file=sys.stderr)
                continue
            wrote += self.sink.write(step, data)
        for problem in self.cursor.problems[self.reported:]:
            print(f"rlhfkit import: {problem}", file=sys.stderr)
            self.bad += 1
        self.reported = len(self.cursor.problems)
        if final and self.cursor.pending_bytes():
            print(f"rlhfkit import: {self.cursor.path}: torn last line (no newline); skipped", file=sys.stderr)
        return wrote


def import_verl(path: str | os.PathLike, out: str | os.PathLike, *, follow_run: bool = False,
                interval_s: float = 2.0, max_idle_s: float = 60.0, overwrite: bool = False, resume: bool = False,
                alerts: bool = True) -> dict[str, Any]:
    """Convert (or keep converting, with ``follow_run``) a veRL JSONL log into the run ``out``."""
    path = Path(path)
    if not follow_run and not path.is_file():
        raise SourceError(f"{path}: no such file")
    writer, start_after = open_writer(out, source="verl", config={"imported_from": str(path.resolve())},
                                      overwrite=overwrite, resume=resume, tensorboard=True)
    sink = StepSink(writer, map_verl, alerts=alerts, start_after=start_after)
    poll = _VerlPoll(path, sink)
    return drive_import(writer, sink, poll, follow_run=follow_run, interval_s=interval_s, max_idle_s=max_idle_s,
                        extra=lambda: {"bad_lines": poll.bad})
