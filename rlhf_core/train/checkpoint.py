"""Checkpoints ``<run>/checkpoints/step_<N>/`` and the resume rule.

``state.pt`` holds plain tensors and containers only, so it loads with ``torch.load(weights_only=True)``:
policy + value head weights, AdamW state, KL controller, RNG states, step/epoch. ``checkpoint.json`` says
what is inside. A checkpoint is written into ``checkpoints/.step_<N>.tmp/`` and renamed when complete. Resume
rule: remove partial writes, continue from the newest complete checkpoint (or from step 0 of the same run when
there is none) and drop every metrics/event/timeline record with a step after it and every system record
written after it (rewritten atomically), so no step is ever written twice.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import IO, Any, cast

STATE_FILE = "state.pt"
INFO_FILE = "checkpoint.json"
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"  # checkpoints/.step_<N>.tmp/ while it is written


KILL_AT_ENV = "RLHFKIT_KILL_AT"


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process here when ``$RLHFKIT_KILL_AT`` is ``name``. Why: the kill tests must hit
    moments too short to hit by timing (the middle of a checkpoint save, of a resume's cleanup)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (both files present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.glob("step_*"):
        digits = p.name[len("step_"):]
        if digits.isdigit() and (p / STATE_FILE).exists() and (p / INFO_FILE).exists():
            out.append((int(digits), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def own_storage(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict with every distinct tensor in storage of its own (tied entries stay one tensor).

    The runner's parameters are views of one flat buffer (``flat_params``); saved as they are, each would
    load as a view of the whole buffer, which tools such as safetensors refuse.
    """
    copies: dict[tuple, Any] = {}
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "untyped_storage"):
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
            if key not in copies:
                copies[key] = v.detach().clone()
            v = copies[key]
        out[k] = v
    return out


class _WholeWrites:
    """A binary file for ``torch.save`` whose ``write`` writes all its bytes or raises, and keeps the OSError
    (a full disk) that torch would turn into a RuntimeError."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self.fh.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as err:
            self.error = err
            raise
        return done

    def flush(self) -> None:
        self.fh.flush()


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write ``state`` and ``info`` for ``step`` into a temporary folder renamed to ``step_<N>`` when complete.

    Why a folder rename: a kill or a full disk at any moment leaves either no ``step_<N>`` or a complete one,
    plus a ``.step_<N>.tmp`` folder that the next resume removes (:func:`clean_partial_writes`). A write error
    is re-raised as one ``OSError`` naming the file (``torch.save`` reports a failed or short write as a
    RuntimeError about zip positions, which hides ENOSPC: :class:`_WholeWrites` keeps the real error).
    """
    import torch

    target = checkpoint_dir(run_dir, step)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}{TMP_SUFFIX}")
    file = tmp / STATE_FILE
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with open(file, "wb", buffering=0) as fh:
            out = _WholeWrites(fh)
            try:
                torch.save(state, cast(IO[bytes], out))  # duck-typed: torch.save calls only write and flush
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
        kill_point("checkpoint:state")
        file = tmp / INFO_FILE
        file.write_text(json.dumps({"step": step, "time": time.time(), **info}, indent=2))
        kill_point("checkpoint:info")
        if target.exists():  # an incomplete folder of an older layout (no rename then): never a complete one
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(err.errno, f"cannot write checkpoint: {err.strerror or err}", str(file)) from None
    return target


