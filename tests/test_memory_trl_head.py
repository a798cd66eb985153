"""TRL's GRPO log-prob head in the planner: the version that picks it, the completion-only logits it holds, the
readers and the adapter that set it, and the table checked against TRL's own function measured on CPU."""
import json
from dataclasses import replace

import pytest

from benchmarks.bench_memory_trl_head import measure
from benchmarks.common import head_entry_matches
from memory.cli import main
from memory.deploy import TRL_HEAD, _chunk_head_bytes, _head_bytes_per_token, head_tokens, plan_deployment, trl_head
from memory.inputs import trl_from_mappings

CONFIG = {"model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "per_device_train_batch_size": 16,
          "max_prompt_length": 512, "max_completion_length": 2048, "num_generations": 16, "beta": 0.0,
          "gradient_checkpointing": True, "bf16": True, "model_init_kwargs": {"dtype": "bfloat16"}}


@pytest.mark.parametrize("version, head", [
    (None, "trl_fused"), ("1.16.0", "trl_fused"), ("1.15.0", "trl_fused"), ("1.14.0", "trl"), ("1.0.0", "trl"),
    ("0.18.0", "trl_copy"), ("0.16.1", "trl_copy"), ("0.15.2", "trl_nodiv"), ("0.14", "trl_nodiv"),
])
def test_the_version_picks_the_head(version, head):
    assert trl_head(version) == head
    assert trl_from_mappings(dict(CONFIG), trl_version=version).logprob_head == head


@pytest.mark.parametrize("version, head", [(None, "trl_fused_torch"), ("1.16.0", "trl_fused_torch"),
                                           ("1.15.0", "trl_fused"), ("1.14.0", "trl")])
def test_without_triton_trl_folds_the_fused_heads_tiles_with_torch_from_116(version, head):
    assert trl_head(version, triton=False) == head


def test_the_fused_head_holds_no_logits_but_its_tile_buffer():
    """TRL 1.15+: the head's bytes do not grow with the vocabulary per token; the 4096 x 32768 buffer does not
    grow past 4096 tokens; only full fine-tuning adds the head's fp32 gradient."""
    dep = trl_from_mappings(dict(CONFIG), trl_version="1.16.0")
    a, db = dep.actor.arch, dep.actor.dtype_bytes
    assert _head_bytes_per_token(dep.actor, dep, False) == a.hidden * db + 56
    buf = 4096 * 32768 * db
    assert _chunk_head_bytes(dep.actor, dep, False, 16 * 2048) == buf
    assert _chunk_head_bytes(dep.actor, dep, False, 100) == 100 * 32768 * db
    full = _chunk_head_bytes(dep.actor, dep, True, 16 * 2048)
    lora = dep.with_(actor=replace(dep.actor, lora_rank=16))
    assert full - _chunk_head_bytes(lora.actor, lora, True, 16 * 2048) >= a.vocab * a.hidden * 4


