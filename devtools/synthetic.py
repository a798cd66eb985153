"""Synthetic PPO-like runs with one planted fault each: the ground truth for the detector tests, the
benchmark and demos (``python -m devtools.synthetic OUT_DIR FAULT`` writes a run directory).

The healthy series follow what a sane RLHF run looks like: KL to the reference rising slowly, a noisy reward
that grows like sqrt(KL) (Gao et al. 2022), stable length, slowly falling entropy, PPO ratios near 1, a
critic that learns, block drifts growing like sqrt(step). Records are written the way the runner writes
them (``step`` plus canonical keys; NaN/Inf become ``None`` listed under ``nonfinite``).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from rlhf_core.runformat.keys import sanitize

BLOCKS = {"wte": 0.6, "wpe": 0.8, "h.0": 1.0, "h.1": 1.2, "h.2": 0.9, "h.3": 1.1, "ln_f": 1.5}
PHASE_TIMES = {"rollout": 0.30, "reward": 0.02, "ref_logprobs": 0.05, "old_logprobs": 0.05, "values": 0.04,
               "advantages": 0.005, "update": 0.25, "logging": 0.01}


def healthy_arrays(n: int = 600, seed: int = 0) -> dict[str, np.ndarray]:
    """Column arrays of a healthy run of ``n`` steps (step = index)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    noise = lambda scale: scale * rng.standard_normal(n)  # noqa: E731
    kl_clean = 0.002 + 4e-5 * t
    kl3 = kl_clean * (1 + noise(0.05))
    policy_loss = noise(0.02)
    value_loss = 0.1 * np.exp(-t / 300) + 0.02 + noise(0.005)
    cols = {
        "kl/ref_k3": kl3,
        "kl/ref_k1": kl3 * (1 + noise(0.1)),
        "kl/coef": np.full(n, 0.05),
        "reward/mean": 0.1 + 7.8 * (np.sqrt(kl_clean) - np.sqrt(0.002)) + noise(0.05),
        "reward/std": 0.3 + noise(0.02),
        "response/length_mean": 40 + noise(1.5),
        "response/eos_rate": np.clip(0.9 + noise(0.02), 0, 1),
        "policy/entropy": 2.5 - 0.0005 * t + noise(0.02),
        "policy/ratio_mean": 1 + noise(0.01),
        "policy/ratio_min": 0.75 + noise(0.03),
        "policy/ratio_max": 1.35 + noise(0.05),
        "policy/clipfrac": np.clip(0.08 + noise(0.02), 0, 1),
        "policy/approx_kl": np.abs(0.002 + noise(0.0005)),
        "value/explained_var": 0.1 + 0.6 * (1 - np.exp(-t / 150)) + noise(0.05),
        "grad/norm": 0.8 * np.exp(noise(0.1)),
        "grad/max_norm": np.full(n, 1.0),
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "loss/total": policy_loss + 0.5 * value_loss,
        "lr": np.full(n, 1e-5),
    }
    drifts = []
    for block, factor in BLOCKS.items():
        cols[f"drift/layer/{block}"] = 1e-3 * np.sqrt(t + 1) * factor * (1 + noise(0.01))
        drifts.append(cols[f"drift/layer/{block}"])
    cols["drift/rel"] = np.mean(drifts, axis=0)
    for phase, seconds in PHASE_TIMES.items():
        cols[f"time/{phase}"] = seconds * np.exp(noise(0.05))
    cols["time/step"] = np.sum([cols[f"time/{p}"] for p in PHASE_TIMES], axis=0)
    return cols


def _growth(n_after: int, rate: float, cap: int) -> np.ndarray:
    return rate ** np.minimum(np.arange(n_after), cap)


def _nonfinite(c, at):
    c["loss/total"][at] = np.nan


def _grad_spike(c, at):
    # a 10x norm that clipping (max_grad_norm 1) capped, after which the policy moved: the next step's KL is 3x
    # (one step, so kl_explosion stays silent); a clipped spike with no consequence is only a note
    c["grad/norm"][at] *= 10
    for key in ("kl/ref_k3", "kl/ref_k1"):
        c[key][at + 1] *= 3


