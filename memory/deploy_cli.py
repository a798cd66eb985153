"""``rlhfkit memory plan`` for multi-GPU deployments: the flags, the reader dispatch and the rendering.

Kept apart from memory/cli.py so the single-device ``plan`` keeps its behaviour: the deployment planner runs
when any deployment flag (``--nodes``, ``--gpus_per_node``, ``--gpu_memory``, ``--zero``, ``--fsdp``,
``--engine``, ``--algorithm``, ``--trl_config``, ``--from_openrlhf``, ``--from_verl``, ``--from_deepspeed_chat``)
is given.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from .advise import suggest
from .arch import arch_from_config, builtin_config, load_arch
from .deploy import (
    PHASES,
    Deployment,
    Engine,
    Role,
    Sharding,
    known_gap_note,
    largest_micro_batch,
    largest_rollout_batch,
    min_gpus,
    plan_deployment,
    role_checkpointing,
    role_sharding,
    torch_counted_note,
    torch_counted_peak,
)
from .inputs import from_deepspeed_chat, from_openrlhf, from_trl, from_verl
from .planner import human, parse_bytes
from .verl_log import overrides_from_log

TRIGGERS = ("nodes", "gpus_per_node", "gpu_memory", "zero", "fsdp", "engine", "algorithm", "trl_config",
            "from_openrlhf", "from_verl", "from_verl_log", "from_deepspeed_chat")


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment (multi-GPU RLHF; any of these switches to the deployment planner)")
    g.add_argument("--nodes", type=int, default=None)
    g.add_argument("--gpus_per_node", type=int, default=None)
    g.add_argument("--gpu_memory", default=None,
                   help="memory of one GPU, e.g. 80GiB, or a GPU name: H100, A100-80GB, A100-40GB, H200, L40S, ... "
                        "(what nvidia-smi reports; default 80GiB)")
    g.add_argument("--reserve", default="0", help="per-GPU bytes outside tensors (CUDA context, NCCL), e.g. 2GiB")
    g.add_argument("--algorithm", choices=("grpo", "rloo", "reinforce", "ppo"), default=None,
                   help="ppo adds a critic (the actor's model unless --critic)")
    g.add_argument("--critic", default=None, help="critic model (PPO)")
    g.add_argument("--reward", default=None, help="reward model; default: a reward function (no model)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="DeepSpeed ZeRO stage")
    g.add_argument("--fsdp", choices=("full_shard", "shard_grad_op"), default=None)
    g.add_argument("--offload", choices=("none", "optimizer", "params", "all"), default="none")
    g.add_argument("--engine", choices=("hf", "vllm", "sglang"), default=None)
    g.add_argument("--vllm_gpu_memory_utilization", "--mem_fraction_static", dest="engine_util", type=float,
                   default=None, help="vLLM gpu_memory_utilization / SGLang mem_fraction_static")
    g.add_argument("--engine_tp", type=int, default=1)
    g.add_argument("--engine_gpus", type=int, default=0, help="GPUs of a separate engine group (0: colocated)")
    g.add_argument("--colocate", action="store_true", help="all models and the engine on the same GPUs (default)")
    g.add_argument("--sleep", action="store_true", help="engine sleep mode between generations")
    g.add_argument("--load_in_4bit", action="store_true", help="QLoRA: 4-bit frozen base (with --lora)")
    g.add_argument("--attn", choices=("flash", "sdpa", "eager"), default="flash")
    g.add_argument("--framework", choices=("trl", "openrlhf", "openrlhf-dotted", "verl", "deepspeed-chat"),
                   default=None, help="whose flags the suggestions use")
    g.add_argument("--trl_config", default=None, help="TRL GRPOConfig/TrainingArguments YAML or JSON")
    g.add_argument("--accelerate_config", default=None, help="accelerate config YAML (with --trl_config)")
    g.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (with --trl_config)")
    g.add_argument("--trl_version", default=None,
                   help="TRL version the run uses, e.g. 0.18.0 (with --trl_config): picks TRL's log-prob head; "
                        "default: TRL 1.15 and later (its fused head, on a GPU)")
    g.add_argument("--from_openrlhf", default=None, metavar="FLAGS",
                   help="an OpenRLHF train_ppo_ray command line, or its whole launch script")
    g.add_argument("--from_verl", default=None, metavar="OVERRIDES",
                   help="veRL main_ppo key=value overrides, or the whole launch script")
    g.add_argument("--from_verl_log", default=None, metavar="LOG",
                   help="a veRL run's console log: the resolved config main_ppo printed at start (every setting, "
                        "that veRL version's defaults included) is planned")
    g.add_argument("--from_deepspeed_chat", default=None, metavar="FLAGS",
                   help="a DeepSpeed-Chat step-3 main.py command line ([deepspeed --num_gpus G] main.py --flags); "
                        "--nodes sets the GPU count (x --gpus_per_node) when the launcher does not")


def wanted(a: argparse.Namespace) -> bool:
    """Any deployment flag given, 0 included (``--nodes 0`` is an error of the deployment planner, not a reason to
    fall back to the single-device one)."""
    if any(getattr(a, k, None) is not None and getattr(a, k) is not False for k in TRIGGERS):
        return True
    # a built-in deployment model (Qwen2.5-7B, Llama-3-70B, ...) that the single-device planner cannot build:
    # plan it as a deployment with the defaults rather than fail on an unknown name
    from .cli import PRESETS  # lazy: cli imports this module

    model = getattr(a, "model", None)
    return isinstance(model, str) and model not in ("tiny", *PRESETS) and builtin_config(model) is not None


def _arch(name: str):

    try:
        return load_arch(name)
    except ValueError:
        from .cli import load_model_config  # lazy: cli imports this module (tiny, presets, a local folder)

        cfg = load_model_config(name)
        return arch_from_config(cfg if isinstance(cfg, dict) else cfg.to_dict(), name=name)


def deployment_from_args(a: argparse.Namespace) -> Deployment:

    for flag in ("nodes", "gpus_per_node", "engine_tp"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag} must be >= 1; got {v}")
    if a.engine_gpus < 0:
        raise ValueError(f"--engine_gpus must be >= 0; got {a.engine_gpus}")
    gpu_memory = parse_bytes(a.gpu_memory or "80GiB")
    gpn = a.gpus_per_node or 8
    if a.from_openrlhf is not None:  # an empty value is the reader's one-line error, not a default plan

        dep = from_openrlhf(a.from_openrlhf, model=None if a.model == "tiny" else a.model, gpu_memory=gpu_memory,
                            gpus_per_node=gpn)
    elif a.from_deepspeed_chat is not None:

        dep = from_deepspeed_chat(a.from_deepspeed_chat, model=None if a.model == "tiny" else a.model,
                                  gpu_memory=gpu_memory, gpus=a.nodes * gpn if a.nodes else None, gpus_per_node=gpn)
    elif a.from_verl is not None or a.from_verl_log is not None:

        overrides = a.from_verl if a.from_verl is not None else overrides_from_log(a.from_verl_log)
        dep = from_verl(overrides, model=None if a.model == "tiny" else a.model, gpu_memory=gpu_memory)
    elif a.trl_config is not None:

        dep = from_trl(a.trl_config, model=None if a.model == "tiny" else a.model, accelerate=a.accelerate_config,
                       deepspeed=a.deepspeed_config, gpu_memory=gpu_memory, gpus_per_node=gpn,
                       trl_version=a.trl_version)
    else:
        dep = _from_flags(a, gpu_memory, gpn)
    if a.framework:
        dep = dep.with_(framework=a.framework)
    return dep.with_(reserve_bytes=parse_bytes(a.reserve) if a.reserve not in ("0", "") else 0)


def _from_flags(a: argparse.Namespace, gpu_memory: int, gpn: int) -> Deployment:
    arch = _arch(a.model)
    db = 4 if a.dtype == "fp32" else 2  # deployments default to bf16
    train = (a.nodes or 1) * gpn
    groups = {"train": train}
    lora = a.lora or 0
    actor = Role("actor", arch, trained=True, group="train", dtype_bytes=db, lora_rank=lora,
                 load_in_4bit=a.load_in_4bit)
    algo = a.algorithm or "grpo"
    critic = None
    if algo == "ppo":
        critic = Role("critic", _arch(a.critic) if a.critic else arch, trained=True, group="train", dtype_bytes=db,
                      value_head=True, lora_rank=lora)
    reference = None if a.no_reference or (lora and a.share_reference) else Role("reference", arch, group="train",
                                                                                 dtype_bytes=db)
    reward = Role("reward", _arch(a.reward), group="train", dtype_bytes=db, value_head=True) if a.reward else None
    if a.fsdp:
        kind = "fsdp_full" if a.fsdp == "full_shard" else "fsdp_grad_op"
    else:
        kind = f"zero{a.zero or 0}"
    sharding = Sharding(kind, offload_optimizer=a.offload in ("optimizer", "all"),
                        offload_params=a.offload in ("params", "all"),
                        mixed_precision=a.mixed_precision or kind != "zero0")
    kind_e = a.engine or "hf"
    eng_group = "train"
    if a.engine_gpus and kind_e != "hf" and not a.colocate:
        groups["engine"] = a.engine_gpus
        eng_group = "engine"
    util = a.engine_util if a.engine_util is not None else (0.9 if kind_e == "vllm" else 0.88)
    engine = Engine(kind_e, group=eng_group, tp=a.engine_tp, gpu_memory_utilization=util, sleep=a.sleep)
    return Deployment(actor=actor, critic=critic, reference=reference, reward=reward, groups=groups,
                      gpus_per_node=gpn, gpu_memory=gpu_memory, sharding=sharding, engine=engine,
                      optimizer={"adam8bit": "adamw8bit", "sgd": "sgd"}.get(a.optimizer, "adamw"),
                      micro_batch=a.mini_batch_size or 1, prompt_len=a.prompt_len, response_len=a.max_new_tokens,
                      rollout_per_gpu=a.rollout_batch_size or a.batch_size,
                      gradient_checkpointing=a.gradient_checkpointing, attn=a.attn,
                      logprob_head="chunked" if a.logprob_impl in ("chunked", "triton", "auto") else "torch",
                      framework=a.framework or "trl")


def report(dep: Deployment) -> dict[str, Any]:
    """The JSON answer: per group peak_bytes, peak_phase and the component x phase table; top-level fits,
    min_gpus, the largest micro-batch, the engine's KV capacity and the ranked suggestions."""
    t0 = time.perf_counter()
    plan = plan_deployment(dep)
    changes = suggest(dep, plan)
    out = {"format_version": 1, "kind": "deployment", "fits": plan.fits, "min_gpus": min_gpus(dep),
           "total_gpus": dep.total_gpus, "gpu_memory_bytes": dep.gpu_memory, "peak_bytes": plan.peak_bytes,
           "largest_micro_batch": largest_micro_batch(dep), "largest_rollout_batch": largest_rollout_batch(dep),
           "groups": {g.name: {"gpus": g.gpus, "roles": g.roles, "peak_bytes": g.peak_bytes,
                               "peak_phase": g.peak_phase, "fits": g.fits, "host_bytes_per_gpu": g.host_bytes,
                               "torch_counted_peak_bytes": torch_counted_peak(plan, g.name),
                               "phases": g.totals, "table": g.table,
                               "notes": g.notes + [n for n in (torch_counted_note(plan, g.name),
                                                               known_gap_note(plan, g.name)) if n]}
                      for g in plan.groups},
           "engine": {"kind": dep.engine.kind, "group": dep.engine.group, "tp": dep.engine.tp,
                      "gpu_memory_utilization": dep.engine.gpu_memory_utilization, "sleep": dep.engine.sleep,
                      "weights_bytes": plan.engine.weights, "kv_pool_bytes": plan.engine.kv_pool,
                      "kv_tokens": plan.engine.kv_tokens, "concurrent_sequences": plan.engine.max_seqs,
                      "rule": plan.engine.rule},
           "suggestions": [c.to_dict() for c in changes], "notes": plan.notes,
           "inputs": _inputs(dep)}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _inputs(dep: Deployment) -> dict[str, Any]:
    roles = {r.name: {"model": r.arch.name, "params": r.arch.params, "trained": r.trained, "group": r.group,
                      "lora_rank": r.lora_rank, "load_in_4bit": r.load_in_4bit, "offload": r.offload,
                      "sharding": role_sharding(r, dep).kind, "gradient_checkpointing": role_checkpointing(r, dep)}
             for r in dep.roles()}
    return {"roles": roles, "groups": dep.groups, "sharding": dep.sharding.kind,
            "offload_optimizer": dep.sharding.offload_optimizer, "offload_params": dep.sharding.offload_params,
            "micro_batch": dep.micro_batch, "prompt_len": dep.prompt_len, "response_len": dep.response_len,
            "gradient_checkpointing": dep.gradient_checkpointing, "attn": dep.attn, "framework": dep.framework,
            "hybrid_engine": asdict(dep.hybrid_engine) if dep.hybrid_engine is not None else None,
            "actor_ema": dep.actor_ema, "sequence_parallel": dep.sequence_parallel,
            "tensor_parallel": dep.tensor_parallel, "tensor_parallel_head": dep.tensor_parallel_head,
            "token_budget_batching": dep.token_budget_batching, "logprob_head": dep.logprob_head,
            **({"entropy_impl": dep.entropy_impl, "entropy_in_update": dep.entropy_in_update}
               if dep.logprob_head == "verl" else {})}


