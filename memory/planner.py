"""Fit an RLHF step into a memory budget: the largest batches that fit, and ranked ways to save memory.

Every suggestion is a changed :class:`~memory.estimator.StepSpec`; its saving is the estimator's predicted peak
before minus after, so the ranking is as good as the estimator (see docs/memory.md for where it was checked
against measurement). Suggestions the thin runner can apply carry the flag that applies them.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .estimator import COMPONENTS, PHASES, Prediction, StepSpec, predict

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_BATCH = 1 << 16
# What a GPU really holds, by the name people type: the totals NVML (nvidia-smi) reports, in MiB, from Modal's table
# (thundergolfer.com/blog/nvidia-gpu-memory-capacity), not the marketing size: an "80 GB" H100 holds 79.65 GiB
# (85.5e9 bytes), an "80 GB" A100 80 GiB; "80GB" read as 80e9 bytes is 74.5 GiB. The China-market parts, from
# nvidia-smi output: H800 as H100 (81559 MiB), H20 97871 MiB, A800 80GB as A100 80GB; A40 as L40S, RTX 4090
# 24564 MiB.
GPU_MEMORY_MIB = {"H200": 143_771, "H100": 81_559, "H800": 81_559, "H20": 97_871, "A100-80GB": 81_920,
                  "A800-80GB": 81_920, "A100-40GB": 40_960, "L40S": 46_068, "A40": 46_068, "A10": 23_028,
                  "L4": 23_034, "RTX-4090": 24_564, "T4": 15_360}


def parse_bytes(text: str) -> int:
    """'16GiB', '500 MB', '1e9', or a GPU name ('H100', 'A100-40GB': what NVML reports) → bytes; a clear
    ValueError otherwise."""
    gpu = re.sub(r"[\s_]+", "-", str(text).strip().upper())
    gpu = gpu + "B" if gpu.endswith("0G") else gpu
    if gpu in GPU_MEMORY_MIB:
        return GPU_MEMORY_MIB[gpu] * 2**20
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size (examples: 16GiB, 512MiB, 8GB, 1e9, or a GPU: "
                         f"{', '.join(GPU_MEMORY_MIB)})")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size must be positive; got {text!r}")
    return int(value)


def human(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


@dataclass
class Suggestion:
    name: str
    saving_bytes: int
    new_peak_bytes: int
    flag: str | None          # how to apply it with the thin runner; None where the runner has no switch
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "saving_bytes": self.saving_bytes, "new_peak_bytes": self.new_peak_bytes,
                "flag": self.flag, "note": self.note}


@dataclass
class Plan:
    spec: StepSpec
    budget_bytes: int
    prediction: Prediction
    max_train_batch: int      # 0: not even one sequence fits
    max_rollout_batch: int
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.prediction.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "fits": self.fits, "max_train_batch": self.max_train_batch,
                "max_rollout_batch": self.max_rollout_batch,
                "suggestions": [s.to_dict() for s in self.suggestions]}


def largest_fitting(fits: Callable[[int], bool], hi: int = MAX_BATCH) -> int:
    """Largest n in [1, hi] with fits(n), by bisection (fits is monotone: memory grows with n); 0 when none does."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _largest_batch(spec: StepSpec, budget: int, knob: str, phase: str) -> int:
    """Largest value of the batch ``knob`` whose ``phase`` fits ``budget`` (other knobs unchanged; the step's
    batch grows with it where needed)."""
    def fits(n: int) -> bool:
        s = spec.with_(batch_size=max(spec.batch_size, n), **{knob: n})
        return predict(s).phases[phase]["total"] <= budget
    return largest_fitting(fits)


def largest_train_batch(spec: StepSpec, budget: int) -> int:
    """Largest train micro-batch whose update phase fits ``budget`` (other knobs unchanged)."""
    return _largest_batch(spec, budget, "train_batch_size", "update")


def largest_rollout_batch(spec: StepSpec, budget: int) -> int:
    """Largest generation batch whose rollout phase fits ``budget``."""
    return _largest_batch(spec, budget, "rollout_batch_size", "rollout")


