"""memory.inputs.from_deepspeed_chat: DeepSpeed-Chat step-3 main.py command lines (DeepSpeedExamples 83757d9
training_scripts/opt, the published rows' inputs), main.py's defaults, one-line errors, and the CLI path."""
import json

import pytest

from memory.cli import main
from memory.deploy import plan_deployment, role_checkpointing, role_sharding
from memory.inputs import from_deepspeed_chat

GiB = 2**30
CRITIC = "--critic_model_name_or_path facebook/opt-350m"

# single_gpu/run_1.3b.sh (stages default 0/0), as e2e_rlhf.py --deployment-type single_gpu runs it
SG_13 = ("deepspeed --num_gpus 1 main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC +
         " --actor_zero_stage 0 --critic_zero_stage 0 --num_padding_at_beginning 1 --gradient_accumulation_steps 2"
         " --deepspeed --actor_lora_dim 128 --enable_hybrid_engine --actor_gradient_checkpointing --actor_dropout 0.0")


def sg_lora(model: str) -> str:  # single_gpu/run_6.7b_lora.sh (its ${OFFLOAD} is never set)
    return ("deepspeed --num_gpus 1 main.py --data_path Dahoas/rm-static --data_split 2,4,4 "
            f"--actor_model_name_or_path {model} {CRITIC} --num_padding_at_beginning 1 "
            "--per_device_generation_batch_size 8 --per_device_training_batch_size 8 --generation_batches 1 "
            "--ppo_epochs 1 --max_answer_seq_len 256 --max_prompt_seq_len 256 --actor_learning_rate 5e-4 "
            "--critic_learning_rate 5e-6 --num_train_epochs 1 --lr_scheduler_type cosine "
            "--gradient_accumulation_steps 16 --num_warmup_steps 100 --deepspeed --seed 1234 --actor_zero_stage 0 "
            "--critic_zero_stage 0 --actor_lora_dim 128 --actor_gradient_checkpointing "
            "--critic_gradient_checkpointing --actor_dropout 0.0 --enable_hybrid_engine")


def node(actor: str, batch: int, rest: str, launcher: str = "") -> str:  # single_node/*.sh, multi_node/run_66b.sh
    return (f"deepspeed {launcher}--master_port 12346 main.py --data_path Dahoas/rm-static --data_split 2,4,4 "
            f"--actor_model_name_or_path {actor} {CRITIC} --num_padding_at_beginning 1 "
            f"--per_device_generation_batch_size {batch} --per_device_training_batch_size {batch} "
            "--generation_batches 1 --ppo_epochs 1 --max_answer_seq_len 256 --max_prompt_seq_len 256 "
            "--num_train_epochs 1 --lr_scheduler_type cosine --gradient_accumulation_steps 1 --num_warmup_steps 100 "
            "--deepspeed --seed 1234 --enable_hybrid_engine " + rest)


MN = ("--inference_tp_size 8 --tp_gather_partition_size 4 --actor_zero_stage 3 --critic_zero_stage 3 "
      "--actor_gradient_checkpointing --actor_dropout 0.0 --actor_lora_dim 128 "
      "--actor_lora_module_name decoder.layers.")

