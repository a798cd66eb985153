"""veRL adapter: convert veRL's logs, either the JSONL its ``file`` logger writes (``{"step": N, "data": {...}}``
lines) or the console output its ``console`` logger prints (``step:N - key:value - ...`` lines, which is what a
``python -m verl.trainer.main_ppo ... | tee run.log`` keeps, Ray's ``(TaskRunner pid=...)`` prefixes and colour
codes included).

The first non-blank line says which: a JSON object means the JSONL log, anything else a console log. Lines are
read with the run reader's incremental cursor, so a half-written last line waits for the next poll. In the
JSONL log a malformed line (bad JSON, nested too deeply, not UTF-8, too long) is reported with its line number
and skipped; in a console log the lines that are not step records (the config dump, warnings, progress bars) are
passed over, and a step record with an unreadable ``key:value`` pair is reported. Records of one step that
arrive on several lines (validation, then training) are merged; the newest step is held back until a later one
appears. A source with no veRL record at all (random bytes, an empty file, another tool's JSONL) is an error
before anything is written, not a run with 0 steps; with ``--follow`` the import waits for records and fails
only when none arrived before ``--max-idle``.

Which KL estimator veRL's ``actor/kl_loss`` and ``actor/reward_kl_penalty`` hold, and the threshold its
pre-clip ``actor/grad_norm`` was clipped at, are settings, not in the metrics: they are taken from
``--kl-loss-type``/``--kl-penalty``/``--grad-clip``, else from the config a console log prints at start
(``'kl_loss_type': 'low_var_kl'``), else veRL's defaults (``low_var_kl``, ``kl``, 1.0).
"""
from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_core.runformat.run_reader import MAX_LINE_BYTES, JsonError, JsonlCursor, file_problem, loads_checked

from .convert import SourceError, StepSink, drive_import, nothing_imported, open_writer
from .mapping import VERL_KL_TYPES, map_verl

MAX_PRINTED = 5  # bad-line warnings printed one by one; the rest are counted in one line at the end
RECORD_FORMAT = '{"step": int, "data": {...}}'
CONSOLE_FORMAT = "step:N - key:value - ..."
# veRL's defaults (actor.yaml, AlgoConfig) for what the metrics do not say
SETTING_DEFAULTS = {"kl_loss_type": "low_var_kl", "kl_penalty": "kl", "grad_clip": "1.0"}

_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
# "step:" not inside a key ("training/global_step:3", "perf/delta_time/step:1.2"); a tqdm bar may end right
# before it on the same line ("... 61.46s/it]step:3 - ...")
_CONSOLE_RECORD = re.compile(r"(?<![\w/])step:(\d{1,15}) - (.*?)(?:\s*\[repeated \d+x across cluster\])?\s*$")
_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")  # pprint.pformat of a numpy scalar (veRL >= 2025-07)
_SETTING = re.compile(r"(?<![\w/])['\"]?(kl_loss_type|kl_penalty|grad_clip)['\"]?\s*[:=]\s*['\"]?([\w.+-]+)")


def _json_object(raw: bytes) -> bool:
    """Whether a line is a JSON object (orjson's strict path failed it; json's rules may still take it). A
    console log can open with a ``{``: the config dump main_ppo prints with pprint, which is not JSON."""
    try:
        return isinstance(loads_checked(raw)[0], dict)
    except JsonError:
        return False


def _console_value(text: str) -> float | None:
    """A value as veRL's console logger prints it: ``%.3f`` before 2025-07, ``pprint.pformat`` since."""
    text = text.strip()
    scalar = _NUMPY_SCALAR.match(text)
    if scalar:
        text = scalar.group(1)
    if text in ("True", "False"):
        return float(text == "True")
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class _VerlCursor(JsonlCursor):
    """The reader's cursor for either veRL log, returning (line number, record) so a bad record can be reported
    where it is; in a console log it also keeps the settings of the printed config that the metrics need
    (the first of each: pprint sorts the dump, so ``actor_rollout_ref``'s ``grad_clip`` comes before the
    critic's)."""

    console: bool | None = None  # None until the first non-blank line says which log this is
    settings: dict[str, str] = field(default_factory=dict)

    def _collect(self, rec: dict, line_no: int) -> tuple[int, dict] | None:
        if self.console is None:
            self.console = False
        if self.console and not ("step" in rec and "data" in rec):
            return None  # a JSON object some library printed among the console lines
        return line_no, rec

    def _restart(self) -> None:
        self.console = None
        self.settings = {}

    def _parse(self, raw: bytes, line_no: int) -> dict[str, Any] | None:
        if self.console is None and raw.strip():
            self.console = not _json_object(raw)
        if not self.console:
            return super()._parse(raw, line_no)
        if len(raw) > MAX_LINE_BYTES:
            return None  # a console line this long is not a metrics line
        text = _ANSI.sub(b"", raw).decode("utf-8", "replace")
        found = _CONSOLE_RECORD.search(text)
        if found is None:
            for key, value in _SETTING.findall(text):
                self.settings.setdefault(key, value)  # the config is printed once, before the first step
            return None
        data: dict[str, float] = {}
        bad: list[str] = []
        for pair in found.group(2).split(" - "):
            key, sep, value = pair.rpartition(":")
            number = _console_value(value) if sep and key.strip() else None
            if number is None:
                bad.append(pair)
            else:
                data[key.strip()] = number
        if bad:
            self._problem(line_no, f"{len(bad)} unreadable key:value pair(s) in a console step record, the first "
                                   f"{bad[0][:80]!r}; those pairs skipped")
        return {"step": int(found.group(1)), "data": data} if data else None


