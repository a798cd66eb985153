"""memory.inputs and ``rlhfkit memory plan`` for deployments: CLI flags, TRL config + DeepSpeed/accelerate
files, an OpenRLHF command line, --json output, and one-line errors."""
import json
import re

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
    # it fits with room to spare: no change is offered that saves nothing
    assert rep["fits"] and all(s["saving_bytes"] > 0 for s in rep["suggestions"])
    tight = _json(capsys, ["plan", "--from_verl", cmd, "--gpu_memory", "12GiB", "--json"])
    assert not tight["fits"]
    assert any(s["flag"] and s["flag"].startswith("actor_rollout_ref.") for s in tight["suggestions"])
    with pytest.raises(ValueError, match="model.path"):
        from_verl("trainer.n_gpus_per_node=8")
    # the weight-sync path: actor.strategy (fsdp = FSDP1 by default) and layered_summon, which veRL only
    # accepts with a preloaded base (a non-dummy load_format)
    assert dep.fsdp_version == 1 and not dep.layered_summon
    assert from_verl(cmd + " actor_rollout_ref.actor.strategy=fsdp2").fsdp_version == 2
    layered = " actor_rollout_ref.rollout.layered_summon=True"
    assert not from_verl(cmd + layered).layered_summon  # default load_format dummy_dtensor
    assert from_verl(cmd + layered + " actor_rollout_ref.rollout.load_format=safetensors").layered_summon


# ---- OpenRLHF's dotted flags (ed62d0e2, 2026-04-19 .. 3c3be623, 2026-08-13) ----------------------------------------

# README.md at OpenRLHF 3c3be623, "RL Training: PPO/REINFORCE++ with Ray and vLLM", verbatim. It keeps two flat
# flags (--prompt_max_len, --generate_max_len) that train_ppo_ray.py at that commit no longer has (its parse_args
# rejects them); examples/scripts/train_ppo_ray_hybrid_engine.sh there writes --data.max_len 2048 instead.
OPENRLHF_README_3C3BE623 = """ray job submit --address="http://127.0.0.1:8265" \\
   --runtime-env-json='{"working_dir": "/openrlhf"}' \\
   -- python3 -m openrlhf.cli.train_ppo_ray \\
   --ref.num_nodes 1 \\
   --ref.num_gpus_per_node 8 \\
   --reward.num_nodes 1 \\
   --reward.num_gpus_per_node 8 \\
   --critic.num_nodes 1 \\
   --critic.num_gpus_per_node 8 \\
   --actor.num_nodes 1 \\
   --actor.num_gpus_per_node 8 \\
   --vllm.num_engines 4 \\
   --vllm.tensor_parallel_size 2 \\
   --train.colocate_all \\
   --vllm.gpu_memory_utilization 0.5 \\
   --actor.model_name_or_path OpenRLHF/Llama-3-8b-sft-mixture \\
   --reward.model_name_or_path OpenRLHF/Llama-3-8b-rm-700k \\
   --ckpt.output_dir /openrlhf/examples/test_scripts/final/llama3-8b-rlhf \\
   --ckpt.path /openrlhf/examples/test_scripts/ckpt/llama3-8b-rlhf \\
   --ckpt.save_hf \\
   --train.batch_size 128 \\
   --rollout.batch_size 1024 \\
   --train.dynamic_batch_enable \\
   --rollout.n_samples_per_prompt 1 \\
   --train.max_epochs 1 \\
   --prompt_max_len 1024 \\
   --data.max_samples 100000 \\
   --generate_max_len 1024 \\
   --ds.zero_stage 3 \\
   --ds.param_dtype bf16 \\
   --actor.adam.lr 5e-7 \\
   --critic.adam.lr 9e-6 \\
   --algo.kl.init_coef 0.01 \\
   --data.prompt_dataset OpenRLHF/prompt-collection-v0.1 \\
   --data.input_key context_messages \\
   --data.apply_chat_template \\
   --reward.normalize_enable \\
   --actor.gradient_checkpointing_enable \\
   --ds.packing_samples \\
   --vllm.sync_backend nccl \\
   --vllm.enforce_eager \\
   --vllm.enable_sleep \\
   --ds.enable_sleep \\
   --logger.wandb.key {wandb_token}
"""
# the OpenRLHF checkpoints have Llama-3-8B's shape (not built in, and the tests run offline)
_LLAMA = {"OpenRLHF/Llama-3-8b-sft-mixture": "Llama-3-8B", "OpenRLHF/Llama-3-8b-rm-700k": "Llama-3-8B"}


def _readme(**replace):
    cmd = OPENRLHF_README_3C3BE623
    for old, new in {**_LLAMA, **replace}.items():
        cmd = cmd.replace(old, new)
    return cmd


