"""Toy rewards that the tiny model can learn in minutes, and how to combine them.

A reward is any callable ``fn(prompts, responses) -> sequence of floats`` (one score per response), so a
user's function plugs in unchanged (``--reward module:function`` on the command line). The built-in ones
score text the tiny model's vocabulary can produce: sentiment keywords, preferred phrase endings and a
length term; ``mix`` is their weighted sum.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from rlhf_core.runformat.samples import words as _words

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class RewardError(ValueError):
    """A reward callable returned something that is not one number per response."""

POSITIVE_WORDS = frozenset({
    "good", "great", "happy", "wonderful", "excellent", "amazing", "love", "loved", "nice", "fantastic", "best",
    "beautiful", "fun", "delightful", "brilliant", "perfect", "enjoyable", "pleasant", "awesome",
})
NEGATIVE_WORDS = frozenset({
    "bad", "terrible", "sad", "awful", "horrible", "worst", "boring", "poor", "hate", "ugly", "dull",
    "annoying", "disappointing", "broken", "slow", "painful",
})
PREFERRED_ENDINGS = ("thank you.", "have a nice day.", "see you soon.", "and i loved it.", "and it was great.")

def sentiment_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """(#positive − #negative keywords) squashed by tanh into (−1, 1)."""
    out = []
    for text in responses:
        words = _words(text)
        score = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        out.append(math.tanh(score))
    return out


def preference_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1 when the response ends with a preferred phrase, 0.5 when it contains one, else 0."""
    out = []
    for text in responses:
        norm = " ".join(text.lower().split())
        if norm.endswith(PREFERRED_ENDINGS):
            out.append(1.0)
        elif any(e in norm for e in PREFERRED_ENDINGS):
            out.append(0.5)
        else:
            out.append(0.0)
    return out


def length_reward(prompts: Sequence[str], responses: Sequence[str], target_words: int = 8) -> list[float]:
    """1 at ``target_words`` words, falling linearly to −1 at zero or twice the target."""
    return [max(-1.0, 1.0 - 2.0 * abs(len(_words(t)) - target_words) / target_words) for t in responses]


class WeightedSum:
    """Several rewards combined with weights: ``WeightedSum([(sentiment_reward, 1.0), (my_fn, 0.5)])``."""

    def __init__(self, parts: Sequence[tuple[RewardFn, float]]):
        if not parts:
            raise ValueError("WeightedSum needs at least one (reward, weight) pair")
        self.parts = list(parts)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        total = [0.0] * len(responses)
        for fn, weight in self.parts:
            scores = score(fn, prompts, responses)
            total = [t + weight * s for t, s in zip(total, scores)]
        return total


BUILTIN: dict[str, RewardFn] = {
    "sentiment": sentiment_reward,
    "preference": preference_reward,
    "length": length_reward,
    "mix": WeightedSum([(sentiment_reward, 1.0), (preference_reward, 0.5), (length_reward, 0.2)]),
}


def get_reward(name: str) -> RewardFn:
    """A built-in reward by name, or ``module:function`` for any importable callable."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown reward {name!r}; choose from {', '.join(BUILTIN)} or give module:function")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise ValueError(f"{name!r} is not callable")
    return fn


def score(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Call a reward and check its shape; values are floats (NaN/Inf pass through for the runner's guard)."""
    try:
        scores = [float(s) for s in fn(prompts, responses)]
    except (TypeError, ValueError) as err:  # e.g. builtins:max returns the larger list: strings
        raise RewardError(f"reward did not return a sequence of numbers ({err})") from None
    if len(scores) != len(responses):
        raise RewardError(f"reward returned {len(scores)} scores for {len(responses)} responses")
    return scores
