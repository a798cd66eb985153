"""Samples of a run: a bounded, per-step sample of prompts and completions (``samples.jsonl``).

Reward hacking and pattern collapse show in the text before they show in the scalars, so the producers (the
runner, the TRL callback) keep a few completions per step: the highest and the lowest reward of the batch and
an even spread of the rest, each text cut to a bounded length. Torch-free; ``rlhfkit samples RUN [--step N]``
prints them.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rlhf_core.runformat.run_reader import Run, RunError

SAMPLES_PER_STEP = 4  # completions kept per step
SAMPLE_CHARS = 2000  # characters kept of each prompt and completion
TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")
_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """Lower-case words: the unit of the text signals below and of the runner's toy rewards."""
    return _WORD.findall(text.lower())


def distinct2(texts: Sequence[str]) -> float:
    """Distinct word bigrams / all word bigrams over a batch (0 without any bigram): a policy collapsing onto
    one phrase drives it towards 0, which the reward alone does not show."""
    grams = [tuple(w[i:i + 2]) for w in map(words, texts) for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def identical_frac(texts: Sequence[str]) -> float:
    """Fraction of a batch equal (words only, lower case) to its most common response."""
    norm = [" ".join(words(t)) for t in texts]
    return max(norm.count(n) for n in set(norm)) / len(norm) if norm else 0.0


def pick(rewards: Sequence[float | None], count: int) -> list[int]:
    """Indices of at most ``count`` samples of a batch: the highest and the lowest finite reward first (the
    ones to read when the reward goes wrong), then evenly spread over the rest, in batch order."""
    n = len(rewards)
    if count <= 0 or n == 0:
        return []
    if n <= count:
        return list(range(n))
    finite = {i: r for i, r in enumerate(rewards) if isinstance(r, (int, float)) and math.isfinite(r)}
    chosen: list[int] = []
    if finite:
        chosen.append(max(finite, key=finite.__getitem__))
        low = min(finite, key=finite.__getitem__)
        if low not in chosen and count > 1:
            chosen.append(low)
    rest = [i for i in range(n) if i not in chosen]
    need = count - len(chosen)
    if need > 0 and rest:
        step = len(rest) / need
        chosen += [rest[int(k * step)] for k in range(need)]
    return sorted(chosen)


def clip_text(text: Any, max_chars: int) -> tuple[str, bool]:
    """``text`` as a string of at most ``max_chars`` characters (a note says how much was cut)."""
    text = text_of(text)
    if max_chars <= 0 or len(text) <= max_chars:
        return text, False
    return text[:max_chars] + f" …[+{len(text) - max_chars} chars]", True


def text_of(value: Any) -> str:
    """A prompt or completion as text: a string as is, a chat (list of ``{"role", "content"}``) one line per
    message as ``role: content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content", "")
        return f"{value.get('role', '')}: {text_of(content)}" if "role" in value else text_of(content)
    if isinstance(value, (list, tuple)):
        return "\n".join(text_of(v) for v in value)
    return "" if value is None else str(value)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return value
    return float(value) if math.isfinite(value) else None


def sample_records(step: int, samples: Sequence[Mapping[str, Any]], count: int = SAMPLES_PER_STEP,
                   max_chars: int = SAMPLE_CHARS) -> list[dict[str, Any]]:
    """The records to write for one step: ``samples`` (dicts with ``prompt``, ``completion`` or ``chosen`` /
    ``rejected``, ``reward``, ``rewards`` (its components), ``kl``, ``length``, any other scalars) picked by
    :func:`pick` and cut to ``max_chars``. Non-finite numbers become null (listed in ``nonfinite``)."""
    out = []
    for i in pick([s.get("reward") for s in samples], count):
        src = samples[i]
        rec: dict[str, Any] = {"step": int(step), "index": i}
        cut, nonfinite = [], []
        for key, value in src.items():
            if key in TEXT_FIELDS:
                rec[key], was_cut = clip_text(value, max_chars)
                if was_cut:
                    cut.append(key)
            elif key == "rewards" and isinstance(value, Mapping):
                rec[key] = {str(k): _number(v) for k, v in value.items()}
                nonfinite += [f"rewards/{k}" for k, v in value.items() if _number(v) is None and v is not None]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                rec[key] = _number(value)
                if rec[key] is None:
                    nonfinite.append(key)
            elif isinstance(value, (str, bool)) or value is None:
                rec[key] = value
        if cut:
            rec["truncated"] = cut
        if nonfinite:
            rec["nonfinite"] = nonfinite
        out.append(rec)
    return out


def repeated_ngram_frac(texts: Iterable[str], n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same completion (0 without any): a
    completion looping on one phrase drives it towards 1."""
    total = repeats = 0
    for text in texts:
        words = text.lower().split()
        seen: set[tuple[str, ...]] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            total += 1
            if gram in seen:
                repeats += 1
            seen.add(gram)
    return repeats / total if total else 0.0


def text_stats(texts: Sequence[str]) -> dict[str, float]:
    """The batch's text-level signals under their canonical keys: pattern collapse and reward hacking show as
    repeated phrases and identical completions before the scalars move."""
    return {"text/distinct2": distinct2(texts), "text/identical_frac": identical_frac(texts),
            "text/repeated_ngram_frac": repeated_ngram_frac(texts)}


def format_samples(records: Sequence[Mapping[str, Any]], width: int = 100) -> str:
    """Samples as terminal text, grouped by step."""
    lines: list[str] = []
    last_step = None
    for rec in records:
        if rec.get("step") != last_step:
            last_step = rec.get("step")
            lines.append(f"=== step {last_step} " + "=" * max(0, width - 12 - len(str(last_step))))
        facts = [f"#{rec.get('index', '?')}"]
        for key in ("reward", "kl", "length"):
            if rec.get(key) is not None:
                facts.append(f"{key} {rec[key]:.4g}" if isinstance(rec[key], float) else f"{key} {rec[key]}")
        parts = rec.get("rewards") if isinstance(rec.get("rewards"), Mapping) else {}
        if parts:
            facts.append("(" + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in parts.items()) + ")")
        lines.append("  ".join(facts))
        for key in TEXT_FIELDS:
            if rec.get(key):
                text = str(rec[key]).replace("\n", "\n      ")
                lines.append(f"  {key}: {text}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """``rlhfkit samples RUN [--step N]``: the completions a run kept, latest step by default."""
    p = argparse.ArgumentParser(prog="rlhfkit samples", description="Print the samples a run kept (samples.jsonl).")
    p.add_argument("run", help="run directory")
    p.add_argument("--step", type=int, default=None, help="this step (default: the latest step with samples)")
    p.add_argument("--all", action="store_true", help="every step")
    args = p.parse_args(argv)
    try:
        run = Run(args.run)
        records = run.samples()
    except RunError as err:
        print(f"rlhfkit samples: {err}", file=sys.stderr)
        return 2
    if not records:
        print(f"rlhfkit samples: {args.run} has no samples (samples.jsonl is missing or empty)", file=sys.stderr)
        return 1
    steps = sorted({r["step"] for r in records if isinstance(r.get("step"), int)})
    if args.step is not None and args.step not in steps:
        near = ", ".join(map(str, steps[-5:]))
        print(f"rlhfkit samples: no samples at step {args.step} (steps with samples: ... {near})", file=sys.stderr)
        return 1
    if not args.all:
        wanted = args.step if args.step is not None else steps[-1]
        records = [r for r in records if r.get("step") == wanted]
    sys.stdout.write(format_samples(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
