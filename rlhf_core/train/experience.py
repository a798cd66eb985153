"""What one PPO step passes from stage to stage, typed: generation → scoring → reference → advantages → update.

Each stage is a function of its inputs alone (the config, the model it needs, the stage before), so the local
runner calls them in one process and the Ray engine (:mod:`rlhf_core.train.ray_engine`) calls the same functions
in its rollout, reward and reference actors: same code, same numbers.

- :class:`Samples` (generation): the step's prompts and the sampler's :class:`~rlhf_core.train.sampling.Rollout`
  (tokens, masks, and the hidden states or log-probs the sampler kept).
- :class:`Scores` (reward): the decoded completions, one reward per completion, and the text statistics.
- :class:`Experience` (the trainer, before the update): the above plus the reference and old-policy log-probs,
  values, KL-penalised rewards, GAE advantages (whitened) and returns: everything the update reads.
- :class:`UpdateStats` (the update's result): per-minibatch values of each loss/ratio/gradient key, reduced
  by the reduction each key declares (:func:`rlhf_core.runformat.keys.reduce_values`).
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_core.runformat.keys import reduce_values
from rlhf_core.runformat.samples import text_stats
from rlhf_core.train.config import TrainConfig
from rlhf_core.train.policy import DTYPES, reference_logprobs
from rlhf_core.train.prompts import batch_for_step
from rlhf_core.train.rewards import RewardError, RewardFn, score
from rlhf_core.train.sampling import Rollout, generate, pad_and_concat


class RunnerError(Exception):
    """A problem with the inputs of a run (model not loadable, world size mismatch…): one line for the user."""


def step_seed(seed: int, stream: str, step: int, rank: int) -> int:
    """A seed that depends only on (seed, stream, step, rank): resume needs no sampler state."""
    return random.Random(f"{stream}/{seed}/{rank}/{step}").getrandbits(63)


@dataclass
class Samples:
    """The step's prompts and what the sampler returned for them."""

    step: int
    prompts: list[str]
    rollout: Rollout

    @property
    def mask(self) -> torch.Tensor:
        """[b, R] float: 1 on real response tokens (through the first EOS)."""
        return self.rollout.response_mask.float()


@dataclass
class Scores:
    """The completions as text, their rewards, and the text-level signals of the batch."""

    texts: list[str]
    rewards: list[float]
    side: dict[str, float]  # text/* statistics, reward/heldout

    def reward_stats(self) -> dict[str, float]:
        t = torch.tensor(self.rewards, dtype=torch.float64)
        return {"reward/mean": t.mean().item(), "reward/std": t.std().item() if len(self.rewards) > 1 else 0.0,
                "reward/min": t.min().item(), "reward/max": t.max().item()}


@dataclass
class Experience:
    """Everything the PPO update and the step's record read; built by the trainer from the three stages."""

    samples: Samples
    scores: Scores
    ref_logp: torch.Tensor     # [b, R] frozen reference
    old_logp: torch.Tensor     # [b, R] the policy before this step's update
    entropy: torch.Tensor      # [b, R] of that policy
    old_values: torch.Tensor   # [b, R] value head, masked
    kl_coef: float
    kl_tok: torch.Tensor       # [b, R] per-token KL penalty term
    advantages: torch.Tensor   # [b, R] GAE, whitened over the batch
    returns: torch.Tensor      # [b, R]
    adv_mean: float            # of the raw (not whitened) advantages
    adv_std: float
    reward_finite: bool        # every rank's rewards are finite: otherwise the update is skipped

    @property
    def rollout(self) -> Rollout:
        return self.samples.rollout

    @property
    def mask(self) -> torch.Tensor:
        return self.samples.mask


@dataclass
class UpdateStats:
    """What the update returns: each key's values over the optimizer steps that were taken, the per-block
    gradient norms of the step's last one, and how many optimizer steps were skipped."""

    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    layer_norms: dict[str, float] = field(default_factory=dict)
    skipped: int = 0

    def add(self, values: Mapping[str, float]) -> None:
        """One optimizer step's values, by key."""
        for key, value in values.items():
            self.values[key].append(value)

    def reduced(self) -> dict[str, float]:
        """One number per key, combined over the step's minibatches as the key declares (keys.reduction)."""
        return {key: reduce_values(key, vals) for key, vals in self.values.items() if vals}


def generate_samples(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], step: int,
                     rank: int, device: torch.device, *, with_logprobs: bool = False) -> Samples:
    """The step's prompts (a function of seed, step, rank) sampled with a generator seeded the same way.

    ``--rollout_dtype`` samples in its own precision and returns the sampler's log-probs (the mismatch probe);
    ``with_logprobs`` asks for them in the policy's own precision too (a stale sampler: the off-policy gap).
    """
    dtype = DTYPES[cfg.rollout_dtype] if cfg.rollout_dtype else None
    batch = batch_for_step(prompts, cfg.batch_size, cfg.seed, step, rank)
    enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
    gen = torch.Generator(device).manual_seed(step_seed(cfg.seed, "sample", step, rank))
    chunk = cfg.effective_rollout_batch_size
    parts = [
        generate(model, enc.input_ids[i: i + chunk], enc.attention_mask[i: i + chunk],
                 max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, generator=gen, temperature=cfg.temperature,
                 top_k=cfg.top_k, top_p=cfg.top_p, dtype=dtype, with_logprobs=with_logprobs or dtype is not None)
        for i in range(0, len(batch), chunk)
    ]
    return Samples(step, batch, pad_and_concat(parts, tokenizer.pad_token_id))


def score_samples(cfg: TrainConfig, samples: Samples, tokenizer: Any, reward_fn: RewardFn,
                  heldout_fn: RewardFn | None) -> Scores:
    """Decode the completions and score them (``--inject_nan_step`` makes one reward NaN)."""
    roll, step = samples.rollout, samples.step
    texts = tokenizer.batch_decode(roll.response_ids * roll.response_mask, skip_special_tokens=True)
    try:
        rewards = score(reward_fn, samples.prompts, texts)
    except RewardError as err:
        raise RunnerError(f"step {step}: {err}") from None
    if cfg.inject_nan_step == step:
        rewards[0] = math.nan
    side = text_stats(texts)
    if heldout_fn is not None:
        try:
            side["reward/heldout"] = sum(score(heldout_fn, samples.prompts, texts)) / len(texts)
        except RewardError as err:
            raise RunnerError(f"step {step}: held-out reward: {err}") from None
    return Scores(texts, rewards, side)


def reference_logp(cfg: TrainConfig, ref: torch.nn.Module, samples: Samples, out_device: torch.device) -> torch.Tensor:
    """The frozen reference's log-probs of the sampled response tokens."""
    roll = samples.rollout
    return reference_logprobs(ref, roll.input_ids, roll.attention_mask, roll.prompt_len, impl=cfg.logprob_impl,
                              temperature=cfg.temperature, out_device=out_device)
