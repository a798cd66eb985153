"""Outcome labels of a corpus run, computed from the whole run after the fact and independent of the kit's
rules (the criteria and why each threshold: docs/corpus.md).

A run is *unstable* when at least one criterion holds at some step, else *healthy*; each outcome records its
kind and the first step where its criterion holds, and the run's outcome step is the earliest of them.
Torch-free: the labels are pure functions of the records, so tests feed them hand-made series.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf_core.runformat.keys import TEXT_KEY_ALIASES

from .grid import DEV_SEEDS, SEEDS, SPIKE_CHECKS

# --- the criteria (docs/corpus.md explains each number)
KL_LIMIT = 1.0             # nats per token: KL(π‖π_ref) estimate above this
KL_KEYS = ("kl/ref_k3", "kl/ref_k1", "src/probe/kl_exact")  # first one the run logs is used
ENTROPY_FRACTION = 0.5     # policy entropy below this fraction of its start (median of the first 3 steps)
ENTROPY_START_STEPS = 3
HACK_WINDOW = 5            # steps averaged at the start and trailing each step
HACK_REWARD_GAIN = 0.25    # optimised reward up by at least this (our rewards lie in [-1, 1])...
HACK_HELDOUT_DROP = 0.15   # ...while the held-out reward (in [0, 1]) is down by at least this
HELDOUT_KEYS = ("reward/heldout", "reward/heldout/mean")
IDENTICAL_LIMIT = 0.5      # at least half the batch is one and the same response...
DISTINCT2_LIMIT = 0.25     # ...or at most a quarter of the batch's word bigrams are distinct
IDENTICAL_KEY, DISTINCT2_KEY = "text/identical_frac", "text/distinct2"  # or their old src/text/ names
NONFINITE_SKIP = ("time/", "mem/", "sys/", "throughput/")  # clocks and memory are not training values

KINDS = ("nonfinite", "kl", "entropy", "reward_hacking", "text_collapse")


@dataclass(frozen=True)
class Outcome:
    kind: str
    step: int
    value: float
    threshold: float
    detail: str = ""


def _num(rec: Mapping[str, Any], key: str) -> float | None:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that hold a finite ``key``."""
    out = []
    for rec in records:
        v = _num(rec, key)
        if v is not None and math.isfinite(v):
            out.append((int(rec["step"]), v))
    return out


def nonfinite_outcome(records: Sequence[Mapping[str, Any]]) -> Outcome | None:
    """First step with a NaN/Inf training value (listed by the writer under ``nonfinite`` or read back as NaN)."""
    for rec in records:
        bad = [k for k in rec.get("nonfinite") or [] if not k.startswith(NONFINITE_SKIP)]
        bad += [k for k, v in rec.items() if k not in bad and not k.startswith(NONFINITE_SKIP)
                and isinstance(v, float) and not math.isfinite(v)]
        if bad:
            return Outcome("nonfinite", int(rec["step"]), math.nan, math.nan, ",".join(sorted(bad)[:5]))
    return None


def kl_key(records: Sequence[Mapping[str, Any]]) -> str | None:
    for key in KL_KEYS:
        if any(_num(r, key) is not None for r in records):
            return key
    return None


def kl_outcome(records: Sequence[Mapping[str, Any]], limit: float = KL_LIMIT) -> Outcome | None:
    """First step whose per-token KL to the reference exceeds ``limit`` nats."""
    key = kl_key(records)
    for step, v in _series(records, key) if key else []:
        if v > limit:
            return Outcome("kl", step, v, limit, key)
    return None


