"""Run: the one reader every consumer (dashboard, reports, diagnose, memory views) uses.

Torch-free. Reads runs that are finished or still being written: only complete lines are consumed, a
half-written last line is left for the next :meth:`Run.tail`, a torn last line of a closed run is skipped
with a warning, and any other bad line is reported with its file and line number. Nothing is dropped
silently: values written as ``null`` and listed in ``nonfinite`` come back as NaN.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .keys import unknown_keys

try:  # orjson parses ~3x faster; it is strict (no bare NaN), so json stays the fallback for such lines
    import orjson

    _fast_loads = orjson.loads

    def _loads(raw: bytes) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.loads(raw)
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    _fast_loads = json.loads

    def _loads(raw: bytes) -> Any:
        return json.loads(raw)


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
    """Incremental reader of one JSONL file: byte offset and line count survive between reads."""

    path: Path
    offset: int = 0
    line_no: int = 0
    problems: list[Problem] = field(default_factory=list)

    def read_new(self, max_bytes: int | None = None) -> list[Any]:
        """Records of the complete lines written since the last call; with ``max_bytes``, of about that many
        bytes of them (at least one line), so a caller holding a lock can read a big file in pieces."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # truncated or replaced: start over rather than read garbage
            self.problems.append(Problem(str(self.path), None, "file shrank while being read; re-reading"))
            self.offset, self.line_no = 0, 0
        if size == self.offset:
            return []
        want = size - self.offset if max_bytes is None else min(size - self.offset, max(1, max_bytes))
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(want)
            end = chunk.rfind(b"\n")
            while end < 0 and len(chunk) < size - self.offset:  # a line longer than max_bytes: on to its end
                more = fh.read(min(want, size - self.offset - len(chunk)))
                found = more.find(b"\n")
                end = len(chunk) + found if found >= 0 else -1
                chunk += more
        if end < 0:
            return []
        complete = chunk[: end + 1]
        self.offset += len(complete)
        records: list[dict[str, Any]] = []
        append, loads, collect, base = records.append, _fast_loads, self._collect, self.line_no
        lines = complete.split(b"\n")
        lines.pop()  # the empty piece after the final newline
        for i, raw in enumerate(lines, 1):
            try:  # the common case in a tight loop: a JSON object per line
                rec = loads(raw)
            except ValueError:  # orjson's and json's decode errors both are ValueErrors
                rec = None
            if type(rec) is not dict:
                rec = self._parse(raw, base + i)  # blank, NaN, malformed, not an object: slow path, problems
                if rec is None:
                    continue
            append(collect(rec, base + i))
        self.line_no = base + len(lines)
        return records

    def _collect(self, rec: dict[str, Any], line_no: int) -> Any:
        """What :meth:`read_new` returns for a good line; subclasses may keep the line number with it."""
        return rec

    def pending_bytes(self) -> int:
        try:
            return max(0, self.path.stat().st_size - self.offset)
        except FileNotFoundError:
            return 0

    def _parse(self, raw: bytes, line_no: int) -> dict[str, Any] | None:
        if not raw.strip():
            return None
        try:
            rec = _loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if isinstance(err, UnicodeDecodeError):
                self.problems.append(Problem(str(self.path), line_no, "not UTF-8 text; line skipped"))
                return None
            self.problems.append(Problem(str(self.path), line_no, f"malformed JSON ({err.msg}); line skipped"))
            return None
        if not isinstance(rec, dict):
            self.problems.append(Problem(str(self.path), line_no, "not a JSON object; line skipped"))
            return None
        return rec