def _loss_spike(c, at):
    # a loss spike the update felt as a gradient spike (one it did not is only a note); the norm is clipped
    # (max_grad_norm 1), so it is a warning only with a consequence: the next step's KL is 3x, as for grad_spike
    c["loss/total"][at] += 3.0
    c["grad/norm"][at] *= 6
    for key in ("kl/ref_k3", "kl/ref_k1"):
        c[key][at + 1] *= 3


def _grad_explosion(c, at):
    c["grad/norm"][at:] *= _growth(len(c["grad/norm"]) - at, 1.15, 40)


def _grad_clipping(c, at):
    c["grad/norm"][at:] *= 1.6


def _kl_explosion(c, at):
    for key in ("kl/ref_k3", "kl/ref_k1"):
        c[key][at:] = c[key][at:] * _growth(len(c[key]) - at, 1.15, 40)


def _negative_kl(c, at):
    c["kl/ref_k1"][at:at + 10] = -0.05


def _collapse_unrewarded(c, at):
    """The harmful kind: the exploration lost buys nothing, the reward falls back to where it started (a policy
    that sharpens on what it is rewarded for loses entropy too, but its reward rises: a note, not a fault)."""
    start = c["reward/mean"][:3].mean()
    c["reward/mean"][at:] = start + (c["reward/mean"][at:] - c["reward/mean"][at:].mean()) * 0.5


def _entropy_collapse_early(c, at):
    c["policy/entropy"][at:] *= 0.4
    _collapse_unrewarded(c, at)


def _entropy_collapse(c, at):
    c["policy/entropy"][at:] = 0.05 * c["policy/entropy"][:5].mean()
    _collapse_unrewarded(c, at)


def _ppo_ratio(c, at):
    c["policy/ratio_mean"][at:at + 5] = 1.25  # sustained: one odd batch is common in healthy runs


def _ppo_ratio_extreme(c, at):
    # sustained, beyond the single-token outliers of healthy runs, and with the bulk of the batch past the clip
    # (clip fraction over 0.3): extremes on a few tail tokens under a normal clip fraction are only a note
    c["policy/ratio_max"][at:at + 6] = 8.0
    c["policy/clipfrac"][at:at + 6] = 0.45


def _clipfrac(c, at):
    c["policy/clipfrac"][at:at + 20] = 0.45


def _critic(c, at):
    c["value/explained_var"][at:at + 40] = -1.0


def _reward_hacking_length(c, at):
    grow = 0.3 * np.arange(len(c["response/length_mean"]) - at)
    c["response/length_mean"][at:] += grow
    c["reward/mean"][at:] += 0.015 * grow


def _reward_hacking_kl(c, at):
    level = c["reward/mean"][at - 20:at].mean()
    c["reward/mean"][at:] = level + (c["reward/mean"][at:] - c["reward/mean"][at:].mean()) * 0.5
    for key in ("kl/ref_k3", "kl/ref_k1"):
        c[key][at:] = c[key][at:] * _growth(len(c[key]) - at, 1.05, 100)


def _pattern_collapse(c, at):
    k = len(c["reward/mean"]) - at
    for key in ("kl/ref_k3", "kl/ref_k1"):
        c[key][at:] = c[key][at:] * _growth(k, 1.08, 60)
    c["reward/mean"][at:] += 0.02 * np.arange(k)
    c["response/length_mean"][at:] *= _growth(k, 1.01, 60)


def _layer_drift(c, at):
    c["drift/layer/h.2"][at:] *= 20


