"""The readers on inputs shaped like the frameworks' own example scripts and configs (a sweep of veRL examples/ and
recipe/ at b178a3cd and 49b08e95, OpenRLHF examples/scripts at 3c3be623 and 76351db1, DeepSpeed-Chat step-3
training_scripts at 83757d9, open-r1 recipes at 1416fa0c): shell variables, arrays and branches, other trainers'
scripts, Megatron and multi-turn configs, reward models and models the planner has no config for. Each case is a
short command written here that reproduces what a script did."""
import pytest

from memory.cli import main
from memory.inputs import from_deepspeed_chat, from_openrlhf, from_trl, from_verl
from memory.shell import expand_script

CRITIC = "--critic_model_name_or_path facebook/opt-350m"
VERL_MODEL = "actor_rollout_ref.model.path=Qwen2.5-7B"


def one_line_error(capsys, flag: str, text: str, *extra: str) -> str:
    """The CLI's answer to a bad input: exit code 2 and one line on stderr, never a traceback."""
    rc = main(["plan", flag, text, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_verl_script_variables_are_resolved_as_bash_would():
    """veRL scripts set their numbers in variables (run_qwen2-7b_seq_balance.sh: ``rollout_name="sglang"`` then
    ``rollout.name=$rollout_name``; DAPO recipes: ``$((1024 * 2))``, ``${NNODES:-1}``). Read literally, the engine
    silently became vLLM and the numbers were errors."""
    script = """set -x
gen_tp=4
NNODES=${NNODES:-2}
max_prompt=$((1024 * 2))
rollout_name="sglang" # sglang or vllm
if [ "$rollout_name" = "vllm" ]; then
    export VLLM_USE_V1=1
fi
python3 -m verl.trainer.main_ppo \\
    actor_rollout_ref.model.path=Qwen2.5-7B \\
    actor_rollout_ref.rollout.name=$rollout_name \\
    actor_rollout_ref.rollout.tensor_model_parallel_size=${gen_tp} \\
    data.max_prompt_length=$max_prompt \\
    trainer.nnodes=$NNODES $@
"""
    dep = from_verl(script)
    assert dep.engine.kind == "sglang" and dep.engine.tp == 4
    assert dep.groups == {"all": 16} and dep.prompt_len == 2048


@pytest.mark.parametrize("text, message", [
    (f"{VERL_MODEL} trainer.nnodes=$NODES", "trainer.nnodes=$NODES: a shell variable"),
    # which branch runs is not known: the value is not guessed
    (f"if [[ $b == x ]]; then TP=2; else TP=4; fi\n{VERL_MODEL} "
     "actor_rollout_ref.rollout.tensor_model_parallel_size=$TP", "tensor_model_parallel_size=$TP: a shell variable"),
    ("MODEL=$HOME/models/Qwen2.5-7B\nactor_rollout_ref.model.path=$MODEL",
     "actor_rollout_ref.model.path=$MODEL: a shell variable"),
    ("python3 -m verl.trainer.main_ppo --config-name=$CONFIG_NAME " + VERL_MODEL, "--config-name $CONFIG_NAME"),
])
def test_verl_unresolved_variables_are_one_line_errors(capsys, text, message):
    assert message in one_line_error(capsys, "--from_verl", text)


@pytest.mark.parametrize("text, message", [
    ("torchrun -m verl.trainer.fsdp_sft_trainer data.train_batch_size=8 model.partial_pretrain=Qwen2.5-7B",
     "verl.trainer.fsdp_sft_trainer is not veRL's PPO trainer"),
    ("python3 -m verl.trainer.main_generation trainer.n_gpus_per_node=8 model.path=Qwen2.5-7B",
     "verl.trainer.main_generation is not veRL's PPO trainer"),
    ("python3 -m recipe.prime.main_prime " + VERL_MODEL, "recipe.prime.main_prime is not"),
    ("python3 -m verl.trainer.main_ppo --config-name='ppo_megatron_trainer.yaml' " + VERL_MODEL,
     "--config-name ppo_megatron_trainer: the Megatron workers are not modelled"),
    ("python3 -m verl.trainer.main_ppo --config-path=config --config-name gsm8k_multiturn_grpo " + VERL_MODEL,
     "--config-name gsm8k_multiturn_grpo: the reader knows main_ppo's ppo_trainer.yaml defaults only"),
    (VERL_MODEL + " actor_rollout_ref.actor.strategy=megatron", "actor.strategy=megatron: the Megatron workers"),
    (VERL_MODEL + " actor_rollout_ref.rollout.multi_turn.enable=True", "multi-turn rollouts"),
    (VERL_MODEL + " actor_rollout_ref.rollout.name=trtllm", "rollout.name=trtllm: the planner models vllm, sglang"),
])
def test_verl_scripts_the_reader_does_not_model_are_refused(capsys, text, message):
    """SFT, generation, PRIME scripts, Megatron and multi-turn configs, the TensorRT-LLM rollout: each was planned
    as an FSDP main_ppo run with ppo_trainer.yaml's defaults (the SFT ones with a critic)."""
    assert message in one_line_error(capsys, "--from_verl", text, "--model", "Qwen2.5-7B")


def test_verl_text_without_overrides_is_refused(capsys):
    """recipe/dapo/prepare_dapo_data.sh (49b08e95, downloads only) with --model was planned with every default."""
    text = "set -x\nhuggingface-cli download BytedTsinghua-SIA/DAPO-Math-17k"
    assert "no veRL main_ppo override recognised" in one_line_error(capsys, "--from_verl", text, "--model",
                                                                    "Qwen2.5-7B")
    assert "no actor_rollout_ref.model.path; pass --model" in one_line_error(capsys, "--from_verl", text)


def test_verl_entry_points_and_configs_of_main_ppo_are_read():
    for text in ("python3 verl/trainer/main_ppo.py " + VERL_MODEL,
                 "python3 -m verl.trainer.main_ppo --config-name ppo_trainer " + VERL_MODEL,
                 "python3 -m recipe.dapo.main_dapo " + VERL_MODEL):
        assert from_verl(text).actor.arch.name == "Qwen2.5-7B"


def test_verl_hydra_null_leaves_a_setting_unset():
    """recipe/dapo/test_dapo_7b.sh (49b08e95) sets ``ppo_micro_batch_size=${train_micro_batch_size}`` with
    ``train_micro_batch_size=null``: Hydra's None, not a number."""
    dep = from_verl("train_micro_batch_size=null\n" + VERL_MODEL +
                    " actor_rollout_ref.actor.ppo_micro_batch_size=${train_micro_batch_size}"
                    " actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4")
    assert dep.micro_batch == 4


def test_verl_reward_model_is_planned(capsys):
    """``reward_model.enable=True`` (examples/ppo_trainer/run_qwen2-7b_rm*.sh) was read without its model: veRL's
    RewardModelWorker is a bf16 FSDP model with its parameters offloaded to the CPU, on every GPU unless it has its
    own resource pool. Since 0102d04e0 the reward loop (a second rollout engine) serves it by default: refused."""
    loop = f"{VERL_MODEL} reward_model.enable=True reward_model.model.path=Llama-3-8B"
    assert "add reward_model.use_reward_loop=False" in one_line_error(capsys, "--from_verl", loop)
    assert "reward loop" in one_line_error(capsys, "--from_verl", loop + " reward_model.use_reward_loop=True")
    base = loop + " reward_model.use_reward_loop=False"
    dep = from_verl(base)
    assert dep.reward is not None and dep.reward.arch.name == "Llama-3-8B" and dep.reward.value_head
    assert dep.reward.group == "all" and dep.reward.offload and not dep.reward.trained
    assert from_verl(VERL_MODEL).reward is None
    pool = from_verl(base + " reward_model.enable_resource_pool=True reward_model.n_gpus_per_node=2")
    assert pool.groups == {"all": 8, "reward": 2} and pool.reward is not None and pool.reward.group == "reward"


@pytest.mark.parametrize("flag, text, message", [
    ("--from_verl", "actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct",
     "actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct: unknown model"),
    ("--from_verl", VERL_MODEL + " reward_model.enable=True reward_model.use_reward_loop=False "
     "reward_model.model.path=sfairXC/FsfairX-LLaMA3-RM-v0.1",
     "reward_model.model.path=sfairXC/FsfairX-LLaMA3-RM-v0.1: unknown model"),
    ("--from_openrlhf", "--pretrain OpenRLHF/Llama-3-8b-sft-mixture", "--pretrain OpenRLHF/Llama-3-8b-sft-mixture"),
    ("--from_openrlhf", "--pretrain Qwen2.5-7B --reward_pretrain OpenRLHF/Llama-3-8b-rm-700k",
     "--critic_pretrain OpenRLHF/Llama-3-8b-rm-700k: unknown model"),
    ("--from_openrlhf", "--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 8 "
     "--reward.model_name_or_path OpenRLHF/Llama-3-8b-rm-700k --algo.advantage.estimator reinforce",
     "--reward.model_name_or_path OpenRLHF/Llama-3-8b-rm-700k: unknown model"),
    ("--from_deepspeed_chat", "main.py --actor_model_name_or_path AdamG012/chat-opt-1.3b-sft-deepspeed " + CRITIC,
     "--actor_model_name_or_path AdamG012/chat-opt-1.3b-sft-deepspeed: unknown model"),
])
def test_unknown_models_name_the_setting_and_the_way_out(capsys, flag, text, message):
    """The built-in list alone took the message past the CLI's 300 characters, cut mid-list, naming neither the
    setting nor --model."""
    err = one_line_error(capsys, flag, text)
    assert message in err and len(err) < 300 and not err.endswith("...")
    assert ("pass --model" if "reward" not in message and "critic" not in message else "in its place") in err


def test_model_override_covers_the_roles_that_default_to_the_actor():
    """``--model`` replaces the actor's unknown name; a critic that defaults to the actor's model (OpenRLHF without
    a reward model, veRL's critic.model.path written as the actor's) follows it."""
    orl = from_openrlhf("--pretrain OpenRLHF/Llama-3-8b-sft-mixture --remote_rm_url http://rm", model="Qwen2.5-7B")
    assert orl.critic is not None and orl.critic.arch.name == orl.actor.arch.name == "Qwen2.5-7B"
    verl = from_verl("algorithm.adv_estimator=gae actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct "
                     "critic.model.path=Qwen/Qwen2-7B-Instruct", model="Qwen2.5-7B")
    assert verl.critic is not None and verl.critic.arch.name == "Qwen2.5-7B"


def test_openrlhf_bash_arrays_are_expanded():
    """examples/scripts/train_reinforce_baseline_hybrid_engine.sh (3c3be623) keeps its flags in bash arrays
    (``ENGINE_ARGS=(...)`` then ``${ENGINE_ARGS[@]}``): no flag was recognised."""
    script = """MODEL=Qwen2.5-7B
ENGINE_ARGS=(
   --actor.num_gpus_per_node 4
   --vllm.num_engines 2
   # --vllm.num_engines 4
   --vllm.tensor_parallel_size 2
   --train.colocate_all
)
ray job submit --address="http://127.0.0.1:8265" -- python3 -m openrlhf.cli.train_ppo_ray \\
   --actor.model_name_or_path ${MODEL} "${ENGINE_ARGS[@]}" --ds.zero_stage 3
"""
    dep = from_openrlhf(script)
    assert dep.groups == {"actor": 4} and dep.engine.group == "actor" and dep.engine.tp == 2
    assert dep.sharding.kind == "zero3"


def test_openrlhf_command_inside_a_quoted_launcher_is_read():
    """examples/scripts/train_ppo_ray_slurm.sh runs the command inside ``srun ... bash -c "..."``: one quoted word,
    so no flag was recognised."""
    dep = from_openrlhf('srun -w "$node_1" bash -c "pip install ray && ray job submit -- python3 -m '
                        'openrlhf.cli.train_ppo_ray --pretrain Qwen2.5-7B --actor_num_gpus_per_node 4 --zero_stage 3"')
    assert dep.groups["actor"] == 4 and dep.sharding.kind == "zero3"


@pytest.mark.parametrize("text, entry", [
    ("deepspeed --module openrlhf.cli.train_sft --pretrain Qwen2.5-7B --micro_train_batch_size 2", "train_sft"),
    ("deepspeed --module openrlhf.cli.train_rm --pretrain Qwen2.5-7B --zero_stage 3", "train_rm"),
    ("deepspeed openrlhf/cli/train_dpo.py --pretrain Qwen2.5-7B --zero_stage 3", "train_dpo"),
    ("python -m openrlhf.cli.serve_rm --reward_pretrain Qwen2.5-7B", "serve_rm"),
    # the DeepSpeed-only PPO of 2024 (all models on every GPU, HF generation), not train_ppo_ray
    ("deepspeed --module openrlhf.cli.train_ppo --pretrain Qwen2.5-7B --reward_pretrain Qwen2.5-7B", "train_ppo"),
    # train_sft_llama.sh (5373c0c7): the command in a here-document, run as ``deepspeed $training_commands``
    ("read -r -d '' training_commands <<EOF\n../train_sft.py \\\n   --pretrain Qwen2.5-7B \\\n   --zero_stage 2\n"
     "EOF\ndeepspeed $training_commands", "train_sft"),
])
def test_openrlhf_other_trainers_are_refused(capsys, text, entry):
    """train_sft.sh, train_rm.sh, train_dpo_llama.sh (flat flags, 76351db1 and earlier) were planned as PPO runs with a
    critic and a reference; in the dotted syntax they were told to set --vllm.num_engines."""
    assert f"openrlhf.cli.{entry} is not OpenRLHF's PPO trainer" in one_line_error(capsys, "--from_openrlhf", text)


def test_deepspeed_chat_script_defaults_and_word_splitting():
    """training_scripts/opt/*: ``ACTOR_ZERO_STAGE=$3`` then its default in an ``if`` (the script run without
    arguments), and run_1.3b_lora.sh's ``CRITIC_ZERO_STAGE="--critic_zero_stage 2"`` split into two words."""
    script = f"""ACTOR_ZERO_STAGE=$3
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=3
fi
CRITIC_ZERO_STAGE="--critic_zero_stage 2"
deepspeed --num_gpus 4 main.py --actor_model_name_or_path facebook/opt-1.3b {CRITIC} \\
   --actor_zero_stage $ACTOR_ZERO_STAGE $CRITIC_ZERO_STAGE
"""
    dep = from_deepspeed_chat(script)
    assert dep.sharding.kind == "zero3" and dep.critic is not None and dep.critic.sharding is not None
    assert dep.critic.sharding.kind == "zero2" and dep.groups == {"all": 4}


@pytest.mark.parametrize("text, message", [
    # run_1.3b_lora.sh: ``ACTOR_MODEL_PATH= # Provide the ckpt path of the actor model``
    ("ACTOR_MODEL_PATH= # the SFT checkpoint\ndeepspeed main.py --actor_model_name_or_path $ACTOR_MODEL_PATH "
     + CRITIC, "--actor_model_name_or_path $ACTOR_MODEL_PATH: a shell variable"),
    (f"deepspeed main.py --actor_model_name_or_path facebook/opt-1.3b {CRITIC} --actor_zero_stage $STAGE",
     "invalid int value: '$STAGE' (a shell variable"),
])
def test_deepspeed_chat_blanks_left_to_fill_are_one_line_errors(capsys, text, message):
    assert message in one_line_error(capsys, "--from_deepspeed_chat", text)


def test_trl_sft_config_is_refused(tmp_path, capsys):
    """open-r1's recipes/*/sft/config_*.yaml (SFTConfig: max_length, packing) were planned as GRPO runs."""
    (tmp_path / "sft.yaml").write_text("model_name_or_path: Qwen2.5-7B\nmax_length: 32768\npacking: false\n"
                                       "per_device_train_batch_size: 2\n")
    assert "an SFT/DPO-style config (max_length, packing" in one_line_error(
        capsys, "--trl_config", str(tmp_path / "sft.yaml"))
    (tmp_path / "grpo.yaml").write_text("model_name_or_path: Qwen2.5-7B\nper_device_train_batch_size: 2\n"
                                        "max_completion_length: 1024\nnum_generations: 8\n")
    assert from_trl(str(tmp_path / "grpo.yaml")).micro_batch == 2
    (tmp_path / "bare.yaml").write_text("model_name_or_path: Qwen2.5-7B\nper_device_train_batch_size: 2\n")
    assert from_trl(str(tmp_path / "bare.yaml")).micro_batch == 2  # nothing says it is not GRPO


def test_trl_unknown_model_names_its_key(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("model_name_or_path: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B\n"
                                     "num_generations: 8\n")
    err = one_line_error(capsys, "--trl_config", str(tmp_path / "g.yaml"))
    assert "model_name_or_path deepseek-ai/DeepSeek-R1-Distill-Qwen-7B: unknown model" in err
    assert "pass --model" in err


@pytest.mark.parametrize("text, expected", [
    ("X=7\nY=$(( (X * 3 + 1) / 2 ))\nZ=$((-7 / 2))\nv=$Y w=$Z", "v=11 w=-3"),  # bash truncates toward zero
    ("A=1\nv=${A:+set} w=${B:+set} x=${B:-dflt} y=${1:-first}", "v=set w= x=dflt y=first"),
    ("A=1\necho '$A' \"$A\" $A", "echo '$A' \"1\" 1"),  # single quotes keep it
    ("ARR=(a 'b c')\ncmd \"${ARR[@]}\"", "cmd a 'b c'"),
    ("X=$(date)\ncmd $X $HOME ${#X}", "cmd $X $HOME ${#X}"),  # unknown: left as written
    ("VLLM_USE_V1=1 python3 run.py", "VLLM_USE_V1=1 python3 run.py"),  # an environment for one command
])
def test_expand_script(text, expected):
    assert expand_script(text).splitlines()[-1] == expected
