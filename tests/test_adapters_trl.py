"""The TRL adapter on real TRL trainers (GRPO with beta>0, DPO, Reward, SFT with and without LoRA), offline on CPU."""
import json
import math

import pytest

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoTokenizer

from adapters.trl import RLHFKitCallback, profile_trainer
from rlhf_core.runformat.run_reader import Run
from rlhf_core.stability.analysis import rule_config

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1)
GRPO_CANONICAL = ("loss/total", "grad/norm", "lr", "kl/ref_k3", "policy/entropy", "reward/mean", "reward/std",
                  "response/length_mean", "time/step", "time/rollout", "time/reward", "time/ref_logprobs",
                  "time/update", "time/optimizer", "drift/rel")
GRPO_PHASES = ("time/rollout", "time/reward", "time/ref_logprobs", "time/update", "time/optimizer")


def _reward_len(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts():
    return Dataset.from_list([{"prompt": f"the movie was {w}"} for w in ["good", "bad", "okay", "long"] * 2])


@pytest.fixture(scope="module")
def preferences():
    return Dataset.from_list([{"prompt": "the movie was", "chosen": " great and fun.", "rejected": " bad and dull."},
                              {"prompt": "the food is", "chosen": " wonderful.", "rejected": " awful."}] * 2)


def _grpo(tiny_model_dir, tok, prompts, out, steps=3):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=steps, beta=0.1, max_grad_norm=1.0, **COMMON)
    # the model is given as a folder path: GRPO with beta>0 rebuilds its reference from config._name_or_path
    return GRPOTrainer(model=str(tiny_model_dir), reward_funcs=_reward_len, args=args, train_dataset=prompts,
                       processing_class=tok)


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def _train_losses(trainer):
    return [(h["step"], h["loss"], h["grad_norm"], h.get("reward")) for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def grpo_run(tiny_model_dir, tok, prompts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    trainer = _grpo(tiny_model_dir, tok, prompts, tmp / "trainer")
    profile_trainer(trainer, run_dir=tmp / "run", trace_steps=1, system_interval_s=0.2, tensorboard=True,
                    trace_options={"with_stack": False, "profile_memory": False})
    trainer.train()
    return tmp / "run", _train_losses(trainer)


def test_grpo_run_has_canonical_keys_probes_phases_and_trace(grpo_run):
    run_dir, _ = grpo_run
    run = Run(run_dir)
    meta = run.meta
    assert meta["source"] == "trl" and meta["status"] == "finished"
    assert meta["config"]["trainer"] == "GRPOTrainer" and meta["config"]["args"]["beta"] == 0.1
    assert meta["trl_summary"]["train_runtime"] > 0

    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2, 3]
    for rec in recs:
        missing = [k for k in GRPO_CANONICAL if not _finite(rec.get(k))]
        assert not missing, f"step {rec['step']} lacks {missing}"
        blocks = {k[len("grad/layer/"):]: v for k, v in rec.items() if k.startswith("grad/layer/")}
        assert {"h.0", "h.1", "wte"} <= set(blocks)
        # per-block norms were taken before clipping: they add up to TRL's pre-clip norm, above max_grad_norm
        assert math.sqrt(sum(v * v for v in blocks.values())) == pytest.approx(rec["grad/norm"], rel=1e-4)
        assert rec["grad/norm"] > rec["grad/max_norm"] == 1.0 and rec["grad/clipped"] == 1.0
        assert {"drift/layer/h.0", "drift/layer/h.1"} <= set(rec) and rec["drift/rel"] > 0
        assert sum(rec[k] for k in GRPO_PHASES) <= rec["time/step"] * 1.02
        assert "src/frac_reward_zero_std" in rec and "src/profiling/_prepare_inputs" in rec  # unmapped kept
    drift = [r["drift/rel"] for r in recs]
    assert drift == sorted(drift)  # weights move away from the start
    assert not run.problems() and not run.unknown_keys()
    assert run.traces(), "trace_steps=1 should leave a Chrome trace in traces/"
    assert run.system() and (run_dir / "tb").is_dir()


def test_report_and_diagnose_cli_read_the_trl_run(grpo_run, capsys):
    from rlhf_core.cli import main as cli

    run_dir, _ = grpo_run
    assert cli.main(["report", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"]["steps"] == 3
    assert cli.main(["diagnose", str(run_dir), "--json"]) in (0, 1)
    assert isinstance(json.loads(capsys.readouterr().out), list)


def test_trl_run_has_throughput_and_the_report_shows_trace_export_in_trl_words(grpo_run, capsys):
    from profiler import report

    run_dir, _ = grpo_run
    recs = Run(run_dir).metrics()
    counts = [r["src/num_tokens"] for r in recs]
    assert counts == sorted(counts) and counts[0] > 0  # TRL's cumulative count is kept as it was logged
    # each step generates, so each rate is that step's new tokens over its own step time
    for prev, rec in zip([0] + counts, recs):
        assert rec["throughput/tokens_per_s"] == pytest.approx((rec["src/num_tokens"] - prev) / rec["time/step"])
    (sidecar,) = (run_dir / "traces").glob("*.export.json")
    assert json.loads(sidecar.read_text())["export_s"]["ops_json"] >= 0
    data = report.build_report(Run(run_dir))
    assert data["throughput"]["source"] == "throughput/tokens_per_s" and data["throughput"]["tokens_per_s_mean"] > 0
    assert data["trace_export"]["windows"] == 1 and not data["trace_missed"]
    assert "profile_trainer" in data["trace_hint"] and "--profile" not in data["trace_hint"]
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "trace export: " in out and "throughput: not logged" not in out


def test_training_is_unchanged_by_the_callback(grpo_run, tiny_model_dir, tok, prompts, tmp_path):
    _, with_callback = grpo_run
    trainer = _grpo(tiny_model_dir, tok, prompts, tmp_path / "plain")
    trainer.train()
    assert _train_losses(trainer) == with_callback
    assert len(with_callback) == 3


def test_rloo_logs_k1_and_phases(tiny_model_dir, tok, prompts, tmp_path, caplog):
    from trl import RLOOConfig, RLOOTrainer

    args = RLOOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=2, beta=0.1, **COMMON)
    trainer = RLOOTrainer(model=str(tiny_model_dir), reward_funcs=_reward_len, args=args, train_dataset=prompts,
                          processing_class=tok)
    # trace_steps past max_steps: the window never runs, which is said once and recorded, not silent
    profile_trainer(trainer, tmp_path / "rloo", system_interval_s=None, trace_steps=5)
    trainer.train()
    run = Run(tmp_path / "rloo")
    assert run.meta["config"]["trainer"] == "RLOOTrainer"
    (event,) = [e for e in run.events() if e["kind"] == "trace"]
    assert event["rule"] == "window_missed" and event["step"] == 2 and "steps 3-7" in event["message"]
    assert sum("no trace window ran" in r.getMessage() for r in caplog.records) == 1
    assert not (tmp_path / "rloo" / "traces").exists()
    for rec in run.metrics():
        assert "kl/ref_k3" not in rec  # RLOO's "kl" is log π_old − log π_ref: the k1 estimator
        for key in ("kl/ref_k1", "loss/total", "reward/mean", "time/rollout", "time/ref_logprobs", "time/update",
                    "grad/layer/h.0", "drift/rel"):
            assert _finite(rec.get(key)), key


def test_dpo_and_reward_trainers_via_callbacks_argument(tiny_model_dir, tok, preferences, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    dpo = DPOTrainer(model=str(tiny_model_dir), train_dataset=preferences, processing_class=tok,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo_out"), beta=0.1, max_length=32, max_steps=2,
                                    per_device_train_batch_size=2, **COMMON),
                     callbacks=[RLHFKitCallback(tmp_path / "dpo", system_interval_s=None)])
    dpo.train()
    run = Run(tmp_path / "dpo")
    assert run.meta["config"]["trainer"] == "DPOTrainer"  # found without being handed the trainer
    for rec in run.metrics():
        for key in ("loss/total", "grad/norm", "reward/chosen", "reward/rejected", "reward/margin", "reward/accuracy",
                    "policy/entropy", "drift/rel", "time/update", "time/optimizer", "grad/layer/h.0"):
            assert _finite(rec.get(key)), key
        assert "src/logps/chosen" in rec

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rm = RewardTrainer(model=model, train_dataset=preferences, processing_class=tok,
                       args=RewardConfig(output_dir=str(tmp_path / "rm_out"), max_length=32, max_steps=2,
                                         per_device_train_batch_size=2, **COMMON))
    profile_trainer(rm, tmp_path / "rm", system_interval_s=None)
    rm.train()
    rec = Run(tmp_path / "rm").metrics()[-1]
    assert all(_finite(rec.get(k)) for k in ("reward/mean", "reward/min", "reward/max", "reward/accuracy",
                                              "reward/margin", "grad/layer/score"))


def _sft(tiny_model_dir, tok, out, args_extra=None, **kwargs):
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"text": "the movie was great and i loved it."}, {"text": "the food was bad."}] * 2)
    args = SFTConfig(output_dir=str(out), max_length=32, max_steps=2, per_device_train_batch_size=2, **COMMON,
                     **(args_extra or {}))
    return SFTTrainer(args=args, train_dataset=data, processing_class=tok, **kwargs)


