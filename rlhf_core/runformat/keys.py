"""Canonical metric keys of the run format (version 1), shared by every producer and consumer.

Producers map their own names onto these; a source key with no canonical twin is kept as ``src/<name>``.
Torch-free on purpose: the dashboard and the reader import it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FORMAT_VERSION = 1

SOURCES = ("rlhf_core", "trl", "transformers", "openrlhf", "generic", "import", "verl", "tensorboard")
STATUSES = ("running", "finished", "failed", "interrupted")

PHASES = (
    "rollout",
    "reward",
    "ref_logprobs",
    "old_logprobs",
    "values",
    "advantages",
    "update",
    "optimizer",
    # the trainer's new weights into the generation engine's copy (the Ray engine, OpenRLHF, veRL); a runner
    # that samples with the trained model itself has no such phase
    "weight_sync",
    "logging",
)

# Fixed canonical keys. Families with a free suffix are matched by CANONICAL_PREFIXES.
CANONICAL_KEYS = frozenset(
    {
        "loss/total", "loss/policy", "loss/value", "loss/entropy",
        "reward/mean", "reward/std", "reward/min", "reward/max",
        "kl/ref_k1", "kl/ref_k2", "kl/ref_k3", "kl/coef",
        "policy/entropy", "policy/approx_kl", "policy/clipfrac",
        "policy/ratio_mean", "policy/ratio_min", "policy/ratio_max",
        "value/explained_var", "value/clipfrac", "value/mean",
        "adv/mean", "adv/std",
        "grad/norm", "grad/clipped", "grad/max_norm",
        "drift/rel",
        "response/length_mean", "response/eos_rate",
        "time/step",
        "mem/peak_bytes",
        "lr", "throughput/tokens_per_s",
        "epoch", "skipped",
        # rollout vs trainer: the sampler's log-probs of the sampled tokens against the trainer's (docs/adapters.md)
        "rollout/logprob_diff_mean", "rollout/logprob_diff_max",
        "rollout/kl_k1", "rollout/kl_k3",
        "rollout/ratio_min", "rollout/ratio_max",
        "rollout/prob_diff_mean", "rollout/prob_diff_max", "rollout/prob_diff_std", "rollout/prob_corr",
        "rollout/is_weight_min", "rollout/is_weight_mean", "rollout/is_weight_max",
        # the step's batch of completions as text (rlhf_core.runformat.samples.text_stats; docs/design.md "Run format")
        "text/distinct2", "text/identical_frac", "text/repeated_ngram_frac",
    }
)
# Names the text statistics had before they were canonical: runs written then still carry these.
TEXT_KEY_ALIASES = {
    "text/distinct2": "src/text/distinct2",
    "text/identical_frac": "src/text/identical_frac",
    "text/repeated_ngram_frac": "src/text/repeated_ngram_frac",
}
# wait/<phase>, wait/total: seconds a rank waited in collective-bound phases for the last rank (docs/timeline.md)
CANONICAL_PREFIXES = ("grad/layer/", "drift/layer/", "time/", "mem/", "reward/", "src/", "sys/", "eval/", "wait/")

RECORD_FIELDS = ("step", "time", "rank", "nonfinite")

_PHASE_MEM = re.compile(r"^mem/(\w+)_peak_bytes$")


REDUCTIONS = ("mean", "max", "min", "sum")
# How a key's values combine, over a step's minibatches and over ranks. Extremes stay extremes (the run-level
# ratio_max of a DDP run is the largest of its ranks', not their mean); throughput adds up over ranks;
# "skipped" is 1 when any part skipped; everything else is a mean.
_REDUCE_EXACT = {"throughput/tokens_per_s": "sum", "skipped": "max", "mem/peak_bytes": "max"}


def reduction(key: str) -> str:
    """The reduction declared for ``key``: one of :data:`REDUCTIONS`."""
    if key in _REDUCE_EXACT:
        return _REDUCE_EXACT[key]
    if key.endswith(("_max", "/max")) or (key.startswith("mem/") and key.endswith("_peak_bytes")):
        return "max"
    if key.endswith(("_min", "/min")):
        return "min"
    return "mean"


def reduce_values(key: str, values: Sequence[float]) -> float:
    """``values`` of one key combined by its declared reduction (non-empty; NaN propagates)."""
    how = reduction(key)
    if how == "max":
        return max(values, key=lambda v: math.inf if v != v else v)
    if how == "min":
        return min(values, key=lambda v: -math.inf if v != v else v)
    total = math.fsum(values)
    return total if how == "sum" else total / len(values)


def is_canonical(key: str) -> bool:
    """True for a key of the contract (fixed or in a known family)."""
    return key in CANONICAL_KEYS or key in RECORD_FIELDS or key.startswith(CANONICAL_PREFIXES)


def text_value(rec: Mapping[str, Any], key: str) -> Any:
    """``rec[key]`` of a canonical text key, or its pre-canonical ``src/text/...`` name in an older run."""
    if key in rec:
        return rec[key]
    return rec.get(TEXT_KEY_ALIASES.get(key, key))


def phase_time_key(phase: str) -> str:
    return f"time/{phase}"


def phase_mem_key(phase: str) -> str:
    return f"mem/{phase}_peak_bytes"


def phase_of_mem_key(key: str) -> str | None:
    m = _PHASE_MEM.match(key)
    return m.group(1) if m else None


def to_number(value: Any) -> float | None:
    """A plain float from ints, floats, numpy or 0-d torch values; None where it is not numeric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (ValueError, RuntimeError):
            return None
        return float(out) if isinstance(out, (int, float, bool)) else None
    return None


class CumulativeRate:
    """Per-second rate of a cumulative counter (TRL's ``num_tokens``) over the step time since it last grew.

    A counter that grows once per generation batch, with steps in between that only train on it, gives one
    rate per batch instead of a spike and zeros. ``start`` is the count before the first step (None: unknown,
    as in a resumed run, so the first reading only sets the base). A counter that goes down starts over.
    """

    def __init__(self, start: float | None = 0.0):
        self.last = start
        self.seconds = 0.0

    def add_time(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds > 0:
            self.seconds += seconds

    def update(self, count: float) -> float | None:
        """The rate up to this reading of the counter, or None when it did not grow (or has no base yet)."""
        if not math.isfinite(count):
            return None
        rate = None
        if self.last is not None and count > self.last and self.seconds > 0:
            rate = (count - self.last) / self.seconds
        if self.last is None or count != self.last:
            self.last, self.seconds = count, 0.0
        return rate


def sanitize(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split metrics into JSON-safe values and the keys whose values were NaN/Inf.

    Non-finite numbers become ``None`` and their keys are returned, so the writer can list them under
    ``nonfinite`` instead of emitting bare ``NaN`` (invalid JSON for most readers).
    """
    clean: dict[str, Any] = {}
    nonfinite: list[str] = []
    for key, value in metrics.items():
        num = to_number(value)
        if num is None:
            clean[key] = value if isinstance(value, (str, type(None), list, dict)) else str(value)
            continue
        if math.isfinite(num):
            clean[key] = int(num) if isinstance(value, int) and not isinstance(value, bool) else num
        else:
            clean[key] = None
            nonfinite.append(key)
    return clean, nonfinite


def prefixed_unmapped(metrics: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """Apply a source→canonical name mapping; names without a mapping are kept as ``src/<name>``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        out[mapping.get(key, key if key.startswith("src/") else f"src/{key}")] = value
    return out


def unknown_keys(keys: Iterable[str]) -> list[str]:
    return sorted(k for k in keys if not is_canonical(k))