def test_openrlhf_dotted_readme_equals_flat():
    with pytest.raises(ValueError, match="mixes.*--generate_max_len, --prompt_max_len.*dotted") as err:
        from_openrlhf(_readme())  # verbatim: OpenRLHF itself rejects the two flat flags
    assert "\n" not in str(err.value)
    # as examples/scripts/train_ppo_ray_hybrid_engine.sh at 3c3be623 writes it
    dotted = from_openrlhf(_readme(**{"   --prompt_max_len 1024 \\\n": "",
                                      "--generate_max_len 1024": "--data.max_len 2048"}))
    # the same setup in the flat flags: bf16, flash attention and micro-batches of 1 are the dotted defaults
    flat = from_openrlhf(
        "python3 -m openrlhf.cli.train_ppo_ray --ref_num_nodes 1 --ref_num_gpus_per_node 8 --reward_num_nodes 1 "
        "--reward_num_gpus_per_node 8 --critic_num_nodes 1 --critic_num_gpus_per_node 8 --actor_num_nodes 1 "
        "--actor_num_gpus_per_node 8 --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --colocate_all_models "
        "--vllm_gpu_memory_utilization 0.5 --pretrain Llama-3-8B --reward_pretrain Llama-3-8B --train_batch_size 128 "
        "--rollout_batch_size 1024 --n_samples_per_prompt 1 --prompt_max_len 1024 --generate_max_len 1024 "
        "--zero_stage 3 --bf16 --init_kl_coef 0.01 --gradient_checkpointing --packing_samples --enforce_eager "
        "--vllm_enable_sleep --deepspeed_enable_sleep --flash_attn --micro_train_batch_size 1 "
        "--micro_rollout_batch_size 1 --use_dynamic_batch")  # the README's --train.dynamic_batch_enable
    assert dotted.framework == "openrlhf-dotted" and dotted.with_(framework="openrlhf") == flat
    assert dotted.groups == {"actor": 8} and dotted.engine.group == "actor" and dotted.engine.sleep
    assert dotted.train_sleep and dotted.critic.group == dotted.reward.group == "actor"
    assert (dotted.engine.tp, dotted.engine.gpu_memory_utilization, dotted.engine.enforce_eager) == (2, 0.5, True)
    assert dotted.sharding.kind == "zero3" and dotted.gradient_checkpointing and dotted.rollout_per_gpu == 256


def test_openrlhf_dotted_defaults_differ_from_flat():
    dotted = from_openrlhf("--actor.model_name_or_path Qwen2.5-0.5B --vllm.num_engines 8")
    flat = from_openrlhf("--pretrain Qwen2.5-0.5B --vllm_num_engines 8")
    assert (dotted.micro_batch, dotted.score_micro_batch) == (1, 1) and (flat.micro_batch, flat.score_micro_batch) \
        == (4, 8)  # train/rollout.micro_batch_size 1; flat micro_train/rollout_batch_size 4 and 8
    assert dotted.actor.dtype_bytes == 2 and flat.actor.dtype_bytes == 4  # ds.param_dtype bf16; flat: no --bf16
    assert dotted.attn == "flash" and flat.attn == "eager"  # ds.attn_implementation flash_attention_2
    assert (dotted.prompt_len, dotted.response_len) == (1024, 1024) == (flat.prompt_len, flat.response_len)
    for k in ("groups", "sharding", "engine", "gradient_checkpointing", "train_sleep", "rollout_per_gpu"):
        assert getattr(dotted, k) == getattr(flat, k), k
    assert dotted.critic.group == "critic" and dotted.reference.group == "ref" and dotted.groups == {
        "actor": 8, "ref": 8, "critic": 8, "vllm": 8}  # GAE, no reward model: the critic is the actor's model


def test_openrlhf_dotted_placement_and_colocation():
    base = "--actor.model_name_or_path Qwen2.5-7B --reward.model_name_or_path Qwen2.5-0.5B "
    dep = from_openrlhf(base + "--actor.num_nodes 2 --actor.num_gpus_per_node 4 --ref.num_nodes 1 "
                        "--ref.num_gpus_per_node 2 --critic.num_gpus_per_node 2 --critic.num_nodes 2 "
                        "--reward.num_gpus_per_node 1 --vllm.num_engines 2 --vllm.tensor_parallel_size 4")
    assert dep.groups == {"actor": 8, "ref": 2, "critic": 4, "reward": 1, "vllm": 8}
    assert dep.critic.arch.name == "Qwen2.5-0.5B"  # GAE: the critic starts from the reward model
    pairs = from_openrlhf(base + "--train.colocate_actor_ref --train.colocate_critic_reward "
                                 "--critic.num_gpus_per_node 2 --reward.num_gpus_per_node 2 --vllm.num_engines 2")
    assert pairs.groups == {"actor": 8, "critic": 2, "vllm": 2} and pairs.reference.group == "actor"
    assert pairs.reward.group == "critic"
    colo = from_openrlhf(base + "--train.colocate_all --vllm.num_engines 8 --vllm.enable_sleep --ds.enable_sleep")
    assert colo.groups == {"actor": 8} and colo.engine.group == "actor" and colo.engine.sleep and colo.train_sleep
    # without --train.colocate_all train_ppo_ray turns vLLM sleep off and DeepSpeed sleep does nothing
    apart = from_openrlhf(base + "--vllm.num_engines 8 --vllm.enable_sleep --ds.enable_sleep")
    assert apart.engine.group == "vllm" and not apart.engine.sleep and not apart.train_sleep
    # async: --train.colocate_all then colocates only the DeepSpeed models; vLLM gets its own GPUs
    asy = from_openrlhf(base + "--train.colocate_all --train.async_enable --vllm.num_engines 4")
    assert asy.groups == {"actor": 8, "vllm": 4} and asy.engine.group == "vllm" and asy.reward.group == "actor"


def test_openrlhf_dotted_zero_offload_lora_4bit():
    base = "--actor.model_name_or_path Qwen2.5-7B --reward.model_name_or_path Qwen2.5-0.5B --vllm.num_engines 1 "
    dep = from_openrlhf(base + "--ds.zero_stage 3 --ds.adam_offload --ref.offload")
    assert dep.sharding.kind == "zero3" and dep.sharding.offload_optimizer
    assert dep.reference.offload and not dep.reward.offload  # offloaded apart (flat: --ref_reward_offload)
    rew = from_openrlhf(base + "--reward.offload --ds.zero_stage 0")
    assert rew.reward.offload and not rew.reference.offload and rew.sharding.kind == "zero0"
    assert not rew.sharding.offload_optimizer
    flat = from_openrlhf("--pretrain Qwen2.5-7B --reward_pretrain Qwen2.5-0.5B --ref_reward_offload")
    assert flat.reference.offload and flat.reward.offload
    lora = from_openrlhf(base + "--ds.lora.rank 16 --ds.load_in_4bit --ds.lora.alpha 32")
    assert lora.actor.lora_rank == 16 and lora.actor.load_in_4bit and lora.critic.lora_rank == 16
    assert from_openrlhf(base).actor.lora_rank == 0


