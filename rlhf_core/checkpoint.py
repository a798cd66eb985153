"""Checkpoints ``<run>/checkpoints/step_<N>/`` and the resume rule.

``state.pt`` holds plain tensors and containers only, so it loads with ``torch.load(weights_only=True)``:
policy + value head weights, AdamW state, KL controller, RNG states, step/epoch. ``checkpoint.json`` says
what is inside. Resume rule: continue from the newest checkpoint and drop every metrics/event record with a
step after it (rewritten atomically), so no step is ever written twice.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .run_writer import write_json_atomic

STATE_FILE = "state.pt"
INFO_FILE = "checkpoint.json"


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


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write ``state`` and ``info`` for ``step``; the info file is written last, marking it complete."""
    import torch

    target = checkpoint_dir(run_dir, step)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, target / STATE_FILE)
    write_json_atomic(target / INFO_FILE, {"step": step, "time": time.time(), **info})
    return target


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


def prepare_resume(run_dir: str | os.PathLike) -> tuple[int, Path, dict[str, int]]:
    """The checkpoint to resume from and the cleanup of records written after it (per file: lines dropped)."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoints/step_<N>/ to resume from")
    step, path = found
    run = Path(run_dir)
    dropped = {}
    for f in sorted(run.glob("metrics*.jsonl")) + [run / "events.jsonl"]:
        n = truncate_after(f, step)
        if n:
            dropped[f.name] = n
    return step, path, dropped
