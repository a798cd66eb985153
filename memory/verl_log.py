"""The resolved config a veRL run prints at start, read back from its console log as ``key=value`` overrides.

``main_ppo`` prints ``OmegaConf.to_container(config, resolve=True)`` with ``pprint`` before training: every
setting of that run, defaults of its veRL version included. Planning from it gives the plan of the run that
happened, where a command line leaves the defaults to whatever veRL version the reader follows. The dump is a
Python literal spread over many lines, each behind Ray's ``(TaskRunner pid=N)`` prefix when the job ran under
Ray, so those prefixes and colour codes are removed (leaving out other processes' lines, which Ray interleaves)
and the text is read with :func:`ast.literal_eval`.
"""
from __future__ import annotations

import ast
import itertools
import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "(TaskRunner pid=3165)", "(main_task pid=64899)", "(VGNd5CWorkerDict_0:0 WorkerDict pid=65860, ip=10.0.0.2)"
_RAY_PREFIX = re.compile(r"^\((?P<who>[^()]*?pid=\d+(?:, ip=[\d.:a-fA-F]+)?)\)\s?")
_START = "{'actor_rollout_ref': "  # pprint sorts the keys, and this section sorts first
_KEY = re.compile(r"'((?:[^'\\]|\\.)*)': ")
MAX_DUMP_LINES = 5000  # a dump is a few hundred lines; past this the "dump" is not one


def _lines_of(who: str | None, lines: Iterable[str]) -> Iterable[str]:
    """The text of the lines ``who`` printed (None: the lines without a Ray prefix, the driver's own)."""
    for raw in lines:
        line = _ANSI.sub("", raw.rstrip("\r\n"))
        prefix = _RAY_PREFIX.match(line)
        if (prefix.group("who") if prefix else None) == who:
            yield line[prefix.end():] if prefix else line


def _value(text: str) -> tuple[bool, Any, int]:
    """``(read, value, closers)`` of the text after ``'key': ``: the literal, and how many of the dicts that
    are open it closes (the ``}`` after it); not read when it opens a dict or is cut (a wrapped string)."""
    t = text.rstrip()
    for cut in range(len(t), 0, -1):
        head, tail = t[:cut].rstrip(), t[cut:]
        if tail.strip("}, "):
            break
        if head.endswith(","):
            continue  # "2," would read as the tuple (2,)
        try:
            return True, ast.literal_eval(head), tail.count("}")
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    return False, None, 0


def config_dump(lines: Iterable[str]) -> dict[str, Any] | None:
    """The settings of the first config dump in a console log's lines, as dotted keys; None when there is none.

    Read line by line as pprint lays a nested dict out (a key's column says which dict it is in), not as one
    literal: real logs cut a dump with other output, or lose a line of it, and a lost line then costs its own
    keys only.
    """
    it = iter(lines)
    for raw in it:
        line = _ANSI.sub("", raw.rstrip("\r\n"))
        prefix = _RAY_PREFIX.match(line)
        body = line[prefix.end():] if prefix else line
        if body.startswith(_START):
            break
    else:
        return None
    out: dict[str, Any] = {}
    open_dicts: list[tuple[int, tuple[str, ...]]] = [(1, ())]  # (column of its keys, path)
    rest = itertools.islice(_lines_of(prefix.group("who") if prefix else None, it), MAX_DUMP_LINES)
    for text in itertools.chain([body], rest):
        pos = len(text) - len(text.lstrip(" "))
        pos += text.startswith("{", pos) and not out and len(open_dicts) == 1  # the dump's own opening brace
        while (key := _KEY.match(text, pos)) is not None:
            while open_dicts and open_dicts[-1][0] > pos:
                open_dicts.pop()  # a line of the dump was lost: its dicts ended before this key
            if not open_dicts or open_dicts[-1][0] != pos:
                break
            path = (*open_dicts[-1][1], key.group(1))
            read, value, closers = _value(text[key.end():])
            if read:
                out.update({".".join(path): value} if not isinstance(value, dict) else
                           {f"{'.'.join(path)}.{k}": v for k, v in _dotted(value).items()})
                del open_dicts[len(open_dicts) - min(closers, len(open_dicts)):]
                break
            if not text.startswith("{", key.end()):
                break  # a value cut over lines (a long string): left out
            pos = key.end() + 1
            open_dicts.append((pos, path))
        if not open_dicts:
            return out
    return out or None


def _dotted(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def overrides(config: Mapping[str, Any]) -> dict[str, str]:
    """``key=value`` settings as Hydra overrides spell them; unset (None) values and lists are left out, as an
    unset key reads as its default and no setting the planner reads is a list.

    A dump is the whole config of its version, so a key it lacks is one that version did not have: a reward
    model with no ``use_reward_loop`` ran in the FSDP ``RewardModelWorker`` (veRL before 0102d04e0), not in the
    reward loop the key's current default picks.
    """
    out = {k: str(v) for k, v in config.items() if isinstance(v, (bool, int, float, str))}
    if "reward_model.enable" in config and "reward_model.use_reward_loop" not in config:
        out["reward_model.use_reward_loop"] = "False"
    return out


def overrides_from_log(path: str | Path) -> str:
    """The run's settings as a ``main_ppo`` command line of overrides, for the veRL reader; a one-line
    ``ValueError`` when the file holds no config dump."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            config = config_dump(fh)
    except OSError as err:
        raise ValueError(f"--from_verl_log: {path}: {err.strerror or err}") from None
    if config is None:
        raise ValueError(f"--from_verl_log: {path}: no config dump found (the \"{_START}...}}\" that veRL's "
                         "main_ppo prints at start); pass the command line with --from_verl instead")
    return " ".join(shlex.quote(f"{k}={v}") for k, v in overrides(config).items())
