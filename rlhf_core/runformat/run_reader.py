"""Run: the one reader every consumer (dashboard, reports, diagnose, memory views) uses.

Torch-free. Reads runs that are finished or still being written: only complete lines are consumed, a
half-written last line is left for the next :meth:`Run.tail`, a torn last line of a closed run is skipped
with a warning, and any other bad line is reported with its file and line number. Nothing is dropped
silently: values written as ``null`` and listed in ``nonfinite`` come back as NaN.

It is also the one defensive layer every reader-side command goes through, because runs arrive copied,
half-written or from other tools: nesting and line sizes are bounded, undecodable bytes, integers too large
for a float, wrong ``meta.json`` field types and files that are folders, FIFOs or symlink loops are each
reported (file and line, one line per problem, counted rather than repeated) while the rest of the run is
still read. Step records whose step is missing or not an integer are skipped and counted; repeated,
decreasing and negative steps are kept and counted.
"""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_core.runformat.keys import reduce_values, unknown_keys

MAX_LINE_BYTES = 16 << 20  # a step record is a few KiB; a longer line is skipped, not parsed
MAX_META_BYTES = 16 << 20  # meta.json / memory.json: read at most this much
MAX_PROBLEMS = 100  # problems kept per file; the rest are counted
LISTED_LINES = 5  # bad lines of one file listed one by one; past that, one counted line and the first three
_INT_DIGITS = 18  # integers up to this many digits parse exactly; longer ones become floats (inf if too large)


class JsonError(ValueError):
    """JSON that cannot be used, with a short reason (``nested too deeply``, ``not UTF-8 text``…)."""


def loads_checked(raw: bytes | str) -> tuple[Any, int]:
    """``(value, oversized)``: ``raw`` parsed with json's rules (NaN and Infinity allowed), never raising
    anything but :class:`JsonError`. Integers of more than 18 digits become floats (``oversized`` counts those
    that overflowed to ±inf), because every consumer computes with floats and Python's own int limit (4300
    digits) or ``float(10**400)`` would otherwise raise far from the file."""
    oversized = 0

    def parse_int(text: str) -> int | float:
        nonlocal oversized
        if len(text) <= _INT_DIGITS:
            return int(text)
        value = float(text)
        if math.isinf(value):
            oversized += 1
        return value

    try:
        return json.loads(raw, parse_int=parse_int), oversized
    except RecursionError:
        raise JsonError("nested too deeply") from None
    except UnicodeDecodeError:
        raise JsonError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise JsonError(f"malformed JSON ({err.msg})") from None
    except (ValueError, TypeError, MemoryError) as err:
        raise JsonError(f"unreadable JSON ({type(err).__name__}: {str(err)[:80]})") from None


try:  # orjson parses ~3x faster; it is strict (no bare NaN, 64-bit ints, depth 1024), so json stays the fallback
    import orjson

    _fast_loads: Callable[[bytes], Any] = orjson.loads
    _HAVE_ORJSON = True
except ImportError:  # pragma: no cover - orjson is a core dependency (pyproject.toml)
    _fast_loads = json.loads
    _HAVE_ORJSON = False


def _loads(raw: bytes) -> tuple[Any, int]:
    """orjson when it can (the common, strict case), else :func:`loads_checked` with its bounds and reasons."""
    if _HAVE_ORJSON:
        try:
            return orjson.loads(raw), 0
        except ValueError:  # orjson.JSONDecodeError: NaN, a 10**400 integer, too deep, not UTF-8...
            pass
    return loads_checked(raw)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a regular file (``"missing"``, ``"a directory"``, ``"a symlink loop"``…),
    or None when it can. Checked before opening: opening a FIFO would block, a folder or a loop would raise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        return f"not readable ({err.strerror or err})"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
    return f"not a regular file ({kind})"


def read_json_file(path: Path, what: str, limit: int = MAX_META_BYTES) -> Any:
    """The JSON value of a small file such as meta.json; every failure is one :class:`RunError` naming the file."""
    why = file_problem(path)
    if why is not None:
        raise RunError(f"{path}: is {why}" if why != "missing" else f"{path}: no {what}")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as err:
        raise RunError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if len(raw) > limit:
        raise RunError(f"{path}: {what} is over {limit >> 20} MiB, so not a {what}")
    try:
        return _loads(raw)[0]
    except JsonError as err:
        raise RunError(f"{path}: unreadable {what} ({err})") from None


