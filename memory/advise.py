"""Ranked changes that make a deployment fit, each with the flag that applies it in the user's framework.

Why the flags: a saving is only useful if the user can apply it; TRL (GRPOConfig / TRL ``ModelConfig`` script
args, accelerate and DeepSpeed JSON keys), OpenRLHF (``train_ppo_ray`` flags: the flat ones, and the dotted ones of
ed62d0e2 and later, "openrlhf-dotted"), veRL (Hydra keys) and DeepSpeed-Chat (step-3 ``main.py`` flags) spell the
same change differently. Every name below was checked in the framework's source or config (docs/memory.md).
Each suggestion is a changed :class:`~memory.deploy.Deployment`; its saving is the planned peak before minus
after on the worst group, so the ranking is as good as the planner.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from .deploy import (
    Deployment,
    DeploymentPlan,
    fits_with,
    largest_micro_batch,
    min_gpus,
    plan_deployment,
    role_checkpointing,
    role_sharding,
)
from .planner import largest_fitting

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
    # the no-grad log-prob/value forwards of the rollout (TRL has no knob of its own: it scores in train micro-batches;
    # DeepSpeed-Chat scores its whole generation batch at once, so the flag also sets the generation batch)
    "score_micro_batch": {"trl": None, "openrlhf": "--micro_rollout_batch_size {v}",
                          "openrlhf-dotted": "--rollout.micro_batch_size {v}",
                          "verl": "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={v} "
                                  "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={v}",
                          "deepspeed-chat": "--per_device_generation_batch_size {v}"},
    # both micro-batch flags at once: the value is the two flags, spelled by the two entries above
    "micro_batches": {f: "{v}" for f in ("openrlhf", "openrlhf-dotted", "verl", "deepspeed-chat")},
    "score_token_budget": {"openrlhf": "--rollout_max_tokens_per_gpu {v}",
                           "openrlhf-dotted": "--rollout.max_tokens_per_gpu {v}",
                           "verl": "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={v} "
                                   "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu={v}"},
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
    # DeepSpeed AutoTP training (OpenRLHF f5b45490+ flat, ed62d0e2+ dotted; memory.inputs._openrlhf_check_tp)
    "train_tp": {"openrlhf": "--ds_tensor_parallel_size {v}", "openrlhf-dotted": "--ds.tensor_parallel_size {v}"},
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


# frameworks whose flags for checkpointing and sharding name every trained model (DeepSpeed-Chat's --actor_* and
# --critic_* pairs): a suggestion changes the roles' own settings (Role.sharding / gradient_checkpointing) too
_FLAGS_NAME_EVERY_ROLE = ("deepspeed-chat",)


def with_every_role(dep: Deployment, gradient_checkpointing: bool | None = None, **sharding: Any) -> Deployment:
    """``dep`` with a checkpointing or sharding change: the deployment's setting and, where the framework's flags
    name every model, each role's own."""
    top: dict[str, Any] = {}
    if gradient_checkpointing is not None:
        top["gradient_checkpointing"] = gradient_checkpointing
    if sharding:
        top["sharding"] = replace(dep.sharding, **sharding)
    if dep.framework in _FLAGS_NAME_EVERY_ROLE:
        for r in dep.roles():
            own: dict[str, Any] = {}
            if gradient_checkpointing is not None and r.gradient_checkpointing is not None:
                own["gradient_checkpointing"] = gradient_checkpointing
            if sharding and r.sharding is not None:
                own["sharding"] = replace(r.sharding, **sharding)
            if own:
                top[r.name] = replace(r, **own)
    return dep.with_(**top)


