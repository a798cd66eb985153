"""The TRL adapter under a plain ``transformers.Trainer``: the run says so, and leaves no empty folders."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from adapters.trl import producer_of, profile_trainer
from rlhf_core.runformat.run_reader import Run


class _Texts(torch.utils.data.Dataset):
    def __init__(self, tok):
        enc = tok(["the movie was great and i loved it.", "the food was bad."] * 2, padding="max_length",
                  max_length=12, truncation=True)
        self.rows = [{"input_ids": ids, "attention_mask": mask, "labels": ids}
                     for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {k: torch.tensor(v) for k, v in self.rows[i].items()}


def test_a_plain_trainer_run_is_a_transformers_run(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             logging_steps=1)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                      train_dataset=_Texts(tok))
    profile_trainer(trainer, tmp_path / "run", system_interval_s=None)
    trainer.train()
    run = Run(tmp_path / "run")
    assert run.meta["source"] == "transformers" and run.meta["config"]["trainer"] == "Trainer"
    assert [r["step"] for r in run.metrics()] == [1, 2]
    assert not (tmp_path / "run" / "traces").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_trl_trainers_and_their_subclasses_stay_trl():
    trl = pytest.importorskip("trl")

    class MyGRPO(trl.GRPOTrainer):
        pass

    assert producer_of(MyGRPO.__new__(MyGRPO)) == "trl"
    assert producer_of(Trainer.__new__(Trainer)) == "transformers"
    assert producer_of(None) == "transformers"


def test_token_counting_trainer_keeps_its_steps_and_gets_a_throughput(tiny_model_dir, tmp_path):
    # include_num_input_tokens_seen puts train_runtime and train_tokens_per_second into every step's log; the
    # step is still a step (only the end-of-training summary has train_loss), and the count gives tokens/s
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             logging_steps=1, include_num_input_tokens_seen=True)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                      train_dataset=_Texts(tok))
    profile_trainer(trainer, tmp_path / "run", system_interval_s=None)
    trainer.train()
    run = Run(tmp_path / "run")
    records = run.metrics()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["src/num_input_tokens_seen"] for r in records] == [24, 48, 72]  # 2 rows x 12 tokens a step
    for rec in records:
        assert rec["throughput/tokens_per_s"] == pytest.approx(24 / rec["time/step"])
    assert "train_loss" in run.meta["trl_summary"]