def test_a_bad_version_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "grpo.json"
    cfg.write_text(json.dumps(CONFIG))
    assert main(["plan", "--trl_config", str(cfg), "--trl_version", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MAJOR.MINOR" in err


def test_cli_takes_the_version_and_names_the_head(tmp_path, capsys):
    cfg = tmp_path / "grpo.json"
    cfg.write_text(json.dumps(CONFIG))
    assert main(["plan", "--trl_config", str(cfg), "--trl_version", "0.18.0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["logprob_head"] == "trl_copy"


def test_only_the_completion_has_logits():
    """TRL (before its fused head, 1.15) asks the model for logits_to_keep positions: a longer prompt adds no
    head bytes (the reference head, over every token, grows with it)."""
    dep = trl_from_mappings(dict(CONFIG), trl_version="1.14.0")
    assert head_tokens(dep, 4) == 4 * 2048
    longer = dep.with_(prompt_len=4096)
    scoring = [plan_deployment(d).groups[0].table["actor.activations"]["scoring"] for d in (dep, longer)]
    assert scoring[0] == pytest.approx(scoring[1], rel=0.02)
    torch_head = [plan_deployment(d.with_(logprob_head="torch")).groups[0].table["actor.activations"]["scoring"]
                  for d in (dep, longer)]
    assert torch_head[1] > 2 * torch_head[0]


def test_each_version_costs_its_measured_bytes():
    dep = trl_from_mappings(dict(CONFIG))
    V = dep.actor.arch.vocab
    for head, (grad, nograd, _, _) in TRL_HEAD.items():
        d = dep.with_(logprob_head=head)
        assert _head_bytes_per_token(d.actor, d, True) == grad * V
        assert _head_bytes_per_token(d.actor, d, False) == nograd * V
    assert _head_bytes_per_token(dep.actor, dep.with_(logprob_head="torch"), True) == 12 * V


def test_adapter_plans_grpo_with_the_installed_head_and_dpo_with_the_reference_head(tiny_model_dir, tmp_path):
    """The adapter predicts a live trainer: GRPO/RLOO with the installed TRL's head over the completion, DPO and
    SFT (a loss over every token) with the reference head."""
    import trl
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, GRPOConfig

    from adapters.trl_memory import _trl_version, trainer_deployment

    assert _trl_version() == trl.__version__
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    common = dict(report_to=[], use_cpu=True, save_strategy="no")
    grpo = GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, **common)
    dep, _ = trainer_deployment(grpo, model, "GRPOTrainer", 8 << 30, prompt_len=16)
    assert dep.logprob_head == trl_head(trl.__version__) and head_tokens(dep, 4) == 4 * 8
    dpo = DPOConfig(output_dir=str(tmp_path / "d"), per_device_train_batch_size=2, max_length=64, **common)
    dep, _ = trainer_deployment(dpo, model, "DPOTrainer", 8 << 30)
    assert dep.logprob_head == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("division, grad, head", [("copy", True, "trl_copy"), ("inplace", True, "trl"),
                                                  ("none", False, "trl_nodiv")])
def test_table_matches_trls_own_function(division, grad, head):
    """TRL's selective_log_softmax (the installed TRL's per-row path, which CPU tensors take) behind a bf16 LM
    head and the version's division, measured at 4 and 8 sequences in fresh processes: per completion token and
    vocabulary entry (and per token of the looped row) within 5% of TRL_HEAD. Every entry both ways:
    benchmarks/bench_memory_trl_head.py."""
    m = measure(division, grad)
    planned = TRL_HEAD[head]
    assert head_entry_matches(m["per_token_vocab"], m["per_row_token_vocab"], planned[0 if grad else 1],
                              planned[2 if grad else 3]), m


def test_the_adapter_plans_autocast_over_fp32_weights(tiny_model_dir, tmp_path):
    """bf16=True on an fp32 model: the fused head computes in bf16 (half the tile buffer), the plan notes that
    the layers' activations are planned in fp32."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from adapters.trl_memory import trainer_deployment

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = {b: GRPOConfig(output_dir=str(tmp_path / str(b)), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, report_to=[], use_cpu=True, save_strategy="no", bf16=b)
            for b in (False, True)}
    plain, _ = trainer_deployment(args[False], model, "GRPOTrainer", 8 << 30, prompt_len=16, device="cpu")
    amp, _ = trainer_deployment(args[True], model, "GRPOTrainer", 8 << 30, prompt_len=16, device="cpu")
    assert plain.autocast_bytes is None and amp.autocast_bytes == 2
    tokens = head_tokens(amp, 4)
    buffer = min(tokens, 4096) * 32768
    assert (_chunk_head_bytes(plain.actor, plain, False, tokens) - _chunk_head_bytes(amp.actor, amp, False, tokens)
            == 2 * buffer)
    assert any("autocast" in n for n in plan_deployment(amp).notes)
    assert not any("autocast" in n for n in plan_deployment(plain).notes)


@pytest.mark.parametrize("changes, dtype_bytes, autocast", [
    ({}, 4, 2),                                                     # TRL's defaults: fp32 model, bf16 autocast
    ({"bf16": False}, 4, None),                                     # fp32 throughout
    ({"torch_dtype": "bfloat16"}, 2, None),                         # open-r1 style: the model loaded in bf16
    ({"model_init_kwargs": {"dtype": "float32"}}, 4, 2),
])
def test_a_trl_config_without_a_dtype_plans_trls_fp32_model_under_autocast(changes, dtype_bytes, autocast):
    """TRL loads the model in fp32 unless model_init_kwargs names a dtype; under plain data parallelism the
    Trainer's bf16 (its default) then runs it under autocast."""
    cfg = {k: v for k, v in CONFIG.items() if k != "model_init_kwargs"}
    dep = trl_from_mappings({**cfg, **changes})
    assert dep.sharding.kind == "zero0"
    assert (dep.actor.dtype_bytes, dep.autocast_bytes) == (dtype_bytes, autocast)