def candidates(dep: Deployment) -> list[tuple[str, str, Deployment, Any, str]]:
    out: list[tuple[str, str, Deployment, Any, str]] = []
    sh, e, a = dep.sharding, dep.engine, dep.actor
    # the roles a suggestion's flags reach: every trained one where the flags name them all, else the actor
    reach = [r for r in dep.roles() if r.trained] if dep.framework in _FLAGS_NAME_EVERY_ROLE else [a]
    if e.kind == "hf" and sh.shards_params and dep.gather_for_generation:
        out.append(("no_gather_for_generation", "generate without gathering the whole model",
                    dep.with_(gather_for_generation=False), None, "ZeRO-3 gathers one layer at a time: much slower"))
    if not all(role_checkpointing(r, dep) for r in reach):
        out.append(("gradient_checkpointing", "gradient checkpointing",
                    with_every_role(dep, gradient_checkpointing=True), None,
                    "saves all but each layer's input; ~30% more update compute"))
    # OpenRLHF's flat versions pin DeepSpeed releases that refuse ZeRO-3 under AutoTP (memory.inputs._openrlhf_check_tp)
    zero3_ok = dep.tensor_parallel == 1 or dep.framework != "openrlhf"
    if not all(role_sharding(r, dep).shards_params for r in reach) and dep.groups[a.group] > 1 and zero3_ok:
        out.append(("zero3", "shard parameters too (ZeRO-3 / FSDP full shard)", with_every_role(dep, kind="zero3"),
                    None, "more all-gather traffic per step"))
    verl = dep.framework == "verl"  # veRL offloads between phases rather than inside the step
    if not (dep.phase_offload_optimizer if verl else sh.offload_optimizer) and a.trained_params:
        out.append(("offload_optimizer", "optimizer state on the CPU",
                    dep.with_(phase_offload_optimizer=True) if verl else with_every_role(dep, offload_optimizer=True),
                    None, "host memory and a slower optimizer step"))
    if sh.shards_params and not (dep.phase_offload_params if verl else sh.offload_params):
        out.append(("offload_params", "parameters on the CPU" + ("" if verl else " (ZeRO-3 offload)"),
                    dep.with_(phase_offload_params=True) if verl else with_every_role(dep, offload_params=True), None,
                    "slower phase switches" if verl else "much slower forward/backward"))
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
            budget = _tokens_per_gpu(dep, mb)
            out.append(("token_budget", f"train token budget {budget} per GPU (micro-batch {mb})",
                        dep.with_(micro_batch=mb), budget, "more, smaller micro-batches per step"))
        else:
            out.append(("micro_batch", f"train micro-batch {mb}", dep.with_(micro_batch=mb), mb,
                        "raise gradient accumulation to keep the batch"))
    out.extend(_scoring_batch_candidates(dep))
    if not a.lora_rank and dep.tensor_parallel == 1:  # LoRA under AutoTP is not modelled
        out.append(("lora", "LoRA (r=16) on the actor", dep.with_(
            actor=replace(a, lora_rank=16), reference=None if dep.framework == "trl" else dep.reference), None,
            "TRL then uses the base with adapters off as the reference"))
    if not a.load_in_4bit and dep.tensor_parallel == 1:
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
    tp = 2 * dep.tensor_parallel
    if (FLAGS["train_tp"].get(dep.framework) and all(r.dtype_bytes == 2 and not r.lora_rank and not r.load_in_4bit
                                                     and dep.groups[r.group] % (tp * dep.sequence_parallel) == 0
                                                     for r in dep.roles())
            and (dep.framework != "openrlhf" or sh.kind != "zero3")):
        out.append(("train_tp", f"training tensor parallel {tp} (DeepSpeed AutoTP)",
                    dep.with_(tensor_parallel=tp, tensor_parallel_head=dep.framework == "openrlhf-dotted"), tp,
                    "each group of that many GPUs trains one micro-batch: activations and split weights shrink, "
                    "optimizer state of replicated ones (embeddings, norms) does not; all-reduces in every layer"))
    if e.kind != "hf" and e.group != a.group and dep.groups[e.group] >= 2 * e.tp:
        tp = 2 * e.tp
        out.append(("engine_tp", f"engine tensor parallel {tp}", dep.with_(engine=replace(e, tp=tp)), tp,
                    "weights and KV split over more GPUs per engine"))
    return out