def test_openrlhf_dotted_vllm_lengths_micro_batches_packing():
    base = "--actor.model_name_or_path Qwen2.5-1.5B --algo.kl.init_coef 0 --reward.remote_url http://rm "
    vl = from_openrlhf(base + "--vllm.num_engines 2 --vllm.tensor_parallel_size 2 --vllm.gpu_memory_utilization 0.7 "
                              "--vllm.enforce_eager --rollout.batch_size 64 --rollout.n_samples_per_prompt 8")
    assert vl.engine.kind == "vllm" and (vl.engine.tp, vl.engine.gpu_memory_utilization) == (2, 0.7)
    assert vl.engine.enforce_eager and vl.rollout_per_gpu == 64 * 8 // 2 and vl.groups["vllm"] == 4
    assert vl.reference is None and vl.reward is None  # KL 0: no reference; a remote reward
    base += "--vllm.num_engines 1 "
    # lengths: --data.max_len is the total; --rollout.max_new_tokens leaves the rest to the prompt
    ln = from_openrlhf(base + "--data.max_len 4096 --rollout.max_new_tokens 3072")
    assert (ln.prompt_len, ln.response_len) == (1024, 3072)
    assert from_openrlhf(base + "--data.max_len 8192").seq == 8192
    assert from_openrlhf(base + "--data.max_len 1024 --rollout.max_new_tokens 4096").seq == 1024  # cut at max_len
    mb = from_openrlhf(base + "--train.micro_batch_size 2 --rollout.micro_batch_size 4")
    assert (mb.micro_batch, mb.score_micro_batch, mb.rollout_per_gpu) == (2, 4, 1024)
    # packing makes train_ppo_ray use flash_attention_2 whatever --ds.attn_implementation says
    assert from_openrlhf(base + "--ds.attn_implementation eager").attn == "eager"
    assert from_openrlhf(base + "--ds.attn_implementation eager --ds.packing_samples").attn == "flash"
    assert from_openrlhf(base + "--actor.gradient_checkpointing_enable").gradient_checkpointing
    assert not from_openrlhf(base).gradient_checkpointing
    # algorithms without GAE have no critic; an agent function replaces the reward model
    assert from_openrlhf(base + "--algo.advantage.estimator group_norm").critic is None
    agent = from_openrlhf("--actor.model_name_or_path Qwen2.5-1.5B --reward.model_name_or_path Qwen2.5-0.5B "
                          "--train.agent_func_path agent.py --vllm.num_engines 1")
    assert agent.reward is None and agent.critic.arch.name == "Qwen2.5-1.5B"


def test_openrlhf_syntax_errors():
    with pytest.raises(ValueError, match="mixes OpenRLHF's flat flags \\(--zero_stage\\).*--actor.model_name_or_path"):
        from_openrlhf("--actor.model_name_or_path Qwen2.5-7B --zero_stage 3")
    with pytest.raises(ValueError, match="no OpenRLHF train_ppo_ray flag recognised"):
        from_openrlhf("--learning_rate 1e-6 --actor.adam.lr 5e-7 --foo", model="Qwen2.5-7B")
    with pytest.raises(ValueError, match="no OpenRLHF train_ppo_ray flag recognised"):
        from_openrlhf("", model="Qwen2.5-7B")
    with pytest.raises(ValueError, match="no --actor.model_name_or_path"):
        from_openrlhf("--ds.zero_stage 3")
    with pytest.raises(ValueError, match="generate only with vLLM; set --vllm.num_engines"):
        from_openrlhf("--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 0")  # train_ppo_ray: 0 = no vLLM
    with pytest.raises(ValueError, match="--ds.zero_stage: invalid int value"):
        from_openrlhf("--actor.model_name_or_path Qwen2.5-7B --ds.zero_stage three")
    # flags the planner does not model stay ignored, in either syntax
    assert from_openrlhf("--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 8 --actor.adam.lr 5e-7 "
                         "--actor.eps_clip 0.2").groups
    assert from_openrlhf("--pretrain Qwen2.5-7B --actor_learning_rate 5e-7 --eps_clip 0.2").groups


def test_cli_openrlhf_dotted(capsys):
    cmd = ("python3 -m openrlhf.cli.train_ppo_ray --actor.model_name_or_path Llama-3-70B --actor.num_nodes 4 "
           "--ds.zero_stage 3 --train.colocate_all --vllm.num_engines 4 --vllm.tensor_parallel_size 8 "
           "--vllm.enable_sleep --ds.enable_sleep --actor.gradient_checkpointing_enable --algo.kl.init_coef 0 "
           "--reward.remote_url http://rm --data.max_len 4096 --rollout.max_new_tokens 3072 "
           "--train.micro_batch_size 2")
    rep = _json(capsys, ["plan", "--from_openrlhf", cmd, "--gpu_memory", "80GiB", "--json"])
    assert rep["groups"]["actor"]["gpus"] == 32 and list(rep["groups"]) == ["actor"]
    inp = rep["inputs"]
    assert (inp["micro_batch"], inp["prompt_len"], inp["response_len"]) == (2, 1024, 3072)
    assert main(["plan", "--from_openrlhf", cmd + " --zero_stage 3"]) == 2
    err = capsys.readouterr().err
    assert "mixes" in err and err.count("\n") == 1 and "Traceback" not in err