class _VerlPoll:
    """Reads new lines into pending veRL records; writes them once a sink is attached (after the source was
    found to hold at least one record, so a source that holds none leaves no run behind)."""

    def __init__(self, path: Path, sink: StepSink | None = None):
        self.cursor = _VerlCursor(path)
        self.sink = sink
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.newest: tuple[int, dict[str, Any]] | None = None  # held back: its step may go on in the next line
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
        wrote = 0
        for step, data in self.pending:
            if self.newest is not None and step == self.newest[0] and not data.keys() & self.newest[1].keys():
                self.newest[1].update(data)  # one step on two lines (validation, then training metrics)
                continue
            if self.newest is not None:
                wrote += self.sink.write(*self.newest)
            self.newest = (step, dict(data))
        self.pending = []
        if final:
            if self.newest is not None:
                wrote += self.sink.write(*self.newest)
                self.newest = None
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
        kinds = (f"{RECORD_FORMAT} JSONL lines" if self.cursor.console is False else
                 f"{RECORD_FORMAT} JSONL lines or console '{CONSOLE_FORMAT}' lines")
        return f"{self.cursor.path}: no veRL records ({kinds}) in {lines:,} complete line(s){detail}"

    def settings(self, given: dict[str, str | None]) -> dict[str, str]:
        """The settings to map with: given on the command line, else printed by the run, else veRL's defaults."""
        return {key: given.get(key) or self.cursor.settings.get(key) or default
                for key, default in SETTING_DEFAULTS.items()}

    def mapper(self, given: dict[str, str | None]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        """map_verl with the settings known when a record is written (a console log prints them first)."""
        def apply(data: Mapping[str, Any]) -> dict[str, Any]:
            s = self.settings(given)
            return map_verl(data, kl_loss_type=s["kl_loss_type"], kl_penalty=s["kl_penalty"],
                            grad_clip=_console_value(s["grad_clip"]))
        return apply


def import_verl(path: str | os.PathLike, out: str | os.PathLike, *, follow_run: bool = False,
                interval_s: float = 2.0, max_idle_s: float = 60.0, overwrite: bool = False, resume: bool = False,
                alerts: bool = True, kl_loss_type: str | None = None, kl_penalty: str | None = None,
                grad_clip: float | None = None) -> dict[str, Any]:
    """Convert (or keep converting, with ``follow_run``) a veRL JSONL or console log into the run ``out``.

    ``kl_loss_type``, ``kl_penalty``, ``grad_clip``: the run's ``actor_rollout_ref.actor.kl_loss_type``,
    ``algorithm.kl_penalty`` and ``actor_rollout_ref.actor.grad_clip`` (None: as its console log printed them,
    else veRL's defaults).
    """
    path = Path(path)
    for key, value in (("kl_loss_type", kl_loss_type), ("kl_penalty", kl_penalty)):
        if value is not None and value not in VERL_KL_TYPES:
            raise SourceError(f"unknown veRL {key} {value!r}; expected one of {', '.join(VERL_KL_TYPES)}")
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise SourceError(f"grad_clip must be a positive number, not {grad_clip}")
    given = {"kl_loss_type": kl_loss_type, "kl_penalty": kl_penalty,
             "grad_clip": None if grad_clip is None else repr(grad_clip)}
    why = file_problem(path)
    if why == "missing" and not follow_run:
        raise SourceError(f"{path}: no such file")
    if why not in (None, "missing"):
        raise SourceError(f"{path}: is {why}, not a veRL log")
    poll = _VerlPoll(path)
    if not follow_run:
        poll.check()
    writer, start_after = open_writer(out, source="verl", config={"imported_from": os.path.realpath(path)},
                                      overwrite=overwrite, resume=resume, tensorboard=True)
    poll.sink = StepSink(writer, poll.mapper(given), alerts=alerts, start_after=start_after)
    summary = drive_import(writer, poll.sink, poll, follow_run=follow_run, interval_s=interval_s,
                           max_idle_s=max_idle_s, extra=lambda: {
                               "bad_lines": poll.bad, "format": "jsonl" if poll.cursor.console is False else "console",
                               **poll.settings(given)})
    if nothing_imported(summary):
        raise SourceError(poll.no_records() + f"; {out} holds no steps")
    return summary
