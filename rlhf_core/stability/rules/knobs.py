"""The training knobs that alert suggestions name, spelled the way each producer spells them.

A suggestion is only useful when the user can act on it without translating: a TRL run gets
``GRPOConfig``/``RLOOConfig`` field names, the kit's runner its ``train.py`` flags, OpenRLHF its
``train_ppo_ray`` flags and veRL its Hydra keys. Names were read from the frameworks' sources:
TRL 1.16 (``trl/trainer/grpo_config.py``, ``rloo_config.py``), OpenRLHF ``openrlhf/cli/train_ppo_ray.py``
(flat flags up to v0.10.1; v0.10.2 renamed them to a dotted hierarchy, given second) and veRL
``verl/trainer/config/_generated_ppo_trainer.yaml``. Producers without their own vocabulary
(``generic``, ``import``, ``tensorboard``) get plain words.
"""
from __future__ import annotations

from typing import Any

KNOBS = ("kl_coef", "learning_rate", "max_grad_norm", "temperature", "ppo_epochs", "clip_range", "entropy_coef",
         "critic_lr", "vf_coef", "critic_warmup")

_PLAIN: dict[str, str] = {
    "kl_coef": "the KL coefficient",
    "learning_rate": "the learning rate",
    "max_grad_norm": "the gradient clipping norm",
    "temperature": "the sampling temperature",
    "ppo_epochs": "the number of PPO epochs per batch",
    "clip_range": "the PPO clip range",
    "entropy_coef": "the entropy bonus",
    "critic_lr": "the critic's learning rate",
    "vf_coef": "the value-loss coefficient",
    "critic_warmup": "the critic warm-up steps",
}

_BY_PRODUCER: dict[str, dict[str, str]] = {
    "rlhf_core": {  # rlhf_core/train/config.py (train.py flags); one optimizer for policy and value head
        "kl_coef": "--kl_coef (or --adaptive_kl)",
        "learning_rate": "--learning_rate",
        "max_grad_norm": "--max_grad_norm",
        "temperature": "--temperature",
        "ppo_epochs": "--ppo_epochs",
        "clip_range": "--cliprange",
        "entropy_coef": "--ent_coef",
        "critic_lr": "--learning_rate",
        "vf_coef": "--vf_coef",
    },
    "trl": {  # GRPOConfig / RLOOConfig fields (TrainingArguments for the optimizer ones)
        "kl_coef": "beta",
        "learning_rate": "learning_rate",
        "max_grad_norm": "max_grad_norm",
        "temperature": "temperature",
        "ppo_epochs": "num_iterations",
        "clip_range": "epsilon",
        "entropy_coef": "entropy_coef",
        "critic_lr": "learning_rate",
        "vf_coef": "vf_coef",
    },
    "openrlhf": {
        "kl_coef": "--init_kl_coef (--algo.kl.init_coef)",
        "learning_rate": "--actor_learning_rate (--actor.adam.lr)",
        "max_grad_norm": "--max_norm (--actor.max_norm)",
        "temperature": "--temperature (--rollout.temperature)",
        "ppo_epochs": "--max_epochs (--train.max_epochs)",
        "clip_range": "--eps_clip (--actor.eps_clip)",
        "entropy_coef": "--entropy_loss_coef (--actor.entropy_coef)",
        "critic_lr": "--critic_learning_rate (--critic.adam.lr)",
        "critic_warmup": "--freezing_actor_steps (--critic.freezing_steps)",
    },
    "verl": {
        "kl_coef": "actor_rollout_ref.actor.kl_loss_coef (or algorithm.kl_ctrl.kl_coef with use_kl_in_reward)",
        "learning_rate": "actor_rollout_ref.actor.optim.lr",
        "max_grad_norm": "actor_rollout_ref.actor.grad_clip",
        "temperature": "actor_rollout_ref.rollout.temperature",
        "ppo_epochs": "actor_rollout_ref.actor.ppo_epochs",
        "clip_range": "actor_rollout_ref.actor.clip_ratio",
        "entropy_coef": "actor_rollout_ref.actor.entropy_coeff",
        "critic_lr": "critic.optim.lr",
        "critic_warmup": "trainer.critic_warmup",
    },
}

PRODUCERS = ("generic", *sorted(_BY_PRODUCER))


def knob(producer: str, name: str) -> str:
    """How ``producer`` spells knob ``name`` (plain words when it has no name for it)."""
    if name not in _PLAIN:
        raise ValueError(f"unknown knob {name!r}; known: {', '.join(KNOBS)}")
    return _BY_PRODUCER.get(producer, {}).get(name, _PLAIN[name])


class Knobs:
    """``Knobs(cfg.producer)["kl_coef"]``: the knob names of one producer, for f-strings in suggestions."""

    def __init__(self, producer: str):
        self.producer = producer

    def __getitem__(self, name: str) -> str:
        return knob(self.producer, name)

    def setting(self, name: str, value: Any) -> str:
        """`` (beta=0.1)`` where the producer has its own name for the knob, else empty (plain words would
        only repeat the sentence)."""
        own = _BY_PRODUCER.get(self.producer, {}).get(name)
        return f" ({own.split(' ')[0]}={value})" if own else ""
