"""memory.advise: the scoring micro-batch is a knob of its own (veRL's log-prob micro-batches, OpenRLHF's rollout
micro-batch, DeepSpeed-Chat's generation batch); a suggestion's flags, read back by the same reader, give the plan
the suggestion promised."""
import pytest

from memory.advise import FLAGS, candidates, suggest
from memory.deploy import plan_deployment
from memory.inputs import GiB, from_deepspeed_chat, from_openrlhf, from_verl, trl_from_mappings

VERL_14B = ("actor_rollout_ref.model.path=Qwen/Qwen2.5-14B-Instruct data.max_prompt_length=512 "
            "data.max_response_length=1024 algorithm.adv_estimator=grpo "
            "actor_rollout_ref.model.enable_gradient_checkpointing=True actor_rollout_ref.model.lora_rank=32 "
            "actor_rollout_ref.model.use_remove_padding=True actor_rollout_ref.actor.use_kl_loss=True "
            "actor_rollout_ref.actor.fsdp_config.param_offload=True "
            "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True actor_rollout_ref.rollout.name=vllm "
            "actor_rollout_ref.rollout.n=5 actor_rollout_ref.ref.fsdp_config.param_offload=True trainer.nnodes=1 "
            "trainer.n_gpus_per_node=2 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=116 "
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=116 "
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=116 "
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.25 "
            "actor_rollout_ref.rollout.tensor_model_parallel_size=2 "
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 "
            "actor_rollout_ref.rollout.load_format=safetensors actor_rollout_ref.rollout.layered_summon=True")


def test_verl_both_micro_batches_capped_when_neither_alone_fits():
    """At the maximum lengths neither the train nor the log-prob micro-batch alone brings 116 sequences per group
    under 80 GB; capping both does, and the suggested keys, appended to the command, plan that deployment."""
    dep = from_verl(VERL_14B, gpu_memory=80 * 10**9)
    assert (dep.micro_batch, dep.score_micro_batch, dep.sequence_parallel) == (116, 116, 2)
    changes = {c.key: c for c in suggest(dep)}
    assert not changes["micro_batch"].fits_after
    # the scoring micro-batch alone does not lower the peak (the update is it): not offered at all
    assert "score_micro_batch" not in changes
    assert all(c.fits_after or c.peak_after < c.peak_before for c in changes.values())
    both = changes["micro_batches"]
    assert both.fits_after and suggest(dep)[0].key == "micro_batches"
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=" in both.flag
    assert "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=" in both.flag
    assert "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=" in both.flag
    reread = from_verl(f"{VERL_14B} {both.flag}", gpu_memory=80 * 10**9)
    n = reread.micro_batch
    assert reread.score_micro_batch == n and 1 <= n < 116
    plan = plan_deployment(reread)
    assert plan.fits and plan.peak_bytes == both.peak_after
    assert not plan_deployment(reread.with_(micro_batch=n + 1, score_micro_batch=n + 1)).fits  # the largest


def test_openrlhf_scoring_micro_batch_alone_when_scoring_is_the_peak():
    """Rollout micro-batch 64 with train micro-batch 1: the reference's scoring forward is what does not fit, and
    the suggestion lowers --micro_rollout_batch_size alone, to the largest value that fits."""
    cmd = ("--pretrain Qwen2.5-7B --vllm_num_engines 2 --actor_num_gpus_per_node 4 --ref_num_gpus_per_node 2 "
           "--zero_stage 3 --bf16 --flash_attn --gradient_checkpointing --micro_train_batch_size 1 "
           "--micro_rollout_batch_size {m} --prompt_max_len 1024 --generate_max_len 3072 "
           "--remote_rm_url http://rm --advantage_estimator group_norm")
    dep = from_openrlhf(cmd.format(m=64), gpu_memory=40 * GiB)
    plan = plan_deployment(dep)
    assert not plan.fits and max(plan.groups, key=lambda g: g.peak_bytes).peak_phase == "scoring"
    change = next(c for c in suggest(dep) if c.key == "score_micro_batch")
    assert change.fits_after and change.flag.startswith("--micro_rollout_batch_size ")
    s = int(change.flag.split()[-1])
    assert plan_deployment(from_openrlhf(cmd.format(m=s), gpu_memory=40 * GiB)).fits
    assert not plan_deployment(from_openrlhf(cmd.format(m=s + 1), gpu_memory=40 * GiB)).fits
    dotted = from_openrlhf(cmd.format(m=64), gpu_memory=40 * GiB).with_(framework="openrlhf-dotted")
    assert next(c for c in suggest(dotted) if c.key == "score_micro_batch").flag == f"--rollout.micro_batch_size {s}"


