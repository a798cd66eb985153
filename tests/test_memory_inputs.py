"""memory.inputs and ``rlhfkit memory plan`` for deployments: CLI flags, TRL config + DeepSpeed/accelerate
files, an OpenRLHF command line, --json output, and one-line errors."""
import json

import pytest

from memory.cli import main
from memory.inputs import from_openrlhf, from_trl, sharding_from_deepspeed

GiB = 2**30


def test_trl_yaml_with_deepspeed_json(tmp_path):
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
                                "stage3_prefetch_bucket_size": 1e7}, "bf16": {"enabled": True}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "grpo.yaml").write_text(
        "model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nper_device_train_batch_size: 4\nnum_generations: 8\n"
        "max_completion_length: 1024\nuse_vllm: true\nvllm_mode: colocate\nvllm_gpu_memory_utilization: 0.4\n"
        "vllm_enable_sleep_mode: true\nbeta: 0.04\ngradient_checkpointing: true\nbf16: true\n"
        "optim: adamw_8bit\ndeepspeed: ds.json\nnum_processes: 8\n")
    dep = from_trl(str(tmp_path / "grpo.yaml"))
    assert dep.actor.arch.params == 7_615_616_512 and dep.reference is not None  # beta > 0 keeps a reference
    assert dep.sharding.kind == "zero3" and dep.sharding.offload_optimizer
    assert dep.sharding.prefetch_bucket == 10_000_000 and dep.sharding.reduce_bucket == 500_000_000
    assert dep.engine.kind == "vllm" and dep.engine.group == "train" and dep.engine.sleep
    assert dep.engine.gpu_memory_utilization == 0.4 and dep.groups == {"train": 8}
    assert dep.micro_batch == 4 and dep.response_len == 1024 and dep.optimizer == "adamw8bit"
    # server mode: vLLM on its own GPUs; beta 0 (TRL's default) drops the reference
    (tmp_path / "server.json").write_text(json.dumps({"model_name_or_path": "Qwen2.5-0.5B", "use_vllm": True,
                                                       "vllm_mode": "server", "vllm_tensor_parallel_size": 2}))
    srv = from_trl(str(tmp_path / "server.json"))
    assert srv.engine.group == "vllm" and srv.groups["vllm"] == 2 and srv.reference is None


def test_trl_with_accelerate_fsdp_yaml(tmp_path):
    (tmp_path / "acc.yaml").write_text(
        "distributed_type: FSDP\nnum_processes: 4\nnum_machines: 2\nfsdp_config:\n"
        "  fsdp_sharding_strategy: SHARD_GRAD_OP\n  fsdp_offload_params: false\n")
    (tmp_path / "cfg.json").write_text(json.dumps({"model_name_or_path": "Llama-3-8B"}))
    dep = from_trl(str(tmp_path / "cfg.json"), accelerate=str(tmp_path / "acc.yaml"))
    assert dep.sharding.kind == "fsdp_grad_op" and dep.groups == {"train": 8}
    (tmp_path / "acc_ds.yaml").write_text("distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config:\n"
                                          "  zero_stage: 2\n  offload_optimizer_device: cpu\n")
    dep2 = from_trl(str(tmp_path / "cfg.json"), accelerate=str(tmp_path / "acc_ds.yaml"))
    assert dep2.sharding.kind == "zero2" and dep2.sharding.offload_optimizer
    assert sharding_from_deepspeed({}).kind == "zero0"
    with pytest.raises(ValueError, match="no model_name_or_path"):
        (tmp_path / "empty.json").write_text("{}")
        from_trl(str(tmp_path / "empty.json"))


def test_openrlhf_command_line():
    cmd = ("python3 -m openrlhf.cli.train_ppo_ray --pretrain meta-llama/Meta-Llama-3-8B "
           "--reward_pretrain Qwen2.5-0.5B --critic_pretrain Llama-3-8B --actor_num_gpus_per_node 4 "
           "--critic_num_gpus_per_node 2 --reward_num_gpus_per_node 2 --ref_num_gpus_per_node 2 "
           "--colocate_critic_reward --vllm_num_engines 2 --vllm_tensor_parallel_size 2 "
           "--vllm_gpu_memory_utilization 0.8 --zero_stage 3 --bf16 --gradient_checkpointing --adam_offload "
           "--micro_train_batch_size 2 --micro_rollout_batch_size 4 --prompt_max_len 1024 --generate_max_len 2048 "
           "--flash_attn --unknown_flag 7")
    dep = from_openrlhf(cmd)
    assert dep.groups == {"actor": 4, "ref": 2, "critic": 2, "vllm": 4}
    assert dep.reward.group == "critic" and dep.critic.value_head and dep.reference.group == "ref"
    assert dep.sharding.kind == "zero3" and dep.sharding.offload_optimizer and dep.attn == "flash"
    assert (dep.micro_batch, dep.score_micro_batch, dep.seq) == (2, 4, 3072)
    assert dep.engine.tp == 2 and dep.engine.gpu_memory_utilization == 0.8 and dep.framework == "openrlhf"
    colo = from_openrlhf("--pretrain Qwen2.5-7B --colocate_all_models --vllm_num_engines 8 --vllm_enable_sleep "
                         "--deepspeed_enable_sleep --init_kl_coef 0 --remote_rm_url http://rm --bf16")
    assert colo.groups == {"actor": 8} and colo.engine.group == "actor" and colo.engine.sleep and colo.train_sleep
    assert colo.reference is None and colo.reward is None and colo.engine.gpu_memory_utilization == 0.95
    with pytest.raises(ValueError, match="--pretrain"):
        from_openrlhf("--zero_stage 3")


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_flags_json_answer(capsys):
    rep = _json(capsys, ["plan", "--model", "Qwen2.5-7B", "--nodes", "1", "--gpus_per_node", "8", "--gpu_memory",
                         "80GiB", "--zero", "3", "--engine", "vllm", "--vllm_gpu_memory_utilization", "0.4",
                         "--colocate", "--sleep", "--prompt_len", "512", "--max_new_tokens", "1024",
                         "--mini_batch_size", "2", "--gradient_checkpointing", "--json"])
    assert rep["kind"] == "deployment" and isinstance(rep["fits"], bool) and "min_gpus" in rep
    g = rep["groups"]["train"]
    assert g["gpus"] == 8 and g["peak_phase"] in g["phases"] and g["peak_bytes"] == max(g["phases"].values())
    assert set(next(iter(g["table"].values()))) == {"generation", "scoring", "update", "optimizer_step", "weight_sync"}
    assert rep["engine"]["kv_tokens"] > 0 and rep["engine"]["concurrent_sequences"] > 0
    assert rep["inputs"]["roles"]["actor"]["params"] == 7_615_616_512
    assert rep["seconds"] < 2


