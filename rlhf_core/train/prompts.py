"""Prompts: a built-in set that suits the tiny model's vocabulary, or a user file in one of three formats.

``--prompts FILE`` accepts a JSON list (of strings, or of objects with a ``prompt`` field), JSONL with a
``prompt`` field per line, or plain text with one prompt per line. Problems are reported as
:class:`PromptError` with the file and line, so the CLI can print one line.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

BUILTIN_PROMPTS: tuple[str, ...] = (
    "The movie was", "This book is", "Honestly the food", "Our trip", "The weather today",
    "My day was", "I think the game", "The service", "The music", "Overall the story",
    "This place", "The team", "Yesterday the show", "The hotel", "In the end the city",
    "The coffee", "The new phone", "At first the class", "The concert", "The garden",
    "My friend said the movie", "Everyone agreed the book", "To be fair the food", "Today the weather",
    "Once upon a time the team", "The review says the hotel", "Honestly the music", "I think our trip",
    "The show", "Overall the service", "In the end my day", "The city",
)


MAX_BYTES = 1 << 30  # a prompts file is read whole: past this it is not a prompts file


class PromptError(ValueError):
    """A prompts file that cannot be used (missing, empty, malformed)."""


def _from_json(data: object, path: Path) -> list[str]:
    if not isinstance(data, list):
        raise PromptError(f"{path}: a JSON prompts file must hold a list")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str) or not item.strip():
            raise PromptError(f"{path}: item {i} is not a non-empty string or an object with a 'prompt' string")
        out.append(item)
    return out


def _from_jsonl(lines: Sequence[str], path: Path) -> list[str]:
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}:{no}: malformed JSON line ({err.msg})") from None
        except RecursionError:
            raise PromptError(f"{path}:{no}: JSON nested too deeply") from None
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"{path}:{no}: no non-empty 'prompt' string")
        out.append(prompt)
    return out


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from ``path``; the format is told from the content, not the extension."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: no such file")
    if path.is_dir():
        raise PromptError(f"{path}: a folder, not a prompts file")
    if not path.is_file():
        raise PromptError(f"{path}: not a regular file (a device or a pipe); give a prompts file")
    if path.stat().st_size > MAX_BYTES:
        raise PromptError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_BYTES} a prompts file may hold")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"{path}: unreadable ({err})") from None
    stripped = text.strip()
    if not stripped:
        raise PromptError(f"{path}: empty prompts file")
    lines = text.splitlines()
    if stripped.startswith("["):
        try:
            prompts = _from_json(json.loads(stripped), path)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None
        except RecursionError:
            raise PromptError(f"{path}: JSON nested too deeply to be a list of prompts") from None
    elif stripped.startswith("{"):
        prompts = _from_jsonl(lines, path)
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"{path}: no prompts found")
    return prompts


def get_prompts(path: str | Path | None) -> list[str]:
    return list(BUILTIN_PROMPTS) if path is None else load_prompts(path)


def batch_for_step(prompts: Sequence[str], batch_size: int, seed: int, step: int, rank: int = 0) -> list[str]:
    """The prompts of one step: a deterministic function of (seed, step, rank), so a resumed run sees the
    same prompts as an uninterrupted one without carrying sampler state."""
    rng = random.Random(f"prompts/{seed}/{rank}/{step}")
    if batch_size <= len(prompts):
        return rng.sample(list(prompts), batch_size)
    return [rng.choice(prompts) for _ in range(batch_size)]