def _tokens_per_gpu(dep: Deployment, n: int) -> int:
    """A token budget per GPU that holds micro-batches of ``n`` sequences at the maximum length: the frameworks'
    bins hold budget x sp x tp tokens (seqlen_balancing.py; every TP rank sees a micro-batch's tokens)."""
    return -(-n * dep.seq // (dep.sequence_parallel * dep.tensor_parallel))


def _scored(dep: Deployment, n: int) -> Deployment:
    """``dep`` scoring ``n`` sequences a micro-batch; DeepSpeed-Chat scores what it generated together, so its one
    flag moves the generation batch with it."""
    if dep.framework == "deepspeed-chat":
        return dep.with_(score_micro_batch=n, rollout_per_gpu=n)
    return dep.with_(score_micro_batch=n)


def _scoring_batch_candidates(dep: Deployment) -> list[tuple[str, str, Deployment, Any, str]]:
    """Smaller scoring micro-batches: alone (the largest that fits, else 1), and, when neither micro-batch alone
    makes it fit, both capped at the largest common size that does. Only where the scoring micro-batch is its own
    setting (a reader set it): otherwise it follows the train micro-batch and that suggestion covers it."""
    score = dep.score_micro_batch
    key = "score_token_budget" if dep.token_budget_batching else "score_micro_batch"
    if score is None or score <= 1 or not FLAGS[key].get(dep.framework):
        return []

    def value(n: int) -> int:  # the flag's value: sequences, or under token budgets the tokens per GPU
        return _tokens_per_gpu(dep, n) if dep.token_budget_batching else n

    s = largest_fitting(lambda n: fits_with(_scored(dep, n)), score - 1) or 1
    name = (f"scoring token budget {value(s)} per GPU (micro-batch {s})" if dep.token_budget_batching
            else f"scoring micro-batch {s}")
    out: list[tuple[str, str, Deployment, Any, str]] = [
        (key, name, _scored(dep, s), value(s), "more, smaller log-prob forwards per step")]
    alone = fits_with(_scored(dep, s)) or (dep.micro_batch > 1 and largest_micro_batch(dep) > 0)
    if not alone and dep.micro_batch > 1:
        top = max(dep.micro_batch, score) - 1

        def capped(n: int) -> Deployment:
            return _scored(dep, min(score, n)).with_(micro_batch=min(dep.micro_batch, n))

        n = largest_fitting(lambda k: fits_with(capped(k)), top)
        if n:
            train = "token_budget" if dep.token_budget_batching else "micro_batch"
            flags = [f for f in (_flag(train, dep.framework, value(min(dep.micro_batch, n))),
                                 _flag(key, dep.framework, value(min(score, n)))) if f]
            out.append(("micro_batches", f"train and scoring micro-batches {n}", capped(n), " ".join(flags),
                        "both phases in smaller micro-batches; raise gradient accumulation to keep the batch"))
    return out


def _planned(dep: Deployment) -> Iterator[tuple[str, str, Deployment, Any, str, DeploymentPlan]]:
    """Each candidate change with its plan; a change that makes the deployment invalid is skipped."""
    for key, name, new, value, note in candidates(dep):
        try:
            yield key, name, new, value, note, plan_deployment(new)
        except ValueError:
            continue


def suggest(dep: Deployment, plan: DeploymentPlan | None = None) -> list[Change]:
    """Changes ranked: those that make it fit first, then by saving of the worst group's peak."""
    plan = plan or plan_deployment(dep)
    before = plan.peak_bytes
    out = []
    for key, name, _new, value, note, p in _planned(dep):
        # a change that neither lowers the peak nor makes the plan fit is noise (on a plan that fits already,
        # a change that fits as well but saves nothing is noise too)
        if p.peak_bytes < before or (p.fits and not plan.fits):
            out.append(Change(key, name, _flag(key, dep.framework, value), before, p.peak_bytes, p.fits, note))
    if not plan.fits:
        n = min_gpus(dep)
        if n is not None and n > dep.total_gpus:
            scaled = {g: max(1, round(k * n / dep.total_gpus)) for g, k in dep.groups.items()}
            after = plan_deployment(dep.with_(groups=scaled)).peak_bytes
            out.append(Change("more_gpus", f"{n} GPUs with this layout", _flag("more_gpus", dep.framework, n), before,
                              after, True, "fewest GPUs that fit, every group scaled alike"))
    if not plan.fits and not any(c.fits_after for c in out):
        found = combined(dep, plan)
        if found is not None:
            out.append(found[0])
    out.sort(key=lambda c: (not c.fits_after, -c.saving))
    return out


# changes that alter what is trained or optimised: listed alone, never folded into a combination
_CHANGES_THE_OBJECTIVE = ("no_reference", "lora", "qlora")


def combined(dep: Deployment, plan: DeploymentPlan | None = None, steps: int = 6) -> tuple[Change, Deployment] | None:
    """When no single change fits: changes applied one after another, each the one that fits, else the largest
    saving left, until the plan fits (at most ``steps``; None if it never does, or one change suffices). The
    answer to "with what?" when the answer is several things at once."""
    plan = plan or plan_deployment(dep)
    before = cur_peak = plan.peak_bytes
    cur = dep
    taken: list[tuple[str, str, str]] = []  # (key, name, flag) of each change applied
    for _ in range(steps):
        best: tuple[str, str, Deployment, Any, DeploymentPlan] | None = None
        for key, name, new, value, _note, p in _planned(cur):
            if key in _CHANGES_THE_OBJECTIVE or key in (t[0] for t in taken):
                continue
            if best is None or (p.fits, -p.peak_bytes) > (best[4].fits, -best[4].peak_bytes):
                best = (key, name, new, value, p)
        if best is None or (not best[4].fits and best[4].peak_bytes >= cur_peak):
            return None
        key, name, cur, value, p = best
        taken.append((key, name, _flag(key, dep.framework, value) or f"({name}: no flag in this framework)"))
        cur_peak = p.peak_bytes
        if p.fits:
            if len(taken) < 2:
                return None
            return (Change("combined", "together: " + " + ".join(t[1] for t in taken), "; ".join(t[2] for t in taken),
                           before, cur_peak, True, "no single change fits; applied in this order"), cur)
    return None
