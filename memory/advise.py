"""Ranked changes that make a deployment fit, each with the flag that applies it in the user's framework.

Why the flags: a saving is only useful if the user can apply it; TRL (GRPOConfig / TRL ``ModelConfig`` script
args, accelerate and DeepSpeed JSON keys), OpenRLHF (``train_ppo_ray`` flags: the flat ones, and the dotted ones of
ed62d0e2 and later, "openrlhf-dotted"), veRL (Hydra keys) and DeepSpeed-Chat (step-3 ``main.py`` flags) spell the
same change differently. Every name below was checked in the framework's source or config (docs/memory.md).
Each suggestion is a changed :class:`~memory.deploy.Deployment`; its saving is the planned peak before minus
after on the worst group, so the ranking is as good as the planner.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .deploy import Deployment, DeploymentPlan, largest_micro_batch, min_gpus, plan_deployment

FLAGS: dict[str, dict[str, str | None]] = {
    "gradient_checkpointing": {"trl": "gradient_checkpointing: true", "openrlhf": "--gradient_checkpointing",
                               "verl": "actor_rollout_ref.model.enable_gradient_checkpointing=True",
                               "deepspeed-chat": "--actor_gradient_checkpointing --critic_gradient_checkpointing",
                               "openrlhf-dotted": "--actor.gradient_checkpointing_enable"},
    "zero3": {"trl": "DeepSpeed JSON zero_optimization.stage: 3 (accelerate: zero_stage: 3)",
              "openrlhf": "--zero_stage 3", "verl": "actor_rollout_ref.actor.strategy=fsdp (full shard)",
              "deepspeed-chat": "--actor_zero_stage 3 --critic_zero_stage 3",
              "openrlhf-dotted": "--ds.zero_stage 3"},
    "offload_optimizer": {"trl": 'DeepSpeed JSON zero_optimization.offload_optimizer.device: "cpu"',
                          "openrlhf": "--adam_offload",
                          "verl": "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True",
                          "deepspeed-chat": "--offload",
                          "openrlhf-dotted": "--ds.adam_offload"},
    "offload_params": {"trl": 'DeepSpeed JSON zero_optimization.offload_param.device: "cpu" (ZeRO-3)',
                       "openrlhf": None, "verl": "actor_rollout_ref.actor.fsdp_config.param_offload=True",
                       "deepspeed-chat": "--offload (acts under ZeRO-3)"},
    "engine_util": {"trl": "vllm_gpu_memory_utilization: {v}", "openrlhf": "--vllm_gpu_memory_utilization {v}",
                    "verl": "actor_rollout_ref.rollout.gpu_memory_utilization={v}",
                    "openrlhf-dotted": "--vllm.gpu_memory_utilization {v}"},
    "sleep": {"trl": "vllm_enable_sleep_mode: true", "openrlhf": "--vllm_enable_sleep --deepspeed_enable_sleep",
              "verl": None,
              "openrlhf-dotted": "--vllm.enable_sleep --ds.enable_sleep"},
    "micro_batch": {"trl": "per_device_train_batch_size: {v}", "openrlhf": "--micro_train_batch_size {v}",
                    "verl": "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={v}",
                    "deepspeed-chat": "--per_device_training_batch_size {v}",
                    "openrlhf-dotted": "--train.micro_batch_size {v}"},
    "token_budget": {"openrlhf": "--train_max_tokens_per_gpu {v}", "openrlhf-dotted": "--train.max_tokens_per_gpu {v}",
                     "verl": "actor_rollout_ref.actor.ppo_max_token_len_per_gpu={v}"},
    "lora": {"trl": "use_peft: true, lora_r: 16 (TRL ModelConfig)", "openrlhf": "--lora_rank 16",
             "verl": "actor_rollout_ref.model.lora_rank=16",
             "deepspeed-chat": "--actor_lora_dim 16 --only_optimize_lora",
             "openrlhf-dotted": "--ds.lora.rank 16"},
    "qlora": {"trl": "use_peft: true, lora_r: 16, load_in_4bit: true", "openrlhf": "--lora_rank 16 --load_in_4bit",
              "verl": None,
              "openrlhf-dotted": "--ds.lora.rank 16 --ds.load_in_4bit"},
    "adam8bit": {"trl": "optim: adamw_8bit", "openrlhf": None, "verl": None},
    "ref_offload": {"trl": None, "openrlhf": "--ref_reward_offload",
                    "verl": "actor_rollout_ref.ref.fsdp_config.param_offload=True",
                    "deepspeed-chat": "--offload_reference_model (acts under ZeRO-3)",
                    "openrlhf-dotted": "--ref.offload"},
    "no_reference": {"trl": "beta: 0.0", "openrlhf": "--init_kl_coef 0",
                     "verl": "actor_rollout_ref.actor.use_kl_loss=False algorithm.use_kl_in_reward=False",
                     "openrlhf-dotted": "--algo.kl.init_coef 0"},
    "engine_tp": {"trl": "vllm_tensor_parallel_size: {v}", "openrlhf": "--vllm_tensor_parallel_size {v}",
                  "verl": "actor_rollout_ref.rollout.tensor_model_parallel_size={v}",
                  "openrlhf-dotted": "--vllm.tensor_parallel_size {v}"},
    "no_gather_for_generation": {"trl": "ds3_gather_for_generation: false", "openrlhf": None, "verl": None,
                                 "deepspeed-chat": "--unpin_actor_parameters"},
    "layered_summon": {"trl": None, "openrlhf": None,
                       "verl": "actor_rollout_ref.rollout.layered_summon=True "
                               "actor_rollout_ref.rollout.load_format=safetensors"},
    "more_gpus": {"trl": "accelerate launch --num_processes {v}",
                  "openrlhf": "--actor_num_nodes/--actor_num_gpus_per_node for {v} GPUs",
                  "verl": "trainer.nnodes x trainer.n_gpus_per_node = {v}",
                  "deepspeed-chat": "deepspeed --num_nodes N --num_gpus G for {v} GPUs",
                  "openrlhf-dotted": "--actor.num_nodes / --actor.num_gpus_per_node for {v} GPUs"},
}


@dataclass
class Change:
    key: str
    name: str
    flag: str | None
    peak_before: int
    peak_after: int
    fits_after: bool
    note: str = ""

    @property
    def saving(self) -> int:
        return self.peak_before - self.peak_after

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "flag": self.flag, "saving_bytes": self.saving,
                "peak_after_bytes": self.peak_after, "fits_after": self.fits_after, "note": self.note}


def _flag(key: str, framework: str, value: Any = None) -> str | None:
    f = FLAGS[key].get(framework)
    return f.format(v=value) if f and value is not None else f


def _fitting_util(dep: Deployment) -> float | None:
    """Largest engine utilisation (in steps of 0.05) that lets a colocated vLLM/SGLang group fit."""
    e = dep.engine
    for k in range(int(e.gpu_memory_utilization * 20) - 1, 0, -1):
        v = round(k * 0.05, 2)
        d = dep.with_(engine=replace(e, gpu_memory_utilization=v))
        p = plan_deployment(d)
        if p.fits:
            return v
    return None


def candidates(dep: Deployment) -> list[tuple[str, str, Deployment, Any, str]]:
    out: list[tuple[str, str, Deployment, Any, str]] = []
    sh, e, a = dep.sharding, dep.engine, dep.actor
    if e.kind == "hf" and sh.shards_params and dep.gather_for_generation:
        out.append(("no_gather_for_generation", "generate without gathering the whole model",
                    dep.with_(gather_for_generation=False), None, "ZeRO-3 gathers one layer at a time: much slower"))
    if not dep.gradient_checkpointing:
        out.append(("gradient_checkpointing", "gradient checkpointing", dep.with_(gradient_checkpointing=True), None,
                    "saves all but each layer's input; ~30% more update compute"))
    if not sh.shards_params and dep.groups[a.group] > 1:
        out.append(("zero3", "shard parameters too (ZeRO-3 / FSDP full shard)",
                    dep.with_(sharding=replace(sh, kind="zero3")), None, "more all-gather traffic per step"))
    verl = dep.framework == "verl"  # veRL offloads between phases rather than inside the step
    if not (dep.phase_offload_optimizer if verl else sh.offload_optimizer) and a.trained_params:
        out.append(("offload_optimizer", "optimizer state on the CPU",
                    dep.with_(phase_offload_optimizer=True) if verl else
                    dep.with_(sharding=replace(sh, offload_optimizer=True)),
                    None, "host memory and a slower optimizer step"))
    if sh.shards_params and not (dep.phase_offload_params if verl else sh.offload_params):
        out.append(("offload_params", "parameters on the CPU" + ("" if verl else " (ZeRO-3 offload)"),
                    dep.with_(phase_offload_params=True) if verl else
                    dep.with_(sharding=replace(sh, offload_params=True)), None, "slower phase switches" if verl
                    else "much slower forward/backward"))
    if e.kind != "hf" and e.group == a.group and not e.sleep:
        out.append(("sleep", "engine sleep mode between generations",
                    dep.with_(engine=replace(e, sleep=True), train_sleep=dep.framework == "openrlhf"), None,
                    "weights and KV pool leave the GPU while training; reload costs seconds per step"))
        util = _fitting_util(dep) if not plan_deployment(dep).fits else None
        if util is not None:
            out.append(("engine_util", f"lower engine memory share to {util}",
                        dep.with_(engine=replace(e, gpu_memory_utilization=util)), util,
                        "smaller KV pool: fewer concurrent sequences"))
    if dep.micro_batch > 1:
        mb = largest_micro_batch(dep) or 1
        mb = min(mb, dep.micro_batch - 1)
        if dep.token_budget_batching:  # the micro-batch flags are ignored: the budget is the knob
            budget = -(-mb * dep.seq // dep.sequence_parallel)  # per GPU: a group's bins hold budget x sp tokens
            out.append(("token_budget", f"train token budget {budget} per GPU (micro-batch {mb})",
                        dep.with_(micro_batch=mb), budget, "more, smaller micro-batches per step"))
        else:
            out.append(("micro_batch", f"train micro-batch {mb}", dep.with_(micro_batch=mb), mb,
                        "raise gradient accumulation to keep the batch"))
    if not a.lora_rank:
        out.append(("lora", "LoRA (r=16) on the actor", dep.with_(
            actor=replace(a, lora_rank=16), reference=None if dep.framework == "trl" else dep.reference), None,
            "TRL then uses the base with adapters off as the reference"))
    if not a.load_in_4bit:
        out.append(("qlora", "QLoRA: 4-bit frozen base + LoRA r=16",
                    dep.with_(actor=replace(a, lora_rank=a.lora_rank or 16, load_in_4bit=True),
                              reference=None if dep.framework == "trl" else dep.reference), None,
                    "bitsandbytes nf4; slower matmuls"))
    if dep.optimizer == "adamw" and a.trained_params:
        out.append(("adam8bit", "8-bit AdamW states", dep.with_(optimizer="adamw8bit"), None, "bitsandbytes"))
    if dep.reference is not None:
        if not dep.reference.offload:
            out.append(("ref_offload", "reference on the CPU outside scoring",
                        dep.with_(reference=replace(dep.reference, offload=True)), None, "reload per step"))
        out.append(("no_reference", "no reference model (no KL term)", dep.with_(reference=None), None,
                    "changes the objective: drops the KL penalty"))
    if verl and a.lora_rank and e.kind == "vllm" and not dep.layered_summon:
        out.append(("layered_summon", "sync LoRA one layer at a time (base preloaded in vLLM)",
                    dep.with_(layered_summon=True), None,
                    "fsdp_vllm.py: no whole-model summon before each generation; vLLM loads the base once"))
    if e.kind != "hf" and e.group != a.group and dep.groups[e.group] >= 2 * e.tp:
        tp = 2 * e.tp
        out.append(("engine_tp", f"engine tensor parallel {tp}", dep.with_(engine=replace(e, tp=tp)), tp,
                    "weights and KV split over more GPUs per engine"))
    return out


def suggest(dep: Deployment, plan: DeploymentPlan | None = None) -> list[Change]:
    """Changes ranked: those that make it fit first, then by saving of the worst group's peak."""
    plan = plan or plan_deployment(dep)
    before = plan.peak_bytes
    out = []
    for key, name, new, value, note in candidates(dep):
        try:
            p = plan_deployment(new)
        except ValueError:
            continue
        out.append(Change(key, name, _flag(key, dep.framework, value), before, p.peak_bytes, p.fits, note))
    if not plan.fits:
        n = min_gpus(dep)
        if n is not None and n > dep.total_gpus:
            scaled = {g: max(1, round(k * n / dep.total_gpus)) for g, k in dep.groups.items()}
            after = plan_deployment(dep.with_(groups=scaled)).peak_bytes
            out.append(Change("more_gpus", f"{n} GPUs with this layout", _flag("more_gpus", dep.framework, n), before,
                              after, True, "fewest GPUs that fit, every group scaled alike"))
    out.sort(key=lambda c: (not c.fits_after, -c.saving))
    return out