# fault name -> (how to plant it, the rule that must fire, its severity, how late it may fire)
FAULTS: dict[str, tuple[Callable[[dict[str, np.ndarray], int], None], str, str, int]] = {
    "nonfinite": (_nonfinite, "nonfinite", "critical", 0),
    "grad_spike": (_grad_spike, "grad_spike", "warning", 0),
    "loss_spike": (_loss_spike, "loss_spike", "warning", 0),
    "grad_explosion": (_grad_explosion, "grad_explosion", "warning", 30),
    "grad_clipping": (_grad_clipping, "grad_clipping", "info", 50),
    "kl_explosion": (_kl_explosion, "kl_explosion", "warning", 50),
    "negative_kl": (_negative_kl, "negative_kl", "warning", 3),
    "entropy_collapse_early": (_entropy_collapse_early, "entropy_collapse", "warning", 3),
    "entropy_collapse": (_entropy_collapse, "entropy_collapse", "critical", 3),
    "ppo_ratio": (_ppo_ratio, "ppo_ratio", "warning", 3),
    "ppo_ratio_extreme": (_ppo_ratio_extreme, "ppo_ratio_extreme", "critical", 4),
    "clipfrac": (_clipfrac, "clipfrac", "warning", 10),
    "critic": (_critic, "critic", "warning", 20),
    "reward_hacking_length": (_reward_hacking_length, "reward_hacking_length", "warning", 100),
    "reward_hacking_kl": (_reward_hacking_kl, "reward_hacking_kl", "warning", 100),
    "pattern_collapse": (_pattern_collapse, "pattern_collapse", "warning", 50),
    "layer_drift": (_layer_drift, "layer_drift", "warning", 3),
}


def to_records(cols: dict[str, np.ndarray], start_step: int = 0) -> list[dict[str, Any]]:
    """Runner-style records: ``step`` plus the columns, non-finite values as None listed in ``nonfinite``."""
    keys = list(cols)
    matrix = np.column_stack([cols[k] for k in keys]).tolist()
    out = []
    for i, row in enumerate(matrix):
        clean, nonfinite = sanitize(dict(zip(keys, row)))
        rec: dict[str, Any] = {"step": start_step + i, **clean}
        if nonfinite:
            rec["nonfinite"] = nonfinite
        out.append(rec)
    return out


def healthy_series(n: int = 600, seed: int = 0) -> list[dict[str, Any]]:
    return to_records(healthy_arrays(n, seed))


def planted_series(fault: str, n: int = 600, at: int = 300, seed: int = 0) -> list[dict[str, Any]]:
    """A healthy run with one fault planted from step ``at`` (see :data:`FAULTS`)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    cols = healthy_arrays(n, seed)
    FAULTS[fault][0](cols, at)
    return to_records(cols)


def rank_timings(n: int = 60, world_size: int = 4, seed: int = 0, slow_rank: int | None = None,
                 phase: str = "update", at: int = 30, factor: float = 2.0) -> dict[int, list[dict[str, Any]]]:
    """Per-rank timing records; ``slow_rank`` takes ``factor`` x longer in ``phase`` from step ``at``."""
    out = {}
    for rank in range(world_size):
        cols = {k: v for k, v in healthy_arrays(n, seed * 100 + rank).items() if k.startswith("time/")}
        if rank == slow_rank:
            extra = cols[f"time/{phase}"][at:] * (factor - 1)
            cols[f"time/{phase}"][at:] += extra
            cols["time/step"][at:] += extra
        recs = to_records(cols)
        for rec in recs:
            rec["rank"] = rank
        out[rank] = recs
    return out


def main(argv: list[str]) -> int:
    """Write a synthetic run directory: ``OUT_DIR [FAULT|healthy] [STEPS]``."""
    from rlhf_core.runformat.run_writer import RunWriter

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m devtools.synthetic OUT_DIR [healthy|{'|'.join(FAULTS)}] [STEPS]")
        return 0 if argv else 2
    fault = argv[1] if len(argv) > 1 else "healthy"
    n = int(argv[2]) if len(argv) > 2 else 600
    try:
        recs = healthy_series(n) if fault == "healthy" else planted_series(fault, n, at=n // 2)
    except ValueError as err:
        print(f"synthetic: {err}", file=sys.stderr)
        return 2
    with RunWriter(argv[0], source="generic", config={"synthetic": fault}, tensorboard=False,
                   overwrite=True) as writer:
        for rec in recs:
            step = rec.pop("step")
            rec.pop("nonfinite", None)
            writer.log(step, {k: (float("nan") if v is None else v) for k, v in rec.items()})
    print(f"wrote {n} steps ({fault}) to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