def test_sft_with_lora_probes_only_the_trainable_parameters(tiny_model_dir, tok, tmp_path):
    from peft import LoraConfig

    evals = Dataset.from_list([{"text": "the game was fun."}] * 2)
    trainer = _sft(tiny_model_dir, tok, tmp_path / "out", model=str(tiny_model_dir), eval_dataset=evals,
                   args_extra=dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2),
                   peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    profile_trainer(trainer, tmp_path / "lora", system_interval_s=None)
    trainer.train()
    run = Run(tmp_path / "lora")
    assert run.meta["config"]["peft"]["default"]["r"] == 4
    assert [r["step"] for r in run.metrics()] == [1, 2]  # the evaluation joined its step's record
    for rec in run.metrics():
        assert _finite(rec["eval/loss/total"])
        grads = {k for k in rec if k.startswith("grad/layer/")}
        drift = {k for k in rec if k.startswith("drift/layer/")}
        assert grads == {"grad/layer/h.0", "grad/layer/h.1"}  # LoRA adapters only: no embeddings, no ln_f
        assert drift == {"drift/layer/h.0", "drift/layer/h.1"}
        assert _finite(rec["loss/total"]) and _finite(rec["policy/entropy"]) and rec["drift/rel"] > 0


def test_nan_loss_is_logged_and_raises_a_live_alert(tiny_model_dir, tok, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    trainer = _sft(tiny_model_dir, tok, tmp_path / "out", model=model)
    assert trainer.args.logging_nan_inf_filter  # TRL's default would hide the NaN loss
    profile_trainer(trainer, tmp_path / "nan", system_interval_s=None, kl_budget=0.3)
    trainer.train()
    assert trainer.args.logging_nan_inf_filter is False
    run = Run(tmp_path / "nan")
    assert run.meta["detector"] == {"kl_budget": 0.3}  # so `rlhfkit diagnose` and the dashboard use it too
    assert rule_config(run.meta).kl_budget == 0.3 and rule_config(run.meta).producer == "trl"
    first = run.metrics()[0]
    assert math.isnan(first["loss/total"]) and "loss/total" in first["nonfinite"]
    alerts = [e for e in run.events() if e["kind"] == "alert"]
    assert alerts and alerts[0]["rule"] == "nonfinite" and alerts[0]["step"] == 1
    assert json.loads((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()[0])["loss/total"] is None