def render(rep: dict[str, Any]) -> str:

    lines = []
    for name, g in rep["groups"].items():
        lines.append(f"group {name}: {g['gpus']} GPU(s), {', '.join(g['roles'])}; per GPU:")
        comps = [c for c in g["table"] if any(g["table"][c].values())]
        width = max([len(c) for c in comps] + [9])
        lines.append(f"  {'component':<{width}}" + "".join(f"{ph:>15}" for ph in PHASES))
        for c in comps:
            lines.append(f"  {c:<{width}}" + "".join(f"{human(g['table'][c][ph]):>15}" for ph in PHASES))
        lines.append(f"  {'total':<{width}}" + "".join(f"{human(g['phases'][ph]):>15}" for ph in PHASES))
        verdict = "fits" if g["fits"] else "DOES NOT FIT"
        lines.append(f"  peak {human(g['peak_bytes'])} in {g['peak_phase']}: {verdict} in "
                     f"{human(rep['gpu_memory_bytes'])}" + (f"; host (CPU) per GPU {human(g['host_bytes_per_gpu'])}"
                                                             if g["host_bytes_per_gpu"] else ""))
        lines.extend(f"  note: {n}" for n in g["notes"])
        lines.append("")
    e = rep["engine"]
    if e["kind"] != "hf":
        lines.append(f"engine {e['kind']} (TP {e['tp']}, utilisation {e['gpu_memory_utilization']}): weights "
                     f"{human(e['weights_bytes'])}/GPU, KV pool {human(e['kv_pool_bytes'])}/GPU = {e['kv_tokens']} "
                     f"tokens, {e['concurrent_sequences']} concurrent sequences of the requested length")
    lines.append(f"fits: {'yes' if rep['fits'] else 'NO'} on {rep['total_gpus']} GPUs; fewest GPUs that fit this "
                 f"layout: {rep['min_gpus'] or 'none up to 1024'}; largest train micro-batch: "
                 f"{rep['largest_micro_batch'] or 'none'}; largest generation batch per "
                 f"{'GPU' if rep['engine']['kind'] == 'hf' else 'engine'}: {rep['largest_rollout_batch'] or 'none'}")
    if rep["suggestions"]:
        lines.append("changes (ranked: those that make it fit first, then by saving of the peak):")
        for i, s in enumerate(rep["suggestions"][:10], 1):
            mark = "fits" if s["fits_after"] else "    "
            lines.append(f"{i:>2}. [{mark}] {s['name']:<46} peak -> {human(s['peak_after_bytes']):>11}  "
                         f"{s['flag'] or '(no flag in this framework)'}")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> dict[str, Any]:
    return report(deployment_from_args(a))