class RunError(Exception):
    """A run directory that cannot be read (missing, outside the root, no meta.json, bad meta.json)."""


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"


@dataclass
class JsonlCursor:
    """Incremental reader of one JSONL file: byte offset and line count survive between reads.

    Bad lines become :class:`Problem` entries (the first :data:`MAX_PROBLEMS` kept, the rest counted in
    ``more_problems``) so 1 MB of garbage costs a bounded list, not one entry per line; :meth:`report`
    folds more than :data:`LISTED_LINES` of them into one counted line per file.
    """

    path: Path
    offset: int = 0
    line_no: int = 0
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0
    bad_lines: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # bad lines by kind ("not UTF-8 text": 4117)
    oversized: int = 0  # integers too large for a float, read as +-inf
    first_oversized: int | None = None
    _unreadable: str | None = field(default=None, repr=False)

    def _problem(self, line_no: int | None, message: str) -> None:
        if line_no is not None:
            self.bad_lines += 1
            kind = message.split(" (")[0].split(";")[0]
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(str(self.path), line_no, message))
        else:
            self.more_problems += 1

    def _size(self) -> int | None:
        """The file's size, or None when it is missing or cannot be read (said once, not on every poll)."""
        why = file_problem(self.path)
        if why is None:
            self._unreadable = None
            try:
                return os.stat(self.path).st_size
            except OSError:
                return None
        if why != "missing" and why != self._unreadable:
            self._problem(None, f"is {why}; not read")
        self._unreadable = why
        return None

    def read_new(self, max_bytes: int | None = None) -> list[Any]:
        """Records of the complete lines written since the last call; with ``max_bytes``, of about that many
        bytes of them (at least one line), so a caller holding a lock can read a big file in pieces."""
        size = self._size()
        if size is None:
            return []
        if size < self.offset:  # truncated or replaced: start over rather than read garbage
            self._problem(None, "file shrank while being read; re-reading")
            self.offset, self.line_no = 0, 0
            self._restart()
        if size == self.offset:
            return []
        want = size - self.offset if max_bytes is None else min(size - self.offset, max(1, max_bytes))
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(want)
                end = chunk.rfind(b"\n")
                while end < 0 and len(chunk) < size - self.offset:  # a line longer than max_bytes: on to its end
                    more = fh.read(min(want, size - self.offset - len(chunk)))
                    if not more:
                        break
                    found = more.find(b"\n")
                    end = len(chunk) + found if found >= 0 else -1
                    chunk += more
        except OSError as err:  # replaced by a folder or lost its permissions between stat and open
            self._problem(None, f"cannot be read ({err.strerror or err}); not read")
            return []
        if end < 0:
            return []
        complete = chunk[: end + 1]
        self.offset += len(complete)
        records: list[dict[str, Any]] = []
        append, loads, collect, base, limit = records.append, _fast_loads, self._collect, self.line_no, MAX_LINE_BYTES
        lines = complete.split(b"\n")
        lines.pop()  # the empty piece after the final newline
        for i, raw in enumerate(lines, 1):
            try:  # the common case in a tight loop: a JSON object per line
                rec = loads(raw) if len(raw) <= limit else None
            except (ValueError, RecursionError):  # orjson's and json's decode errors both are ValueErrors
                rec = None
            if type(rec) is not dict:
                rec = self._parse(raw, base + i)  # blank, NaN, malformed, not an object: slow path, problems
                if rec is None:
                    continue
            out = collect(rec, base + i)
            if out is not None:
                append(out)
        self.line_no = base + len(lines)
        return records

    def _collect(self, rec: dict[str, Any], line_no: int) -> Any:
        """What :meth:`read_new` returns for a good line (None: skip it); subclasses may keep the line number."""
        return rec

    def _restart(self) -> None:
        """The file is read again from its start (it shrank); subclasses forget what they tracked."""

    def pending_bytes(self) -> int:
        try:
            return max(0, self.path.stat().st_size - self.offset) if file_problem(self.path) is None else 0
        except OSError:
            return 0

    def report(self) -> list[Problem]:
        """The problems of this file; past :data:`LISTED_LINES` bad lines, one counted line by kind and the
        first few lines, so a file of garbage is a handful of lines wherever it is shown."""
        lines = [p for p in self.problems if p.line is not None]
        out = [p for p in self.problems if p.line is None]
        if self.bad_lines > LISTED_LINES:
            kinds = ", ".join(f"{k} x{n:,}" for k, n in sorted(self.kinds.items(), key=lambda kv: -kv[1])[:3])
            more = f" and {len(self.kinds) - 3} more kinds" if len(self.kinds) > 3 else ""
            out.append(Problem(str(self.path), None, f"{self.bad_lines:,} bad lines skipped ({kinds}{more}); "
                               f"the first {LISTED_LINES - 2} follow"))
            out += lines[: LISTED_LINES - 2]
        else:
            out += lines
        if self.oversized:
            out.append(Problem(str(self.path), self.first_oversized,
                               f"{self.oversized} integer(s) too large for a float, read as inf (first here)"))
        return out

    def _parse(self, raw: bytes, line_no: int) -> dict[str, Any] | None:
        if not raw.strip():
            return None
        if len(raw) > MAX_LINE_BYTES:
            self._problem(line_no, f"line of {len(raw):,} bytes is over the {MAX_LINE_BYTES:,}-byte limit; "
                                   "line skipped")
            return None
        try:
            rec, oversized = _loads(raw)
        except JsonError as err:
            self._problem(line_no, f"{err}; line skipped")
            return None
        if not isinstance(rec, dict):
            self._problem(line_no, "not a JSON object; line skipped")
            return None
        if oversized:
            self.oversized += oversized
            self.first_oversized = self.first_oversized or line_no
        return rec


