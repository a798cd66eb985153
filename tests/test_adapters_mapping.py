"""Key tables: tools' names → canonical keys, everything else kept as src/<name>."""
import math

import pytest

from adapters.mapping import map_identity, map_openrlhf, map_trl, map_verl, trl_profile_phase
from rlhf_core.runformat.keys import is_canonical


def test_trl_grpo_keys_map_to_canonical_and_unknown_keys_are_kept():
    logs = {"loss": 0.1, "grad_norm": 2.0, "learning_rate": 1e-6, "kl": 0.01, "entropy": 6.5, "reward": 1.0,
            "reward_std": 0.5, "rewards/len/mean": 1.0, "clip_ratio/region_mean": 0.0,
            "completions/mean_length": 8.0, "completions/clipped_ratio": 0.25, "frac_reward_zero_std": 0.0,
            "step_time": 0.3, "epoch": 0.5, "eval_loss": 0.2, "eval_reward": 0.9}
    out = map_trl(logs)
    assert out["loss/total"] == 0.1 and out["grad/norm"] == 2.0 and out["lr"] == 1e-6
    assert out["kl/ref_k3"] == 0.01 and out["policy/entropy"] == 6.5 and out["policy/clipfrac"] == 0.0
    assert out["reward/mean"] == 1.0 and out["reward/std"] == 0.5 and out["reward/len/mean"] == 1.0
    assert out["response/length_mean"] == 8.0 and out["response/eos_rate"] == 0.75
    assert out["src/frac_reward_zero_std"] == 0.0 and out["src/step_time"] == 0.3
    assert out["eval/loss/total"] == 0.2 and out["eval/reward/mean"] == 0.9
    assert all(is_canonical(k) for k in out)


def test_trl_kl_meaning_depends_on_the_trainer():
    assert map_trl({"kl": 0.1})["kl/ref_k3"] == 0.1
    assert map_trl({"kl": -0.1}, trainer="RLOOTrainer")["kl/ref_k1"] == -0.1  # k1 can be negative
    assert map_trl({"kl": 0.1}, trainer="KTOTrainer") == {"src/kl": 0.1}


def test_trl_dpo_and_reward_keys():
    out = map_trl({"rewards/chosen": 1.0, "rewards/margins": 0.3, "rewards/accuracies": 1.0, "logps/chosen": -3.0,
                   "accuracy": 0.5, "mean_reward": 0.1, "mean_token_accuracy": 0.2})
    assert out["reward/chosen"] == 1.0 and out["reward/margin"] == 0.3 and out["reward/accuracy"] == 0.5
    assert out["src/logps/chosen"] == -3.0 and out["reward/mean"] == 0.1 and out["src/mean_token_accuracy"] == 0.2


def test_openrlhf_tags_and_kl_estimator():
    tags = {"train/policy_loss": 0.1, "train/kl": 0.02, "train/logprobs_diff": 0.03, "train/actor_grad_norm": 1.0,
            "train/timing/generation": 2.0, "train/timing/ppo_train": 3.0, "train/rollout/truncated_rate": 0.1,
            "train/return": 4.0, "eval/eval_pass1": 0.3}
    k1 = map_openrlhf(tags)
    assert k1["kl/ref_k1"] == 0.02 and k1["src/logprobs_diff"] == 0.03
    assert k1["time/rollout"] == 2.0 and k1["time/update"] == 3.0 and k1["grad/norm"] == 1.0
    assert k1["response/eos_rate"] == pytest.approx(0.9) and k1["src/return"] == 4.0
    assert k1["eval/eval_pass1"] == 0.3
    k3 = map_openrlhf(tags, kl_estimator="k3")
    assert k3["kl/ref_k3"] == 0.02 and k3["kl/ref_k1"] == 0.03
    with pytest.raises(ValueError):
        map_openrlhf(tags, kl_estimator="k9")


