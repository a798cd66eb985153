"""Memory and sampling flags really change the run, and any Python callable works as a reward."""
import json
import math

import pytest
import torch

from rlhf_core.cli.train import main
from rlhf_core.runformat.run_reader import Run
from rlhf_core.train.config import parse_args
from rlhf_core.train.rewards import WeightedSum, get_reward, length_reward, preference_reward, score, sentiment_reward
from rlhf_core.train.runner import PPORunner, RunnerError, train
from rlhf_core.train.sampling import Rollout, pad_and_concat

BASE = ["--batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens", "6", "--steps_per_epoch", "2",
        "--epochs", "1", "--sample_interval", "0", "--no_tensorboard", "--ppo_epochs", "1"]


def test_memory_flags_keep_the_maths(tmp_path):
    """Checkpointing, a CPU reference and the plain log-prob path change memory, not the numbers."""
    assert main([*BASE, "--run_dir", str(tmp_path / "a"), "--logprob_impl", "chunked"]) == 0
    assert main([*BASE, "--run_dir", str(tmp_path / "b"), "--gradient_checkpointing", "--ref_device", "cpu",
                 "--logprob_impl", "torch"]) == 0
    a, b = Run(tmp_path / "a").metrics()[0], Run(tmp_path / "b").metrics()[0]
    for key in ("reward/mean", "reward/std", "response/length_mean", "response/eos_rate"):
        assert a[key] == b[key], key
    for key in ("loss/total", "loss/value", "policy/entropy", "kl/ref_k1", "grad/norm", "value/mean", "drift/rel"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


def test_gradient_checkpointing_and_ref_device_are_applied(tmp_path):
    cfg = parse_args([*BASE, "--run_dir", str(tmp_path / "r"), "--gradient_checkpointing", "--ref_device", "cpu",
                      "--dtype", "bf16"])
    runner = PPORunner(cfg)
    try:
        assert runner.policy.model.transformer.gradient_checkpointing
        assert runner.ref.get_output_embeddings().weight.device.type == "cpu"
        assert runner.policy.model.get_output_embeddings().weight.dtype == torch.bfloat16
        assert runner.policy.v_head.weight.dtype == torch.bfloat16
        assert not any(p.requires_grad for p in runner.ref.parameters())
    finally:
        runner._finish("finished")


def test_bf16_chunked_rollouts_sampling_filters_and_extras(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["The movie was", "The coffee", "Our trip"]))
    run_dir = tmp_path / "r"
    assert main([*BASE, "--run_dir", str(run_dir), "--dtype", "bf16", "--rollout_batch_size", "1", "--top_k", "20",
                 "--top_p", "0.9", "--temperature", "0.8", "--ent_coef", "0.01", "--adaptive_kl", "--kl_target", "0.01",
                 "--save_every", "1", "--prompts", str(prompts), "--reward", "mix", "--max_grad_norm", "0.5"]) == 0
    run = Run(run_dir)
    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2]
    for rec in recs:
        assert rec["loss/entropy"] < 0  # −ent_coef·H is in the loss
        assert rec["grad/max_norm"] == 0.5
        assert all(math.isfinite(rec[k]) for k in ("loss/total", "reward/mean", "kl/ref_k3", "grad/norm"))
    assert recs[1]["kl/coef"] != recs[0]["kl/coef"]  # the adaptive controller moved
    assert [p.name for p in run.checkpoints()] == ["step_1", "step_2"]
    state = torch.load(run.checkpoints()[-1] / "state.pt", weights_only=True)
    assert state["policy"]["model.transformer.h.0.attn.c_attn.weight"].dtype == torch.bfloat16


def test_any_callable_is_a_reward(tmp_path):
    seen = []

    def exclaim(prompts, responses):
        seen.append((list(prompts), list(responses)))
        return [2.5 for _ in responses]

    cfg = parse_args([*BASE, "--run_dir", str(tmp_path / "r"), "--steps_per_epoch", "1"])
    result = train(cfg, reward_fn=exclaim)
    assert result.status == "finished" and result.steps == 1
    rec = Run(tmp_path / "r").metrics()[0]
    assert rec["reward/mean"] == 2.5 and rec["reward/std"] == 0.0
    assert len(seen) == 1 and len(seen[0][0]) == len(seen[0][1]) == 4
    assert all(isinstance(r, str) for r in seen[0][1])


def test_a_broken_reward_is_one_line_and_marks_the_run_failed(tmp_path):
    cfg = parse_args([*BASE, "--run_dir", str(tmp_path / "r")])
    with pytest.raises(RunnerError, match="step 1: reward returned 1 scores for 4 responses"):
        train(cfg, reward_fn=lambda prompts, responses: [0.0])
    assert Run(tmp_path / "r").status == "failed"


