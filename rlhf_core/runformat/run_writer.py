"""RunWriter: the one way producers (runner, adapters, importers) write a run directory.

Layout and rules are the contract in docs/design.md ("Run format"): ``meta.json`` (rewritten atomically),
``metrics.jsonl`` (one line per step, one ``write`` + flush each so a crash can only tear the last line),
``events.jsonl``, ``system.jsonl``, ``samples.jsonl`` (a bounded sample of completions per step), ``tb/``,
``traces/``, ``memory.json``, ``checkpoints/`` (the two folders only once something is written into them, by the
profiler or a checkpoint). With ``world_size > 1`` each
rank writes ``metrics.rank<k>.jsonl``; rank 0 alone writes the shared files and the reduced
``metrics.jsonl`` through :meth:`RunWriter.log_reduced`.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rlhf_core.runformat.keys import FORMAT_VERSION, SOURCES, STATUSES, sanitize
from rlhf_core.runformat.samples import SAMPLE_CHARS, SAMPLES_PER_STEP, sample_records

if TYPE_CHECKING:  # the run format stays torch-free at run time
    from torch.utils.tensorboard import SummaryWriter


TB_FLUSH_SECS = 5


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions and host facts recorded in ``meta.json`` so a run can be reproduced or compared."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "device": device,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def dumps_line(obj: Mapping[str, Any]) -> str:
    """One JSON line, strict (no bare NaN): non-serialisable values become strings."""
    return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":")) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write through a temporary file and a rename (a crash leaves the old or the new file); a write error
    removes the temporary file and names ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, default=_json_default, indent=2, allow_nan=False))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(path)) from None


def write_json_in_place(path: Path, obj: Any) -> None:
    """Overwrite ``path`` in place: the last resort of a full disk, where the blocks the file already holds
    are reused and no temporary file fits (not atomic: used only after :func:`write_json_atomic` failed)."""
    data = json.dumps(obj, default=_json_default, indent=2, allow_nan=False).encode()
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()


class JsonlAppender:
    """Append-only JSONL file; each record goes out in one ``write`` and is flushed at once."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: TextIO | None = None
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one line; a write error (a full disk) is re-raised naming the file, and the next append
        starts on a fresh line (a resume drops the torn one)."""
        line = dumps_line(record)
        with self._lock:
            try:
                if self._fh is None:
                    self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
                self._fh.write(line)
                self._fh.flush()
            except OSError as err:
                self._discard()
                raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(self.path)) from None

    def _discard(self) -> None:
        """Drop the handle and whatever its buffer still holds (it could not be written)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close; a buffer that cannot be flushed any more (a full disk) is dropped, not raised."""
        with self._lock:
            self._discard()


class RunWriter:
    """Writes one run directory. Use as a context manager so the final status is always recorded."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        source: str,
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: str | None = None,
        tensorboard: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        extra_meta: Mapping[str, Any] | None = None,
        tb_purge_step: int | None = None,
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = int(rank), int(world_size)
        self.is_main = self.rank == 0
        self.meta_path = self.run_dir / "meta.json"
        existing = self.meta_path.exists()
        if self.is_main:
            if existing and not (resume or overwrite):
                raise FileExistsError(
                    f"{self.run_dir} already holds a run; pass resume (continue it) or overwrite (replace it)"
                )
            if existing and overwrite and not resume:
                _clear_run_dir(self.run_dir)
                existing = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_name = "metrics.jsonl" if self.world_size == 1 else f"metrics.rank{self.rank}.jsonl"
        self.metrics_path = self.run_dir / metrics_name
        self._metrics = JsonlAppender(self.metrics_path)
        self._reduced = JsonlAppender(self.run_dir / "metrics.jsonl") if self.world_size > 1 and self.is_main else None
        self._events = JsonlAppender(self.run_dir / "events.jsonl")
        self._system = JsonlAppender(self.run_dir / "system.jsonl")
        self._tb: SummaryWriter | None = None
        self._tb_enabled = tensorboard and self.is_main
        self._tb_purge_step = tb_purge_step  # on resume: TensorBoard hides events from this step on, written before
        self._closed = False
        self.previous: dict[str, Any] | None = None  # on resume: the status and reason the run had
        if self.is_main:
            if resume and existing:
                self.meta = json.loads(self.meta_path.read_text())
                self.previous = {"status": self.meta.get("status"), "reason": self.meta.get("reason")}
                self.meta["status"] = "running"
                self.meta["reason"] = None
                self.meta["resumed_at"] = self.meta.get("resumed_at", []) + [time.time()]
                self.meta["end_time"] = None
            else:
                self.meta = {
                    "format_version": FORMAT_VERSION,
                    "run_id": run_id or self.run_dir.name or uuid.uuid4().hex[:8],
                    "source": source,
                    "config": dict(config or {}),
                    "env": environment(device),
                    "world_size": self.world_size,
                    "status": "running",
                    "start_time": time.time(),
                    "end_time": None,
                }
            if extra_meta:
                self.meta.update(extra_meta)
            # who is writing now: a reader on this host can tell a "running" run whose process was killed
            self.meta["process"] = {"pid": os.getpid(), "host": socket.gethostname()}
            write_json_atomic(self.meta_path, self.meta)
        else:
            self.meta = {}

    # paths consumers and producers share; whoever writes into traces/ or checkpoints/ creates it, so a run
    # without traces or checkpoints (most adapter runs) has no empty folders
    @property
    def traces_dir(self) -> Path:
        return self.run_dir / "traces"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def memory_path(self) -> Path:
        return self.run_dir / "memory.json"

    def _record(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        clean, nonfinite = sanitize(metrics)
        record: dict[str, Any] = {"step": int(step), "time": time.time(), "rank": self.rank}
        record.update(clean)
        if nonfinite:
            record["nonfinite"] = nonfinite
        return record

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write this rank's record for one optimizer step (and its TensorBoard scalars)."""
        record = self._record(step, metrics)
        self._metrics.append(record)
        if self.world_size == 1:
            self._tb_scalars(step, record)
        return record

    def log_reduced(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Rank 0 only: the run-level (reduced over ranks) record of a multi-process run."""
        if self._reduced is None:
            return None
        record = self._record(step, metrics)
        record["rank"] = "all"
        self._reduced.append(record)
        self._tb_scalars(step, record)
        return record

    def _tb_scalars(self, step: int, record: Mapping[str, Any]) -> None:
        if not self._tb_enabled:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # producers have torch; the reader never gets here

            # TensorBoard is a secondary view: its own writer thread flushes every few seconds (and at
            # close), so a step pays for queueing scalars, not for a disk flush.
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=self._tb_purge_step,
                                     flush_secs=TB_FLUSH_SECS)
        for key, value in record.items():
            if key in ("step", "time", "rank") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self._tb.add_scalar(key, value, global_step=step)

    def event(
        self,
        step: int | None,
        kind: str,
        *,
        rule: str | None = None,
        severity: str = "info",
        message: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an alert or notable event (main process only; other ranks return without writing)."""
        rec = {
            "step": step, "time": time.time(), "kind": kind, "rule": rule, "severity": severity,
            "message": message, "data": sanitize(data or {})[0], "rank": self.rank,
        }
        if self.is_main:
            self._events.append(rec)
        return rec

    def system(self, record: Mapping[str, Any]) -> None:
        """One system-sampler record (CPU, RSS, GPUs)."""
        rec = dict(record)
        rec.setdefault("time", time.time())
        rec.setdefault("rank", self.rank)
        self._system.append(sanitize(rec)[0])

    # samples.jsonl: how many completions each step keeps and how many characters of each text (set them on
    # the writer, or through the producer's options, before the first step)
    samples_per_step: int = SAMPLES_PER_STEP
    sample_chars: int = SAMPLE_CHARS
    _samples: JsonlAppender | None = None

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """A bounded sample of one step's completions to ``samples.jsonl`` (rank 0 only; the file appears with
        the first sample): ``samples`` are dicts with ``prompt``, ``completion`` (or ``chosen``/``rejected``),
        ``reward``, ``rewards`` (components), ``kl``, ``length``; see
        :func:`rlhf_core.runformat.samples.sample_records`. Returns the records written."""
        if not self.is_main or self._closed:
            return []
        records = sample_records(step, samples, self.samples_per_step, self.sample_chars)
        if not records:
            return records
        if self._samples is None:
            self._samples = JsonlAppender(self.run_dir / "samples.jsonl")
        now = time.time()
        for rec in records:
            self._samples.append({"step": rec.pop("step"), "time": now, "rank": self.rank, **rec})
        return records

    def write_memory(self, report: Mapping[str, Any]) -> None:
        if self.is_main:
            write_json_atomic(self.memory_path, dict(report))

    def update_meta(self, **fields: Any) -> None:
        if self.is_main:
            self.meta.update(fields)
            write_json_atomic(self.meta_path, self.meta)

    def close(self, status: str = "finished", reason: str | None = None) -> None:
        """Close every file and record ``status`` (and, for a failed or interrupted run, ``reason``: one line
        saying why) in ``meta.json``. On a full disk the status still gets written: the files are closed
        first, and ``meta.json`` is rewritten in place when no temporary copy fits."""
        if self._closed:
            return
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        self._closed = True
        for f in (self._metrics, self._reduced, self._events, self._system, self._samples):
            if f is not None:
                f.close()
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError:
                pass
        if self.is_main:
            self.meta.update(status=status, end_time=time.time(), reason=reason)
            try:
                write_json_atomic(self.meta_path, self.meta)
            except OSError:
                write_json_in_place(self.meta_path, self.meta)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted", f"{exc_type.__name__}")
        else:
            self.close("failed", " ".join(f"{exc_type.__name__}: {exc}".split())[:500])


def _clear_run_dir(run_dir: Path) -> None:

    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