def test_verl_keys_and_unit_conversion():
    out = map_verl({"actor/pg_loss": 0.1, "critic/score/mean": 0.5, "timing_s/gen": 1.5, "timing_s/step": 4.0,
                    "perf/max_memory_allocated_gb": 2.0, "actor/kl_loss": 0.01, "perf/mfu/actor": 0.3})
    assert out["loss/policy"] == 0.1 and out["reward/mean"] == 0.5 and out["time/rollout"] == 1.5
    assert out["time/step"] == 4.0 and out["mem/peak_bytes"] == 2 * 2**30
    assert out["kl/ref_k3"] == 0.01 and out["src/perf/mfu/actor"] == 0.3  # kl_loss_type low_var_kl: k3


def test_identity_keeps_canonical_and_nan_passes_through():
    out = map_identity({"loss/total": float("nan"), "my_metric": 1})
    assert math.isnan(out["loss/total"]) and out["src/my_metric"] == 1


def test_trl_profiling_names_to_phases():
    assert trl_profile_phase("GRPOTrainer.transformers.generate") == "rollout"
    assert trl_profile_phase("RLOOTrainer._calculate_rewards") == "reward"
    assert trl_profile_phase("GRPOTrainer._get_per_token_logps_and_entropies") == "ref_logprobs"
    assert trl_profile_phase("GRPOTrainer.my_reward_fn") is None


def test_rollout_vs_trainer_mismatch_keys_of_each_framework():
    """Names from the frameworks' source: TRL 1.16 GRPOTrainer (vLLM IS correction), OpenRLHF PolicyLoss's
    vllm_kl, veRL's debug metrics (probabilities, not log-probs) and its rollout_corr off-policy metrics."""
    trl = map_trl({"sampling/sampling_logp_difference/mean": 0.01, "sampling/sampling_logp_difference/max": 0.5,
                   "sampling/importance_sampling_ratio/min": 0.0, "sampling/importance_sampling_ratio/mean": 0.98,
                   "sampling/importance_sampling_ratio/max": 3.0})
    assert trl == {"rollout/logprob_diff_mean": 0.01, "rollout/logprob_diff_max": 0.5, "rollout/is_weight_min": 0.0,
                   "rollout/is_weight_mean": 0.98, "rollout/is_weight_max": 3.0}
    assert map_trl({"eval_sampling/sampling_logp_difference/mean": 0.02}) == {"eval/rollout/logprob_diff_mean": 0.02}
    assert map_openrlhf({"train/vllm_kl": 0.003, "train/ppo_kl": 0.01}) == {"rollout/kl_k1": 0.003,
                                                                             "policy/approx_kl": 0.01}
    verl = map_verl({"training/rollout_probs_diff_valid": 1, "training/rollout_probs_diff_max": 0.4,
                     "training/rollout_probs_diff_mean": 0.006, "training/rollout_probs_diff_std": 0.02,
                     "training/rollout_actor_probs_pearson_corr": 0.999, "rollout_corr/kl": -0.0001,
                     "rollout_corr/k3_kl": 0.0016, "rollout_corr/rollout_is_max": 2.5})
    assert verl["rollout/prob_diff_mean"] == 0.006 and verl["rollout/prob_diff_max"] == 0.4
    assert verl["rollout/prob_diff_std"] == 0.02 and verl["rollout/prob_corr"] == 0.999
    assert verl["rollout/kl_k1"] == -0.0001 and verl["rollout/kl_k3"] == 0.0016
    # kept, not mapped: a validity flag, and IS weights whose level (token/sequence) the log does not say
    assert verl["src/training/rollout_probs_diff_valid"] == 1 and verl["src/rollout_corr/rollout_is_max"] == 2.5
    assert "rollout/logprob_diff_mean" not in verl  # |Δp| is not |Δ log p|
    assert all(is_canonical(k) for out in (trl, verl) for k in out)
    assert map_identity({"rollout/kl_k3": 1e-4, "rollout/whatever": 1}) == {"rollout/kl_k3": 1e-4,
                                                                             "src/rollout/whatever": 1}