def test_cli_openrlhf_and_trl_text_and_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--from_openrlhf", "--pretrain Llama-3-70B --zero_stage 3 --bf16 --colocate_all_models "
                 "--vllm_num_engines 4 --vllm_tensor_parallel_size 8 --actor_num_nodes 4 --vllm_enable_sleep "
                 "--deepspeed_enable_sleep --gradient_checkpointing --init_kl_coef 0 --remote_rm_url x",
                 "--gpu_memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "group actor: 32 GPU(s)" in out and "fewest GPUs" in out
    assert list(tmp_path.iterdir()) == []  # no stray memory.json
    (tmp_path / "grpo.json").write_text(json.dumps({"model_name_or_path": "Qwen2.5-1.5B", "use_vllm": True}))
    assert main(["plan", "--trl_config", str(tmp_path / "grpo.json"), "--out", str(tmp_path / "plan.json")]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["kind"] == "deployment"


@pytest.mark.parametrize("argv,msg", [
    (["--model", "no-such-model", "--nodes", "1"], "no-such-model"),
    (["--model", "Qwen2.5-7B", "--gpu_memory", "lots"], "memory size"),
    (["--trl_config", "/nonexistent.yaml"], "cannot read"),
    (["--model", "Qwen2.5-7B", "--engine", "vllm", "--vllm_gpu_memory_utilization", "1.5"], "gpu_memory_utilization"),
])
def test_cli_bad_input_is_one_line(argv, msg, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_single_device_plan_unchanged(capsys):
    assert main(["plan", "--model", "tiny", "--budget", "64MiB", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "rollout" in out and "suggestions" in out and "group" not in out


def test_verl_overrides(capsys):
    from memory.inputs import from_verl

    cmd = ("python3 -m verl.trainer.main_ppo algorithm.adv_estimator=grpo data.max_prompt_length=512 "
           "data.max_response_length=1024 actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct "
           "actor_rollout_ref.model.enable_gradient_checkpointing=True actor_rollout_ref.actor.use_kl_loss=True "
           "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 "
           "actor_rollout_ref.actor.fsdp_config.param_offload=True "
           "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True actor_rollout_ref.rollout.name=vllm "
           "actor_rollout_ref.rollout.gpu_memory_utilization=0.4 "
           "actor_rollout_ref.rollout.tensor_model_parallel_size=2 "
           "actor_rollout_ref.ref.fsdp_config.param_offload=True trainer.n_gpus_per_node=8 trainer.nnodes=2")
    dep = from_verl(cmd)
    assert dep.groups == {"all": 16} and dep.sharding.kind == "fsdp_full"
    assert dep.phase_offload_params and dep.phase_offload_optimizer  # veRL loads them per phase
    assert dep.actor.storage_bytes == 4  # fsdp_workers.py: the actor is created in fp32 by default
    assert dep.reference is not None and dep.reference.offload and dep.critic is None  # GRPO: no critic
    assert dep.engine.tp == 2 and dep.engine.sleep and dep.micro_batch == 4
    from memory.deploy import plan_deployment

    t = plan_deployment(dep).groups[0].table
    assert t["actor.weights"]["generation"] == 0 and t["actor.weights"]["update"] == dep.actor.arch.params * 4 // 16
    assert t["actor.optimizer"]["scoring"] == 0 and t["actor.optimizer"]["update"] > 0
    assert plan_deployment(dep).groups[0].host_bytes > 0
    assert dep.framework == "verl" and dep.seq == 1536
    gae = from_verl(cmd.replace("algorithm.adv_estimator=grpo", "algorithm.adv_estimator=gae"))
    assert gae.critic is not None and gae.critic.value_head
    rep = _json(capsys, ["plan", "--from_verl", cmd, "--json"])
    assert rep["groups"]["all"]["gpus"] == 16
    assert any(s["flag"] and s["flag"].startswith("actor_rollout_ref.") for s in rep["suggestions"])
    with pytest.raises(ValueError, match="model.path"):
        from_verl("trainer.n_gpus_per_node=8")
    # the weight-sync path: actor.strategy (fsdp = FSDP1 by default) and layered_summon, which veRL only
    # accepts with a preloaded base (a non-dummy load_format)
    assert dep.fsdp_version == 1 and not dep.layered_summon
    assert from_verl(cmd + " actor_rollout_ref.actor.strategy=fsdp2").fsdp_version == 2
    layered = " actor_rollout_ref.rollout.layered_summon=True"
    assert not from_verl(cmd + layered).layered_summon  # default load_format dummy_dtensor
    assert from_verl(cmd + layered + " actor_rollout_ref.rollout.load_format=safetensors").layered_summon
