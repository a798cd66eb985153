"""Per-step text statistics and the held-out reward the corpus producers log next to the optimised one.

Torch-free and tiny on purpose: every producer (the runner, TRL reward functions, the REINFORCE loop) calls
the same functions, so a run's ``text/*`` and held-out reward mean the same thing whichever trainer wrote it.
"""
from __future__ import annotations

from collections.abc import Sequence

from rlhf_core.runformat.samples import distinct2, identical_frac
from rlhf_core.runformat.samples import words as _words
from rlhf_core.train.rewards import BUILTIN, RewardFn

DISTINCT2_KEY = "text/distinct2"        # canonical (rlhf_core.runformat.keys); src/text/distinct2 in older runs
IDENTICAL_KEY = "text/identical_frac"   # canonical; src/text/identical_frac in older runs


def text_stats(texts: Sequence[str]) -> dict[str, float]:
    return {DISTINCT2_KEY: distinct2(texts), IDENTICAL_KEY: identical_frac(texts)}


def word_variety_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Held-out reward: distinct words / words of each response (0 for an empty one).

    It stands in for a "quality" judge that is never optimised: a policy that games a keyword reward by
    repeating the keyword loses variety, so this falls while the optimised reward rises (reward hacking)."""
    out = []
    for text in responses:
        words = _words(text)
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out


def reward_fn(name: str) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    if name == "word_variety":
        return word_variety_reward
    raise ValueError(f"unknown corpus reward {name!r}")