def entropy_outcome(records: Sequence[Mapping[str, Any]], fraction: float = ENTROPY_FRACTION) -> Outcome | None:
    """First step whose policy entropy is below ``fraction`` of its start (median of the first 3 values)."""
    s = _series(records, "policy/entropy")
    if len(s) < ENTROPY_START_STEPS:
        return None
    start = sorted(v for _, v in s[:ENTROPY_START_STEPS])[ENTROPY_START_STEPS // 2]
    for step, v in s:
        if start > 0 and v < fraction * start:
            return Outcome("entropy", step, v, fraction * start, f"start {start:.4g}")
    return None


def hacking_outcome(records: Sequence[Mapping[str, Any]], window: int = HACK_WINDOW) -> Outcome | None:
    """First step where the trailing mean of the optimised reward is ``HACK_REWARD_GAIN`` above its start
    while the held-out reward's is ``HACK_HELDOUT_DROP`` below its own (start = mean of the first ``window``)."""
    key = next((k for k in HELDOUT_KEYS if any(_num(r, k) is not None for r in records)), None)
    if key is None:
        return None
    pairs = [(int(r["step"]), _num(r, "reward/mean"), _num(r, key)) for r in records]
    pairs = [(s, a, b) for s, a, b in pairs
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2 * window:
        return None
    r0 = sum(a for _, a, _ in pairs[:window]) / window
    h0 = sum(b for _, _, b in pairs[:window]) / window
    for i in range(2 * window - 1, len(pairs)):
        tail = pairs[i - window + 1: i + 1]
        gain = sum(a for _, a, _ in tail) / window - r0
        drop = h0 - sum(b for _, _, b in tail) / window
        if gain >= HACK_REWARD_GAIN and drop >= HACK_HELDOUT_DROP:
            return Outcome("reward_hacking", pairs[i][0], drop, HACK_HELDOUT_DROP,
                           f"reward +{gain:.3g}, {key} -{drop:.3g}")
    return None


def _text_key(rec: Mapping[str, Any], key: str) -> str:
    """The name ``rec`` holds a text statistic under: canonical, or ``src/text/...`` in a run written before
    the key was canonical (the committed corpus), so both label the same."""
    return key if key in rec else TEXT_KEY_ALIASES.get(key, key)


def text_outcome(records: Sequence[Mapping[str, Any]]) -> Outcome | None:
    """First step where the batch's completions are near-identical (see the two limits above)."""
    for rec in records:
        same_key, d2_key = _text_key(rec, IDENTICAL_KEY), _text_key(rec, DISTINCT2_KEY)
        same, d2 = _num(rec, same_key), _num(rec, d2_key)
        if same is not None and same >= IDENTICAL_LIMIT:
            return Outcome("text_collapse", int(rec["step"]), same, IDENTICAL_LIMIT, same_key)
        if d2 is not None and d2 <= DISTINCT2_LIMIT:
            return Outcome("text_collapse", int(rec["step"]), d2, DISTINCT2_LIMIT, d2_key)
    return None


def outcomes(records: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    """Every criterion that holds somewhere in the run, earliest first."""
    found = [f(records) for f in (nonfinite_outcome, kl_outcome, entropy_outcome, hacking_outcome, text_outcome)]
    return sorted((o for o in found if o is not None), key=lambda o: (o.step, KINDS.index(o.kind)))


def label_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``label`` (healthy/unstable), the outcomes and the run's outcome step (earliest outcome, or None)."""
    found = outcomes(records)
    return {"label": "unstable" if found else "healthy",
            "outcome_step": found[0].step if found else None,
            "outcome_kinds": [o.kind for o in found],
            "outcomes": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in asdict(o).items()} for o in found],
            "kl_key": kl_key(records)}


def _generation(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """How the runs were made: one entry per generation batch (a full ``make corpus`` starts the list over;
    a batch limited by ``--only`` or ``--seeds`` adds to it)."""
    if new is None:
        return dict(old) if old else None
    partial = new.get("only") is not None or new.get("seeds") is not None
    batches = list((old or {}).get("batches", [])) if partial else []
    batches.append(dict(new))
    return {"batches": batches, "wall_s_total": round(sum(b.get("wall_s", 0.0) for b in batches), 1)}


def _splits(spike_check: str | None = None) -> dict[str, str]:
    """Which seeds form each split (grid.py), as labels.json states it."""
    if spike_check is not None:
        seeds = SPIKE_CHECKS[spike_check]
        return {spike_check: f"seeds {seeds[0]}-{seeds[-1]}, runner settings only (not for tuning)"}
    dev = [s for s in SEEDS if s in DEV_SEEDS]
    held = [s for s in SEEDS if s not in DEV_SEEDS]
    return {"dev": "seeds " + ", ".join(map(str, dev)),
            "heldout": "seeds " + ", ".join(map(str, held)) + " (not for tuning)"}


def write_labels(runs_dir: Path, specs: Iterable[Mapping[str, Any]], generation: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Label every run of ``specs`` present under ``runs_dir`` and write ``runs_dir/labels.json``."""
    from rlhf_core.runformat.run_reader import Run

    path = runs_dir / "labels.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    runs: dict[str, Any] = {}
    specs = list(specs)
    for spec in specs:
        run_dir = runs_dir / spec["name"]
        if not (run_dir / "meta.json").exists():
            continue
        run = Run(run_dir)
        records = list(run.metrics())
        entry = {k: spec[k] for k in ("trainer", "setting", "intent", "seed", "split", "lr", "kl", "reward")}
        entry.update(steps_planned=spec["steps"], steps_logged=len(records), status=run.status)
        entry.update(label_records(records))
        runs[spec["name"]] = entry
    payload = {
        "criteria": {"kl_limit_nats_per_token": KL_LIMIT, "kl_keys": list(KL_KEYS),
                     "entropy_fraction": ENTROPY_FRACTION, "entropy_start_steps": ENTROPY_START_STEPS,
                     "hack_window": HACK_WINDOW, "hack_reward_gain": HACK_REWARD_GAIN,
                     "hack_heldout_drop": HACK_HELDOUT_DROP, "heldout_keys": list(HELDOUT_KEYS),
                     "identical_limit": IDENTICAL_LIMIT, "distinct2_limit": DISTINCT2_LIMIT,
                     "doc": "docs/corpus.md"},
        "splits": _splits(next((c for c in SPIKE_CHECKS if specs and all(s["split"] == c for s in specs)), None)),
        "generation": _generation(old.get("generation"), generation),
        "runs": runs,
    }
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return payload