def test_openrlhf_suggestions_name_the_syntax_of_the_command():
    """A dotted command is told the dotted flags (--ds.adam_offload), a flat one the flat flags (--adam_offload)."""
    from memory.advise import suggest

    dotted = from_openrlhf("--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 8 --actor.num_gpus_per_node 8 "
                           "--ref.num_gpus_per_node 8 --ds.zero_stage 3 --train.micro_batch_size 16 "
                           "--data.max_len 4096", gpu_memory=40 * 2**30)
    flat = from_openrlhf("--pretrain Qwen2.5-7B --vllm_num_engines 8 --actor_num_gpus_per_node 8 "
                         "--ref_num_gpus_per_node 8 --zero_stage 3 --micro_train_batch_size 16 --bf16 --flash_attn "
                         "--prompt_max_len 2048 --generate_max_len 2048", gpu_memory=40 * 2**30)
    d = {c.key: c.flag for c in suggest(dotted)}
    f = {c.key: c.flag for c in suggest(flat)}
    assert d["offload_optimizer"] == "--ds.adam_offload" and f["offload_optimizer"] == "--adam_offload"
    assert d["micro_batch"].startswith("--train.micro_batch_size ") and f["micro_batch"].startswith(
        "--micro_train_batch_size ")


# ---- OpenRLHF's late flat flags (c250c21a, 2025-08-15 .. 76351db1, 2026-04-17) ------------------------------------

# examples/scripts/train_ppo_ray_hybrid_engine.sh at OpenRLHF 76351db1 (ed62d0e2^, the last flat commit; the file
# is as d0e088b6 left it), the command verbatim: --param_dtype (cd7a434f+) and --max_len as the total (d0e088b6+)
OPENRLHF_HYBRID_D0E088B6 = """python3 -m openrlhf.cli.train_ppo_ray \\
   --ref_num_nodes 1 \\
   --ref_num_gpus_per_node 8 \\
   --reward_num_nodes 1 \\
   --reward_num_gpus_per_node 8 \\
   --critic_num_nodes 1 \\
   --critic_num_gpus_per_node 8 \\
   --actor_num_nodes 1 \\
   --actor_num_gpus_per_node 8 \\
   --vllm_num_engines 4 \\
   --vllm_tensor_parallel_size 2 \\
   --colocate_all_models \\
   --vllm_gpu_memory_utilization 0.5 \\
   --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
   --reward_pretrain OpenRLHF/Llama-3-8b-rm-700k \\
   --save_path /openrlhf/examples/test_scripts/final/llama3-8b-rlhf \\
   --ckpt_path /openrlhf/examples/test_scripts/ckpt/llama3-8b-rlhf \\
   --save_hf_ckpt \\
   --train_batch_size 128 \\
   --rollout_batch_size 1024 \\
   --n_samples_per_prompt 1 \\
   --max_epochs 1 \\
   --max_len 2048 \\
   --max_samples 100000 \\
   --zero_stage 3 \\
   --param_dtype bf16 \\
   --actor_learning_rate 5e-7 \\
   --critic_learning_rate 9e-6 \\
   --init_kl_coef 0.01 \\
   --prompt_data OpenRLHF/prompt-collection-v0.1 \\
   --input_key context_messages \\
   --apply_chat_template \\
   --normalize_reward \\
   --gradient_checkpointing \\
   --packing_samples \\
   --vllm_sync_backend nccl \\
   --enforce_eager \\
   --vllm_enable_sleep \\
   --deepspeed_enable_sleep \\
   --use_dynamic_batch \\
   --train_max_tokens_per_gpu 16384 \\
   --enable_vllm_is_correction
"""


def _hybrid(**replace):
    cmd = OPENRLHF_HYBRID_D0E088B6
    for old, new in {**_LLAMA, **replace}.items():
        assert old in cmd, old
        cmd = cmd.replace(old, new)
    return cmd


def test_openrlhf_late_flat_script_read_with_its_flags_and_defaults():
    dep = from_openrlhf(_hybrid())
    assert dep.framework == "openrlhf" and dep.actor.dtype_bytes == 2  # --param_dtype bf16 (fp32 is gone)
    assert dep.attn == "flash"  # --attn_implementation's default flash_attention_2 (c250c21a+), packing too
    assert (dep.prompt_len, dep.response_len) == (1024, 1024)  # --max_len 2048 is the total (d0e088b6+)
    # the script's --use_dynamic_batch cuts both micro-batches by tokens (16384 // 2048 = 8 sequences a GPU)
    assert (dep.micro_batch, dep.score_micro_batch) == (8, 8)
    static = from_openrlhf(_hybrid(**{"   --use_dynamic_batch \\\n   --train_max_tokens_per_gpu 16384 \\\n": ""}))
    # not written: d0e088b6's defaults 4/8 (a2978694 lowered them to 1 later and added no flag that shows it)
    assert (static.micro_batch, static.score_micro_batch) == (4, 8)
    assert dep.groups == {"actor": 8} and dep.engine.group == "actor" and dep.engine.sleep and dep.train_sleep
    assert dep.sharding.kind == "zero3" and dep.gradient_checkpointing and dep.rollout_per_gpu == 256
    late = _hybrid(**{"--max_len 2048": "--max_len 74240 --max_new_tokens 64000"})
    assert (from_openrlhf(late).prompt_len, from_openrlhf(late).response_len) == (10240, 64000)
    one = from_openrlhf(_hybrid(**{"--zero_stage 3": "--zero_stage 3 --micro_train_batch_size 1 "
                                   "--micro_rollout_batch_size 1", "   --use_dynamic_batch \\\n": ""}))
    assert (one.micro_batch, one.score_micro_batch) == (1, 1)  # v0.10.0+ defaults, when written
    # train_reinforce_baseline_ray_agent_async.sh's placement: --async_train keeps vLLM off the colocated GPUs
    asy = from_openrlhf("--pretrain Qwen2.5-7B --colocate_all_models --async_train --vllm_num_engines 4 "
                        "--agent_func_path agent.py --reward_pretrain Qwen2.5-0.5B --param_dtype bf16")
    assert asy.groups == {"actor": 8, "vllm": 4} and asy.engine.group == "vllm" and asy.reward is None