def clean_partial_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes left (temporary checkpoint folders, incomplete ``step_<N>`` folders,
    ``.*.tmp`` files of atomic rewrites); returns what went. Run before a resume, by the only live writer."""
    run = Path(run_dir)
    removed: list[Path] = []
    complete = {path for _, path in list_checkpoints(run)}
    root = run / "checkpoints"
    candidates = list(root.iterdir()) if root.is_dir() else []
    for p in candidates:
        partial = p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX)
        if p.is_dir() and not p.is_symlink() and (partial or (p.name.startswith("step_") and p not in complete)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for folder in [run, *sorted(complete)]:
        for p in folder.glob(".*.tmp"):
            if p.is_file() or p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    import torch

    return torch.load(Path(path) / STATE_FILE, map_location=map_location, weights_only=True)


def _parse(line: bytes) -> tuple[bool, int | None]:
    """(is a JSON object, its integer step or None)."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False, None
    if not isinstance(rec, dict):
        return False, None
    step = rec.get("step")
    return True, step if isinstance(step, int) and not isinstance(step, bool) else None


def truncate_after(path: Path, step: int) -> int:
    """Drop what a resume from ``step`` must not keep; returns how many lines went.

    Dropped: records with a step after ``step``, a torn last line, and bad lines after the last record kept
    (the remains of the interrupted session). Kept: records up to ``step``, records without a step (events
    of the run as a whole) and bad lines among the kept records (the reader reports them; nothing is lost).
    Atomic: a crash leaves either the old or the new file.
    """
    if not path.exists():
        return 0
    lines = path.read_bytes().split(b"\n")
    complete, torn = lines[:-1], lines[-1]
    parsed = [_parse(line) for line in complete]
    keep = [ok and (s is None or s <= step) for ok, s in parsed]
    last_kept = max((i for i, k in enumerate(keep) if k), default=-1)
    kept = [line for i, line in enumerate(complete)
            if keep[i] or (i < last_kept and not parsed[i][0] and line.strip())]
    dropped = len([line for line in complete if line.strip()]) - len([line for line in kept if line.strip()])
    dropped += 1 if torn.strip() else 0
    if dropped:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept if line.strip()))
        os.replace(tmp, path)
    return dropped


def truncate_after_time(path: Path, cutoff: float) -> int:
    """Drop the records of ``path`` (``system.jsonl``: no step, a ``time``) written after ``cutoff`` and a torn
    last line; returns how many lines went. Atomic, as :func:`truncate_after`."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_bytes().split(b"\n")]
    complete, torn = lines[:-1], lines[-1]
    kept = []
    for line in complete:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        t = rec.get("time") if isinstance(rec, dict) else None
        if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t <= cutoff:
            kept.append(line)
    dropped = sum(1 for line in complete if line.strip()) - len(kept) + (1 if torn.strip() else 0)
    if dropped:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def checkpoint_time(path: Path) -> float:
    """When a complete checkpoint was written (``checkpoint.json``'s ``time``; the file's mtime otherwise)."""
    try:
        t = json.loads((path / INFO_FILE).read_text()).get("time")
    except (OSError, ValueError, AttributeError):
        t = None
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) else (path / INFO_FILE).stat().st_mtime


def prepare_resume(run_dir: str | os.PathLike) -> tuple[int, Path | None, dict[str, int]]:
    """The checkpoint to resume from (step 0 and None when no checkpoint is complete: the run restarts from its
    beginning, in the same folder) and the cleanup of what was written after it (per file: lines dropped).

    Cut at that step: ``metrics*.jsonl``, ``events.jsonl``, ``samples.jsonl`` and ``timeline.rank*.jsonl`` by step,
    ``system.jsonl`` by time (its records have none: those after the checkpoint was written go).
    """
    found = latest_checkpoint(run_dir)
    step, path = found if found is not None else (0, None)
    run = Path(run_dir)
    dropped = {}
    by_step = [*sorted(run.glob("metrics*.jsonl")), run / "events.jsonl", run / "samples.jsonl",
               *sorted(run.glob("timeline.rank*.jsonl"))]
    for f in by_step:
        n = truncate_after(f, step)
        if n:
            dropped[f.name] = n
    n = truncate_after_time(run / "system.jsonl", checkpoint_time(path) if path is not None else -math.inf)
    if n:
        dropped["system.jsonl"] = n
    return step, path, dropped
