"""Build a :class:`memory.deploy.Deployment` from what users hold: CLI flags, a TRL config (YAML/JSON of
``GRPOConfig``/``TrainingArguments``) with its accelerate or DeepSpeed config, or an OpenRLHF command line.

Why three readers: the same deployment is spelled differently in each framework (TRL's ``beta: 0`` means no
reference model; OpenRLHF's ``--init_kl_coef 0`` too; ``--colocate_all_models`` puts vLLM on the actor's
GPUs). Defaults are the frameworks' own (TRL 1.16 ``GRPOConfig``; OpenRLHF ``train_ppo_ray.py``).
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from .arch import Arch, load_arch
from .deploy import Deployment, Engine, Role, Sharding

GiB = 2**30


def _load_mapping(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - YAML and JSON errors differ; one line for the user
        raise ValueError(f"{path}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def sharding_from_deepspeed(ds: dict[str, Any], mixed: bool = True) -> Sharding:
    """ZeRO stage, offload and bucket sizes from a DeepSpeed JSON (``"auto"`` values keep the defaults)."""
    z = ds.get("zero_optimization") or {}
    stage = int(z.get("stage", 0) or 0)

    def num(key: str, default: int) -> int:
        v = z.get(key, default)
        return default if v in (None, "auto") else int(float(v))

    off_opt = (z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    off_par = (z.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    return Sharding(f"zero{stage}", offload_optimizer=off_opt, offload_params=off_par, mixed_precision=mixed,
                    reduce_bucket=num("reduce_bucket_size", 500_000_000),
                    allgather_bucket=num("allgather_bucket_size", 500_000_000),
                    prefetch_bucket=num("stage3_prefetch_bucket_size", 50_000_000))


def sharding_from_accelerate(acc: dict[str, Any], base_dir: Path) -> tuple[Sharding, int, int]:
    """(sharding, processes, machines) from an accelerate config YAML (DeepSpeed or FSDP plugin)."""
    procs = int(acc.get("num_processes", 1) or 1)
    machines = int(acc.get("num_machines", 1) or 1)
    kind = str(acc.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        dc = acc.get("deepspeed_config") or {}
        if dc.get("deepspeed_config_file"):
            f = Path(dc["deepspeed_config_file"])
            return sharding_from_deepspeed(_load_mapping(str(f if f.is_absolute() else base_dir / f))), procs, machines
        return Sharding(f"zero{int(dc.get('zero_stage', 0))}",
                        offload_optimizer=dc.get("offload_optimizer_device", "none") in ("cpu", "nvme"),
                        offload_params=dc.get("offload_param_device", "none") in ("cpu", "nvme")), procs, machines
    if kind == "FSDP":
        fc = acc.get("fsdp_config") or {}
        strat = str(fc.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        shard = "fsdp_grad_op" if strat in ("SHARD_GRAD_OP", "2") else "fsdp_full"
        off = str(fc.get("fsdp_offload_params", False)).lower() == "true"
        return Sharding(shard, offload_optimizer=off, offload_params=off), procs, machines
    return Sharding("zero0"), procs, machines


def from_trl(config_path: str, model: str | None = None, accelerate: str | None = None,
             deepspeed: str | None = None, gpu_memory: int = 80 * GiB, gpus_per_node: int = 8) -> Deployment:
    """A TRL GRPO/PPO run: actor (+ reference when ``beta > 0``), generation by vLLM when ``use_vllm``."""
    cfg = _load_mapping(config_path)
    base = Path(config_path).parent
    name = model or cfg.get("model_name_or_path") or cfg.get("model")
    if not name:
        raise ValueError(f"{config_path}: no model_name_or_path; pass --model")
    arch = load_arch(str(name))
    n_proc, machines = 1, 1
    sharding = Sharding("zero0", mixed_precision=False)
    ds_file = deepspeed or cfg.get("deepspeed")
    if accelerate:
        sharding, n_proc, machines = sharding_from_accelerate(_load_mapping(accelerate), Path(accelerate).parent)
    if isinstance(ds_file, dict):
        sharding = sharding_from_deepspeed(ds_file)
    elif ds_file:
        f = Path(ds_file)
        sharding = sharding_from_deepspeed(_load_mapping(str(f if f.is_absolute() or f.exists() else base / f)))
    gpus = n_proc * machines if accelerate else int(cfg.get("num_processes", n_proc))
    return trl_deployment(cfg, arch, gpus=gpus, sharding=sharding, gpu_memory=gpu_memory,
                          gpus_per_node=gpus_per_node)


def sharding_from_trl_args(cfg: dict[str, Any], base_dir: Path | None = None) -> Sharding:
    """Sharding from a ``TrainingArguments`` dict: its ``deepspeed`` (a dict or a JSON path) or ``fsdp``
    (``"full_shard auto_wrap"`` or a list of such options; ``offload`` moves parameters and optimizer)."""
    ds = cfg.get("deepspeed")
    if isinstance(ds, dict):
        return sharding_from_deepspeed(ds)
    if ds:
        f = Path(str(ds))
        if not f.is_absolute() and not f.exists() and base_dir is not None:
            f = base_dir / f
        return sharding_from_deepspeed(_load_mapping(str(f)))
    fsdp = cfg.get("fsdp")
    opts = " ".join(str(o) for o in fsdp).lower() if isinstance(fsdp, (list, tuple)) else str(fsdp or "").lower()
    if "full_shard" in opts or "shard_grad_op" in opts:
        off = "offload" in opts
        return Sharding("fsdp_grad_op" if "shard_grad_op" in opts else "fsdp_full", offload_optimizer=off,
                        offload_params=off)
    return Sharding("zero0", mixed_precision=False)


def trl_deployment(cfg: dict[str, Any], arch: Arch, *, gpus: int, sharding: Sharding, gpu_memory: int = 80 * GiB,
                   gpus_per_node: int = 8, dtype_bytes: int = 2, lora_rank: int | None = None,
                   load_in_4bit: bool | None = None, prompt_len: int | None = None) -> Deployment:
    """The deployment of a TRL GRPO/RLOO run described by its config keys (a YAML file's mapping or
    ``GRPOConfig.to_dict()``): the one reader behind ``--trl_config`` and the TRL adapter's prediction.

    ``generation_batch_size`` is TRL's global count (``per_device_train_batch_size x num_processes x
    steps_per_generation``), so each GPU generates its share of it. ``lora_rank``/``load_in_4bit`` override
    the config's ``use_peft``/``lora_r`` (the adapter reads them from the live model's PEFT config).
    """
    use_vllm = bool(cfg.get("use_vllm", False))
    mode = str(cfg.get("vllm_mode") or "colocate")
    lora = lora_rank if lora_rank is not None else (int(cfg.get("lora_r", 0) or 0) if cfg.get("use_peft") else 0)
    four_bit = bool(cfg.get("load_in_4bit")) if load_in_4bit is None else load_in_4bit
    actor = Role("actor", arch, trained=True, group="train", dtype_bytes=dtype_bytes, lora_rank=lora,
                 load_in_4bit=four_bit)
    beta = float(cfg.get("beta") or 0.0)
    reference = None
    if beta > 0 and not lora:  # with peft the reference is the base with adapters disabled
        reference = Role("reference", arch, group="train", dtype_bytes=dtype_bytes)
    groups = {"train": gpus}
    engine = Engine("hf", group="train")
    if use_vllm:
        tp = int(cfg.get("vllm_tensor_parallel_size") or 1)
        util = float(cfg.get("vllm_gpu_memory_utilization") or 0.3)
        if mode == "server":
            groups["vllm"] = tp
            engine = Engine("vllm", group="vllm", tp=tp, gpu_memory_utilization=util)
        else:
            engine = Engine("vllm", group="train", tp=tp, gpu_memory_utilization=util,
                            sleep=bool(cfg.get("vllm_enable_sleep_mode", False)))
    per_dev = int(cfg.get("per_device_train_batch_size") or 8)
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    steps_per_gen = int(cfg.get("steps_per_generation") or accum)
    gen_global = cfg.get("generation_batch_size")
    gen_batch = max(1, int(gen_global) // max(gpus, 1)) if gen_global else per_dev * steps_per_gen
    gc = cfg.get("gradient_checkpointing")
    return Deployment(actor=actor, reference=reference, groups=groups, gpus_per_node=gpus_per_node,
                      gpu_memory=gpu_memory, sharding=sharding, engine=engine,
                      optimizer="adamw8bit" if "8bit" in str(cfg.get("optim", "")) else "adamw",
                      micro_batch=per_dev, grad_accum=accum,
                      prompt_len=int(prompt_len or cfg.get("max_prompt_length") or 512),
                      response_len=int(cfg.get("max_completion_length") or 256), rollout_per_gpu=gen_batch,
                      gradient_checkpointing=True if gc is None else bool(gc),
                      attn=_attn(cfg.get("attn_implementation") or (cfg.get("model_init_kwargs") or {}).get(
                          "attn_implementation")), framework="trl")


def _attn(name: Any) -> str:
    name = str(name or "sdpa").lower()
    if "flash" in name:
        return "flash"
    return "eager" if name == "eager" else "sdpa"


def _openrlhf_parser() -> argparse.ArgumentParser:
    """The memory-relevant subset of OpenRLHF ``train_ppo_ray.py`` flags, with its defaults."""
    p = argparse.ArgumentParser(prog="--from_openrlhf", add_help=False)
    add = p.add_argument
    for role in ("actor", "ref", "critic", "reward"):
        add(f"--{role}_num_nodes", type=int, default=1)
        add(f"--{role}_num_gpus_per_node", type=int, default=8)
    for flag in ("colocate_actor_ref", "colocate_critic_reward", "colocate_all_models", "vllm_enable_sleep",
                 "deepspeed_enable_sleep", "adam_offload", "gradient_checkpointing", "bf16", "flash_attn",
                 "load_in_4bit", "ref_reward_offload", "enforce_eager", "packing_samples"):
        add(f"--{flag}", action="store_true")
    add("--vllm_num_engines", type=int, default=None)
    add("--vllm_tensor_parallel_size", type=int, default=1)
    add("--vllm_gpu_memory_utilization", type=float, default=0.95)
    add("--zero_stage", type=int, default=2)
    add("--lora_rank", type=int, default=0)
    add("--micro_train_batch_size", type=int, default=4)
    add("--micro_rollout_batch_size", type=int, default=8)
    add("--rollout_batch_size", type=int, default=1024)
    add("--n_samples_per_prompt", type=int, default=1)
    add("--prompt_max_len", type=int, default=1024)
    add("--generate_max_len", type=int, default=1024)
    add("--init_kl_coef", type=float, default=0.01)
    add("--pretrain", default=None)
    add("--reward_pretrain", default=None)
    add("--critic_pretrain", default=None)
    add("--remote_rm_url", default=None)
    add("--attn_implementation", default=None)
    add("--advantage_estimator", default="gae")
    return p


def from_openrlhf(cmdline: str, model: str | None = None, gpu_memory: int = 80 * GiB,
                  gpus_per_node: int = 8) -> Deployment:
    """An OpenRLHF ``train_ppo_ray`` command line (unknown flags are ignored; placement follows its launcher:
    each role on its own group unless colocated)."""
    argv = [t for t in shlex.split(cmdline) if t not in ("python", "python3", "-m", "openrlhf.cli.train_ppo_ray")]
    a, _ = _openrlhf_parser().parse_known_args(argv)
    name = model or a.pretrain
    if not name:
        raise ValueError("--from_openrlhf: no --pretrain in the command line; pass --model")
    actor_arch = load_arch(name)
    db = 2 if a.bf16 else 4
    lora = a.lora_rank
    groups: dict[str, int] = {"actor": a.actor_num_nodes * a.actor_num_gpus_per_node}
    actor = Role("actor", actor_arch, trained=True, group="actor", dtype_bytes=db, lora_rank=lora,
                 load_in_4bit=a.load_in_4bit)
    ref = None
    if a.init_kl_coef > 0:
        g = "actor" if (a.colocate_actor_ref or a.colocate_all_models) else "ref"
        groups.setdefault(g, a.ref_num_nodes * a.ref_num_gpus_per_node)
        ref = Role("reference", actor_arch, group=g, dtype_bytes=db, offload=a.ref_reward_offload)
    critic = reward = None
    if a.advantage_estimator != "gae":  # train_ppo_ray: only GAE has a critic; it defaults to the reward model
        a.critic_pretrain = None
    elif a.critic_pretrain is None:
        a.critic_pretrain = a.reward_pretrain.split(",")[0] if (a.reward_pretrain and not a.remote_rm_url) \
            else a.pretrain
    if not a.colocate_all_models:  # train_ppo_ray turns sleep off without --colocate_all_models
        a.vllm_enable_sleep = False
    if a.critic_pretrain:
        g = "actor" if a.colocate_all_models else "critic"
        groups.setdefault(g, a.critic_num_nodes * a.critic_num_gpus_per_node)
        critic = Role("critic", load_arch(a.critic_pretrain), trained=True, group=g, dtype_bytes=db,
                      value_head=True, lora_rank=lora)
    if not a.remote_rm_url and a.reward_pretrain:
        g = "actor" if a.colocate_all_models else ("critic" if a.colocate_critic_reward and critic else "reward")
        groups.setdefault(g, a.reward_num_nodes * a.reward_num_gpus_per_node)
        reward = Role("reward", load_arch(a.reward_pretrain), group=g, dtype_bytes=db, value_head=True,
                      offload=a.ref_reward_offload)
    if a.vllm_num_engines:
        if a.colocate_all_models:
            eng_group = "actor"
        else:
            eng_group = "vllm"
            groups["vllm"] = a.vllm_num_engines * a.vllm_tensor_parallel_size
        engine = Engine("vllm", group=eng_group, tp=a.vllm_tensor_parallel_size,
                        gpu_memory_utilization=a.vllm_gpu_memory_utilization, sleep=a.vllm_enable_sleep,
                        enforce_eager=a.enforce_eager)
        rollout = max(1, a.rollout_batch_size * a.n_samples_per_prompt // a.vllm_num_engines)
    else:
        engine = Engine("hf", group="actor")
        rollout = a.micro_rollout_batch_size
    return Deployment(actor=actor, critic=critic, reference=ref, reward=reward, groups=groups,
                      gpus_per_node=gpus_per_node, gpu_memory=gpu_memory,
                      sharding=Sharding(f"zero{a.zero_stage}", offload_optimizer=a.adam_offload,
                                        mixed_precision=True),
                      engine=engine, micro_batch=a.micro_train_batch_size,
                      score_micro_batch=a.micro_rollout_batch_size, prompt_len=a.prompt_max_len,
                      response_len=a.generate_max_len, rollout_per_gpu=rollout,
                      gradient_checkpointing=a.gradient_checkpointing,
                      train_sleep=a.deepspeed_enable_sleep and a.colocate_all_models,
                      attn="flash" if a.flash_attn or "flash" in str(a.attn_implementation or "") else
                      _attn(a.attn_implementation), framework="openrlhf")


def from_verl(cmdline: str, model: str | None = None, gpu_memory: int = 80 * GiB) -> Deployment:
    """A veRL ``main_ppo`` command line of Hydra ``key=value`` overrides (hybrid engine: actor, rollout and
    reference share every GPU; FSDP full shard; the rollout engine frees its cache while training)."""
    kv: dict[str, str] = {}
    for tok in shlex.split(cmdline):
        if "=" in tok and not tok.startswith("-"):
            k, v = tok.split("=", 1)
            kv[k.lstrip("+")] = v.strip("'\"")

    def get(key: str, default: Any = None) -> Any:
        return kv.get(key, default)

    def flag(key: str, default: bool = False) -> bool:
        return str(get(key, default)).lower() == "true"

    name = model or get("actor_rollout_ref.model.path")
    if not name:
        raise ValueError("--from_verl: no actor_rollout_ref.model.path; pass --model")
    arch = load_arch(str(name))
    n = int(get("trainer.n_gpus_per_node", 8)) * int(get("trainer.nnodes", 1))
    sp = int(get("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1))
    if get("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu") is not None:
        micro = max(1, int(get("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu")) // sp)
    else:  # deprecated global micro-batch, split over data-parallel ranks, each rank's tokens over sp GPUs
        micro = max(1, int(get("actor_rollout_ref.actor.ppo_micro_batch_size", n)) // n)
    lp = get("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu")
    score_micro = max(1, int(lp) // sp) if lp is not None else max(1, int(get(
        "actor_rollout_ref.rollout.log_prob_micro_batch_size", micro * n)) // n)
    lora = int(get("actor_rollout_ref.model.lora_rank", 0))
    param_off = flag("actor_rollout_ref.actor.fsdp_config.param_offload")
    # fsdp_workers.py: the actor is loaded in fp32 unless fsdp_config.model_dtype says otherwise (LoRA base too)
    dtype = str(get("actor_rollout_ref.actor.fsdp_config.model_dtype", "fp32")).lower()
    actor = Role("actor", arch, trained=True, group="all", lora_rank=lora,
                 storage_bytes=4 if dtype in ("fp32", "float32") else 2)
    use_kl = flag("actor_rollout_ref.actor.use_kl_loss") or flag("algorithm.use_kl_in_reward")
    reference = Role("reference", arch, group="all", offload=flag("actor_rollout_ref.ref.fsdp_config.param_offload")) \
        if use_kl and not lora else None
    critic = None
    if get("algorithm.adv_estimator", "gae") == "gae":
        critic = Role("critic", load_arch(str(get("critic.model.path", name))), trained=True, group="all",
                      value_head=True)
    eng = str(get("actor_rollout_ref.rollout.name", "vllm"))
    engine = Engine("sglang" if eng == "sglang" else ("hf" if eng == "hf" else "vllm"), group="all",
                    tp=int(get("actor_rollout_ref.rollout.tensor_model_parallel_size", 2)),
                    gpu_memory_utilization=float(get("actor_rollout_ref.rollout.gpu_memory_utilization", 0.5)),
                    sleep=True, max_num_seqs=int(get("actor_rollout_ref.rollout.max_num_seqs", 1024)),
                    max_num_batched_tokens=int(get("actor_rollout_ref.rollout.max_num_batched_tokens", 8192)))
    return Deployment(actor=actor, critic=critic, reference=reference, groups={"all": n}, gpus_per_node=int(
                          get("trainer.n_gpus_per_node", 8)), gpu_memory=gpu_memory,
                      sharding=Sharding("fsdp_full", mixed_precision=dtype in ("fp32", "float32")),
                      phase_offload_params=param_off,
                      phase_offload_optimizer=flag("actor_rollout_ref.actor.fsdp_config.optimizer_offload"),
                      engine=engine, micro_batch=micro, score_micro_batch=score_micro,
                      prompt_len=int(get("data.max_prompt_length", 512)),
                      response_len=int(get("data.max_response_length", 512)), rollout_per_gpu=1,
                      gradient_checkpointing=flag("actor_rollout_ref.model.enable_gradient_checkpointing"),
                      attn="flash", framework="verl",
                      fsdp_version=2 if str(get("actor_rollout_ref.actor.strategy", "fsdp")) == "fsdp2" else 1,
                      # fsdp_vllm.py refuses layered_summon unless the engine preloaded the base (no dummy format)
                      layered_summon=flag("actor_rollout_ref.rollout.layered_summon") and "dummy" not in str(
                          get("actor_rollout_ref.rollout.load_format", "dummy_dtensor")))