def test_openrlhf_same_setup_early_and_late_flat_is_one_deployment():
    """The hybrid-engine script in three flat versions (the memory-relevant lines of their diffs in OpenRLHF):
    c250c21a^ (train_ppo_llama_ray_hybrid_engine.sh: --bf16, micro-batches 4/8 written, prompt/generate maxima),
    cd7a434f (--param_dtype bf16 with the maxima) and d0e088b6 (--max_len 2048)."""
    late = from_openrlhf(_hybrid())
    mid = from_openrlhf(_hybrid(**{"--max_len 2048": "--prompt_max_len 1024 --generate_max_len 1024"}))
    early_cmd = _hybrid(**{"--max_len 2048": "--prompt_max_len 1024 --generate_max_len 1024",
                           "--param_dtype bf16": "--bf16", "--train_batch_size 128": "--micro_train_batch_size 4 "
                           "--train_batch_size 128 --micro_rollout_batch_size 8"})
    early = from_openrlhf(early_cmd)
    # before c250c21a --packing_samples forced --flash_attn (the script packs): the same flash attention
    assert mid == late and early == late and from_openrlhf(early_cmd + " --flash_attn") == late
    # a command without any version's own flag: the first flat defaults (fp32, eager attention, 4/8)
    bare = from_openrlhf("--pretrain Qwen2.5-7B --vllm_num_engines 8")
    assert (bare.actor.dtype_bytes, bare.attn, bare.micro_batch, bare.seq) == (4, "eager", 4, 2048)
    # --max_len was a deprecated cap on vLLM's max_model_len before d0e088b6: the total unless an older flag says
    assert from_openrlhf("--pretrain Qwen2.5-7B --vllm_num_engines 8 --max_len 8192").seq == 8192
    assert from_openrlhf("--pretrain Qwen2.5-7B --vllm_num_engines 8 --max_len 8192 --bf16").seq == 2048
    # --attn_implementation alone is c250c21a..cd7a434f^, where weights are fp32 unless --bf16
    c250 = from_openrlhf("--pretrain Qwen2.5-7B --vllm_num_engines 8 --attn_implementation eager")
    assert (c250.attn, c250.actor.dtype_bytes) == ("eager", 4)
    assert from_openrlhf("--pretrain Qwen2.5-7B --vllm_num_engines 8 --attn_implementation eager --bf16") \
        .actor.dtype_bytes == 2


@pytest.mark.parametrize("flags,old,new", [
    ("--bf16 --param_dtype bf16", "--bf16", "--param_dtype"),
    ("--flash_attn --attn_implementation flash_attention_2", "--flash_attn", "--attn_implementation"),
    ("--prompt_max_len 1024 --max_new_tokens 1024", "--prompt_max_len", "--max_new_tokens"),
    ("--generate_max_len 1024 --max_len 2048 --max_new_tokens 512", "--generate_max_len", "--max_new_tokens"),
])
def test_openrlhf_mixed_flat_versions_is_one_line(flags, old, new, capsys):
    cmd = "--pretrain Qwen2.5-7B --vllm_num_engines 8 " + flags
    with pytest.raises(ValueError, match=f"{old} \\(OpenRLHF before \\w+\\) and {new} \\(\\w+ and later\\)") as err:
        from_openrlhf(cmd)
    assert "\n" not in str(err.value)
    assert main(["plan", "--from_openrlhf", cmd]) == 2
    out = capsys.readouterr().err
    assert "in no OpenRLHF version together" in out and out.count("\n") == 1 and "Traceback" not in out


def test_openrlhf_early_flat_attention_is_eager_without_flash_attn():
    """Before c250c21a OpenRLHF's Actor loads "flash_attention_2" if --flash_attn else "eager"; --packing_samples
    turns --flash_attn on (4c902a2a)."""
    base = "--pretrain Qwen2.5-0.5B --vllm_num_engines 8 --bf16"
    assert from_openrlhf(base).attn == "eager"
    assert from_openrlhf(base + " --flash_attn").attn == "flash"
    assert from_openrlhf(base + " --packing_samples").attn == "flash"
    assert from_openrlhf(base.replace("--bf16", "--param_dtype bf16")).attn == "flash"  # cd7a434f+: flash default


@pytest.mark.parametrize("flag,words", [("--from_openrlhf", "no OpenRLHF train_ppo_ray flag"),
                                        ("--from_verl", "no actor_rollout_ref.model.path"),
                                        ("--from_deepspeed_chat", "no --actor_model_name_or_path"),
                                        ("--trl_config", "empty file path")])