def test_no_scoring_knob_where_scoring_follows_the_train_micro_batch():
    """TRL scores in train micro-batches: no reader sets a scoring micro-batch, so no such suggestion."""
    dep = trl_from_mappings({"model_name_or_path": "Qwen2.5-7B", "per_device_train_batch_size": 16,
                             "max_prompt_length": 1024, "max_completion_length": 4096}, gpu_memory=40 * GiB)
    assert dep.score_micro_batch is None
    assert not [k for k, *_ in candidates(dep) if k in ("score_micro_batch", "micro_batches")]
    assert FLAGS["score_micro_batch"]["trl"] is None


def test_deepspeed_chat_scoring_flag_moves_the_generation_batch():
    """DeepSpeed-Chat scores its generation batch in one forward: --per_device_generation_batch_size moves both."""
    dep = from_deepspeed_chat(
        "deepspeed --num_gpus 1 main.py --actor_model_name_or_path facebook/opt-1.3b "
        "--critic_model_name_or_path facebook/opt-350m --per_device_generation_batch_size 64 "
        "--per_device_training_batch_size 4 --max_prompt_seq_len 256 --max_answer_seq_len 256 "
        "--actor_zero_stage 0 --critic_zero_stage 0", gpu_memory=24 * GiB)
    new = next(new for k, _, new, _, _ in candidates(dep) if k == "score_micro_batch")
    assert new.score_micro_batch == new.rollout_per_gpu < 64
    change = next(c for c in suggest(dep) if c.key == "score_micro_batch")
    assert change.flag == f"--per_device_generation_batch_size {new.score_micro_batch}"


@pytest.mark.parametrize("framework", ["openrlhf", "openrlhf-dotted", "verl"])
def test_token_budget_commands_are_told_the_scoring_budget(framework):
    """Under token-budget batching the scoring micro-batch flags are ignored; the suggestion names the budget in
    tokens per GPU (sequences x length / sequence-parallel size)."""
    dep = from_verl(VERL_14B, gpu_memory=80 * 10**9).with_(token_budget_batching=True, framework=framework)
    key, name, new, tokens, _ = next(c for c in candidates(dep) if c[0] == "score_token_budget")
    assert name == f"scoring token budget {tokens} per GPU (micro-batch {new.score_micro_batch})"
    assert tokens == -(-new.score_micro_batch * dep.seq // 2)
    assert str(tokens) in FLAGS[key][framework].format(v=tokens)


def test_several_changes_together_when_no_single_one_fits():
    """Llama-3-70B PPO on 16 GPUs, micro-batch 8 of 4096 + 4096 tokens, no checkpointing: no single change fits,
    so the answer is a combination, each step the largest saving left; applied, it fits. LoRA, QLoRA and dropping
    the reference change what is trained and are never folded in."""
    from memory.advise import combined
    from memory.arch import load_arch
    from memory.deploy import Deployment, Engine, Role, Sharding

    big = load_arch("Llama-3-70B")
    dep = Deployment(actor=Role("actor", big, trained=True), reference=Role("reference", big),
                     critic=Role("critic", big, trained=True, value_head=True), groups={"all": 16},
                     sharding=Sharding("zero3"), engine=Engine("vllm", group="all", tp=8, gpu_memory_utilization=0.5),
                     micro_batch=8, prompt_len=4096, response_len=4096, gradient_checkpointing=False)
    singles = [c for c in suggest(dep) if c.key != "combined"]
    assert singles and not any(c.fits_after for c in singles)
    change, applied = combined(dep)
    assert suggest(dep)[0] == change and change.fits_after and change.name.startswith("together: ")
    assert plan_deployment(applied).fits and plan_deployment(applied).peak_bytes == change.peak_after
    assert applied.gradient_checkpointing and applied.micro_batch < 8
    assert applied.actor.lora_rank == 0 and applied.reference is not None
    assert change.flag.count(";") == change.name.count(" + ")  # one flag per step
    assert combined(dep.with_(micro_batch=1, gradient_checkpointing=True, prompt_len=512, response_len=512)) is None