# (command line, actor params, GPUs, ZeRO stage, LoRA rank, micro-batch, grad accumulation, checkpointing)
ROWS = [
    (SG_13, 1_315_758_080, 1, 0, 128, 16, 2, True),
    (sg_lora("facebook/opt-6.7b"), 6_658_473_984, 1, 0, 128, 8, 16, True),
    (sg_lora("facebook/opt-2.7b"), 2_651_596_800, 1, 0, 128, 8, 16, True),
    (sg_lora("facebook/opt-13b"), 12_853_473_280, 1, 0, 128, 8, 16, True),
    (node("facebook/opt-1.3b", 4, "--actor_zero_stage 2 --critic_zero_stage 2 --enable_ema --actor_dropout 0.0"),
     1_315_758_080, 8, 2, 0, 4, 1, False),
    (node("facebook/opt-6.7b", 4, "--actor_gradient_checkpointing --actor_zero_stage 3 --critic_zero_stage 3"),
     6_658_473_984, 8, 3, 0, 4, 1, True),
    (node("facebook/opt-13b", 16, "--inference_tp_size 2 --actor_zero_stage 3 --critic_zero_stage 3 "
          "--actor_gradient_checkpointing --actor_dropout 0.0 --actor_lora_dim 128"), 12_853_473_280, 8, 3, 128, 16,
     1, True),
    (node("facebook/opt-30b", 4, "--actor_gradient_checkpointing --actor_zero_stage 3 --critic_zero_stage 3 "
          "--actor_lora_dim 128 --actor_lora_module_name decoder.layers."), 29_974_540_288, 8, 3, 128, 4, 1, True),
    (node("facebook/opt-66b", 4, MN, "--num_gpus 8 "), 65_719_701_504, 8, 3, 128, 4, 1, True),
    (node("facebook/opt-66b", 4, MN, "--num_nodes 8 --num_gpus 8 "), 65_719_701_504, 64, 3, 128, 4, 1, True),
    (node("facebook/opt-175b", 4, MN, "--num_nodes 8 --num_gpus 8 "), 174_604_468_224, 64, 3, 128, 4, 1, True),
]


@pytest.mark.parametrize("cmd,params,gpus,stage,lora,micro,accum,gc", ROWS)
def test_published_command_lines(cmd, params, gpus, stage, lora, micro, accum, gc):
    dep = from_deepspeed_chat(cmd, gpu_memory=40 * GiB)
    assert dep.actor.arch.params == params and dep.actor.trained and dep.actor.lora_rank == lora
    assert dep.reference is not None and dep.reference.arch == dep.actor.arch and not dep.reference.trained
    assert dep.critic is not None and dep.critic.trained and dep.critic.value_head
    assert dep.critic.arch.name == "opt-350m" and dep.critic.arch.params == 331_196_416
    assert dep.reward is not None and dep.reward.arch == dep.critic.arch and not dep.reward.trained
    assert not dep.reference.offload and not dep.reward.offload  # no script offloads them
    assert dep.groups == {"all": gpus} and dep.gpu_memory == 40 * GiB
    assert dep.sharding.kind == f"zero{stage}" and dep.sharding.mixed_precision and dep.sharding.overlap_comm
    assert not dep.sharding.offload_optimizer and not dep.sharding.offload_params
    assert dep.micro_batch == micro and dep.score_micro_batch == micro and dep.rollout_per_gpu == micro
    assert dep.grad_accum == accum and dep.gradient_checkpointing is gc
    # every script gives both models one stage; the critic checkpoints only where the script says so
    assert role_sharding(dep.critic, dep) == dep.sharding and dep.reference.sharding is None
    assert role_sharding(dep.reward, dep).kind == ("zero3" if stage == 3 else "zero0")
    assert role_checkpointing(dep.critic, dep) is ("--critic_gradient_checkpointing" in cmd)
    assert dep.logprob_head == "model_dtype"  # gather_log_probs on the fp16 logits
    assert dep.prompt_len == 256 and dep.response_len == 256
    assert dep.engine.kind == "hf" and dep.engine.group == "all"
    assert dep.gather_for_generation  # every script enables the hybrid engine, pinned (gathers under ZeRO-3)
    he = dep.hybrid_engine
    assert he is not None and he.max_out_tokens == 512 and not he.release_inference_cache
    assert he.tp == (8 if "--inference_tp_size 8" in cmd else 2 if "--inference_tp_size 2" in cmd else 1)
    assert dep.actor.lora_trains_others == (lora > 0)  # no script passes --only_optimize_lora
    assert dep.actor_ema == ("--enable_ema" in cmd)
    assert dep.actor.dtype_bytes == 2 and dep.framework == "deepspeed-chat" and dep.attn == "eager"
    assert plan_deployment(dep).peak_bytes > 0