def _restore_nonfinite(rec: dict[str, Any]) -> dict[str, Any]:
    for key in rec.get("nonfinite") or ():
        if rec.get(key) is None:
            rec[key] = math.nan
    return rec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge_ranks(per_rank: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run-level records from per-rank ones: the mean over ranks of each numeric key at each step."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for recs in per_rank.values():
        for rec in recs:
            by_step.setdefault(int(rec["step"]), []).append(rec)
    merged = []
    for step in sorted(by_step):
        recs = by_step[step]
        out: dict[str, Any] = {"step": step, "time": max(r.get("time", 0) for r in recs), "rank": "all"}
        keys = {k for r in recs for k in r if k not in ("step", "time", "rank", "nonfinite")}
        nonfinite = []
        for key in sorted(keys):
            vals = [r[key] for r in recs if _is_number(r.get(key))]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            out[key] = mean
            if not math.isfinite(mean):
                nonfinite.append(key)
        if nonfinite:
            out["nonfinite"] = nonfinite
        merged.append(out)
    return merged


class Run:
    """A run directory. Cheap to construct; files are read on demand and followed incrementally."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir)
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        self.meta_path = self.path / "meta.json"
        if not self.meta_path.exists():
            raise RunError(f"{self.path}: no meta.json, so this is not a run directory (or it is still being created)")
        self._meta: dict[str, Any] | None = None
        self._cursors: dict[str, JsonlCursor] = {}
        self._records: dict[str, list[dict[str, Any]]] = {}

    # ---- meta
    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self.reload_meta()
        return self._meta  # type: ignore[return-value]

    def reload_meta(self) -> dict[str, Any]:
        try:
            self._meta = json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{self.meta_path}: unreadable meta.json ({err})") from err
        if not isinstance(self._meta, dict):
            raise RunError(f"{self.meta_path}: meta.json is not a JSON object")
        return self._meta

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.reload_meta().get("status", "unknown"))

    @property
    def world_size(self) -> int:
        return int(self.meta.get("world_size") or 1)

    # ---- JSONL files
    def _cursor(self, name: str) -> JsonlCursor:
        if name not in self._cursors:
            self._cursors[name] = JsonlCursor(self.path / name)
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
        (:class:`rlhf_core.metric_columns.MetricColumns`), or None where the file must be read line by line
        (rank files only, fewer than ``min_bytes``, or anything but clean JSON lines). Independent of
        :meth:`metrics`: a caller that draws from the columns still reads the records for everything else."""
        if not (self.path / "metrics.jsonl").exists():
            return None
        from .metric_columns import read_columns

        return read_columns(self.path / "metrics.jsonl", min_bytes)

    def rank_metrics(self) -> dict[int, list[dict[str, Any]]]:
        """Per-rank records; a single-process run is rank 0."""
        files = self.rank_files()
        if not files:
            return {0: self._all("metrics.jsonl")}
        return {rank: self._all(name) for rank, name in files.items()}

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

    def memory(self) -> dict[str, Any] | None:
        p = self.path / "memory.json"
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{p}: unreadable memory.json ({err})") from err

    def traces(self) -> list[Path]:
        return sorted((self.path / "traces").glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)

    def checkpoints(self) -> list[Path]:
        ckpts = [p for p in (self.path / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
        return sorted(ckpts, key=lambda p: int(p.name[5:]))

    # ---- diagnostics
    def problems(self) -> list[Problem]:
        """Bad lines seen so far, plus a torn last line of a run that is no longer being written."""
        out = [p for c in self._cursors.values() for p in c.problems]
        if self.status != "running":
            for name, cursor in self._cursors.items():
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


def resolve_run_path(root: str | os.PathLike, run_id: str) -> Path:
    """The directory of ``run_id`` under ``root``; refuses ids that leave it (``..``, absolute, symlinks)."""
    root_real = Path(root).resolve()
    if not run_id or os.path.isabs(run_id) or "\x00" in run_id:
        raise RunError(f"refused run id {run_id!r}: not a relative name under the runs root")
    candidate = (root_real / run_id).resolve()
    if candidate != root_real and root_real not in candidate.parents:
        raise RunError(f"refused run id {run_id!r}: it leaves the runs root {root_real}")
    return candidate


def iter_run_dirs(root: str | os.PathLike, max_depth: int = 2) -> Iterator[Path]:
    """Directories holding a meta.json under root (runs may be grouped one folder deep)."""
    root_real = Path(root).resolve()
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
            real = c.resolve()
            if real == root_real or root_real in real.parents:
                stack.append((real, depth + 1))


def list_runs(root: str | os.PathLike) -> list[Run]:
    """Runs under root, newest first; unreadable ones are skipped (``list_run_problems`` says why)."""
    runs = []
    for d in iter_run_dirs(root):
        try:
            run = Run(d)
            run.meta
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