def test_cli_empty_input_is_a_one_line_error(capsys, flag, words):
    """An empty value is the reader's own error, not a plan of the default model with the generic flags."""
    assert main(["plan", flag, ""]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


# ---- OpenRLHF dynamic batching and ring attention (3c3be623; the same rule since 81421bd2) ----------------------
# seqlen_balancing.get_minimum_num_micro_batch_size first-fits the lengths into bins of budget x ring_attn_size
# tokens; get_seqlen_balanced_partitions spreads the sequences over that many micro-batches. Training
# (replay_buffer.setup_dynamic_batch): train_batch_size // dp sequences per step; scoring
# (experience_maker.split_rollout_samples): rollout_batch_size x n_samples_per_prompt, the bin count rounded down
# to a multiple of dp (at least dp); dp = actor GPUs // ring_attn_size. Ring attention slices each micro-batch's
# packed tokens over ring_attn_size GPUs (ring_attn_utils.get_tensor_in_current_ring_attn_rank).

def _readme_2048(extra: str = "", dynamic: bool = True) -> str:
    cmd = _readme(**{"   --prompt_max_len 1024 \\\n": "", "--generate_max_len 1024": "--data.max_len 2048"})
    if not dynamic:
        cmd = cmd.replace("   --train.dynamic_batch_enable \\\n", "")
    return cmd.replace("--logger.wandb.key {wandb_token}", "--logger.wandb.key x " + extra)


def _micro(cmd: str) -> tuple[int, int]:
    dep = from_openrlhf(cmd)
    return dep.micro_batch, dep.score_micro_batch


def test_openrlhf_dynamic_batch_readme_token_budget():
    # train: dp 8, 128 // 8 = 16 sequences of 2048 tokens; 16192 // 2048 = 7 a bin -> 3 bins -> ceil(16 / 3) = 6.
    # scoring: the rollout budget defaults to the training one: 1024 sequences, 7 a bin -> 147 bins, rounded down to
    # 144 (a multiple of dp 8) -> ceil(1024 / 144) = 8 (16384 tokens: over the budget, as OpenRLHF cuts it)
    assert _micro(_readme_2048()) == (6, 8)
    assert _micro(_readme_2048(dynamic=False)) == (1, 1)  # the micro-batch flags' defaults
    # an explicit rollout budget: 4096 // 2048 = 2 a bin -> 512 bins -> 2 a micro-batch; training unchanged
    assert _micro(_readme_2048("--rollout.max_tokens_per_gpu 4096")) == (6, 2)
    # a larger training budget: 32768 // 2048 = 16 a bin -> the step's 16 in one; scoring follows it (16 a bin ->
    # 64 bins -> 16)
    assert _micro(_readme_2048("--train.max_tokens_per_gpu 32768")) == (16, 16)
    # a budget under one sequence: one sequence a micro-batch (first fit opens a bin for each)
    assert _micro(_readme_2048("--train.max_tokens_per_gpu 1000")) == (1, 1)
    # longer sequences: 8192 tokens, 16192 // 8192 = 1 a bin
    assert _micro(_readme_2048().replace("--data.max_len 2048", "--data.max_len 8192")) == (1, 1)
    # few rollouts: 24 sequences, 7 a bin -> 4 bins, rounded down to 0, at least dp 8 -> 3 a micro-batch
    assert _micro(_readme_2048("--rollout.batch_size 24"))[1] == 3
    # the micro-batch flags do not count with dynamic batching
    assert _micro(_readme_2048("--train.micro_batch_size 4 --rollout.micro_batch_size 4")) == (6, 8)


def test_openrlhf_dynamic_batch_flat_flags_and_rollout_default():
    flat = ("--pretrain Qwen2.5-0.5B --vllm_num_engines 4 --actor_num_gpus_per_node 4 --prompt_max_len 1024 "
            "--generate_max_len 1024 --train_batch_size 64 --rollout_batch_size 512 --n_samples_per_prompt 4 "
            "--use_dynamic_batch --train_max_tokens_per_gpu 16384")
    # train: dp 4, 16 sequences, 8 a bin -> 2 bins of 8. scoring: the rollout budget defaults to 16384 (f9a1676b+):
    # 2048 sequences, 8 a bin -> 256 bins -> 8
    assert _micro(flat) == (8, 8)
    # --rollout_max_tokens_per_gpu 8192: 4 a bin -> 512 bins -> 4
    assert _micro(flat + " --rollout_max_tokens_per_gpu 8192") == (8, 4)
    # without a training budget: the default 16192 (7 a bin): train 16 -> 3 bins -> 6; scoring 2048 -> 293 bins,
    # rounded down to 292 -> ceil(2048 / 292) = 8
    assert _micro(flat.replace(" --train_max_tokens_per_gpu 16384", "")) == (6, 8)
    # dynamic batching turns packing on, and packing flash attention (397d6a1c-era flags: eager otherwise)
    assert from_openrlhf(flat).attn == "flash"
    # the dotted spelling of the same command is read alike
    dotted = ("--actor.model_name_or_path Qwen2.5-0.5B --vllm.num_engines 4 --actor.num_gpus_per_node 4 "
              "--data.max_len 2048 --train.batch_size 64 --rollout.batch_size 512 --rollout.n_samples_per_prompt 4 "
              "--train.dynamic_batch_enable --train.max_tokens_per_gpu 16384")
    assert _micro(dotted) == (8, 8) and _micro(dotted + " --rollout.max_tokens_per_gpu 8192") == (8, 4)
    # 81421bd2 (2025-07-12..14): one --max_tokens_per_gpu for both; not together with its successors or with flags
    # of later versions
    assert _micro(flat.replace("--train_max_tokens_per_gpu", "--max_tokens_per_gpu")) == (8, 8)
    assert _micro(flat.replace("--train_max_tokens_per_gpu 16384", "--max_tokens_per_gpu 8192")) == (4, 4)
    with pytest.raises(ValueError, match="--max_tokens_per_gpu.*no OpenRLHF version together"):
        from_openrlhf(flat + " --max_tokens_per_gpu 8192")
    with pytest.raises(ValueError, match="no OpenRLHF version together"):
        from_openrlhf(flat.replace("--train_max_tokens_per_gpu", "--max_tokens_per_gpu") + " --param_dtype bf16")


def test_openrlhf_ring_attention_splits_tokens_per_gpu():
    from memory.deploy import micro_tokens

    # without dynamic batching each ring group gets the micro-batch flags' sequences; each GPU holds 1/r of their
    # tokens (padded to a multiple of r)
    base = "--actor.model_name_or_path Qwen2.5-0.5B --vllm.num_engines 8 --data.max_len 2048"
    static = base + " --train.micro_batch_size 4 --rollout.micro_batch_size 3"
    ring2 = from_openrlhf(static + " --ds.ring_attn_size 2")
    assert _micro(static) == _micro(static + " --ds.ring_attn_size 2") == (4, 3) and ring2.sequence_parallel == 2
    assert (micro_tokens(ring2, 4), micro_tokens(ring2, 3)) == (4 * 2048 // 2, 3 * 2048 // 2)
    # one sequence over 4 GPUs: a quarter of its tokens each, not the whole sequence
    one = from_openrlhf(base + " --ds.ring_attn_size 4")
    assert _micro(base + " --ds.ring_attn_size 4") == (1, 1) and micro_tokens(one, 1) == 2048 // 4
    # flat alike; ring attention turns packing on (flash attention at 397d6a1c-era flags)
    flat = from_openrlhf("--pretrain Qwen2.5-0.5B --vllm_num_engines 8 --micro_train_batch_size 4 "
                         "--micro_rollout_batch_size 8 --ring_attn_size 2")
    assert (flat.micro_batch, flat.score_micro_batch, flat.attn, flat.sequence_parallel) == (4, 8, "flash", 2)
    # ZeRO still shards over every actor GPU: the groups do not change
    plain = from_openrlhf("--pretrain Qwen2.5-0.5B --vllm_num_engines 8")
    assert flat.groups == plain.groups and flat.groups["actor"] == 8 and flat.sharding == plain.sharding
    # with dynamic batching: dp 8 // 2 = 4; budgets x 2 per group. train: 128 // 4 = 32, 16192 x 2 // 2048 = 15 a
    # bin -> 3 bins -> 11 a group (5.5 sequences' tokens a GPU). scoring: 1024, 15 a bin -> 69 bins, rounded down to
    # 68 -> ceil(1024 / 68) = 16 a group
    assert _micro(_readme_2048("--ds.ring_attn_size 2")) == (11, 16)
    with pytest.raises(ValueError, match="ring_attn_size 0"):
        from_openrlhf(base + " --ds.ring_attn_size 0")


def test_openrlhf_without_dynamic_batch_or_ring_nothing_changes():
    # budgets without the switch are inert (OpenRLHF reads them only with dynamic batching)
    for cmd, extra in (
            ("--pretrain Qwen2.5-0.5B --vllm_num_engines 8 --micro_train_batch_size 3 --micro_rollout_batch_size 5",
             " --train_max_tokens_per_gpu 100 --rollout_max_tokens_per_gpu 100 --ring_attn_size 1"),
            ("--actor.model_name_or_path Qwen2.5-0.5B --vllm.num_engines 8 --train.micro_batch_size 3 "
             "--rollout.micro_batch_size 5", " --train.max_tokens_per_gpu 100 --rollout.max_tokens_per_gpu 100 "
             "--ds.ring_attn_size 1 --train.batch_size 7")):
        dep = from_openrlhf(cmd)
        assert (dep.micro_batch, dep.score_micro_batch) == (3, 5) and from_openrlhf(cmd + extra) == dep
    flat = from_openrlhf("--pretrain Qwen2.5-0.5B --vllm_num_engines 8")
    assert (flat.micro_batch, flat.score_micro_batch, flat.attn) == (4, 8, "eager")  # no packing forced


def test_token_budget_batching_is_advised_by_its_budget():
    """With veRL's use_dynamic_bsz or OpenRLHF's dynamic batching the micro-batch flags are ignored, so the
    smaller-batch suggestion names the token budget per GPU (micro-batch x sequence length) instead."""
    from memory.advise import suggest
    from memory.inputs import from_verl

    verl = from_verl("actor_rollout_ref.model.path=Qwen2.5-7B algorithm.adv_estimator=grpo data.train_batch_size=1024 "
                     "data.max_prompt_length=1024 data.max_response_length=3072 "
                     "actor_rollout_ref.actor.ppo_mini_batch_size=256 actor_rollout_ref.actor.use_dynamic_bsz=True "
                     "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=65536 actor_rollout_ref.rollout.n=8 "
                     # log-probs at a smaller budget, so that the update is the peak phase
                     "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=16384 "
                     "trainer.n_gpus_per_node=8", gpu_memory=40 * 2**30)
    assert verl.token_budget_batching and verl.micro_batch > 1
    changes = {c.key: c for c in suggest(verl)}
    assert "micro_batch" not in changes
    budget = changes["token_budget"]
    assert budget.flag.startswith("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=")
    assert int(budget.flag.split("=")[1]) % verl.seq == 0 and int(budget.flag.split("=")[1]) < 65536
    dotted = from_openrlhf("--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 8 --train.dynamic_batch_enable "
                           "--train.max_tokens_per_gpu 65536 --train.batch_size 1024 --data.max_len 4096",
                           gpu_memory=40 * 2**30)
    flags = {c.key: c.flag for c in suggest(dotted)}
    assert dotted.token_budget_batching and flags["token_budget"].startswith("--train.max_tokens_per_gpu ")
    assert not from_verl("actor_rollout_ref.model.path=Qwen2.5-7B").token_budget_batching


def test_cli_json_reports_sequence_parallel_and_token_budget(capsys):
    """The --json inputs say how the micro-batches were read: per sequence-parallel group, from a token budget."""
    cmd = ("actor_rollout_ref.model.path=Qwen2.5-7B algorithm.adv_estimator=grpo trainer.n_gpus_per_node=8 "
           "actor_rollout_ref.actor.ulysses_sequence_parallel_size=4 actor_rollout_ref.actor.use_dynamic_bsz=True")
    rep = _json(capsys, ["plan", "--from_verl", cmd, "--json"])
    assert rep["inputs"]["sequence_parallel"] == 4 and rep["inputs"]["token_budget_batching"] is True


@pytest.mark.parametrize("flag,one_line", [
    ("--from_verl", "python3 -m verl.trainer.main_ppo actor_rollout_ref.model.path=Qwen2.5-7B "
                    "algorithm.adv_estimator=grpo trainer.n_gpus_per_node=4 actor_rollout_ref.rollout.n=5"),
    ("--from_deepspeed_chat", "deepspeed --num_gpus 8 main.py --actor_model_name_or_path facebook/opt-1.3b "
                              "--critic_model_name_or_path facebook/opt-350m --actor_zero_stage 2 "
                              "--per_device_training_batch_size 4"),
    ("--from_openrlhf", "python3 -m openrlhf.cli.train_ppo_ray --pretrain Qwen2.5-0.5B --vllm_num_engines 2 "
                        "--zero_stage 3 --micro_train_batch_size 2"),
])
def test_a_pasted_multi_line_script_reads_as_one_line(flag, one_line):
    """A script pasted with backslash line continuations, indented or not: shlex alone keeps the escaped newline,
    which glued to an unindented next line's flag so that it matched nothing and was silently planned with its
    default (veRL, DeepSpeed-Chat). An unbalanced quote names the input that has it."""
    from memory.inputs import from_deepspeed_chat, from_verl

    reader = {"--from_verl": from_verl, "--from_deepspeed_chat": from_deepspeed_chat,
              "--from_openrlhf": from_openrlhf}[flag]
    for indent in ("    ", ""):
        pasted = one_line.replace(" --", f" \\\n{indent}--").replace(" actor_", f" \\\n{indent}actor_")
        assert "\\\n" in pasted and reader(pasted) == reader(one_line)
    with pytest.raises(ValueError, match=f"{flag}: cannot split the command line") as err:
        reader(one_line + " '--unclosed")
    assert "\n" not in str(err.value)


ACC_FSDP2 = {"distributed_type": "FSDP", "num_processes": 8, "fsdp_config": {"fsdp_version": 2}}
GRPO_CFG = {"model_name_or_path": "Qwen/Qwen2.5-7B", "num_generations": 8, "max_completion_length": 512}


@pytest.mark.parametrize("pc, message", [
    ({"parallelism_config_tp_size": 2, "parallelism_config_dp_shard_size": 4}, "tp_size 2 is not modelled"),
    ({"parallelism_config_cp_size": 2, "parallelism_config_dp_shard_size": 4}, "cp_size 2 is not modelled"),
    ({"parallelism_config_dp_replicate_size": 2, "parallelism_config_dp_shard_size": 4},
     "dp_replicate_size 2 is not modelled"),
    ({"parallelism_config_dp_shard_size": 4}, "dp_shard_size 4 is not the 8 processes"),
    ({"parallelism_config_tp_size": "two"}, "parallelism_config_tp_size: 'two' is not a number"),
])
def test_accelerate_parallelism_config_the_planner_would_misread_is_refused(pc, message):
    """accelerate's ParallelismConfig (1.10+) splits the processes into replicas, shards, TP, CP and SP groups;
    the planner plans FSDP over every process, so any other split is refused in one line rather than misplanned."""
    from memory.inputs import trl_from_mappings

    with pytest.raises(ValueError, match=re.escape(message)):
        trl_from_mappings(dict(GRPO_CFG), accelerate={**ACC_FSDP2, "parallelism_config": pc})


def test_accelerate_parallelism_config_of_plain_fsdp_is_planned_as_fsdp():
    from memory.inputs import trl_from_mappings

    plain = trl_from_mappings(dict(GRPO_CFG), accelerate=ACC_FSDP2)
    same = trl_from_mappings(dict(GRPO_CFG), accelerate={
        **ACC_FSDP2, "parallelism_config": {"parallelism_config_dp_shard_size": 8, "parallelism_config_tp_size": 1}})
    assert same == plain and same.sharding.kind == "fsdp_full"
    with pytest.raises(ValueError, match="needs distributed_type FSDP"):
        trl_from_mappings(dict(GRPO_CFG), accelerate={"distributed_type": "DEEPSPEED", "num_processes": 8,
                                                      "parallelism_config": {"parallelism_config_dp_shard_size": 8}})


def test_open_r1_pass_rate_filtering_config_is_not_planned_as_training():
    """open-r1's recipes/dataset_filtering/filter_dapo.yaml (at 1416fa0) is GRPO-shaped (num_generations,
    max_completion_length, reward_funcs) but drives a vLLM-only pass-rate filter, not a trainer."""
    from memory.inputs import trl_from_mappings

    cfg = {"model_name_or_path": "Qwen/Qwen2.5-7B", "max_completion_length": 32000, "num_generations": 8,
           "reward_funcs": ["accuracy"], "pass_rate_min": 0.1, "pass_rate_max": 0.6,
           "output_dataset_name": "open-r1/DAPO-Math-17k-Processed-filter"}
    with pytest.raises(ValueError, match="pass-rate filtering config .*does not train"):
        trl_from_mappings(cfg)