@dataclass
class _StepCounts:
    """How often one kind of step trouble happened in a file, and where first (reported once per kind)."""

    count: int = 0
    line: int | None = None
    example: str = ""


class MetricsCursor(JsonlCursor):
    """The cursor of a step-record file: records whose step is missing or not an integer are skipped (nothing
    downstream can place them); repeated, decreasing and negative steps are kept. Each kind is counted."""

    KINDS = {
        "missing": "record(s) without a step; skipped",
        "not_int": "record(s) whose step is not an integer; skipped",
        "negative": "record(s) with a negative step; kept",
        "repeated": "record(s) that repeat an earlier step; kept",
        "decreasing": "record(s) whose step decreases (back below an earlier one); kept",
    }

    def __init__(self, path: Path):
        super().__init__(path)
        self.seen: set[int] = set()
        self.max_step: int | None = None
        self._above = -1  # every step above this is new and in order: the fast path
        self.steps: dict[str, _StepCounts] = {}

    def _restart(self) -> None:
        self.seen, self.max_step, self._above = set(), None, -1  # re-read steps are not repeats

    def _count(self, kind: str, line_no: int, example: str) -> None:
        c = self.steps.setdefault(kind, _StepCounts())
        if not c.count:
            c.line, c.example = line_no, example
        c.count += 1

    def _collect(self, rec: dict[str, Any], line_no: int) -> Any:
        step = rec.get("step")
        if type(step) is int and step > self._above:  # the common case, kept cheap: a new, later step
            self._above = step
            self.max_step = step
            self.seen.add(step)
            return rec
        if type(step) is not int:
            if "step" not in rec or step is None:
                self._count("missing", line_no, "")
            else:
                self._count("not_int", line_no, repr(step)[:40])
            return None
        if step < 0:
            self._count("negative", line_no, str(step))
        elif step in self.seen:
            self._count("repeated", line_no, str(step))
        elif self.max_step is not None and step < self.max_step:
            self._count("decreasing", line_no, f"{step} after {self.max_step}")
        self.seen.add(step)
        if self.max_step is None or step > self.max_step:
            self.max_step = step
        self._above = max(self._above, self.max_step)
        return rec

    def report(self) -> list[Problem]:
        out = super().report()
        for kind, text in self.KINDS.items():
            c = self.steps.get(kind)
            if c and c.count:
                example = f" (first: step {c.example})" if c.example else " (first here)"
                out.append(Problem(str(self.path), c.line, f"{c.count} {text}{example}"))
        return out


