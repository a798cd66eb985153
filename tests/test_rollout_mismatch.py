"""Rollout vs trainer log-probs: the probe, the sampler in another precision, and the runner's rollout/* keys."""
import json

import pytest
import torch

from rlhf_core.runformat.keys import is_canonical
from rlhf_core.stability.detectors import Diagnoser
from rlhf_core.train import gpt2_decode
from rlhf_core.train.policy import load_causal_lm, load_tokenizer, response_hidden, score_tokens
from rlhf_core.train.probes import rollout_mismatch
from rlhf_core.train.sampling import generate, pad_and_concat

KEYS = ["rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/kl_k1", "rollout/kl_k3",
        "rollout/ratio_min", "rollout/ratio_max"]


def test_probe_values_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -3.0]])
    rollout = torch.tensor([[-1.1, -1.8, 2.0]])  # Δ = 0.1, -0.2 and a masked-out 5.0
    out = rollout_mismatch(trainer, rollout, torch.tensor([[1, 1, 0]]))
    d = torch.tensor([0.1, -0.2], dtype=torch.float64)
    assert out["rollout/logprob_diff_mean"] == pytest.approx(0.15)
    assert out["rollout/logprob_diff_max"] == pytest.approx(0.2)
    assert out["rollout/kl_k1"] == pytest.approx(0.05)  # mean(log π_rollout − log π_trainer)
    assert out["rollout/kl_k3"] == pytest.approx((torch.expm1(d) - d).mean().item())
    assert out["rollout/ratio_min"] == pytest.approx(torch.exp(d.min()).item())
    assert out["rollout/ratio_max"] == pytest.approx(torch.exp(d.max()).item())
    assert sorted(out) == sorted(KEYS)
    assert rollout_mismatch(trainer, rollout, torch.zeros(1, 3)) == {}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), "fp32", torch.device("cpu"))
    yield tok, model
    torch.set_num_threads(threads)


def _sample(tok, model, dtype, chunk=8, seed=0):
    prompts = ["The movie", "Honestly the food at this place was quite", "Our trip", "I think the game",
               "Yesterday my day", "The weather", "Overall the hotel", "To be fair the coffee"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(seed)
    parts = [generate(model, enc.input_ids[i: i + chunk], enc.attention_mask[i: i + chunk], max_new_tokens=12,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=gen, dtype=dtype,
                      with_logprobs=True)
             for i in range(0, len(prompts), chunk)]
    return pad_and_concat(parts, tok.pad_token_id)


def _trainer_logp(model, roll):
    with torch.no_grad():
        hidden = response_hidden(model, roll.input_ids, roll.attention_mask, roll.prompt_len)
        logp, _ = score_tokens(model, hidden, roll.response_ids, impl="torch", temperature=1.0, with_entropy=False)
    return logp


@pytest.mark.parametrize("decoder", ["lean", "hf"])
def test_fp32_sampler_agrees_with_the_trainer_and_bf16_does_not(lm, decoder, monkeypatch):
    tok, model = lm
    if decoder == "hf":  # any causal LM: the model's own modules under autocast
        monkeypatch.setattr(gpt2_decode, "supports", lambda m: False)
    fp32 = _sample(tok, model, torch.float32)
    assert fp32.logprobs is not None and fp32.logprobs.shape == fp32.response_mask.shape
    assert (fp32.logprobs[fp32.response_mask == 0] == 0).all()
    mism = rollout_mismatch(_trainer_logp(model, fp32), fp32.logprobs, fp32.response_mask)
    assert mism["rollout/logprob_diff_mean"] <= 1e-5 and mism["rollout/logprob_diff_max"] <= 1e-5

    bf16 = _sample(tok, model, torch.bfloat16)
    assert bf16.hidden is None  # the sampler's bf16 states are not the trainer's: the runner recomputes
    assert next(model.parameters()).dtype == torch.float32  # the trainer's weights are untouched
    mism = rollout_mismatch(_trainer_logp(model, bf16), bf16.logprobs, bf16.response_mask)
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per op): a real gap, far above fp32's ~1e-7, far below harm
    assert 1e-4 < mism["rollout/logprob_diff_mean"] < 0.05
    assert mism["rollout/kl_k3"] > 0 and mism["rollout/ratio_min"] < 1 < mism["rollout/ratio_max"]


def test_the_default_path_is_unchanged_and_chunks_keep_the_logprobs(lm):
    tok, model = lm
    whole = _sample(tok, model, None)
    explicit = _sample(tok, model, torch.float32)
    assert torch.equal(whole.input_ids, explicit.input_ids) and whole.hidden is not None
    chunked = _sample(tok, model, torch.float32, chunk=3)
    assert chunked.logprobs.shape == chunked.response_mask.shape
    mism = rollout_mismatch(_trainer_logp(model, chunked), chunked.logprobs, chunked.response_mask)
    assert mism["rollout/logprob_diff_max"] <= 1e-5


def _train(run_dir, *flags):
    from rlhf_core.cli.train import main

    rc = main(["--epochs", "1", "--steps_per_epoch", "4", "--batch_size", "4", "--max_new_tokens", "8",
               "--sample_interval", "0", "--no_tensorboard", "--run_dir", str(run_dir), *flags])
    assert rc == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_dtype")
    return {dtype: _train(root / dtype, "--rollout_dtype", dtype) for dtype in ("fp32", "bf16")}


def test_runner_logs_the_measured_mismatch_every_step(runs):
    for dtype, recs in runs.items():
        assert [r["step"] for r in recs] == [1, 2, 3, 4]
        for rec in recs:
            assert all(k in rec for k in KEYS), (dtype, rec["step"])
            assert all(is_canonical(k) for k in rec)
    for rec in runs["fp32"]:
        assert rec["rollout/logprob_diff_mean"] <= 1e-5 and rec["rollout/logprob_diff_max"] <= 1e-5
    bf16 = [rec["rollout/logprob_diff_mean"] for rec in runs["bf16"]]
    assert all(1e-4 < v < 0.05 for v in bf16) and len(set(bf16)) == len(bf16)  # measured per step, not a constant
    for rec in runs["bf16"]:
        assert rec["rollout/kl_k3"] > 0 and rec["rollout/ratio_min"] < 1 < rec["rollout/ratio_max"]
    # the old log-probs are the trainer's recompute, so the first PPO pass still starts at ratio 1
    assert runs["bf16"][0]["policy/ratio_max"] < 1.5


def test_default_run_measures_nothing(smoke_run_dir):
    recs = [json.loads(line) for line in (smoke_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs and not any(k.startswith("rollout/") for rec in recs for k in rec)


def test_rule_is_quiet_on_real_runs_and_fires_when_their_mismatch_grows(runs):
    for recs in runs.values():
        assert not [a for a in Diagnoser().update(recs) if a.rule == "rollout_logprob_mismatch"]
    # the fp32 run's records with the gap growing 4x a step from its measured bf16 level
    grown = []
    for i, rec in enumerate(runs["fp32"] * 2):
        rec = dict(rec, step=i + 1)
        rec["rollout/logprob_diff_mean"] = runs["bf16"][0]["rollout/logprob_diff_mean"] * 4 ** i
        rec["rollout/kl_k3"] = runs["bf16"][0]["rollout/kl_k3"] * 16 ** i
        grown.append(rec)
    alerts = [a for a in Diagnoser().update(grown) if a.rule == "rollout_logprob_mismatch"]
    assert [a.severity for a in alerts] == ["warning", "critical"]
    assert alerts[0].step < alerts[1].step <= len(grown)
