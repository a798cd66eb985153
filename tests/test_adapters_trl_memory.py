"""The TRL adapter's memory prediction on a real tiny TRL GRPO run on CPU: memory.json holds the planner's
per-phase bytes and the inputs it used; a fake-small device triggers one warning; failures never stop training."""
import json
import logging

import pytest

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoTokenizer

from adapters.trl import RLHFKitCallback
from adapters.trl_memory import PhasePeaks, with_measured
from memory.deploy import plan_deployment
from memory.deploy_json import deployment_from_dict

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1)


def _reward_len(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _train(tiny_model_dir, out, steps=1, **callback):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=steps, beta=0.1, **COMMON)
    prompts = Dataset.from_list([{"prompt": f"the movie was {w}"} for w in ["good", "bad", "okay", "long"]])
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=_reward_len, args=args, train_dataset=prompts,
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    cb = RLHFKitCallback(out / "run", trainer=trainer, system_interval_s=None, **callback)
    trainer.add_callback(cb)
    trainer.train()
    return trainer, json.loads((out / "run" / "memory.json").read_text()), out / "run"


@pytest.fixture(scope="module")
def grpo_memory(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("grpo_mem"), memory_prompt_len=16)


def test_memory_json_holds_the_prediction_and_its_inputs(grpo_memory):
    trainer, mem, _ = grpo_memory
    model = trainer.model
    assert mem["kind"] == "deployment" and mem["source"] == "adapters.trl" and mem["device"] == "cpu"
    inputs = mem["inputs"]
    exact = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert inputs["params"] == exact
    assert inputs["kind"] == "GRPO" and inputs["reference"] is True  # beta 0.1 keeps a reference
    assert inputs["micro_batch"] == 4 and inputs["response_len"] == 8 and inputs["prompt_len"] == 16
    assert inputs["dtype_bytes"] == 4 and inputs["world_size"] == 1 and inputs["engine"] == "hf"
    pred = mem["prediction"]
    assert set(pred["phases"]) == {"generation", "scoring", "update", "optimizer_step", "weight_sync"}
    for comps in pred["phases"].values():
        assert comps["total"] == sum(v for k, v in comps.items() if k != "total")
    assert pred["peak_bytes"] == max(c["total"] for c in pred["phases"].values())
    # weights are the exact fp32 bytes; Adam keeps two fp32 moments per parameter
    assert pred["phases"]["optimizer_step"]["actor.weights"] == 4 * exact
    assert pred["phases"]["optimizer_step"]["actor.optimizer"] == 8 * exact
    assert pred["phases"]["scoring"]["reference.weights"] == 4 * exact
    # CPU: compared with the machine's RAM, no comparable measurement
    assert mem["device_memory_source"].startswith("cpu") and mem["fits_device"] is True
    assert mem["measured"] is None and mem["comparable"] is False
    assert mem["seconds"] < 1.0
    # the stored deployment re-plans to the same peak (what the dashboard's what-if starts from)
    again = plan_deployment(deployment_from_dict(mem["deployment"]))
    assert again.groups[0].totals["update"] == pred["phases"]["update"]["total"]


def test_fake_small_device_warns_once_and_training_goes_on(tiny_model_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("RLHFKIT_DEVICE_MEMORY", "1MiB")
    with caplog.at_level(logging.WARNING, logger="adapters.trl"):
        trainer, mem, _ = _train(tiny_model_dir, tmp_path, steps=2)
    warned = [r for r in caplog.records if "exceeds the device" in r.getMessage()]
    assert len(warned) == 1 and "1.00 MiB" in warned[0].getMessage()
    assert mem["fits_device"] is False and mem["device_memory_bytes"] == 2**20
    assert mem["device_memory_source"] == "override" and trainer.state.global_step == 2


def test_a_failing_prediction_is_one_warning_line(tiny_model_dir, tmp_path, caplog, monkeypatch):
    import adapters.trl_memory as tm

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tm, "predict_trainer", broken)
    with caplog.at_level(logging.WARNING, logger="adapters.trl"):
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, max_steps=1, **COMMON)
        prompts = Dataset.from_list([{"prompt": "the movie was good"}] * 2)
        trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=_reward_len, args=args,
                              train_dataset=prompts, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        trainer.add_callback(RLHFKitCallback(tmp_path / "run", trainer=trainer, system_interval_s=None))
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "memory prediction skipped" in r.getMessage()]
    assert lines == ["rlhfkit: memory prediction skipped (RuntimeError: boom)"]
    assert trainer.state.global_step == 1 and not (tmp_path / "run" / "memory.json").exists()


