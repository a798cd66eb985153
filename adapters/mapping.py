"""Source key → canonical key tables, shared by every adapter and importer.

Each table maps a tool's own metric names to the run format's canonical keys (docs/design.md, "Adapters"); a
name with no entry is kept as ``src/<name>`` (``rlhf_core.runformat.keys.prefixed_unmapped``) so nothing a tool logs is
lost. A few entries also derive a value (veRL's GiB → bytes, TRL's truncation ratio → EOS rate). Torch-free.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

from rlhf_core.runformat.keys import is_canonical, prefixed_unmapped, to_number

# TRL 1.16: Trainer.log keys of GRPO/RLOO, DPO, Reward and SFT trainers.
TRL_KEYS: dict[str, str] = {
    "loss": "loss/total",
    "policy_loss": "loss/policy",
    "grad_norm": "grad/norm",
    "learning_rate": "lr",
    "kl": "kl/ref_k3",  # GRPO logs the k3 estimator (only when beta > 0); see TRL_KL_BY_TRAINER
    "entropy": "policy/entropy",
    "reward": "reward/mean",
    "reward_std": "reward/std",
    "clip_ratio/region_mean": "policy/clipfrac",
    "completions/mean_length": "response/length_mean",
    "epoch": "epoch",
    # text statistics a reward function logs itself (TRL's ``log_metric``) keep their canonical names
    "text/distinct2": "text/distinct2",
    "text/identical_frac": "text/identical_frac",
    "text/repeated_ngram_frac": "text/repeated_ngram_frac",
    # DPO's implicit rewards and the reward model's pairwise statistics
    "rewards/chosen": "reward/chosen",
    "rewards/rejected": "reward/rejected",
    "rewards/margins": "reward/margin",
    "rewards/accuracies": "reward/accuracy",
    "accuracy": "reward/accuracy",
    "margin": "reward/margin",
    "mean_reward": "reward/mean",
    "min_reward": "reward/min",
    "max_reward": "reward/max",
    # GRPOTrainer with vLLM and vllm_importance_sampling_correction: |log π_trainer − log π_vLLM| per token, and
    # the IS weight as applied (after truncation/masking; per sequence in the sequence_* modes)
    "sampling/sampling_logp_difference/mean": "rollout/logprob_diff_mean",
    "sampling/sampling_logp_difference/max": "rollout/logprob_diff_max",
    "sampling/importance_sampling_ratio/min": "rollout/is_weight_min",
    "sampling/importance_sampling_ratio/mean": "rollout/is_weight_mean",
    "sampling/importance_sampling_ratio/max": "rollout/is_weight_max",
}
# What TRL's ``kl`` means depends on the trainer: RLOO logs the k1 mean (log π_old − log π_ref, the estimator
# of its reward penalty); KTO's ``kl`` is its batch KL baseline, not a KL to the reference per token.
TRL_KL_BY_TRAINER: dict[str, str] = {"RLOOTrainer": "kl/ref_k1", "KTOTrainer": "src/kl"}
# ``rewards/<fn>/mean`` of GRPO's reward functions → ``reward/<fn>/mean``.
TRL_PREFIXES: dict[str, str] = {"rewards/": "reward/"}
# Keys of TRL's end-of-training summary log (not a step): kept in meta.json instead.
TRL_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                              "train_loss"})
# What marks a log as that summary: with include_num_input_tokens_seen, transformers puts train_runtime (and
# train_tokens_per_second) into every step's log too, so only these two tell the summary apart.
TRL_SUMMARY_MARKERS = frozenset({"train_loss", "total_flos"})

# OpenRLHF ≥ 0.9 (TensorboardLogger: ``train/<key>``; ``eval/<key>`` is imported under ``eval/``).
OPENRLHF_KEYS: dict[str, str] = {
    "policy_loss": "loss/policy",
    "critic_loss": "loss/value",
    "reward": "reward/mean",
    "response_length": "response/length_mean",
    "actor_grad_norm": "grad/norm",
    "ppo_clip_ratio": "policy/clipfrac",
    "ppo_kl": "policy/approx_kl",
    "entropy_loss": "policy/entropy",  # OpenRLHF logs the entropy itself under this name
    "actor_lr": "lr",
    "values": "value/mean",
    "rollout/reward_std": "reward/std",
    "timing/generation": "time/rollout",
    "timing/make_experience": "time/make_experience",
    "timing/ppo_train": "time/update",
    "timing/broadcast": "time/weight_sync",
    "timing/step_total": "time/step",
    # mean of log π_vLLM − log π_old over action tokens (k1 of KL(rollout ‖ trainer)); only with
    # --algo.advantage.is_correction_enable (openrlhf/models/loss.py PolicyLoss)
    "vllm_kl": "rollout/kl_k1",
}

# veRL (its ``file`` logger: ``{"step": N, "data": {...}}``).
VERL_KEYS: dict[str, str] = {
    "actor/pg_loss": "loss/policy",
    "actor/entropy": "policy/entropy",
    "actor/grad_norm": "grad/norm",
    "actor/pg_clipfrac": "policy/clipfrac",
    "actor/ppo_kl": "policy/approx_kl",
    "actor/lr": "lr",
    "actor/reward_kl_penalty_coeff": "kl/coef",
    "critic/vf_loss": "loss/value",
    "critic/vf_clipfrac": "value/clipfrac",
    "critic/vf_explained_var": "value/explained_var",
    "critic/values/mean": "value/mean",
    "critic/score/mean": "reward/mean",
    "critic/score/max": "reward/max",
    "critic/score/min": "reward/min",
    "critic/advantages/mean": "adv/mean",
    "response_length/mean": "response/length_mean",
    "perf/throughput": "throughput/tokens_per_s",
    "timing_s/gen": "time/rollout",
    "timing_s/generate_sequences": "time/rollout",
    "timing_s/reward": "time/reward",
    "timing_s/ref": "time/ref_logprobs",
    "timing_s/old_log_prob": "time/old_logprobs",
    "timing_s/values": "time/values",
    "timing_s/adv": "time/advantages",
    "timing_s/update_actor": "time/update",
    "timing_s/update_critic": "time/update_critic",
    "timing_s/step": "time/step",
    "training/epoch": "epoch",
    # verl/utils/debug/metrics.py (whenever the rollout returns log-probs): |p_actor − p_rollout| on
    # *probabilities* (exp of the log-probs), despite the "log_prob_diff" helper name
    "training/rollout_probs_diff_mean": "rollout/prob_diff_mean",
    "training/rollout_probs_diff_max": "rollout/prob_diff_max",
    "training/rollout_probs_diff_std": "rollout/prob_diff_std",
    "training/rollout_actor_probs_pearson_corr": "rollout/prob_corr",
    # verl/trainer/ppo/rollout_corr_helper.py (algorithm.rollout_correction set): KL(π_rollout ‖ π_old)
    "rollout_corr/kl": "rollout/kl_k1",
    "rollout_corr/k3_kl": "rollout/kl_k3",
}
# Older veRL names for the same quantities (console logs of releases before mid-2025: ``timing/*`` before
# ``timing_s/*``, the entropy as ``actor/entropy_loss``, the reward penalty's coefficient as ``critic/kl_coeff``).
# Where a record has both, the current name keeps the canonical key and the older one stays ``src/``.
VERL_OLD_KEYS: dict[str, str] = {
    "timing/gen": "time/rollout",
    "timing/reward": "time/reward",
    "timing/ref": "time/ref_logprobs",
    "timing/old_log_prob": "time/old_logprobs",
    "timing/values": "time/values",
    "timing/adv": "time/advantages",
    "timing/update_actor": "time/update",
    "timing/update_critic": "time/update_critic",
    "timing/step": "time/step",
    "actor/entropy_loss": "policy/entropy",
    "critic/kl_coeff": "kl/coef",
    "actor/kl_coef": "kl/coef",
}
# veRL's KL estimators by name (core_algos.kl_penalty; "+" are straight-through variants with the same forward
# value); "abs" and "full" are not one of the run format's estimators, so their series stay ``src/``.
VERL_KL_ESTIMATORS: dict[str, str] = {"kl": "k1", "k1": "k1", "k1+": "k1", "mse": "k2", "k2": "k2", "k2+": "k2",
                                      "low_var_kl": "k3", "k3": "k3", "k3+": "k3"}
VERL_KL_TYPES = (*VERL_KL_ESTIMATORS, "abs", "full")
_GIB = float(2**30)
# canonical key → (source key, transform) for values that need converting, not just renaming.
VERL_DERIVED: dict[str, tuple[str, Callable[[float], float]]] = {
    "mem/peak_bytes": ("perf/max_memory_allocated_gb", lambda gb: gb * _GIB),
}
TRL_DERIVED: dict[str, tuple[str, Callable[[float], float]]] = {
    "response/eos_rate": ("completions/clipped_ratio", lambda clipped: 1.0 - clipped),
}
OPENRLHF_DERIVED: dict[str, tuple[str, Callable[[float], float]]] = {
    "response/eos_rate": ("rollout/truncated_rate", lambda truncated: 1.0 - truncated),
}

# TRL ProfilingContext names ("<TrainerClass>.<name>") → phase. Nesting is resolved by the TRL adapter.
TRL_PROFILE_PHASES: dict[str, str] = {
    "transformers.generate": "rollout",
    "transformers.generate_batch": "rollout",
    "vLLM.generate": "rollout",
    "_calculate_rewards": "reward",
    "_get_per_token_logps_and_entropies": "ref_logprobs",
    "sync_weights": "weight_sync",
}


def _apply(
    metrics: Mapping[str, Any],
    table: Mapping[str, str],
    prefixes: Mapping[str, str] | None = None,
    derived: Mapping[str, tuple[str, Callable[[float], float]]] | None = None,
    keep_canonical: bool = False,
) -> dict[str, Any]:
    mapping: dict[str, str] = {}
    for key in metrics:
        if key in table:
            mapping[key] = table[key]
            continue
        for src_prefix, dst_prefix in (prefixes or {}).items():
            if key.startswith(src_prefix):
                mapping[key] = dst_prefix + key[len(src_prefix):]
                break
        else:
            if keep_canonical and is_canonical(key):
                mapping[key] = key
    out = prefixed_unmapped(metrics, mapping)
    for canonical, (src, fn) in (derived or {}).items():
        num = to_number(metrics.get(src))
        if num is not None and canonical not in out:
            out[canonical] = fn(num) if math.isfinite(num) else num
    return out


def map_trl(logs: Mapping[str, Any], trainer: str | None = None) -> dict[str, Any]:
    """Canonical record of one TRL ``Trainer.log`` call; ``eval_<key>`` becomes ``eval/<canonical>``.

    ``trainer`` (the trainer's class name) picks what ``kl`` means (:data:`TRL_KL_BY_TRAINER`).
    """
    table = dict(TRL_KEYS, kl=TRL_KL_BY_TRAINER.get(trainer or "", TRL_KEYS["kl"]))
    train = {k: v for k, v in logs.items() if not k.startswith("eval_") and k not in TRL_SUMMARY_KEYS}
    evals = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")}
    out = _apply(train, table, TRL_PREFIXES, TRL_DERIVED)
    for key, value in _apply(evals, table, TRL_PREFIXES).items():
        out[f"eval/{key}"] = value
    return out


def map_openrlhf(scalars: Mapping[str, Any], kl_estimator: str = "k1") -> dict[str, Any]:
    """Canonical record from OpenRLHF tags (``train/<key>``, ``eval/<key>``, or bare keys).

    ``kl`` is OpenRLHF's token-mean KL to the reference with ``--algo.kl.estimator`` (k1 by default);
    ``logprobs_diff`` is always the k1 mean, so it fills ``kl/ref_k1`` when the estimator is another one.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; expected k1, k2 or k3")
    table = dict(OPENRLHF_KEYS, kl=f"kl/ref_{kl_estimator}")
    if kl_estimator != "k1":
        table["logprobs_diff"] = "kl/ref_k1"
    train, evals = {}, {}
    for tag, value in scalars.items():
        if tag.startswith("eval/"):
            evals[tag[len("eval/"):]] = value
        else:
            train[tag[len("train/"):] if tag.startswith("train/") else tag] = value
    out = _apply(train, table, derived=OPENRLHF_DERIVED)
    out.update({f"eval/{k}": v for k, v in evals.items()})
    return out


@functools.lru_cache(maxsize=16)
def _verl_table(kl_loss_type: str, kl_penalty: str) -> dict[str, str]:
    """veRL's names in precedence order: current names, the KL series, older names."""
    kl = {"actor/reward_kl_penalty": kl_penalty, "critic/kl": kl_penalty, "actor/kl_loss": kl_loss_type}
    table = {key: f"kl/ref_{VERL_KL_ESTIMATORS[kind]}" for key, kind in kl.items() if kind in VERL_KL_ESTIMATORS}
    return {**VERL_KEYS, **table, **VERL_OLD_KEYS}


def map_verl(data: Mapping[str, Any], kl_loss_type: str = "low_var_kl", kl_penalty: str = "kl",
             grad_clip: float | None = 1.0) -> dict[str, Any]:
    """Canonical record from one veRL ``data`` dict.

    The KL to the reference is ``actor/reward_kl_penalty`` (``critic/kl`` before 2025-04) with the estimator of
    ``algorithm.kl_penalty``, and ``actor/kl_loss`` with ``actor_rollout_ref.actor.kl_loss_type``; the log does
    not say which, so the caller passes them (veRL's defaults here). Where two names give the same canonical
    key, the first in precedence order keeps it and the other stays ``src/``. ``actor/grad_norm`` is the norm
    before clipping, and veRL always clips at ``actor.grad_clip`` (1.0 unless set; its dp_actor asserts one is
    set), so that threshold is the record's ``grad/max_norm``.
    """
    table = _verl_table(kl_loss_type, kl_penalty)
    rank = {key: i for i, key in enumerate(table)}
    mapping: dict[str, str] = {}
    for key in sorted((k for k in data if k in table), key=rank.__getitem__):
        if table[key] not in mapping.values():
            mapping[key] = table[key]
    out = _apply(data, mapping, derived=VERL_DERIVED)
    if grad_clip is not None and "grad/norm" in out:
        out.setdefault("grad/max_norm", grad_clip)
    return out


def map_identity(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Keys already canonical stay; anything else becomes ``src/<name>`` (generic loops, TensorBoard)."""
    return _apply(metrics, {}, keep_canonical=True)


MAPPERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "trl": map_trl,
    "openrlhf": map_openrlhf,
    "verl": map_verl,
    "none": map_identity,
}


def trl_profile_phase(context_name: str) -> str | None:
    """Phase of a TRL ``ProfilingContext`` name such as ``GRPOTrainer.transformers.generate``."""
    _, _, name = context_name.partition(".")
    return TRL_PROFILE_PHASES.get(name or context_name)
