"""The grid of runs in the corpus: which trainer, learning rate, KL weight, reward, length and seed.

Learning rates 1e-5..1e-4 are the usual healthy range; 1e-2..5e-2 blow the tiny model up within tens of steps.
``intent`` records which of the two a setting was meant to be (``borderline``: 1e-3, in between, either may
happen); the *label* is computed from the run itself (labels.py). Seeds 0-5 form the development split and
seeds 6 and 7 the held-out split, never used for tuning: two seeds, so the held-out part has 20 healthy runs
and "at most 1 in 20 false alarms" can be measured at all. A held-out split is used up once a rule change was
made after looking at it: seeds 2 and 3 were the first held-out split, seeds 4 and 5 the second (its two
false alarms led to the gradient-spike change in docs/diagnose.md); each moved to the development split and a
fresh pair of seeds, which no rule change has seen, became the held-out split.
The *spike check* (``SPIKE_CHECK_SEEDS``) reruns only the runner settings, with seeds no rule change has seen,
to test the clipped-spike change out of sample: the borderline lr 1e-3 setting is the one whose gradient-norm
spikes were false alarms, the two unstable runner settings check that recall holds for the same seeds.
The *second spike check* (``SPIKE_CHECK2_SEEDS``, 28-47) is the same three settings again, made after the
consequence-based ``grad_spike`` was frozen: the first spike check was looked at while designing it.
The *third spike check* (``SPIKE_CHECK3_SEEDS``, 48-67) is the same three settings once more, made while the
consequence test was extended to ``grad_explosion`` and ``loss_spike`` (both earlier checks were looked at then).
Sized so the whole corpus regenerates in about half an hour on a shared 2-core CPU (two runs at a time).
"""
from __future__ import annotations

from typing import Any

SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
DEV_SEEDS = frozenset({0, 1, 2, 3, 4, 5})
SPIKE_CHECK_SEEDS = tuple(range(8, 28))  # 20 seeds: as many as fit in about 15 minutes
SPIKE_CHECK2_SEEDS = tuple(range(28, 48))  # the second spike check: 20 seeds no rule change has seen
SPIKE_CHECK3_SEEDS = tuple(range(48, 68))  # the third: 20 seeds, scored once after the rules were frozen
SPIKE_CHECKS = {"spike_check": SPIKE_CHECK_SEEDS, "spike_check2": SPIKE_CHECK2_SEEDS,
                "spike_check3": SPIKE_CHECK3_SEEDS}
SPIKE_CHECK_SETTINGS = frozenset({("runner", "lr1e-3_kl0.05_sentiment"), ("runner", "lr3e-2_kl0.1_sentiment"),
                                  ("runner", "lr1e-2_kl0.02_length")})


def split_of(seed: int) -> str:
    for split, seeds in SPIKE_CHECKS.items():
        if seed in seeds:
            return split
    return "dev" if seed in DEV_SEEDS else "heldout"


# (trainer, setting name, intent, settings). ``kl`` is the runner's/REINFORCE's kl_coef, TRL's beta.
SETTINGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("runner", "lr1e-5_kl0.1_sentiment", "healthy", dict(lr=1e-5, kl=0.1, reward="sentiment", steps=100)),
    ("runner", "lr1e-4_kl0.05_length", "healthy", dict(lr=1e-4, kl=0.05, reward="length", steps=200)),
    ("runner", "lr3e-2_kl0.1_sentiment", "unstable", dict(lr=3e-2, kl=0.1, reward="sentiment", steps=60)),
    ("runner", "lr1e-2_kl0.02_length", "unstable", dict(lr=1e-2, kl=0.02, reward="length", steps=150)),
    ("runner", "lr1e-3_kl0.05_sentiment", "borderline", dict(lr=1e-3, kl=0.05, reward="sentiment", steps=150)),
    ("grpo", "lr1e-5_beta0.1_sentiment", "healthy", dict(lr=1e-5, kl=0.1, reward="sentiment", steps=60)),
    ("grpo", "lr5e-5_beta0_length", "healthy", dict(lr=5e-5, kl=0.0, reward="length", steps=60)),
    ("grpo", "lr5e-2_beta0.1_sentiment", "unstable", dict(lr=5e-2, kl=0.1, reward="sentiment", steps=40)),
    ("grpo", "lr1e-2_beta0_sentiment", "unstable", dict(lr=1e-2, kl=0.0, reward="sentiment", steps=60)),
    ("grpo", "lr1e-3_beta0.04_sentiment", "borderline", dict(lr=1e-3, kl=0.04, reward="sentiment", steps=80)),
    ("rloo", "lr1e-5_beta0.05_sentiment", "healthy", dict(lr=1e-5, kl=0.05, reward="sentiment", steps=50)),
    ("rloo", "lr3e-2_beta0.05_sentiment", "unstable", dict(lr=3e-2, kl=0.05, reward="sentiment", steps=50)),
    ("dpo", "lr1e-5_beta0.1", "healthy", dict(lr=1e-5, kl=0.1, reward="preference_pairs", steps=60)),
    ("dpo", "lr2e-2_beta0.1", "unstable", dict(lr=2e-2, kl=0.1, reward="preference_pairs", steps=60)),
    ("reinforce", "lr5e-5_kl0.05_sentiment", "healthy", dict(lr=5e-5, kl=0.05, reward="sentiment", steps=80)),
    ("reinforce", "lr2e-2_kl0.01_sentiment", "unstable", dict(lr=2e-2, kl=0.01, reward="sentiment", steps=80)),
    ("reinforce", "lr1e-3_kl0.05_sentiment", "borderline", dict(lr=1e-3, kl=0.05, reward="sentiment", steps=80)),
    # the healthy REINFORCE setting in pure fp16 (weights and AdamW state, no master copy): AdamW's eps 1e-8
    # rounds to 0 in fp16, so parameters that got no gradient divide 0 by 0 and the weights go NaN
    ("reinforce", "lr5e-5_kl0.05_sentiment_fp16", "unstable",
     dict(lr=5e-5, kl=0.05, reward="sentiment", steps=40, dtype="fp16")),
]


def specs(spike_check: bool | str = False) -> list[dict[str, Any]]:
    """One dict per run: everything a producer needs plus the bookkeeping labels.json records; with
    ``spike_check`` (True or ``"spike_check"``: the first; ``"spike_check2"``, ``"spike_check3"``: the later
    ones), the runs of that spike check instead of the main grid."""
    check = "spike_check" if spike_check is True else spike_check or None
    if check is not None and check not in SPIKE_CHECKS:
        raise ValueError(f"unknown spike check {check!r}; choose from {', '.join(SPIKE_CHECKS)}")
    out = []
    for trainer, setting, intent, s in SETTINGS:
        if check is not None and (trainer, setting) not in SPIKE_CHECK_SETTINGS:
            continue
        for seed in SPIKE_CHECKS[check] if check is not None else SEEDS:
            out.append({"name": f"{trainer}_{setting}_s{seed}", "trainer": trainer, "setting": setting,
                        "intent": intent, "seed": seed, "split": split_of(seed), "lr": s["lr"], "kl": s["kl"],
                        "beta": s["kl"], "kl_coef": s["kl"], "reward": s["reward"], "steps": s["steps"],
                        "max_new_tokens": 16,
                        "max_grad_norm": 5.0 if trainer == "runner" else 1.0,  # each trainer's default
                        **({"dtype": s["dtype"]} if "dtype" in s else {})})
    return out