def _candidates(spec: StepSpec, budget: int) -> list[tuple[str, StepSpec, str | None, str]]:
    out: list[tuple[str, StepSpec, str | None, str]] = []
    if not spec.gradient_checkpointing:
        out.append(("gradient checkpointing", spec.with_(gradient_checkpointing=True), "--gradient_checkpointing",
                     "recompute block activations in backward (~30% more update compute)"))
    if spec.dtype == "fp32":
        out.append(("bf16 weights and activations", spec.with_(dtype="bf16"), "--dtype bf16",
                     "halves weights, gradients, optimizer state and activations"))
    if spec.reference and not spec.share_reference and spec.ref_device == "same":
        note = "frozen reference on the CPU: scoring gets slower"
        if spec.device == "cpu":
            note += "; no saving when training on the CPU itself"
        out.append(("reference model on CPU (offload)", spec.with_(ref_device="cpu"), "--ref_device cpu", note))
    if spec.reward_model and spec.reward_device == "same":
        out.append(("reward model on CPU (offload)", spec.with_(reward_device="cpu"), None,
                     "the thin runner scores with toy reward functions; applies to TRL/OpenRLHF setups"))
    if spec.reference and spec.policy_training == "full":
        out.append(("LoRA policy sharing its base with the reference",
                     spec.with_(policy_training="lora", share_reference=True), None,
                     "trains adapters only; the reference is the base with adapters disabled (TRL/peft)"))
    assert spec.rollout_batch_size is not None and spec.train_batch_size is not None  # set by __post_init__
    if spec.rollout_batch_size > 1:
        half = max(1, spec.rollout_batch_size // 2)
        fit = largest_rollout_batch(spec, budget)
        n = min(half, fit) if fit else half
        out.append((f"smaller generation batch ({n})", spec.with_(rollout_batch_size=n), f"--rollout_batch_size {n}",
                     "caps the KV cache; more generate calls per step"))
    if spec.logprob_impl == "torch":
        impl = "triton" if spec.device == "cuda" else "chunked"
        out.append((f"{impl} log-prob computation", spec.with_(logprob_impl=impl), f"--logprob_impl {impl}",
                     "no full b·s·V logits/log-softmax (memory.logprobs)"))
    if spec.train_batch_size > 1:
        n = max(1, spec.train_batch_size // 2)
        out.append((f"smaller train micro-batch ({n})", spec.with_(train_batch_size=n), f"--mini_batch_size {n}",
                     "activations and logits scale with the micro-batch"))
    if spec.optimizer in ("adamw", "adam"):
        out.append(("8-bit Adam state", spec.with_(optimizer="adam8bit"), None,
                     "bitsandbytes AdamW8bit; not a runner flag"))
    return out


def plan(spec: StepSpec, budget_bytes: int) -> Plan:
    """Prediction, largest batches that fit, and suggestions ranked by predicted saving of the peak."""
    if budget_bytes <= 0:
        raise ValueError(f"budget must be positive; got {budget_bytes}")
    base = predict(spec)
    suggestions = []
    for name, new, flag, note in _candidates(spec, budget_bytes):
        after = predict(new).peak_bytes
        suggestions.append(Suggestion(name, base.peak_bytes - after, after, flag, note))
    suggestions.sort(key=lambda s: s.saving_bytes, reverse=True)
    return Plan(spec, budget_bytes, base, largest_train_batch(spec, budget_bytes),
                largest_rollout_batch(spec, budget_bytes), suggestions)


def table(pred: Prediction) -> str:
    """Component × phase table of a prediction, in human units."""
    width = max(len(c) for c in COMPONENTS + ("total",))
    head = f"{'component':<{width}}" + "".join(f"{ph:>14}" for ph in PHASES)
    lines = [head, "-" * len(head)]
    for comp in COMPONENTS + ("total",):
        lines.append(f"{comp:<{width}}" + "".join(f"{human(pred.phases[ph][comp]):>14}" for ph in PHASES))
    lines.append(f"peak: {human(pred.peak_bytes)} in {pred.peak_phase}")
    return "\n".join(lines)


def render(p: Plan) -> str:
    lines = [table(p.prediction), "",
             f"budget {human(p.budget_bytes)}: {'fits' if p.fits else 'DOES NOT FIT'} "
             f"(peak {human(p.prediction.peak_bytes)})",
             "largest train micro-batch that fits: "
             f"{p.max_train_batch or 'none (weights and optimizer alone exceed it)'}",
             f"largest rollout (generation) batch that fits: {p.max_rollout_batch or 'none'}", "",
             "suggestions (ranked by predicted saving of the peak):"]
    for i, s in enumerate(p.suggestions, 1):
        flag = s.flag or "(no runner flag)"
        lines.append(f"{i:>2}. {s.name:<48} saves {human(s.saving_bytes):>11} -> peak {human(s.new_peak_bytes):>11}"
                     f"  {flag}  [{s.note}]")
    return "\n".join(lines)