def test_prompts_longer_than_the_context_are_refused(tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("the movie was " * 40 + "\n")
    assert main([*BASE, "--run_dir", str(tmp_path / "r"), "--prompts", str(prompts), "--max_new_tokens", "200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: the longest prompt has") and "context of 256" in err[-1]


def test_builtin_rewards_by_hand():
    p = ["x", "x", "x"]
    assert sentiment_reward(p, ["great great bad", "terrible", "okay"]) == pytest.approx(
        [math.tanh(1), math.tanh(-1), 0.0])
    assert preference_reward(p, ["so Thank you.", "thank you. and more", "nothing"]) == [1.0, 0.5, 0.0]
    assert length_reward(p, ["a b c d e f g h", "", "a " * 16]) == [1.0, -1.0, -1.0]
    mix = WeightedSum([(sentiment_reward, 2.0), (length_reward, 1.0)])
    assert mix(["x"], ["good"]) == pytest.approx([2 * math.tanh(1) + (1 - 2 * 7 / 8)])
    assert get_reward("rlhf_core.train.rewards:length_reward") is length_reward
    with pytest.raises(ValueError, match="3 scores for 2"):
        score(lambda prompts, responses: [1, 2, 3], ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="not return a sequence"):
        score(lambda prompts, responses: None, ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")


def test_pad_and_concat_joins_chunks():
    a = Rollout(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long), 2,
                torch.tensor([[1, 1]]), torch.tensor([False]))
    b = Rollout(torch.tensor([[0, 9, 3, 1, 0]]), torch.tensor([[0, 1, 1, 1, 1]]), 3,
                torch.tensor([[1, 0]]), torch.tensor([True]))
    out = pad_and_concat([a, b], pad_token_id=0)
    assert out.prompt_len == 3
    assert out.input_ids.tolist() == [[0, 5, 6, 7, 8], [0, 9, 3, 1, 0]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert out.response_mask.tolist() == [[1, 1], [1, 0]]
    assert out.eos.tolist() == [False, True]


@pytest.mark.parametrize("impl,old", [("torch", "rollout"), ("chunked", "rollout"), ("chunked", "recompute")])
def test_first_update_sees_ratio_exactly_one(tmp_path, impl, old):
    """Old log-probs come from the hidden states kept while sampling (or a fresh forward) and the update's from
    its own forward: before any optimizer step the PPO ratio is 1 and nothing is clipped (a mismatch here
    would bias every update)."""
    assert main([*BASE, "--run_dir", str(tmp_path / "r"), "--mini_batch_size", "4", "--steps_per_epoch", "1",
                 "--logprob_impl", impl, "--old_logprobs", old]) == 0
    rec = Run(tmp_path / "r").metrics()[0]
    assert rec["policy/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert rec["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert rec["policy/clipfrac"] == 0.0 and rec["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert rec["value/clipfrac"] == 0.0


def test_old_logprobs_source_follows_the_flag_and_dtype():
    assert parse_args([]).old_logprobs_from_rollout
    assert not parse_args(["--dtype", "bf16"]).old_logprobs_from_rollout
    assert parse_args(["--dtype", "bf16", "--old_logprobs", "rollout"]).old_logprobs_from_rollout
    assert not parse_args(["--old_logprobs", "recompute"]).old_logprobs_from_rollout


def test_old_logprobs_from_the_rollout_train_like_a_fresh_forward(tmp_path):
    """Three steps with either source: the same samples and, within float rounding, the same numbers."""
    for old in ("rollout", "recompute"):
        assert main([*BASE, "--run_dir", str(tmp_path / old), "--steps_per_epoch", "3", "--learning_rate", "1e-3",
                     "--old_logprobs", old]) == 0
    a, b = Run(tmp_path / "rollout").metrics(), Run(tmp_path / "recompute").metrics()
    for x, y in zip(a, b):
        assert x["response/length_mean"] == y["response/length_mean"] and x["reward/mean"] == y["reward/mean"]
        for key in ("loss/total", "kl/ref_k1", "kl/ref_k3", "policy/entropy", "value/mean", "grad/norm", "drift/rel"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


def test_save_model_exports_a_from_pretrained_folder_of_the_trained_policy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "r"
    assert main([*BASE, "--run_dir", str(run_dir), "--steps_per_epoch", "1", "--save_model"]) == 0
    state = torch.load(Run(run_dir).checkpoints()[-1] / "state.pt", weights_only=True)["policy"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[f"model.{name}"]), name
    head = torch.load(run_dir / "model" / "value_head.pt", weights_only=True)
    assert torch.equal(head["weight"], state["v_head.weight"]) and torch.equal(head["bias"], state["v_head.bias"])
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert tok.padding_side == "left" and tok("The movie was")["input_ids"]


def test_no_model_folder_without_the_flag(tmp_path):
    assert main([*BASE, "--run_dir", str(tmp_path / "r"), "--steps_per_epoch", "1"]) == 0
    assert not (tmp_path / "r" / "model").exists()