def test_main_py_defaults():
    dep = from_deepspeed_chat("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC)
    assert dep.sharding.kind == "zero0" and dep.actor.lora_rank == 0 and dep.critic.lora_rank == 0
    assert dep.micro_batch == 16 and dep.rollout_per_gpu == 16 and dep.grad_accum == 1
    assert dep.prompt_len == 256 and dep.response_len == 256 and dep.actor.dtype_bytes == 2  # fp16
    assert not dep.gradient_checkpointing and not dep.gather_for_generation  # no hybrid engine
    assert dep.hybrid_engine is None and not dep.actor_ema and not dep.actor.lora_trains_others
    assert dep.groups == {"all": 8}  # the launcher's default: every GPU of one node
    assert from_deepspeed_chat("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC,
                               gpus=2).groups == {"all": 2}
    bf = from_deepspeed_chat("main.py --actor_model_name_or_path x " + CRITIC + " --dtype bf16",
                             model="facebook/opt-350m")
    assert bf.actor.arch.name == "opt-350m" and bf.actor.dtype_bytes == 2


def test_offload_flags_follow_deepspeed():
    base = "main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC + " --offload_reference_model " \
           "--offload_reward_model --offload --enable_hybrid_engine"
    z3 = from_deepspeed_chat(base + " --actor_zero_stage 3 --critic_zero_stage 3")
    assert z3.sharding.offload_optimizer and z3.sharding.offload_params
    assert z3.reference.offload and z3.reward.offload
    # offload_param acts under ZeRO-3 only; ZeRO-Offload of the optimizer needs stage >= 1
    z2 = from_deepspeed_chat(base + " --actor_zero_stage 1 --critic_zero_stage 1")
    assert z2.sharding.offload_optimizer and not z2.sharding.offload_params
    assert not z2.reference.offload and not z2.reward.offload
    z0 = from_deepspeed_chat(base)
    assert not z0.sharding.offload_optimizer and not z0.reference.offload
    unpinned = from_deepspeed_chat(base + " --actor_zero_stage 3 --unpin_actor_parameters")
    assert not unpinned.gather_for_generation
    unsup = from_deepspeed_chat(base + " --unsupervised_dataset_name wikitext --unsupervised_dataset_config_name x "
                                "--gradient_accumulation_steps 3 --critic_lora_dim 8 --only_optimize_lora")
    assert unsup.grad_accum == 6 and unsup.critic.lora_rank == 8  # main.py doubles the actor's accumulation


@pytest.mark.parametrize("cmd,msg", [
    ("main.py " + CRITIC, "no --actor_model_name_or_path"),
    ("main.py --actor_model_name_or_path facebook/opt-1.3b", "no --critic_model_name_or_path"),
    ("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC + " --actor_zero_stage x", "invalid int"),
    ("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC + " --actor_zero_stage 4", "invalid choice"),
    ("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC + " --inference_tp_size 2", "needs"),
    ("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC + " --enable_hybrid_engine --offload "
     "--actor_zero_stage 2 --critic_zero_stage 2", "refuses"),
    ("main.py --actor_model_name_or_path facebook/opt-1.3b " + CRITIC + " --max_answer_seq_len 0", ">= 1"),
    ("main.py --actor_model_name_or_path 'facebook/opt-1.3b " + CRITIC, "cannot split"),
    ("main.py --actor_model_name_or_path facebook/opt-7b " + CRITIC, "unknown model"),
    ("deepspeed --num_gpus 3 main.py --actor_model_name_or_path facebook/opt-13b " + CRITIC +
     " --actor_zero_stage 3 --inference_tp_size 2", "not a multiple"),
])
def test_bad_command_line_is_one_line_error(cmd, msg):
    with pytest.raises(ValueError, match=msg) as err:
        from_deepspeed_chat(cmd)
    assert "\n" not in str(err.value)


def test_cli_json_and_bad_input(capsys):
    cmd = node("facebook/opt-13b", 16, "--inference_tp_size 2 --actor_zero_stage 3 --critic_zero_stage 3 "
               "--actor_gradient_checkpointing --actor_lora_dim 128")
    assert main(["plan", "--from_deepspeed_chat", cmd, "--gpu_memory", "40GiB", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kind"] == "deployment" and rep["total_gpus"] == 8 and rep["gpu_memory_bytes"] == 40 * GiB
    roles = rep["inputs"]["roles"]
    assert set(roles) == {"actor", "critic", "reference", "reward"} and roles["actor"]["lora_rank"] == 128
    assert roles["critic"]["model"] == "opt-350m" and rep["inputs"]["sharding"] == "zero3"
    assert rep["inputs"]["prompt_len"] == 256 and rep["inputs"]["framework"] == "deepspeed-chat"
    # --nodes gives the GPU count when the launcher does not (multi-node scripts use a hostfile)
    assert main(["plan", "--from_deepspeed_chat", cmd, "--nodes", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_gpus"] == 64
    assert main(["plan", "--from_deepspeed_chat", "main.py " + CRITIC]) == 2
    err = capsys.readouterr().err
    assert "no --actor_model_name_or_path" in err and err.count("\n") == 1 and "Traceback" not in err


def test_suggestions_name_deepspeed_chat_flags():
    """The 30B LoRA script gathers the whole fp16 actor for generation on a 40 GB GPU: the advice names the
    main.py flag that gathers one layer at a time instead."""
    from memory.advise import suggest

    cmd = ("deepspeed main.py --actor_model_name_or_path facebook/opt-30b --critic_model_name_or_path "
           "facebook/opt-350m --per_device_generation_batch_size 4 --per_device_training_batch_size 4 "
           "--actor_gradient_checkpointing --actor_zero_stage 3 --critic_zero_stage 3 --actor_lora_dim 128 "
           "--enable_hybrid_engine")
    dep = from_deepspeed_chat(cmd, gpu_memory=40 * GiB)
    changes = {c.key: c for c in suggest(dep)}
    assert changes["no_gather_for_generation"].flag == "--unpin_actor_parameters"
    assert changes["no_gather_for_generation"].fits_after
    assert all(c.flag is not None for k, c in changes.items() if k in ("micro_batch", "offload_optimizer"))


MAIN = ("main.py --actor_model_name_or_path facebook/opt-1.3b --critic_model_name_or_path facebook/opt-350m "
        "--actor_zero_stage 3")


@pytest.mark.parametrize("launcher, gpus", [
    ("deepspeed --include localhost:0,1,2,3", 4),
    ("deepspeed -i worker-0:0,1@worker-1:0,1,2", 5),
    ("deepspeed --hostfile hosts --num_nodes 8 --num_gpus 8", 64),
    ("deepspeed --num_nodes 2", 16),
    ("deepspeed --master_port 12346", 8),
])
def test_the_deepspeed_launchers_gpu_count(launcher, gpus):
    """deepspeed/launcher/runner.py: --include counts its slots; a hostfile with --num_nodes and --num_gpus is
    their product; with neither, one node of every local GPU (the CLI's --gpus_per_node, 8)."""
    assert from_deepspeed_chat(f"{launcher} {MAIN}").groups == {"all": gpus}


@pytest.mark.parametrize("launcher", ["deepspeed --hostfile /job/hostfile", "deepspeed -H hosts --num_gpus 8",
                                      "deepspeed --include worker-0@worker-1:0", "deepspeed --exclude worker-1:0"])
def test_a_gpu_count_left_to_a_hostfile_asks_for_nodes(launcher):
    with pytest.raises(ValueError, match="takes its GPUs from a hostfile the planner cannot read; pass --nodes"):
        from_deepspeed_chat(f"{launcher} {MAIN}")
    assert from_deepspeed_chat(f"{launcher} {MAIN}", gpus=32).groups == {"all": 32}


def test_bad_include_slots_are_named():
    with pytest.raises(ValueError, match="--include localhost:a,b: slots must be GPU numbers"):
        from_deepspeed_chat(f"deepspeed --include localhost:a,b {MAIN}")
