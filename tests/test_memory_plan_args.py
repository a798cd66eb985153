"""rlhfkit memory plan's deployment arguments: counts below one are a one-line error (0 used to be taken as "not
given" and silently become the default, or to drop the command back to the single-device planner), and a built-in
deployment model alone is planned as a deployment."""
import pytest

from memory.cli import main


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be >= 1; got 0"),
    (["--gpus_per_node", "0"], "--gpus_per_node must be >= 1; got 0"),
    (["--nodes", "-2"], "--nodes must be >= 1; got -2"),
    (["--engine_tp", "0"], "--engine_tp must be >= 1; got 0"),
    (["--engine_gpus", "-1"], "--engine_gpus must be >= 0; got -1"),
])
def test_counts_below_one_are_one_line_errors(args, message, capsys):
    rc = main(["plan", "--model", "Qwen2.5-7B", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith(message) and len(err.splitlines()) == 1


def test_a_builtin_deployment_model_alone_is_planned_as_a_deployment(capsys):
    assert main(["plan", "--model", "Qwen2.5-7B"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("group train: 8 GPU(s)") and "fewest GPUs that fit" in out
    assert main(["plan", "--model", "gpt2"]) == 0  # the single-device planner's preset stays there
    assert "group train" not in capsys.readouterr().out


def test_an_unknown_model_names_the_built_in_configs(capsys):
    """A misspelt built-in name falls through to the single-device planner's loader; its one-line error used to
    name only tiny and the GPT-2 presets, hiding the deployment configs the planner has."""
    assert main(["plan", "--model", "Qwen2.5-7b-typo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Qwen2.5-7B" in err and "Llama-3-70B" in err


@pytest.mark.parametrize("overrides, message", [
    ("trainer.n_gpus_per_node=abc", "--from_verl: trainer.n_gpus_per_node=abc is not a number"),
    ("actor_rollout_ref.rollout.gpu_memory_utilization=lots",
     "--from_verl: actor_rollout_ref.rollout.gpu_memory_utilization=lots is not a number"),
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=3",
     "--from_verl: actor_rollout_ref.actor.ulysses_sequence_parallel_size=3 does not divide the 8 GPUs"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=3",
     "--from_verl: actor_rollout_ref.rollout.tensor_model_parallel_size=3 does not divide the 8 GPUs"),
])
def test_verl_overrides_that_veRL_refuses_are_named(overrides, message, capsys):
    """A value veRL cannot use is a one-line error naming its key (int('abc') named nothing; a Ulysses or rollout
    TP size that does not divide the GPUs, which veRL's device meshes refuse, was planned)."""
    rc = main(["plan", "--from_verl", f"actor_rollout_ref.model.path=Qwen2.5-7B {overrides}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_verl_actor_checkpointing_defaults_on():
    """veRL has checkpointed the actor by default since 9fca71d2c (2025-01-28); the reader used to plan it off."""
    from memory.inputs import from_verl

    assert from_verl("actor_rollout_ref.model.path=Qwen2.5-7B").gradient_checkpointing
    assert not from_verl("actor_rollout_ref.model.path=Qwen2.5-7B "
                         "actor_rollout_ref.model.enable_gradient_checkpointing=False").gradient_checkpointing


@pytest.mark.parametrize("command, message", [
    ("--pretrain Qwen2.5-7B --vllm_num_engines 3 --vllm_tensor_parallel_size 2 --colocate_all_models",
     "--vllm_num_engines x --vllm_tensor_parallel_size (6) must equal "
     "--actor_num_nodes x --actor_num_gpus_per_node (8)"),
    ("--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 3 --train.colocate_all",
     "--vllm.num_engines x --vllm.tensor_parallel_size (3) must equal "
     "--actor.num_nodes x --actor.num_gpus_per_node (8)"),
])
def test_openrlhf_colocated_engines_must_fill_the_actor_gpus(command, message, capsys):
    """train_ppo_ray asserts it (a4ca1ab6 and later); the reader used to plan 3 engines on 8 GPUs."""
    rc = main(["plan", "--from_openrlhf", command])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    from memory.inputs import from_openrlhf

    assert from_openrlhf(command.replace("3", "8").replace("--vllm_tensor_parallel_size 2", "")).engine.group \
        == "actor"


def test_a_pasted_script_is_read_as_the_shell_reads_it():
    """veRL's example scripts end with commented-out alternatives (``# trainer.n_gpus_per_node=8``), which were
    read as settings and overrode the real ones; ``$(cat script.sh)`` leaves a final continuation backslash, which
    failed to split. A ``#`` inside a word (a URL fragment) is no comment."""
    from memory.inputs import _split_command, from_openrlhf, from_verl

    script = ("set -x\n\npython3 -m verl.trainer.main_ppo \\\n    algorithm.adv_estimator=grpo \\\n"
              "    actor_rollout_ref.model.path=Qwen/Qwen2.5-3B-Instruct \\\n    trainer.n_gpus_per_node=2 \\\n"
              "    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \\\n    trainer.nnodes=1 $@\n\n"
              "    # actor_rollout_ref.actor.ppo_mini_batch_size=256 \\\n    # trainer.n_gpus_per_node=8 \\\n"
              "    # actor_rollout_ref.model.use_shm=True \\")
    assert from_verl(script).groups == {"all": 2}
    assert _split_command("a=1 --url http://x/#frag b='#q' c=\"d # e\" # f=1\ng=2", "x") == \
        ["a=1", "--url", "http://x/#frag", "b=#q", "c=d # e", "g=2"]
    # bash: a commented line inside a continued command ends it (its backslash is part of the comment)
    assert _split_command("a=1 \\\n  # b=2 \\\n  c=3", "x") == ["a=1"]
    rm = from_openrlhf("--pretrain Qwen2.5-7B --remote_rm_url http://rm:5000/#reward --vllm_num_engines 8 "
                       "--colocate_all_models --micro_train_batch_size 3")
    assert rm.reward is None and rm.micro_batch == 3


@pytest.mark.parametrize("files, message", [
    ({"c.yaml": "model_name_or_path: Qwen2.5-7B\nper_device_train_batch_size: abc\n"},
     "c.yaml: per_device_train_batch_size: 'abc' is not a number"),
    ({"c.yaml": "model_name_or_path: Qwen2.5-7B\nuse_vllm: true\nvllm_gpu_memory_utilization: lots\n"},
     "c.yaml: vllm_gpu_memory_utilization: 'lots' is not a number"),
    ({"c.yaml": "model_name_or_path: Qwen2.5-7B\n", "ds.json": '{"zero_optimization": {"stage": "three"}}'},
     "DeepSpeed config zero_optimization: stage: 'three' is not a number"),
    ({"c.yaml": "model_name_or_path: Qwen2.5-7B\n", "ds.json": '{"zero_optimization": {"stage": 4}}'},
     "DeepSpeed config zero_optimization: stage: 4 is not 0-3"),
    ({"c.yaml": "model_name_or_path: Qwen2.5-7B\n", "acc.yaml": "distributed_type: DEEPSPEED\nnum_processes: x\n"},
     "accelerate config: num_processes: 'x' is not a number"),
])
def test_trl_config_values_that_are_not_numbers_are_named(files, message, tmp_path, capsys):
    """int('abc') named neither the setting nor the file; the TRL, DeepSpeed and accelerate readers now do."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = ["plan", "--trl_config", str(tmp_path / "c.yaml")]
    if "ds.json" in files:
        args += ["--deepspeed_config", str(tmp_path / "ds.json")]
    if "acc.yaml" in files:
        args += ["--accelerate_config", str(tmp_path / "acc.yaml")]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