class RecordStream:
    """One step-record file read in pieces, each record handed out once and not kept: for a consumer that
    needs every record once (the dashboard's straggler pass over 256 rank files holds no copy of the run)."""

    def __init__(self, path: Path):
        self.cursor = MetricsCursor(path)

    def read(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        """The records of about ``max_bytes`` of complete lines not read yet (all of them without it)."""
        return [_restore_nonfinite(r) for r in self.cursor.read_new(max_bytes)]

    def pending_bytes(self) -> int:
        return self.cursor.pending_bytes()


def tail_records(path: Path, n: int, chunk: int = 64 << 10) -> list[dict[str, Any]]:
    """The step records (objects with an integer ``step``) among the last ``n`` complete lines of a JSONL
    file, oldest first, read backwards from its end in growing pieces; lines that do not parse are skipped."""
    if n <= 0 or file_problem(path) is not None:
        return []
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            want = min(size, chunk)
            while True:
                fh.seek(size - want)
                data = fh.read(want)
                lines = data.split(b"\n")[:-1]  # the piece after the last newline is not a complete line yet
                if want < size and lines:
                    lines = lines[1:]  # the first piece may start inside a line
                if len(lines) >= n or want >= size or want >= MAX_LINE_BYTES:
                    break
                want = min(size, want * 4)
    except OSError:
        return []
    out = []
    for raw in lines[-n:]:
        try:
            rec = _fast_loads(raw) if len(raw) <= MAX_LINE_BYTES else None
        except (ValueError, RecursionError):
            rec = None
        if type(rec) is dict and type(rec.get("step")) is int:
            out.append(_restore_nonfinite(rec))
    return out


def _restore_nonfinite(rec: dict[str, Any]) -> dict[str, Any]:
    for key in rec.get("nonfinite") or ():
        if rec.get(key) is None:
            rec[key] = math.nan
    return rec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge_ranks(per_rank: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run-level records from per-rank ones: each numeric key combined over ranks at each step by its declared
    reduction (a mean, or the max/min/sum of :func:`rlhf_core.runformat.keys.reduction`), as the runner's DDP
    reduce does (records without an integer step cannot be placed and are left out; the reader already counted them)."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for recs in per_rank.values():
        for rec in recs:
            step = rec.get("step")
            if type(step) is int:
                by_step.setdefault(step, []).append(rec)
    merged = []
    for step in sorted(by_step):
        recs = by_step[step]
        times = [r["time"] for r in recs if _is_number(r.get("time"))]
        out: dict[str, Any] = {"step": step, "time": max(times, default=0), "rank": "all"}
        keys = {k for r in recs for k in r if k not in ("step", "time", "rank", "nonfinite")}
        nonfinite = []
        for key in sorted(keys):
            vals = [r[key] for r in recs if _is_number(r.get(key))]
            if not vals:
                continue
            value = reduce_values(key, [float(v) for v in vals])
            out[key] = value
            if not math.isfinite(value):
                nonfinite.append(key)
        if nonfinite:
            out["nonfinite"] = nonfinite
        merged.append(out)
    return merged


_NUMBER = (int, float)
# meta.json fields consumers rely on -> (accepted types, what the message says they must be)
META_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "format_version": ((int,), "an integer"),
    "run_id": ((str, int), "a string"),
    "source": ((str,), "a string"),
    "status": ((str,), "a string"),
    "config": ((dict,), "a JSON object"),
    "env": ((dict,), "a JSON object"),
    "world_size": ((int,), "an integer from 1 to 1,000,000"),
    "start_time": (_NUMBER, "a finite number"),
    "end_time": (_NUMBER + (type(None),), "a finite number or null"),
}


def _meta_field_ok(name: str, value: Any) -> bool:
    types, _ = META_FIELDS[name]
    if isinstance(value, bool) or not isinstance(value, types):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not (name == "world_size" and isinstance(value, int) and not 1 <= value <= 1_000_000)


class Run:
    """A run directory. Cheap to construct; files are read on demand and followed incrementally.

    A ``meta.json`` field of the wrong type (``world_size: "two"``, ``config: "x"``) is taken out of
    :attr:`meta` and reported by :meth:`problems`, so consumers can trust the types of what is left; the raw
    value stays in :attr:`meta_invalid` for a command that cannot go on without it.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir)
        why = file_problem(self.path)
        if why is not None and why != "a directory":
            raise RunError(f"{self.path}: no such run directory" if why == "missing" else f"{self.path}: is {why}")
        if why is None:
            raise RunError(f"{self.path}: a file, not a run directory")
        self.meta_path = self.path / "meta.json"
        if not os.path.lexists(self.meta_path):
            raise RunError(f"{self.path}: no meta.json, so this is not a run directory (or it is still being created)")
        self._meta: dict[str, Any] | None = None
        self.meta_invalid: dict[str, Any] = {}
        self._meta_problems: list[Problem] = []
        self._cursors: dict[str, JsonlCursor] = {}
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._path_problems: dict[str, Problem] = {}

    # ---- meta
    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            return self.reload_meta()
        return self._meta

    def reload_meta(self) -> dict[str, Any]:
        """Re-read meta.json; any failure is one :class:`RunError`, a field of the wrong type is a problem."""
        meta = read_json_file(self.meta_path, "meta.json")
        if not isinstance(meta, dict):
            raise RunError(f"{self.meta_path}: meta.json is not a JSON object")
        self.meta_invalid, self._meta_problems = {}, []
        for name, (_, must_be) in META_FIELDS.items():
            if name in meta and not _meta_field_ok(name, meta[name]):
                value = meta.pop(name)
                self.meta_invalid[name] = value
                note = ""
                if name == "world_size":
                    note = f" (using {self._ranks_on_disk()}, the number of rank files)"
                self._meta_problems.append(Problem(str(self.meta_path), None, f"{name} {_preview(value)} is not "
                                                   f"{must_be}; ignored{note}"))
        self._meta = meta
        return meta

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id") or self.path.name)

    @property
    def status(self) -> str:
        """The status now (meta.json re-read: a live run changes it); the last good one if it just broke."""
        try:
            meta = self.reload_meta()
        except RunError:
            if self._meta is None:
                raise
            meta = self._meta
        return str(meta.get("status", "unknown"))

    def process_gone(self) -> bool:
        """True for a run that says ``running`` although the process that wrote it, on this host, has ended.

        A SIGKILL (or the machine going down) leaves no chance to write ``failed``/``interrupted``; the writer
        records its pid and host, so a reader on the same host can still tell. False whenever it cannot know
        (another host, no pid recorded, a pid that now belongs to another process)."""
        meta = self._meta if self._meta is not None else {}
        process = meta.get("process")
        if meta.get("status") != "running" or not isinstance(process, dict):
            return False
        pid, host = process.get("pid"), process.get("host")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            return False
        return False

    def status_line(self) -> str:
        """The status for people: ``running`` is qualified when the writing process is known to be gone."""
        status = self.status
        if status == "running" and self.process_gone():
            pid = self.meta["process"]["pid"]
            return f"running, but its process {pid} has ended without closing the run (killed?)"
        return status

    def _ranks_on_disk(self) -> int:
        return max(1, len(self.rank_files()))

    @property
    def world_size(self) -> int:
        if "world_size" in self.meta_invalid:
            return self._ranks_on_disk()
        return int(self.meta.get("world_size") or 1)

    # ---- JSONL files
    def _cursor(self, name: str) -> JsonlCursor:
        if name not in self._cursors:
            is_steps = name.startswith("metrics")
            self._cursors[name] = MetricsCursor(self.path / name) if is_steps else JsonlCursor(self.path / name)
            self._records[name] = []
        return self._cursors[name]

    def _tail_file(self, name: str, max_bytes: int | None = None) -> list[dict[str, Any]]:
        new = [_restore_nonfinite(r) for r in self._cursor(name).read_new(max_bytes)]
        self._records[name].extend(new)
        return new

    def _all(self, name: str, max_bytes: int | None = None) -> list[dict[str, Any]]:
        self._tail_file(name, max_bytes)
        return list(self._records[name])

    def rank_files(self) -> dict[int, str]:
        out = {}
        for p in self.path.glob("metrics.rank*.jsonl"):
            digits = p.name[len("metrics.rank"): -len(".jsonl")]
            if digits.isdigit():
                out[int(digits)] = p.name
        return dict(sorted(out.items()))

    def metrics(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        """Run-level records: ``metrics.jsonl``, or the mean over rank files when only those exist.

        ``max_bytes`` reads at most about that many new bytes of ``metrics.jsonl`` this call (the records
        returned are then those read so far); the rank-file merge ignores it.
        """
        if (self.path / "metrics.jsonl").exists() or not self.rank_files():
            return self._all("metrics.jsonl", max_bytes)
        return merge_ranks(self.rank_metrics())

    def metric_columns(self, min_bytes: int = 0) -> Any:
        """``metrics.jsonl``'s complete lines as float columns in one columnar parse
        (:class:`rlhf_core.runformat.metric_columns.MetricColumns`), or None where the file must be read line by line
        (rank files only, fewer than ``min_bytes``, or anything but clean JSON lines). Independent of
        :meth:`metrics`: a caller that draws from the columns still reads the records for everything else."""
        if not (self.path / "metrics.jsonl").exists():
            return None
        from rlhf_core.runformat.metric_columns import read_columns

        return read_columns(self.path / "metrics.jsonl", min_bytes)

    def rank_metrics(self, ranks: Iterable[int] | None = None) -> dict[int, list[dict[str, Any]]]:
        """Per-rank records; a single-process run is rank 0. ``ranks``: only these ranks' files are read (the
        others are neither read nor returned), so one rank of a 256-rank run costs one file."""
        files = self.rank_files()
        if not files:
            return {0: self._all("metrics.jsonl")} if ranks is None or 0 in set(ranks) else {}
        wanted = None if ranks is None else set(ranks)
        return {rank: self._all(name) for rank, name in files.items() if wanted is None or rank in wanted}

    def rank_streams(self) -> dict[int, RecordStream]:
        """Per rank file, a :class:`RecordStream` of its records, independent of this run's own reads."""
        return {rank: RecordStream(self.path / name) for rank, name in self.rank_files().items()}

    def rank_tails(self, n: int) -> dict[int, list[dict[str, Any]]]:
        """Per rank, the step records of the last ``n`` complete lines of its file, read from the file's end
        (a few KiB per rank whatever the run's length; nothing is kept). Bad lines there are skipped, not
        reported: :meth:`rank_metrics` reads and reports every line."""
        files = self.rank_files() or {0: "metrics.jsonl"}
        return {rank: tail_records(self.path / name, n) for rank, name in files.items()}

    def tail(self) -> list[dict[str, Any]]:
        """Run-level records written since the previous call (the first call returns everything so far)."""
        if (self.path / "metrics.jsonl").exists() or not self.rank_files():
            return self._tail_file("metrics.jsonl")
        before = {n: len(self._records.get(n, [])) for n in self.rank_files().values()}
        per_rank = self.rank_metrics()
        new_steps = {
            int(r["step"]) for rank, name in self.rank_files().items() for r in per_rank[rank][before.get(name, 0):]
        }
        return [r for r in merge_ranks(per_rank) if r["step"] in new_steps]

    def events(self) -> list[dict[str, Any]]:
        return self._all("events.jsonl")

    def system(self) -> list[dict[str, Any]]:
        return self._all("system.jsonl")

    def samples(self, step: int | None = None) -> list[dict[str, Any]]:
        """The completions the producer kept (``samples.jsonl``: a bounded sample per step), or those of
        ``step``; followed incrementally like the other files."""
        records = self._all("samples.jsonl")
        return records if step is None else [r for r in records if r.get("step") == step]

    def memory(self) -> dict[str, Any] | None:
        p = self.path / "memory.json"
        if not os.path.lexists(p):
            return None
        data = read_json_file(p, "memory.json")
        if not isinstance(data, dict):
            raise RunError(f"{p}: memory.json is not a JSON object")
        return data

    def traces(self) -> list[Path]:
        """Trace files, oldest first; one that is a folder, a FIFO or a symlink loop is reported and left out."""
        found = []
        for p in (self.path / "traces").glob("*.pt.trace.json*"):
            why = file_problem(p)
            if why is None:
                try:
                    found.append((p.stat().st_mtime, p))
                    continue
                except OSError as err:
                    why = f"not readable ({err.strerror or err})"
            if why != "missing":
                self._path_problems[str(p)] = Problem(str(p), None, f"is {why}; ignored")
        return [p for _, p in sorted(found)]

    def checkpoints(self) -> list[Path]:
        ckpts = [p for p in (self.path / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
        return sorted(ckpts, key=lambda p: int(p.name[5:]))

    # ---- diagnostics
    def problems(self) -> list[Problem]:
        """meta.json fields of the wrong type, files that cannot be read, bad lines and steps seen so far (one line
        per kind where they repeat), plus a torn last line of a run that is no longer being written."""
        out = list(self._meta_problems) + list(self._path_problems.values())
        out += [p for c in self._cursors.values() for p in c.report()]
        if self.status != "running":
            for cursor in self._cursors.values():
                if cursor.pending_bytes():
                    out.append(Problem(str(cursor.path), cursor.line_no + 1,
                                       "torn last line (the writer stopped mid-record); skipped"))
        return out

    def unknown_keys(self) -> list[str]:
        return unknown_keys({k for r in self._records.get("metrics.jsonl", []) for k in r})

    def frame(self):
        """Metrics as a pandas DataFrame indexed by step (pandas imported only here)."""
        import pandas as pd

        recs = self.metrics()
        if not recs:
            return pd.DataFrame()
        df = pd.DataFrame.from_records(recs).drop(columns=["nonfinite"], errors="ignore")
        return df.drop_duplicates("step", keep="last").set_index("step").sort_index()

    def summary(self) -> dict[str, Any]:
        recs = self.metrics()
        return {
            "run_id": self.run_id,
            "path": str(self.path),
            "source": self.meta.get("source"),
            "status": self.status,
            "world_size": self.world_size,
            "start_time": self.meta.get("start_time"),
            "steps": len(recs),
            "last_step": recs[-1]["step"] if recs else None,
            "alerts": sum(1 for e in self.events() if e.get("kind") == "alert"),
        }


def _preview(value: Any, limit: int = 40) -> str:
    """A short repr for a message (a 10**400 integer or a deep list must not flood the terminal)."""
    try:
        text = repr(value) if not isinstance(value, (list, dict)) else f"<{type(value).__name__} of {len(value)}>"
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(problems: Iterable[Any], limit: int = 5) -> list[str]:
    """At most ``limit`` problem lines and one ``… and N more`` line: a bounded warning block for a terminal."""
    lines = [str(p) for p in problems]
    if len(lines) <= limit + 1:
        return lines
    return lines[:limit] + [f"… and {len(lines) - limit} more problem(s) not shown"]


def resolve_run_path(root: str | os.PathLike, run_id: str) -> Path:
    """The directory of ``run_id`` under ``root``; refuses ids that leave it (``..``, absolute, symlinks)."""
    root_real = Path(os.path.realpath(root))
    if not run_id or os.path.isabs(run_id) or "\x00" in run_id:
        raise RunError(f"refused run id {run_id!r}: not a relative name under the runs root")
    candidate = Path(os.path.realpath(root_real / run_id))  # realpath: a symlink loop is a path, not a RuntimeError
    if candidate != root_real and root_real not in candidate.parents:
        raise RunError(f"refused run id {run_id!r}: it leaves the runs root {root_real}")
    return candidate


def iter_run_dirs(root: str | os.PathLike, max_depth: int = 2) -> Iterator[Path]:
    """Directories holding a meta.json under root (runs may be grouped one folder deep)."""
    root_real = Path(os.path.realpath(root))
    if not root_real.is_dir():
        return
    stack = [(root_real, 0)]
    while stack:
        d, depth = stack.pop()
        if (d / "meta.json").exists():
            yield d
            continue
        if depth >= max_depth:
            continue
        try:
            children = sorted((c for c in d.iterdir() if c.is_dir()), reverse=True)
        except OSError:
            continue
        for c in children:
            if c.name.startswith(".") or c.name in ("traces", "checkpoints", "tb"):
                continue
            real = Path(os.path.realpath(c))
            if real == root_real or root_real in real.parents:
                stack.append((real, depth + 1))


def list_runs(root: str | os.PathLike) -> list[Run]:
    """Runs under root, newest first; unreadable ones are skipped (``list_run_problems`` says why)."""
    runs = []
    for d in iter_run_dirs(root):
        try:
            run = Run(d)
            _ = run.meta  # reads meta.json: a folder without a readable one is not a run
        except RunError:
            continue
        runs.append(run)
    runs.sort(key=lambda r: r.meta.get("start_time") or 0, reverse=True)
    return runs


def list_run_problems(root: str | os.PathLike) -> list[str]:
    out = []
    for d in iter_run_dirs(root):
        try:
            Run(d).reload_meta()
        except RunError as err:
            out.append(str(err))
    return out