def test_memory_measure_keeps_the_adapters_prediction(grpo_memory, capsys):
    from memory.cli import main

    _, mem, run_dir = grpo_memory
    before = (run_dir / "memory.json").read_text()
    assert main(["measure", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "the TRL adapter's prediction" in out and f"in {mem['prediction']['peak_phase']}" in out
    assert "measured: none" in out and (run_dir / "memory.json").read_text() == before


def test_phase_peaks_attribute_spans_and_sit_next_to_the_prediction():
    from adapters.trl_profiling import Span

    values = iter([0, 100, 300, 250, 50, 900, 400, 120])
    resets: list[int] = []
    peaks = PhasePeaks(lambda: next(values), lambda: resets.append(1))
    peaks.mark()  # step begins
    for name, t0, t1 in (("GRPOTrainer.transformers.generate", 0, 1), ("GRPOTrainer._calculate_rewards", 1, 2),
                         ("GRPOTrainer._get_per_token_logps_and_entropies", 2, 3),
                         ("GRPOTrainer.sync_weights", 3, 4),
                         ("GRPOTrainer._get_per_token_logps_and_entropies", 5, 6),  # the update's forward
                         ("GRPOTrainer.compute_loss", 5, 7)):
        peaks.span_ended(Span(name, t0, t1))
    peaks.fold()
    peaks.add("optimizer", peaks.mark())
    assert len(resets) == 8
    assert peaks.peaks == {"rollout": 100, "reward": 300, "ref_logprobs": 250, "weight_sync": 50, "update": 900,
                           "optimizer": 120}
    report = {"prediction": {"phases": {"scoring": {"total": 600}, "update": {"total": 450}}}, "measured": None}
    out = with_measured(report, peaks)
    assert out["measured"]["phases"] == {"generation": 100, "scoring": 300, "weight_sync": 50, "update": 900,
                                         "optimizer_step": 120}
    assert out["comparable"] is True and out["ratio"]["scoring"] == 2.0 and out["ratio"]["update"] == 0.5
    assert with_measured(report, PhasePeaks(lambda: 0, lambda: None)) is report


def test_real_grpo_spans_reach_each_phase_peak(tiny_model_dir, tmp_path):
    """The CUDA wiring on the CPU: a fake allocator counter stands in for ``max_memory_allocated``, installed
    right after the adapter's train start; a real GRPO step's spans and optimizer hooks fill every phase."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    calls = iter(range(1, 10_000))

    class FakeCuda(TrainerCallback):
        def __init__(self, kit):
            self.kit = kit

        def on_train_begin(self, args, state, control, **kwargs):
            self.kit._mem_peaks = PhasePeaks(lambda: next(calls), lambda: None)

    args = GRPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=2, beta=0.1, **COMMON)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=_reward_len, args=args,
                          train_dataset=Dataset.from_list([{"prompt": "the movie was good"}] * 4),
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    kit = RLHFKitCallback(tmp_path / "run", trainer=trainer, system_interval_s=None)
    trainer.add_callback(kit)
    trainer.add_callback(FakeCuda(kit))
    trainer.train()
    mem = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert set(mem["measured"]["runner_phases"]) >= {"rollout", "reward", "ref_logprobs", "update", "optimizer"}
    assert set(mem["measured"]["phases"]) >= {"generation", "scoring", "update", "optimizer_step"}
    assert mem["comparable"] is True and set(mem["ratio"]) == set(mem["measured"]["phases"])
    # the counter grows, so each phase's value says when it was marked in the last step: generation first,
    # then the scoring passes (TRL 1.16: reference log-probs, then rewards), the update, the optimizer step
    order = mem["measured"]["runner_phases"]
    assert order["rollout"] < min(order["reward"], order["ref_logprobs"])
    assert max(order["reward"], order["ref_logprobs"]) < order["update"] < order["optimizer"]
