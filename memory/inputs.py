"""Build a :class:`memory.deploy.Deployment` from what users hold: CLI flags, a TRL config (YAML/JSON of
``GRPOConfig``/``TrainingArguments``) with its accelerate or DeepSpeed config, or an OpenRLHF command line.

Why three readers: the same deployment is spelled differently in each framework (TRL's ``beta: 0`` means no
reference model; OpenRLHF's ``--init_kl_coef 0`` too; ``--colocate_all_models`` puts vLLM on the actor's
GPUs). Defaults are the frameworks' own (TRL 1.16 ``GRPOConfig``; OpenRLHF ``train_ppo_ray.py``).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arch import Arch, load_arch
from .deploy import Deployment, Engine, HybridEngine, Role, Sharding, trl_head
from .shell import UNSET, Quoting, expand_script, unresolved

GiB = 2**30


def _split_command(cmdline: str, flag: str) -> list[str]:
    """A pasted command line as its tokens, as the shell reads them: a script's backslash line continuations
    joined (shlex would keep the newline in the next token, which then matches no flag); ``#`` comments dropped
    (example scripts keep commented-out alternatives such as ``# trainer.n_gpus_per_node=8``, which were read as
    settings); a final continuation backslash (``$(cat script.sh)`` strips the newline after it) ignored; the
    variables a whole script sets expanded (memory/shell.py; the rest stay ``$NAME``); an unbalanced quote a
    one-line error."""
    text = _drop_comments(cmdline.replace("\\\r\n", " ").replace("\\\n", " ")).rstrip()
    if text.endswith("\\") and not text.endswith("\\\\"):
        text = text[:-1]
    try:
        return shlex.split(expand_script(text))
    except ValueError as err:
        raise ValueError(f"{flag}: cannot split the command line ({err})") from None


def _drop_comments(text: str) -> str:
    """Each line up to an unquoted, unescaped ``#`` that starts a word, as bash reads comments (shlex's own
    comment rule also cuts inside a word: ``http://host/#x``)."""
    out, quoting = [], Quoting()
    for line in text.split("\n"):
        cut = len(line)
        for i, ch in enumerate(line):
            if quoting.plain(ch) and ch == "#" and (i == 0 or line[i - 1] in " \t"):
                cut = i
                break
        out.append(line[:cut])
    return "\n".join(out)


_PASS_MODEL = "pass --model (its config.json or folder, or a built-in name)"
_WRITE_MODEL = "write a built-in name or a local config.json in its place"


def _model(name: str, what: str, remedy: str = _PASS_MODEL) -> Arch:
    """``load_arch(name)`` with its error one line that says where the name came from (``what``) and how to give
    the model instead: the built-in list alone ran past the CLI's 300 characters and named neither."""
    if unresolved(name):
        raise ValueError(f"{what}: {UNSET}; {remedy}")
    try:
        return load_arch(name)
    except ValueError as err:
        if not str(err).startswith("unknown model"):
            raise
    raise ValueError(f"{what}: unknown model (no built-in config such as Qwen2.5-7B, no local config.json; nothing "
                     f"is downloaded); {remedy}")


def _actor_model(model: str | None, name: str, what: str) -> Arch:
    """The actor's architecture: ``--model`` when given (its own error), else ``name`` as the input spells it."""
    if model:
        return _model(model, f"--model {model}", "give a built-in name, a config.json or its folder")
    return _model(name, what)


def _inner_commands(tokens: list[str], markers: tuple[str, ...]) -> list[str]:
    """``tokens`` with a quoted command that names one of ``markers`` split into its words, as the shell that runs
    it would (``srun ... bash -c "python3 -m openrlhf.cli.train_ppo_ray --flags"``)."""
    out: list[str] = []
    for t in tokens:
        if any(m in t for m in markers) and any(c.isspace() for c in t.strip()):
            try:
                out.extend(shlex.split(t))
                continue
            except ValueError:
                pass
        out.append(t)
    return out


def _module(token: str) -> str:
    """A script path (``openrlhf/cli/train_sft.py``, ``verl/trainer/main_ppo.py``) as its module name."""
    if not (token.endswith(".py") and "/" in token):
        return token
    module = token[:-3].replace("/", ".")
    at = max(module.rfind(p) for p in ("openrlhf.cli.", "verl.trainer.", "recipe."))
    return module[at:] if at >= 0 else token


# OpenRLHF's entry points (openrlhf/cli/, earlier examples/*.py run as ``deepspeed ../train_sft.py``)
_OPENRLHF_ENTRIES = ("train_ppo_ray", "train_ppo", "train_sft", "train_rm", "train_dpo", "train_kto", "train_kd",
                     "train_prm", "batch_inference", "serve_rm", "interactive_chat", "lora_combiner")


def _openrlhf_module(token: str) -> str:
    """An OpenRLHF script path as its module name (``../train_sft.py``: openrlhf.cli.train_sft)."""
    stem = token.rsplit("/", 1)[-1].removesuffix(".py")
    return f"openrlhf.cli.{stem}" if token.endswith(".py") and stem in _OPENRLHF_ENTRIES else _module(token)


def _load_mapping(path: str) -> dict[str, Any]:
    if not str(path).strip():
        raise ValueError("an empty file path was given")
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


def _setting(cfg: dict[str, Any], key: str, default: Any, where: str, cast: Callable[[Any], Any] = int) -> Any:
    """``cfg[key]`` as a number (missing, empty, 0 or ``"auto"``: ``default``), or a one-line error naming the
    setting and its file (``int('abc')`` names neither)."""
    v = cfg.get(key)
    if v in (None, "", "auto") or v == 0:
        return default
    return _number(v, f"{where}: {key}: {v!r}", cast)


def _number(value: Any, what: str, cast: Callable[[Any], Any] = int) -> Any:
    """``value`` cast to a number (an int written ``1e9`` too), or the one-line error ``<what> is not a number``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} is not a number")
    try:
        return cast(float(value)) if cast is int and isinstance(value, str) and "e" in value.lower() else cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number") from None


def sharding_from_deepspeed(ds: dict[str, Any], mixed: bool = True) -> Sharding:
    """ZeRO stage, offload and bucket sizes from a DeepSpeed JSON (``"auto"`` values keep the defaults)."""
    z = ds.get("zero_optimization") or {}
    if not isinstance(z, dict):
        raise ValueError(f"DeepSpeed config: zero_optimization: expected a mapping, got {z!r}")
    stage = _setting(z, "stage", 0, "DeepSpeed config zero_optimization")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config zero_optimization: stage: {stage} is not 0-3")

    def num(key: str, default: int) -> int:
        return int(_setting(z, key, default, "DeepSpeed config zero_optimization", cast=float))

    off_opt = (z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    off_par = (z.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    return Sharding(f"zero{stage}", offload_optimizer=off_opt, offload_params=off_par, mixed_precision=mixed,
                    reduce_bucket=num("reduce_bucket_size", 500_000_000),
                    allgather_bucket=num("allgather_bucket_size", 500_000_000),
                    prefetch_bucket=num("stage3_prefetch_bucket_size", 50_000_000))


# accelerate's ParallelismConfig (accelerate/parallelism_config.py, 1.10+), set in an accelerate config YAML as
# parallelism_config: {parallelism_config_<dim>_size: N}: data-parallel replicas and shards, tensor, context and
# sequence parallelism, whose product is the process count
_ACC_PARALLEL_DIMS = ("dp_replicate", "dp_shard", "tp", "cp", "sp")


def _check_parallelism_config(acc: dict[str, Any], kind: str, procs: int) -> None:
    """Refuse an accelerate ParallelismConfig the planner would misread: it plans FSDP sharded over every process,
    so only a config that says just that (every size 1 but dp_shard, which is 1 or the process count) passes."""
    pc = acc.get("parallelism_config") or {}
    if not pc:
        return
    if not isinstance(pc, dict):
        raise ValueError(f"accelerate config parallelism_config: {pc!r} is not a mapping")
    sizes = {d: _setting(pc, f"parallelism_config_{d}_size", 1, "accelerate config parallelism_config")
             for d in _ACC_PARALLEL_DIMS}
    others = [f"{d}_size {n}" for d, n in sizes.items() if d != "dp_shard" and n != 1]
    if others:
        raise ValueError(f"accelerate config parallelism_config: {', '.join(others)} is not modelled (the planner "
                         "plans FSDP sharded over every process; tensor, context and sequence parallelism and HSDP "
                         "replicas are not)")
    if sizes["dp_shard"] not in (1, procs):
        raise ValueError(f"accelerate config parallelism_config: dp_shard_size {sizes['dp_shard']} is not the "
                         f"{procs} processes (num_processes): accelerate needs the sizes' product to be the process "
                         "count")
    if kind != "FSDP":
        raise ValueError(f"accelerate config parallelism_config: needs distributed_type FSDP (fsdp_version 2), "
                         f"not {kind}")


def sharding_from_accelerate(acc: dict[str, Any], base_dir: Path) -> tuple[Sharding, int, int]:
    """(sharding, processes, machines) from an accelerate config YAML (DeepSpeed or FSDP plugin)."""
    procs = _setting(acc, "num_processes", 1, "accelerate config")
    machines = _setting(acc, "num_machines", 1, "accelerate config")
    kind = str(acc.get("distributed_type", "NO")).upper()
    _check_parallelism_config(acc, kind, procs)
    if kind == "DEEPSPEED":
        dc = acc.get("deepspeed_config") or {}
        if dc.get("deepspeed_config_file"):
            f = Path(dc["deepspeed_config_file"])
            return sharding_from_deepspeed(_load_mapping(str(f if f.is_absolute() else base_dir / f))), procs, machines
        stage = _setting(dc, "zero_stage", 0, "accelerate config deepspeed_config")
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"accelerate config deepspeed_config: zero_stage: {stage} is not 0-3")
        return Sharding(f"zero{stage}",
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
             deepspeed: str | None = None, gpu_memory: int = 80 * GiB, gpus_per_node: int = 8,
             trl_version: str | None = None) -> Deployment:
    """A TRL GRPO/PPO run: actor (+ reference when ``beta > 0``), generation by vLLM when ``use_vllm``."""
    cfg = _load_mapping(config_path)
    base = Path(config_path).parent
    ds_file = deepspeed or cfg.get("deepspeed")
    ds: dict[str, Any] | None = ds_file if isinstance(ds_file, dict) else None
    if ds_file and ds is None:
        f = Path(ds_file)
        ds = _load_mapping(str(f if f.is_absolute() or f.exists() else base / f))
    return trl_from_mappings(cfg, accelerate=_load_mapping(accelerate) if accelerate else None, deepspeed=ds,
                             base_dir=Path(accelerate).parent if accelerate else base, model=model,
                             gpu_memory=gpu_memory, gpus_per_node=gpus_per_node, source=config_path,
                             trl_version=trl_version)


# keys only TRL's SFTConfig/DPOConfig have (max_length: their sequence cap; GRPO caps prompt and completion apart),
# and keys only its online RL configs (GRPOConfig, RLOOConfig; open-r1's GRPOScriptArguments) have
_TRL_SFT_KEYS = ("max_length", "max_seq_length", "packing", "dataset_text_field", "completion_only_loss",
                 "assistant_only_loss")
# open-r1's PassRateScriptArguments (scripts/pass_rate_filtering/compute_pass_rate.py at 1416fa0): a GRPO-shaped
# config for a vLLM-only dataset filter (recipes/dataset_filtering/*.yaml)
_OPEN_R1_PASS_RATE_KEYS = ("pass_rate_min", "pass_rate_max", "output_dataset_name")
_TRL_RL_KEYS = ("num_generations", "max_completion_length", "use_vllm", "vllm_mode", "steps_per_generation",
                "generation_batch_size", "reward_funcs", "num_iterations", "rloo_k")


def trl_from_mappings(cfg: dict[str, Any], *, accelerate: dict[str, Any] | None = None,
                      deepspeed: dict[str, Any] | None = None, base_dir: Path = Path("."), model: str | None = None,
                      num_processes: int | None = None, gpu_memory: int = 80 * GiB, gpus_per_node: int = 8,
                      source: str = "TRL config", trl_version: str | None = None) -> Deployment:
    """A TRL run from its settings already read: the GRPOConfig/TrainingArguments mapping, an accelerate config
    (its sharding and process count; files it names resolve against ``base_dir``) and a DeepSpeed JSON, which
    overrides the accelerate config's sharding. ``num_processes``: the launch's total, when known apart."""
    name = model or cfg.get("model_name_or_path") or cfg.get("model")
    if not name:
        raise ValueError(f"{source}: no model_name_or_path; pass --model")
    filtering = sorted(k for k in _OPEN_R1_PASS_RATE_KEYS if k in cfg)
    if filtering:
        raise ValueError(f"{source}: an open-r1 pass-rate filtering config ({', '.join(filtering)}): "
                         "scripts/pass_rate_filtering/compute_pass_rate.py only generates with vLLM and scores, it "
                         "does not train; --trl_config plans GRPO/RLOO training")
    sft = sorted(k for k in _TRL_SFT_KEYS if k in cfg)
    if sft and not any(k in cfg for k in _TRL_RL_KEYS):
        raise ValueError(f"{source}: an SFT/DPO-style config ({', '.join(sft[:3])}; no num_generations or "
                         "max_completion_length): --trl_config plans GRPO/RLOO runs")
    arch = _actor_model(model, str(name), f"{source}: model_name_or_path {name}")
    n_proc, machines = 1, 1
    sharding = Sharding("zero0", mixed_precision=False)
    if accelerate:
        sharding, n_proc, machines = sharding_from_accelerate(accelerate, base_dir)
    if deepspeed:
        sharding = sharding_from_deepspeed(deepspeed)
    gpus = num_processes or (n_proc * machines if accelerate else _setting(cfg, "num_processes", n_proc, source))
    # TRL loads the model in fp32 unless model_init_kwargs names a dtype, and under plain data parallelism nothing
    # casts it: the Trainer's bf16/fp16 (bf16 by default) runs it under autocast. DeepSpeed and FSDP keep their own
    # 16-bit working copies (Sharding.mixed_precision).
    fp32 = sharding.kind == "zero0" and _trl_model_dtype(cfg) in (None, "float32")
    dep = trl_deployment(cfg, arch, gpus=int(gpus), sharding=sharding, gpu_memory=gpu_memory,
                         gpus_per_node=gpus_per_node, dtype_bytes=4 if fp32 else 2, source=source,
                         trl_version=trl_version)
    amp = fp32 and (cfg.get("bf16", True) or cfg.get("fp16"))
    return dep.with_(autocast_bytes=2) if amp else dep


def _trl_model_dtype(cfg: dict[str, Any]) -> str | None:
    """The dtype a TRL config loads its model in: model_init_kwargs' ``dtype``/``torch_dtype`` (or the same key
    at top level, as TRL's scripts take it from ModelConfig); None when none is named."""
    init = cfg.get("model_init_kwargs") or {}
    for value in (init.get("dtype"), init.get("torch_dtype"), cfg.get("dtype"), cfg.get("torch_dtype")):
        if value:
            return str(value).replace("torch.", "")
    return None


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
                   load_in_4bit: bool | None = None, prompt_len: int | None = None,
                   source: str = "TRL config", trl_version: str | None = None) -> Deployment:
    """The deployment of a TRL GRPO/RLOO run described by its config keys (a YAML file's mapping or
    ``GRPOConfig.to_dict()``): the one reader behind ``--trl_config`` and the TRL adapter's prediction.

    ``generation_batch_size`` is TRL's global count (``per_device_train_batch_size x num_processes x
    steps_per_generation``), so each GPU generates its share of it. ``lora_rank``/``load_in_4bit`` override
    the config's ``use_peft``/``lora_r`` (the adapter reads them from the live model's PEFT config).
    ``trl_version`` picks TRL's log-prob head (memory.deploy.TRL_HEAD, TRL_FUSED); None plans TRL 1.15 and later.
    """
    use_vllm = bool(cfg.get("use_vllm", False))
    mode = str(cfg.get("vllm_mode") or "colocate")
    lora = lora_rank if lora_rank is not None else (_setting(cfg, "lora_r", 0, source) if cfg.get("use_peft") else 0)
    four_bit = bool(cfg.get("load_in_4bit")) if load_in_4bit is None else load_in_4bit
    actor = Role("actor", arch, trained=True, group="train", dtype_bytes=dtype_bytes, lora_rank=lora,
                 load_in_4bit=four_bit)
    beta = _setting(cfg, "beta", 0.0, source, cast=float)
    reference = None
    if beta > 0 and not lora:  # with peft the reference is the base with adapters disabled
        reference = Role("reference", arch, group="train", dtype_bytes=dtype_bytes)
    groups = {"train": gpus}
    engine = Engine("hf", group="train")
    if use_vllm:
        tp = _setting(cfg, "vllm_tensor_parallel_size", 1, source)
        util = _setting(cfg, "vllm_gpu_memory_utilization", 0.3, source, cast=float)
        if mode == "server":
            groups["vllm"] = tp
            engine = Engine("vllm", group="vllm", tp=tp, gpu_memory_utilization=util)
        else:
            engine = Engine("vllm", group="train", tp=tp, gpu_memory_utilization=util,
                            sleep=bool(cfg.get("vllm_enable_sleep_mode", False)))
    per_dev = _setting(cfg, "per_device_train_batch_size", 8, source)
    accum = _setting(cfg, "gradient_accumulation_steps", 1, source)
    steps_per_gen = _setting(cfg, "steps_per_generation", accum, source)
    gen_global = _setting(cfg, "generation_batch_size", None, source)
    gen_batch = max(1, gen_global // max(gpus, 1)) if gen_global else per_dev * steps_per_gen
    gc = cfg.get("gradient_checkpointing")
    return Deployment(actor=actor, reference=reference, groups=groups, gpus_per_node=gpus_per_node,
                      gpu_memory=gpu_memory, sharding=sharding, engine=engine,
                      optimizer="adamw8bit" if "8bit" in str(cfg.get("optim", "")) else "adamw",
                      micro_batch=per_dev, grad_accum=accum,
                      prompt_len=int(prompt_len or _setting(cfg, "max_prompt_length", 512, source)),
                      response_len=_setting(cfg, "max_completion_length", 256, source), rollout_per_gpu=gen_batch,
                      gradient_checkpointing=True if gc is None else bool(gc),
                      attn=_attn(cfg.get("attn_implementation") or (cfg.get("model_init_kwargs") or {}).get(
                          "attn_implementation")), logprob_head=trl_head(trl_version), framework="trl")


def _attn(name: Any) -> str:
    name = str(name or "sdpa").lower()
    if "flash" in name:
        return "flash"
    return "eager" if name == "eager" else "sdpa"


def _openrlhf_parser() -> argparse.ArgumentParser:
    """The memory-relevant subset of OpenRLHF ``train_ppo_ray.py``'s flat flags, with their defaults (see
    :func:`from_openrlhf` for the versions); a default that changed between flat versions is None here and comes
    from ``_OPENRLHF_FLAT_VERSIONS`` once the version is known."""
    p = _OneLineParser(prog="--from_openrlhf", add_help=False)
    add = p.add_argument
    for role in ("actor", "ref", "critic", "reward"):
        add(f"--{role}_num_nodes", type=int, default=1)
        add(f"--{role}_num_gpus_per_node", type=int, default=8)
    for flag in ("colocate_actor_ref", "colocate_critic_reward", "colocate_all_models", "vllm_enable_sleep",
                 "deepspeed_enable_sleep", "adam_offload", "gradient_checkpointing", "bf16", "flash_attn",
                 "load_in_4bit", "ref_reward_offload", "enforce_eager", "packing_samples", "async_train",
                 "use_dynamic_batch"):
        add(f"--{flag}", action="store_true")
    add("--vllm_num_engines", type=int, default=None)
    add("--vllm_tensor_parallel_size", type=int, default=1)
    add("--vllm_gpu_memory_utilization", type=float, default=0.95)
    add("--zero_stage", type=int, default=2)
    add("--lora_rank", type=int, default=0)
    add("--micro_train_batch_size", type=int, default=None)
    add("--micro_rollout_batch_size", type=int, default=None)
    add("--rollout_batch_size", type=int, default=1024)
    add("--train_batch_size", type=int, default=128)
    add("--n_samples_per_prompt", type=int, default=1)
    # dynamic batching (81421bd2, 2025-07-12: one --max_tokens_per_gpu; f9a1676b, 2025-07-14: the train and
    # rollout budgets) and ring attention (bfa85f6f, 2025-02-28); see _openrlhf_token_micro_batches
    add("--train_max_tokens_per_gpu", type=int, default=None)  # 16192 (below), unless --max_tokens_per_gpu
    add("--rollout_max_tokens_per_gpu", type=int, default=None)
    add("--max_tokens_per_gpu", type=int, default=None)
    add("--ring_attn_size", type=int, default=1)
    add("--ds_tensor_parallel_size", type=int, default=1)  # DeepSpeed AutoTP training, f5b45490 (2025-04-27)+
    add("--prompt_max_len", type=int, default=None)
    add("--generate_max_len", type=int, default=None)
    add("--max_len", type=int, default=None)
    add("--max_new_tokens", type=int, default=None)
    add("--param_dtype", default=None)
    add("--init_kl_coef", type=float, default=0.01)
    add("--pretrain", default=None)
    add("--reward_pretrain", default=None)
    add("--critic_pretrain", default=None)
    add("--remote_rm_url", default=None)
    add("--agent_func_path", default=None)
    add("--attn_implementation", default=None)
    add("--advantage_estimator", default="gae")
    return p


# The flat flags changed before the dotted rename (OpenRLHF train_ppo_ray.py history; first release in brackets).
# Version k: (its first commit, the defaults that differ between flat versions). In order:
#   0  397d6a1c 2024-07-15: --bf16 (else fp32), --flash_attn (else eager in its Actor),
#      --prompt_max_len/--generate_max_len 1024/1024, --max_len a deprecated cap on vLLM's max_model_len only,
#      micro-batches 4/8
#   1  c250c21a 2025-08-15 [v0.8.10]: --attn_implementation (default flash_attention_2) replaces --flash_attn
#   2  cd7a434f 2026-01-06 [v0.9.2]: --param_dtype bf16|fp16 (default bf16, no fp32) replaces --bf16
#   3  d0e088b6 2026-03-24 [v0.9.8]: --max_len is the total (default 2048) and --max_new_tokens (default None: per
#      sample) the response cap; --prompt_max_len/--generate_max_len are gone
#   4  a2978694 2026-04-11 [v0.10.0] .. 76351db1 2026-04-17 [v0.10.1.post2]: micro-batch defaults 1/1. a2978694
#      comes after every flag above and adds none (VLM flags came with 02010fe9, the same day, still 4/8), so no
#      flat command shows version 4: it is read as 3 (micro-batches 4/8) unless it writes them.
_OPENRLHF_FLAT_VERSIONS: list[tuple[str, dict[str, Any]]] = [
    ("397d6a1c", {"micro_train_batch_size": 4, "micro_rollout_batch_size": 8, "prompt_max_len": 1024,
                  "generate_max_len": 1024}),
    ("c250c21a", {"attn_implementation": "flash_attention_2"}),
    ("cd7a434f", {"param_dtype": "bf16"}),
    ("d0e088b6", {"max_len": 2048, "prompt_max_len": None, "generate_max_len": None}),
    ("a2978694", {"micro_train_batch_size": 1, "micro_rollout_batch_size": 1}),
]
# flag -> (first, last) flat version that has it; a command is read as the earliest version that has all its flags
# (the largest defaults: fp32, micro-batches 4/8, eager attention), and one that no version accepts is refused
_OPENRLHF_FLAT_SPAN: dict[str, tuple[int, int]] = {
    "flash_attn": (0, 0), "bf16": (0, 1), "prompt_max_len": (0, 2), "generate_max_len": (0, 2),
    "attn_implementation": (1, 4), "param_dtype": (2, 4), "max_new_tokens": (3, 4),
    "max_tokens_per_gpu": (0, 0)}  # 81421bd2 to f9a1676b^ only (2025-07-12..14)


def _openrlhf_flat_version(a: argparse.Namespace) -> int:
    """The flat version ``a`` is read as (``_OPENRLHF_FLAT_VERSIONS``), its defaults filled in."""
    given = [f for f in _OPENRLHF_FLAT_SPAN if getattr(a, f) is not None and getattr(a, f) is not False]
    old = min(given, key=lambda f: _OPENRLHF_FLAT_SPAN[f][1], default=None)
    new = max(given, key=lambda f: _OPENRLHF_FLAT_SPAN[f][0], default=None)
    lo = _OPENRLHF_FLAT_SPAN[new][0] if new else 0
    hi = _OPENRLHF_FLAT_SPAN[old][1] if old else len(_OPENRLHF_FLAT_VERSIONS) - 1
    if lo > hi:
        raise ValueError(f"--from_openrlhf: --{old} (OpenRLHF before {_OPENRLHF_FLAT_VERSIONS[hi + 1][0]}) and "
                         f"--{new} ({_OPENRLHF_FLAT_VERSIONS[lo][0]} and later) are in no OpenRLHF version together; "
                         "write one version's flags")
    if a.max_len is not None and hi >= 3:  # read as the total (d0e088b6+) unless an earlier flag rules that out
        lo = max(lo, 3)
    defaults: dict[str, Any] = {}
    for _, changed in _OPENRLHF_FLAT_VERSIONS[:lo + 1]:
        defaults.update(changed)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return lo


# OpenRLHF ed62d0e2 (2026-04-19, "dotted config hierarchy") renamed every flag; 3c3be623 (HEAD, 2026-08-13) has the
# same names and defaults. Dotted flag -> (the flat parser's dest it fills, type, the dotted default; bool: a
# store_true switch). Differences from the first flat flags (397d6a1c), most of them made in the later flat versions
# already (_OPENRLHF_FLAT_VERSIONS): micro-batches default 1 (flat 4 and 8); lengths are one total --data.max_len
# with an optional --rollout.max_new_tokens (flat: prompt and generate maxima); --ds.param_dtype bf16|fp16 (flat:
# fp32 unless --bf16); --ds.attn_implementation defaults to flash_attention_2 (flat: none, --flash_attn);
# the reference and reward offload apart (flat: --ref_reward_offload for both).
_OPENRLHF_DOTTED: dict[str, tuple[str, type, Any]] = {
    **{f"{r}.{k}": (f"{r}_{k}", int, d) for r in ("actor", "ref", "critic", "reward")
       for k, d in (("num_nodes", 1), ("num_gpus_per_node", 8))},
    "train.colocate_actor_ref": ("colocate_actor_ref", bool, False),
    "train.colocate_critic_reward": ("colocate_critic_reward", bool, False),
    "train.colocate_all": ("colocate_all_models", bool, False),
    "train.async_enable": ("async_enable", bool, False),  # colocate_all then shares only the DeepSpeed models
    "vllm.num_engines": ("vllm_num_engines", int, None),
    "vllm.tensor_parallel_size": ("vllm_tensor_parallel_size", int, 1),
    "vllm.gpu_memory_utilization": ("vllm_gpu_memory_utilization", float, 0.95),
    "vllm.enable_sleep": ("vllm_enable_sleep", bool, False),
    "vllm.enforce_eager": ("enforce_eager", bool, False),
    "ds.zero_stage": ("zero_stage", int, 2),
    "ds.adam_offload": ("adam_offload", bool, False),
    "ds.enable_sleep": ("deepspeed_enable_sleep", bool, False),
    "ds.param_dtype": ("param_dtype", str, "bf16"),
    "ds.attn_implementation": ("attn_implementation", str, "flash_attention_2"),
    "ds.packing_samples": ("packing_samples", bool, False),
    "ds.load_in_4bit": ("load_in_4bit", bool, False),
    "ds.lora.rank": ("lora_rank", int, 0),
    "actor.gradient_checkpointing_enable": ("gradient_checkpointing", bool, False),
    "ref.offload": ("ref_offload", bool, False),
    "reward.offload": ("reward_offload", bool, False),
    "train.micro_batch_size": ("micro_train_batch_size", int, 1),
    "rollout.micro_batch_size": ("micro_rollout_batch_size", int, 1),
    "rollout.batch_size": ("rollout_batch_size", int, 1024),
    "train.batch_size": ("train_batch_size", int, 128),
    "train.dynamic_batch_enable": ("use_dynamic_batch", bool, False),
    "train.max_tokens_per_gpu": ("train_max_tokens_per_gpu", int, 16192),
    "rollout.max_tokens_per_gpu": ("rollout_max_tokens_per_gpu", int, None),
    "ds.ring_attn_size": ("ring_attn_size", int, 1),
    "ds.tensor_parallel_size": ("ds_tensor_parallel_size", int, 1),
    "rollout.n_samples_per_prompt": ("n_samples_per_prompt", int, 1),
    "data.max_len": ("max_len", int, 2048),
    "rollout.max_new_tokens": ("max_new_tokens", int, None),
    "algo.kl.init_coef": ("init_kl_coef", float, 0.01),
    "algo.advantage.estimator": ("advantage_estimator", str, "gae"),
    "actor.model_name_or_path": ("pretrain", str, None),
    "reward.model_name_or_path": ("reward_pretrain", str, None),
    "critic.model_name_or_path": ("critic_pretrain", str, None),
    "reward.remote_url": ("remote_rm_url", str, None),
    "train.agent_func_path": ("agent_func_path", str, None),
}


def _openrlhf_dotted_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="--from_openrlhf", add_help=False)
    for flag, (dest, kind, default) in _OPENRLHF_DOTTED.items():
        if kind is bool:
            p.add_argument(f"--{flag}", dest=dest, action="store_true")
        else:
            p.add_argument(f"--{flag}", dest=dest, type=kind, default=default)
    return p


def _openrlhf_args(argv: list[str]) -> tuple[argparse.Namespace, bool]:
    """Parse ``argv`` as the flat or the dotted syntax: (the flat parser's namespace, dotted?); one syntax only."""
    def parse(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, set[str]]:
        a, unknown = p.parse_known_args(argv)
        flags = {t.split("=")[0] for t in argv if t.startswith("--")}
        return a, flags - {t.split("=")[0] for t in unknown if t.startswith("--")}

    a, flat = parse(_openrlhf_parser())
    d, dotted = parse(_openrlhf_dotted_parser())
    if flat and dotted:
        raise ValueError(f"--from_openrlhf: mixes OpenRLHF's flat flags ({', '.join(sorted(flat)[:3])}) and its "
                         f"dotted flags of ed62d0e2+ ({', '.join(sorted(dotted)[:3])}); write one syntax")
    if not flat and not dotted:
        raise ValueError("--from_openrlhf: no OpenRLHF train_ppo_ray flag recognised (e.g. --pretrain, "
                         "--actor.model_name_or_path)")
    if dotted:  # train_ppo_ray.py 3c3be623: what the flat flags said apart, derived
        for k, v in vars(d).items():
            setattr(a, k, v)
        version = len(_OPENRLHF_FLAT_VERSIONS)  # after every flat version, with their changes
    else:
        a.ref_offload = a.reward_offload = a.ref_reward_offload
        a.async_enable = a.async_train
        version = _openrlhf_flat_version(a)
    a.bf16 = a.bf16 or version >= 2  # cd7a434f+ --param_dtype, --ds.param_dtype: bf16 or fp16, 2 bytes either way
    if a.agent_func_path:  # flat 7d3e07bf+, dotted --train.agent_func_path
        a.remote_rm_url = "agent"
    if a.max_tokens_per_gpu is not None:  # 81421bd2: one budget, for training and scoring alike
        if a.rollout_max_tokens_per_gpu is not None or a.train_max_tokens_per_gpu is not None:
            raise ValueError("--from_openrlhf: --max_tokens_per_gpu (OpenRLHF 81421bd2 only) and its successors "
                             "--train_max_tokens_per_gpu/--rollout_max_tokens_per_gpu (f9a1676b+) are in no "
                             "OpenRLHF version together; write one version's flags")
        a.train_max_tokens_per_gpu = a.rollout_max_tokens_per_gpu = a.max_tokens_per_gpu
    if a.train_max_tokens_per_gpu is None:
        a.train_max_tokens_per_gpu = 16192  # every version's default (dotted --train.max_tokens_per_gpu too)
    if a.ring_attn_size < 1:
        raise ValueError(f"--from_openrlhf: --ring_attn_size {a.ring_attn_size}: must be at least 1")
    _openrlhf_check_tp(a, bool(dotted))
    # train_ppo_ray (806d0296+ for ring attention, 81421bd2+ for dynamic batching) turns packing on for both, and
    # a dynamic batch's rollout budget defaults to the training one (f9a1676b+, dotted alike)
    if a.ring_attn_size > 1 or a.use_dynamic_batch:
        a.packing_samples = True
    if a.use_dynamic_batch and a.rollout_max_tokens_per_gpu is None:
        a.rollout_max_tokens_per_gpu = a.train_max_tokens_per_gpu
    # packing makes train_ppo_ray use flash attention: c250c21a+ flash_attention_2, before it ``args.flash_attn =
    # True`` (4c902a2a, which added --packing_samples)
    if version >= 1 and a.packing_samples and "flash_attention" not in a.attn_implementation:
        a.attn_implementation = "flash_attention_2"
    if version == 0:  # before c250c21a the Actor loads "flash_attention_2" if --flash_attn else "eager"
        a.attn_implementation = "flash_attention_2" if a.flash_attn or a.packing_samples else "eager"
    if version >= 3:  # d0e088b6+
        # every sequence is cut at --max_len (vLLM max_model_len, samples_generator truncate_length); the prompt
        # at max_len - max_new_tokens; without max_new_tokens the split is per sample: half and half here (only
        # the total sizes memory)
        response = max(1, min(a.max_new_tokens or (a.max_len + 1) // 2, a.max_len - 1))
        a.prompt_max_len, a.generate_max_len = max(1, a.max_len - response), response
    return a, bool(dotted)


def _openrlhf_check_tp(a: argparse.Namespace, dotted: bool) -> None:
    """What OpenRLHF and its DeepSpeed accept with ``--ds_tensor_parallel_size`` / ``--ds.tensor_parallel_size``
    above 1 (DeepspeedStrategy.__init__ in openrlhf/utils/deepspeed/deepspeed.py, f5b45490 to 3c3be623): bf16
    weights (``--bf16`` before cd7a434f, ``--param_dtype bf16`` after; fp16 is refused). The DeepSpeed releases
    the flat versions pin (0.16.7 to 0.18.9) assert ZeRO stage <= 2 under AutoTP (engine.py
    _configure_tensor_parallel_states); 3c3be623, which the dotted flags are read as, pins 0.19.5, which allows
    ZeRO-3. LoRA and 4-bit weights under AutoTP are not modelled. Every flat version the reader tells apart has
    commits with the flag (version 0 runs to c250c21a), so no flag combination rules it out."""
    tp = a.ds_tensor_parallel_size
    flag = "--ds.tensor_parallel_size" if dotted else "--ds_tensor_parallel_size"
    if tp < 1:
        raise ValueError(f"--from_openrlhf: {flag} {tp}: must be at least 1")
    if tp == 1:
        return
    if not a.bf16 or a.param_dtype == "fp16":
        raise ValueError(f"--from_openrlhf: {flag} {tp} needs bf16 weights (OpenRLHF asserts 'BF16 is required for "
                         f"tensor parallel training'); {'--bf16' if a.param_dtype is None else '--param_dtype bf16'}")
    if a.zero_stage == 3 and not dotted:
        raise ValueError(f"--from_openrlhf: {flag} {tp} with --zero_stage 3: the DeepSpeed of OpenRLHF's flat-flag "
                         "versions (0.16.7 to 0.18.9) allows AutoTP with ZeRO stage 0-2 only")
    if a.lora_rank or a.load_in_4bit:
        raise ValueError(f"--from_openrlhf: {flag} {tp} with LoRA or 4-bit weights is not modelled")


def _openrlhf_token_micro_batches(a: argparse.Namespace) -> tuple[int, int]:
    """(training, scoring) micro-batch in sequences of a ring group (a GPU without ring attention), as OpenRLHF
    cuts them (3c3be623, the same rule since 81421bd2), read at the maximum total length L = prompt + response
    maxima.

    Ring attention (``--ring_attn_size`` r, ``--ds.ring_attn_size``): DeepSpeed's mesh is (dp, sp=r, tp)
    (deepspeed.py setup_distributed); each micro-batch goes to one sp group and its packed tokens are padded to
    a multiple of r and sliced over the r GPUs (ring_attn_utils.get_tensor_in_current_ring_attn_rank; logits
    stay local), so a GPU holds 1/r of them (``Deployment.sequence_parallel``). ZeRO still shards over every GPU
    (deepspeed is initialised without an mpu; its train_batch_size is multiplied by r): the groups do not change.

    Dynamic batching (``--use_dynamic_batch``, ``--train.dynamic_batch_enable``) replaces both micro-batch flags:
    seqlen_balancing.get_minimum_num_micro_batch_size first-fits the lengths into bins of budget x r tokens (at
    length L: max(1, budget x r // L) sequences a bin) and get_seqlen_balanced_partitions splits them evenly over
    that many micro-batches (at equal lengths the largest holds ceil(n / micro-batches)).
    Training (replay_buffer.setup_dynamic_batch): n = train_batch_size // dp per step, dp = actor GPUs // r.
    Scoring (experience_maker.split_rollout_samples): n = rollout_batch_size x n_samples_per_prompt, and the
    bin count is rounded down to a multiple of dp (at least dp), so a micro-batch can exceed the rollout budget
    (``--rollout_max_tokens_per_gpu``, default: the training budget). The critic's micro-batches are read with the
    actor's dp (one micro-batch for both here)."""
    ring = a.ring_attn_size * a.ds_tensor_parallel_size  # a TP group's ranks all see its micro-batch
    seq = a.prompt_max_len + a.generate_max_len
    dp = max(1, a.actor_num_nodes * a.actor_num_gpus_per_node // ring)

    if not a.use_dynamic_batch:
        return a.micro_train_batch_size, a.micro_rollout_batch_size

    def bins(n: int, budget: int) -> int:  # first fit of n sequences of length seq into budget x ring x tp tokens
        return -(-n // max(1, budget * ring // seq))

    local = max(1, a.train_batch_size // dp)
    train = -(-local // bins(local, a.train_max_tokens_per_gpu))
    n = max(1, a.rollout_batch_size * a.n_samples_per_prompt)
    k = min(n, max(bins(n, a.rollout_max_tokens_per_gpu) // dp * dp, dp))
    return train, -(-n // k)


def from_openrlhf(cmdline: str, model: str | None = None, gpu_memory: int = 80 * GiB,
                  gpus_per_node: int = 8) -> Deployment:
    """An OpenRLHF ``train_ppo_ray`` command line (unknown flags are ignored; placement follows its launcher:
    each role on its own group unless colocated).

    Two syntaxes, each with its own defaults. The flat flags (``--actor_num_gpus_per_node``, 397d6a1c, 2024-07,
    to 76351db1, 2026-04-17) changed over time (``_OPENRLHF_FLAT_VERSIONS``): a command is read as the earliest
    flat version that has all its flags, with that version's defaults; ``--attn_implementation`` (c250c21a+),
    ``--param_dtype`` (cd7a434f+), ``--max_new_tokens`` and ``--max_len`` (d0e088b6+: the total) bring bf16,
    flash attention and the total length where they apply, and ``--bf16``, ``--flash_attn``, ``--prompt_max_len``
    or ``--generate_max_len`` keep the old ones (with one of these, ``--max_len`` is the older versions' cap on
    vLLM's ``max_model_len``, not read: the sequence is cut at prompt + generate maxima anyway). A command with
    none of these flags is read as 397d6a1c (fp32 weights, eager attention unless --flash_attn or
    --packing_samples, 1024 + 1024 tokens, micro-batches 4/8): every flat version accepts it and these are the
    largest defaults. The micro-batch defaults of 1 (a2978694, v0.10.0 to v0.10.1.post2) come with no new flag,
    so they apply only when written. Flags no single version has together (``--bf16`` with ``--param_dtype``)
    are an error. The dotted flags
    (``--actor.num_gpus_per_node``, ed62d0e2, 2026-04-19, through 3c3be623, 2026-08-13) have the newest flat
    defaults and some of their own. A command mixing flat and dotted flags, or with neither, is an error.
    Dynamic batching (``--use_dynamic_batch``, ``--train.dynamic_batch_enable``) and ring attention
    (``--ring_attn_size``, ``--ds.ring_attn_size``) set the micro-batches by OpenRLHF's token budgets and the
    sequence split (:func:`_openrlhf_token_micro_batches`, ``Deployment.sequence_parallel``); both turn packing
    on. DeepSpeed AutoTP (``--ds_tensor_parallel_size``, f5b45490+, ``--ds.tensor_parallel_size``) trains every model
    split over groups of that many GPUs that share each micro-batch (``Deployment.tensor_parallel``; the LM head is
    split too in the dotted syntax, whose 3c3be623 pins DeepSpeed 0.19.5), with OpenRLHF's and its DeepSpeed's
    constraints checked (:func:`_openrlhf_check_tp`)."""
    toks = [_openrlhf_module(t) for t in _inner_commands(_split_command(cmdline, "--from_openrlhf"),
                                                                ("openrlhf.cli.", "train_ppo_ray"))]
    entry = "openrlhf.cli.train_ppo_ray"
    others = [t for t in toks if t.startswith("openrlhf.cli.") and t != entry]
    if others and entry not in toks:  # train_sft, train_rm, train_dpo, serve_rm, ...: their flags overlap PPO's
        raise ValueError(f"--from_openrlhf: {others[0]} is not OpenRLHF's PPO trainer ({entry}); the planner reads "
                         "train_ppo_ray command lines only")
    if entry in toks:  # what precedes it is the launcher's (ray job submit ... --)
        toks = toks[toks.index(entry) + 1:]
    argv = [t for t in toks if t not in ("python", "python3", "-m")]
    a, dotted = _openrlhf_args(argv)
    flag = {"actor": "--actor.model_name_or_path" if dotted else "--pretrain",
            "critic": "--critic.model_name_or_path" if dotted else "--critic_pretrain",
            "reward": "--reward.model_name_or_path" if dotted else "--reward_pretrain"}
    name = model or a.pretrain
    if not name:
        raise ValueError(f"--from_openrlhf: no {flag['actor']} in the command line; pass --model")
    if dotted and not a.vllm_num_engines:  # train_ppo_ray.py ed62d0e2+: samples_generator only dispatches to vLLM
        raise ValueError("--from_openrlhf: OpenRLHF's dotted-flag versions generate only with vLLM; "
                         "set --vllm.num_engines")
    actor_arch = _actor_model(model, name, f"--from_openrlhf: {flag['actor']} {name}")
    db = 2 if a.bf16 else 4
    lora = a.lora_rank
    groups: dict[str, int] = {"actor": a.actor_num_nodes * a.actor_num_gpus_per_node}
    actor = Role("actor", actor_arch, trained=True, group="actor", dtype_bytes=db, lora_rank=lora,
                 load_in_4bit=a.load_in_4bit)
    ref = None
    if a.init_kl_coef > 0:
        g = "actor" if (a.colocate_actor_ref or a.colocate_all_models) else "ref"
        groups.setdefault(g, a.ref_num_nodes * a.ref_num_gpus_per_node)
        ref = Role("reference", actor_arch, group=g, dtype_bytes=db, offload=a.ref_offload)
    critic = reward = None
    if a.advantage_estimator != "gae":  # train_ppo_ray: only GAE has a critic; it defaults to the reward model
        a.critic_pretrain = None
    elif a.critic_pretrain is None:  # the actor's model (``--model`` when given) unless a reward model
        a.critic_pretrain = a.reward_pretrain.split(",")[0] if (a.reward_pretrain and not a.remote_rm_url) \
            else name
    if not a.colocate_all_models:  # train_ppo_ray turns sleep off without --colocate_all_models
        a.vllm_enable_sleep = False
    if a.critic_pretrain:
        g = "actor" if a.colocate_all_models else "critic"
        groups.setdefault(g, a.critic_num_nodes * a.critic_num_gpus_per_node)
        critic_arch = actor_arch if a.critic_pretrain in (name, a.pretrain) else _model(
            a.critic_pretrain, f"--from_openrlhf: {flag['critic']} {a.critic_pretrain}", _WRITE_MODEL)
        critic = Role("critic", critic_arch, trained=True, group=g, dtype_bytes=db,
                      value_head=True, lora_rank=lora)
    if not a.remote_rm_url and a.reward_pretrain:
        g = "actor" if a.colocate_all_models else ("critic" if a.colocate_critic_reward and critic else "reward")
        groups.setdefault(g, a.reward_num_nodes * a.reward_num_gpus_per_node)
        reward = Role("reward", _model(a.reward_pretrain, f"--from_openrlhf: {flag['reward']} {a.reward_pretrain}",
                                       _WRITE_MODEL), group=g, dtype_bytes=db, value_head=True,
                      offload=a.reward_offload)
    if a.vllm_num_engines:
        if a.colocate_all_models and not a.async_enable:  # async: vLLM gets its own GPUs
            eng_group = "actor"
            engine_gpus = a.vllm_num_engines * a.vllm_tensor_parallel_size
            if engine_gpus != groups["actor"]:  # train_ppo_ray's own assert (a4ca1ab6, 2025-02-09, and later)
                sep = "." if dotted else "_"
                flags = (f"--vllm{sep}num_engines x --vllm{sep}tensor_parallel_size",
                         f"--actor{sep}num_nodes x --actor{sep}num_gpus_per_node")
                raise ValueError(f"--from_openrlhf: colocating all models puts the engines on the actor's GPUs, so "
                                 f"{flags[0]} ({engine_gpus}) must equal {flags[1]} ({groups['actor']})")
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
    micro, score_micro = _openrlhf_token_micro_batches(a)
    tp = a.ds_tensor_parallel_size
    for g, n in groups.items():
        if tp > 1 and g != "vllm" and n % (tp * a.ring_attn_size):
            raise ValueError(f"--from_openrlhf: the {g} group's {n} GPUs do not split into DeepSpeed's (dp, sp, tp) "
                             f"mesh with ring attention {a.ring_attn_size} x tensor parallel {tp}")
    return Deployment(actor=actor, critic=critic, reference=ref, reward=reward, groups=groups,
                      gpus_per_node=gpus_per_node, gpu_memory=gpu_memory,
                      sharding=Sharding(f"zero{a.zero_stage}", offload_optimizer=a.adam_offload,
                                        mixed_precision=True),
                      engine=engine, micro_batch=micro, score_micro_batch=score_micro, prompt_len=a.prompt_max_len,
                      response_len=a.generate_max_len, rollout_per_gpu=rollout,
                      gradient_checkpointing=a.gradient_checkpointing,
                      train_sleep=a.deepspeed_enable_sleep and a.colocate_all_models,
                      attn=_attn(a.attn_implementation), framework="openrlhf-dotted" if dotted else "openrlhf",
                      token_budget_batching=a.use_dynamic_batch, sequence_parallel=a.ring_attn_size,
                      tensor_parallel=tp, tensor_parallel_head=dotted and tp > 1)


def from_verl(cmdline: str, model: str | None = None, gpu_memory: int = 80 * GiB) -> Deployment:
    """A veRL ``main_ppo`` command line of Hydra ``key=value`` overrides (hybrid engine: actor, rollout and
    reference share every GPU; FSDP full shard; the rollout engine frees its cache while training)."""
    kv: dict[str, str] = {}
    toks = [_module(t) for t in _inner_commands(_split_command(cmdline, "--from_verl"), ("verl.trainer.", "main_ppo"))]
    config = "ppo_trainer"
    for i, tok in enumerate(toks):
        if tok in ("--config-name", "-cn") and i + 1 < len(toks):
            config = toks[i + 1]
        elif tok.startswith(("--config-name=", "-cn=")):
            config = tok.split("=", 1)[1]
        elif "=" in tok and not tok.startswith("-"):
            k, v = tok.split("=", 1)
            if v.strip("'\"") in ("null", "~"):  # Hydra's None: the setting left unset
                kv.pop(k.lstrip("+"), None)
            else:
                kv[k.lstrip("+")] = v.strip("'\"")
    _verl_check_entry(toks, config.strip("'\"").removesuffix(".yaml"))
    if model and not any(k.split(".", 1)[0] in _VERL_SECTIONS for k in kv):  # else: no model path, below
        raise ValueError("--from_verl: no veRL main_ppo override recognised (e.g. actor_rollout_ref.model.path=..., "
                         "trainer.n_gpus_per_node=8)")

    def get(key: str, default: Any = None) -> Any:
        value = kv.get(key, default)
        if isinstance(value, str) and unresolved(value):
            raise ValueError(f"--from_verl: {key}={value}: {UNSET}; write its value")
        return value

    def flag(key: str, default: bool = False) -> bool:
        return str(get(key, default)).lower() == "true"

    def num(key: str, default: Any = None, cast: Callable[[Any], Any] = int) -> Any:
        value = get(key, default)
        return _number(value, f"--from_verl: {key}={value}", cast)

    for key, refused in (("actor_rollout_ref.actor.strategy", "megatron"),
                         ("actor_rollout_ref.rollout.multi_turn.enable", "true")):
        if str(get(key, "")).lower() == refused:
            raise ValueError(f"--from_verl: {key}={get(key)}: " + (
                "the Megatron workers are not modelled (the reader plans veRL's FSDP workers)" if refused == "megatron"
                else "multi-turn rollouts (tools, interactions) are not modelled"))
    eng = str(get("actor_rollout_ref.rollout.name", "vllm"))
    if eng not in ("vllm", "sglang", "hf"):
        raise ValueError(f"--from_verl: actor_rollout_ref.rollout.name={eng}: the planner models vllm, sglang and "
                         "hf rollouts")
    model_key = "actor_rollout_ref.model.path"
    name = model or kv.get(model_key)
    if not name:
        raise ValueError(f"--from_verl: no {model_key}; pass --model")
    arch = _actor_model(model, str(name), f"--from_verl: {model_key}={name}")
    n = num("trainer.n_gpus_per_node", 8) * num("trainer.nnodes", 1)
    sp = num("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1)
    tp = num("actor_rollout_ref.rollout.tensor_model_parallel_size", 2)
    for key, k in (("actor_rollout_ref.actor.ulysses_sequence_parallel_size", sp),
                   ("actor_rollout_ref.rollout.tensor_model_parallel_size", tp)):
        if k < 1 or n % k:  # fsdp_workers.py builds (dp, k) device meshes over all n GPUs
            raise ValueError(f"--from_verl: {key}={k} does not divide the {n} GPUs "
                             "(trainer.nnodes x trainer.n_gpus_per_node)")
    dp = max(1, n // sp)
    # micro-batches in sequences per Ulysses group (fsdp_workers.py normalises the deprecated global keys by
    # dp = GPUs / sp; the _per_gpu keys are taken as they are, after the group's all-gather); each GPU then holds
    # 1/sp of the tokens (Deployment.sequence_parallel)
    if get("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu") is not None:
        micro = max(1, num("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"))
    else:  # deprecated global micro-batch, split over data-parallel ranks
        micro = max(1, num("actor_rollout_ref.actor.ppo_micro_batch_size", dp) // dp)
    lp, lp_global = (f"actor_rollout_ref.rollout.log_prob_micro_batch_size{k}" for k in ("_per_gpu", ""))
    score_micro = max(1, num(lp)) if get(lp) is not None else (
        max(1, num(lp_global) // dp) if get(lp_global) is not None else micro)
    # use_dynamic_bsz (dp_actor.py, seqlen_balancing.rearrange_micro_batches): a rank's batch is cut into
    # ceil(tokens / (max_token_len_per_gpu x sp)) balanced micro-batches, whatever the micro-batch keys say; the
    # rank's batch is its share of ppo_mini_batch_size x rollout.n for the update (fsdp_workers.py normalises it per
    # data-parallel rank) and of train_batch_size x rollout.n for log-probs. Read at the maximum lengths. Log-probs
    # follow rollout.log_prob_use_dynamic_bsz / log_prob_max_token_len_per_gpu, defaulting to the actor's.
    seq_max = num("data.max_prompt_length", 512) + num("data.max_response_length", 512)
    rollout_n = num("actor_rollout_ref.rollout.n", 1)
    dyn = flag("actor_rollout_ref.actor.use_dynamic_bsz")
    budget = num("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", 16384)

    def packed(rank_seqs: int, max_tokens: int) -> int:  # sequences per micro-batch of a group
        k = max(1, min(rank_seqs, -(-rank_seqs * seq_max // (max_tokens * sp))))
        return max(1, -(-rank_seqs // k))

    if dyn:
        micro = packed(max(1, num("actor_rollout_ref.actor.ppo_mini_batch_size", 256) * rollout_n // dp), budget)
    if str(get("actor_rollout_ref.rollout.log_prob_use_dynamic_bsz", dyn)).lower() == "true":
        score_micro = packed(max(1, num("data.train_batch_size", 1024) * rollout_n // dp),
                             num("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", budget))
    lora = num("actor_rollout_ref.model.lora_rank", 0)
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
        # fsdp_workers.py CriticWorker: its own checkpointing switch (ppo_trainer.yaml default True) and model_dtype
        # (default fp32: mixed precision, as for the actor); its offload and micro-batches follow the actor's here
        critic_dtype = str(get("critic.model.fsdp_config.model_dtype", "fp32")).lower()
        critic_name = str(kv.get("critic.model.path", name))  # the actor's (``--model`` too) unless another
        critic_arch = arch if critic_name in (name, kv.get(model_key)) else _model(
            critic_name, f"--from_verl: critic.model.path={critic_name}", _WRITE_MODEL)
        critic = Role("critic", critic_arch, trained=True, group="all",
                      value_head=True,
                      sharding=Sharding("fsdp_full", mixed_precision=critic_dtype in ("fp32", "float32")),
                      gradient_checkpointing=flag("critic.model.enable_gradient_checkpointing", True))
    groups = {"all": n}
    reward = None
    if flag("reward_model.enable"):
        # since 0102d04e0 (2025-12-09) ppo_trainer.yaml defaults to reward_model/dp_reward_loop.yaml
        # (use_reward_loop: True): the reward model is served by its own rollout engine (reward_model.rollout.*)
        if str(get("reward_model.use_reward_loop", True)).lower() != "false":
            raise ValueError("--from_verl: reward_model.enable=True: veRL serves the reward model through its reward "
                             "loop (its own rollout engine; the default since 0102d04e0, 2025-12), which is not "
                             "modelled; add reward_model.use_reward_loop=False for the FSDP RewardModelWorker")
        # fsdp_workers.py RewardModelWorker (49b08e95 and b178a3cd): a bf16 AutoModelForTokenClassification under
        # FSDP with CPUOffload(offload_params=True) whatever its fsdp_config says, on every GPU unless
        # reward_model.enable_resource_pool gives it its own (b178a3cd main_ppo.py)
        rm_name = str(kv.get("reward_model.model.path", ""))
        if not rm_name:
            raise ValueError("--from_verl: reward_model.enable=True without reward_model.model.path")
        rm_group = "all"
        if flag("reward_model.enable_resource_pool"):
            rm_group = "reward"
            groups["reward"] = num("reward_model.n_gpus_per_node", 8) * num("reward_model.nnodes", 1)
        reward = Role("reward", _model(rm_name, f"--from_verl: reward_model.model.path={rm_name}", _WRITE_MODEL),
                      group=rm_group, value_head=True, offload=True)
    engine = Engine("sglang" if eng == "sglang" else ("hf" if eng == "hf" else "vllm"), group="all",
                    tp=tp,
                    gpu_memory_utilization=num("actor_rollout_ref.rollout.gpu_memory_utilization", 0.5, cast=float),
                    sleep=True, max_num_seqs=num("actor_rollout_ref.rollout.max_num_seqs", 1024),
                    max_num_batched_tokens=num("actor_rollout_ref.rollout.max_num_batched_tokens", 8192))
    return Deployment(actor=actor, critic=critic, reference=reference, reward=reward, groups=groups, gpus_per_node=int(
                          get("trainer.n_gpus_per_node", 8)), gpu_memory=gpu_memory,
                      sharding=Sharding("fsdp_full", mixed_precision=dtype in ("fp32", "float32")),
                      phase_offload_params=param_off,
                      phase_offload_optimizer=flag("actor_rollout_ref.actor.fsdp_config.optimizer_offload"),
                      engine=engine, micro_batch=micro, score_micro_batch=score_micro,
                      prompt_len=num("data.max_prompt_length", 512),
                      response_len=num("data.max_response_length", 512), rollout_per_gpu=1,
                      # on by default since veRL 9fca71d2c (2025-01-28), as the critic's
                      gradient_checkpointing=flag("actor_rollout_ref.model.enable_gradient_checkpointing", True),
                      attn="flash", framework="verl", **_verl_head(get, flag),
                      fsdp_version=2 if str(get("actor_rollout_ref.actor.strategy", "fsdp")) == "fsdp2" else 1,
                      # fsdp_vllm.py refuses layered_summon unless the engine preloaded the base (no dummy format)
                      token_budget_batching=dyn, sequence_parallel=sp,
                      layered_summon=flag("actor_rollout_ref.rollout.layered_summon") and "dummy" not in str(
                          get("actor_rollout_ref.rollout.load_format", "dummy_dtensor")))


def _verl_head(get: Callable[..., Any], flag: Callable[..., bool]) -> dict[str, Any]:
    """The actor's log-prob head as veRL's dp_actor.py computes it (memory.deploy.VERL_HEAD): fused kernels
    (model.use_fused_kernels) compute log-probs and entropy chunk by chunk without the full logits; otherwise the
    entropy's implementation, and whether the update computes it (entropy_coeff != 0, or b178a3c's
    calculate_entropy; both default off at 49b08e9 and b178a3c)."""
    actor = "actor_rollout_ref.actor."
    if flag("actor_rollout_ref.model.use_fused_kernels"):
        return {"logprob_head": "chunked"}
    try:
        coeff = float(get(actor + "entropy_coeff", 0))
    except (TypeError, ValueError):
        raise ValueError(f"--from_verl: {actor}entropy_coeff={get(actor + 'entropy_coeff')}: not a number") from None
    # dp_actor.py: chunking picks the function, torch.compile wraps it, checkpointing wraps the call (around the
    # chunked function it is planned as chunked: not measured)
    impl = ("chunked" if flag(actor + "entropy_from_logits_with_chunking")
            else "checkpointed" if flag(actor + "entropy_checkpointing") else "compiled")
    if not flag(actor + "use_torch_compile", True):
        impl = "eager" if impl == "compiled" else impl + "_eager"
    return {"logprob_head": "verl", "entropy_impl": impl,
            "entropy_in_update": coeff != 0 or flag(actor + "calculate_entropy")}


# the top-level sections of ppo_trainer.yaml: a text with none of them is no main_ppo command line
_VERL_SECTIONS = ("actor_rollout_ref", "critic", "data", "trainer", "algorithm", "reward_model",
                  "custom_reward_function", "ray_init", "ray_kwargs")
# veRL entry points whose config is main_ppo's: recipe/dapo/config/dapo_trainer.yaml (49b08e95) is ppo_trainer plus
# DAPO's reward and filter keys
_VERL_PPO = {"verl.trainer.main_ppo": "ppo_trainer", "recipe.dapo.main_dapo": "dapo_trainer"}


def _verl_check_entry(toks: list[str], config: str) -> None:
    """Refuse a script of another veRL trainer (SFT, generation, PRIME, SPIN...) or a Hydra config other than
    main_ppo's: the reader fills in ppo_trainer.yaml's defaults, which a Megatron or multi-turn config changes."""
    entries = [t for t in toks if re.fullmatch(r"(verl\.trainer|recipe\.\w+)\.\w+", t)]
    ppo = [t for t in entries if t in _VERL_PPO]
    if entries and not ppo:
        raise ValueError(f"--from_verl: {entries[0]} is not veRL's PPO trainer (verl.trainer.main_ppo); the planner "
                         "reads main_ppo runs only")
    if unresolved(config):
        raise ValueError(f"--from_verl: --config-name {config}: {UNSET}; write its value")
    if config not in _VERL_PPO.values():
        raise ValueError(f"--from_verl: --config-name {config}: " + (
            "the Megatron workers are not modelled (the reader plans veRL's FSDP workers)" if "megatron" in config
            else "the reader knows main_ppo's ppo_trainer.yaml defaults only; write its settings as overrides"))


# ---- DeepSpeed-Chat (DeepSpeedExamples applications/DeepSpeed-Chat, step 3) ----------------------------------

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits; a reader raises one line
        if "invalid" in message and "'$" in message:  # a script's variable that it does not set
            message += f" ({UNSET}; write its value)"
        raise ValueError(f"{self.prog}: {message}")


def _dschat_parser() -> argparse.ArgumentParser:
    """The memory-relevant flags of DeepSpeed-Chat's ``training/step3_rlhf_finetuning/main.py``, its names and
    defaults (DeepSpeedExamples 83757d9), and the ``deepspeed`` launcher's GPU counts."""
    p = _OneLineParser(prog="--from_deepspeed_chat", add_help=False)
    add = p.add_argument
    add("--actor_model_name_or_path", default=None)
    add("--critic_model_name_or_path", default=None)
    add("--per_device_generation_batch_size", type=int, default=16)
    add("--per_device_training_batch_size", type=int, default=16)
    add("--generation_batches", type=int, default=1)
    add("--max_prompt_seq_len", type=int, default=256)
    add("--max_answer_seq_len", type=int, default=256)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--inference_tp_size", type=int, default=1)
    add("--tp_gather_partition_size", type=int, default=8)
    add("--dtype", choices=("fp16", "bf16"), default="fp16")
    add("--actor_zero_stage", type=int, choices=(0, 1, 2, 3), default=0)
    add("--critic_zero_stage", type=int, choices=(0, 1, 2, 3), default=0)
    add("--actor_lora_dim", type=int, default=0)
    add("--critic_lora_dim", type=int, default=0)
    add("--unsupervised_dataset_name", default=None)
    add("--unsupervised_dataset_config_name", default=None)
    for flag in ("enable_hybrid_engine", "unpin_actor_parameters", "release_inference_cache", "offload",
                 "offload_reference_model", "offload_reward_model", "actor_gradient_checkpointing",
                 "critic_gradient_checkpointing", "only_optimize_lora", "enable_ema", "enable_mixed_precision_lora"):
        add(f"--{flag}", action="store_true")
    return p


def _dschat_train_sharding(stage: int, offload: bool) -> Sharding:
    """A trained model's ZeRO config as get_train_ds_config writes it (dschat/utils/ds_utils.py): ``--offload``
    sets offload_optimizer and offload_param (the latter acts under ZeRO-3 only), overlap_comm true,
    stage3_prefetch_bucket_size 3e7."""
    return Sharding(f"zero{stage}", offload_optimizer=offload and stage > 0, offload_params=offload and stage == 3,
                    mixed_precision=True, overlap_comm=True, prefetch_bucket=30_000_000)


def _dschat_eval_sharding(trained_stage: int) -> Sharding:
    """A frozen model's config (get_eval_ds_config): ZeRO-3 when the model it copies is trained under ZeRO-3,
    else stage 0 (rlhf_engine.py _init_ref / _init_reward); its offload_param is the role's ``offload``."""
    return Sharding("zero3" if trained_stage == 3 else "zero0")


def _deepspeed_launcher_gpus(la: argparse.Namespace, gpus_per_node: int) -> int:
    """The GPUs the ``deepspeed`` launcher starts (deepspeed/launcher/runner.py): an ``--include`` that lists every
    node's slots (``NODE[:SLOT[,SLOT...]][@NODE...]``) counts them; a hostfile, ``--exclude`` or an include with a
    whole node leaves the count to the hostfile, which the planner cannot read, unless ``--num_nodes`` and
    ``--num_gpus`` fix it; otherwise ``--num_nodes`` x ``--num_gpus`` (one node and every local GPU by default)."""
    if la.include:
        nodes: dict[str, set[int]] = {}
        for spec in la.include.split("@"):
            host, _, slots = spec.partition(":")
            try:
                nodes.setdefault(host, set()).update(int(x) for x in slots.split(",") if x)
            except ValueError:
                raise ValueError(f"--from_deepspeed_chat: --include {la.include}: slots must be GPU numbers "
                                 "(NODE:0,1@NODE:0)") from None
        if all(nodes.values()):
            return sum(len(v) for v in nodes.values())
    if la.hostfile or la.include or la.exclude:
        if la.num_nodes and la.num_gpus and not la.exclude:
            return int(la.num_nodes * la.num_gpus)
        given = " ".join(f"--{k} {v}" for k, v in (("hostfile", la.hostfile), ("include", la.include),
                                                    ("exclude", la.exclude)) if v)
        raise ValueError(f"--from_deepspeed_chat: the launcher's {given} takes its GPUs from a hostfile the planner "
                         "cannot read; pass --nodes N (and --gpus_per_node G)")
    return int(la.num_gpus * (la.num_nodes or 1) if la.num_gpus else (la.num_nodes or 1) * gpus_per_node)


def from_deepspeed_chat(cmdline: str, model: str | None = None, gpu_memory: int = 80 * GiB,
                        gpus: int | None = None, gpus_per_node: int = 8) -> Deployment:
    """A DeepSpeed-Chat step-3 (PPO) command line: ``[deepspeed --num_nodes N --num_gpus G] main.py --flags``.

    What it models, from ``dschat/rlhf/rlhf_engine.py`` and ``dschat/utils/ds_utils.py`` (DeepSpeedExamples
    83757d9): all four models on every GPU (one group); the actor (trained, ``--actor_lora_dim`` adapters)
    under ``--actor_zero_stage`` and ``--actor_gradient_checkpointing``; the reference (a frozen actor copy: ZeRO-3
    when the actor is, else stage 0, unsharded); the critic (trained, value head, ``--critic_model_name_or_path``,
    usually an OPT-350m reward model) under its own ``--critic_zero_stage`` and ``--critic_gradient_checkpointing``
    (``Role.sharding`` / ``Role.gradient_checkpointing``); the reward model (a frozen critic copy: ZeRO-3 when the
    critic is, else stage 0). fp16 or bf16 weights with DeepSpeed's fp32 master and Adam
    states (FusedAdam, DeepSpeedCPUAdam with ``--offload``); ``--offload`` sets both ``offload_optimizer`` and
    ``offload_param`` to the CPU (the latter acts under ZeRO-3 only); ``overlap_comm`` true and
    ``stage3_prefetch_bucket_size`` 3e7 as get_train_ds_config writes them. ``--offload_reference_model`` /
    ``--offload_reward_model`` set the eval config's ``offload_param``, which DeepSpeed honours under ZeRO-3
    only, so the role is parked on the CPU only when its stage is 3. The whole generation batch is scored at
    once (generate_experience), so the scoring micro-batch is ``--per_device_generation_batch_size``. The
    log-prob head is gather_log_probs (dschat/rlhf/ppo_trainer.py): log-softmax on the fp16/bf16 logits
    (``logprob_head="model_dtype"``), the logits held through the actor's backward. Sequences: prompts are
    padded to ``--max_prompt_seq_len`` and ``generate(max_length=prompt+answer)``; the maximum lengths are what a
    batch reaches when no answer stops early.

    Generation: with ``--enable_hybrid_engine`` the actor's DeepSpeedEngine is DeepSpeed-HE
    (``memory.deploy.HybridEngine``: ``--inference_tp_size``, ``--tp_gather_partition_size``,
    ``--release_inference_cache``, ``max_out_tokens`` = prompt + answer as rlhf_engine.py _init_actor passes it;
    ``pin_parameters`` = not ``--unpin_actor_parameters`` is ``gather_for_generation``): the planner counts the
    ZeRO-3 weights its generate gathers (all at TP 1, 1/TP slices + the non-sliced parameters at TP > 1, one
    layer when unpinned), and its DeepSpeed-Inference workspace (KV cache + kernel activations, sized by
    GenWorkSpace) instead of HF generate's KV cache, held through training unless ``--release_inference_cache``.
    Without the hybrid engine: the planner's plain ``hf`` engine (HF generate; under ZeRO-3 one layer at a time).
    LoRA: without ``--only_optimize_lora`` the embeddings, biases and LayerNorms train too (``lora_trains_others``;
    LinearLayer_LoRA freezes only the wrapped weight). ``--enable_ema``: one more frozen actor copy with its
    adapters (``actor_ema``; ZeRO-3 when the actor is, on the CPU with ``--offload_reference_model`` under ZeRO-3).

    What the planner does not model (so it is not pretended):
    - under ZeRO-3 DeepSpeed partitions the LoRA adapters with the rest; the planner keeps the adapters' 16-bit
      weights unsharded on every GPU (over-count of (1 - 1/N) x adapter weights).
    - ``--enable_mixed_precision_lora`` (ZeRO++ quantized frozen weights) has no term.
    - the actor's and reference's logits of the whole batch coexist in generate_experience (the planner counts
      one model's head at a time); ``--compute_fp32_loss`` casts them to fp32 there (the planner keeps the
      model-dtype head).
    - GenWorkSpace's allocation-time check that ``temp_size`` + 500 MB (100 MB under 1 GB free) stay free beyond
      the workspace (cudaMemGetInfo), the EMA update's per-parameter gathers (utils.py moving_average) and the
      prefill logits of HF generate.
    Attention is ``eager``: the published OPT runs (2023) predate SDPA for OPT in transformers.

    ``gpus``: total GPUs; by default the launcher's ``--num_nodes`` x ``--num_gpus`` when given, else one node of
    ``gpus_per_node`` (the launcher's default: every local GPU).
    """
    tokens = _split_command(cmdline, "--from_deepspeed_chat")
    main_at = next((i for i, t in enumerate(tokens) if t.endswith("main.py")), None)
    launcher, argv = (tokens[:main_at], tokens[main_at + 1:]) if main_at is not None else ([], tokens)
    lp = _OneLineParser(prog="--from_deepspeed_chat (launcher)", add_help=False)
    lp.add_argument("--num_nodes", type=int, default=None)
    lp.add_argument("--num_gpus", "--num_accelerators", dest="num_gpus", type=int, default=None)
    lp.add_argument("-H", "--hostfile", default=None)
    lp.add_argument("-i", "--include", default="")
    lp.add_argument("-e", "--exclude", default="")
    la, _ = lp.parse_known_args(launcher)
    a, _ = _dschat_parser().parse_known_args(argv)
    actor_name = model or a.actor_model_name_or_path
    if not actor_name:
        raise ValueError("--from_deepspeed_chat: no --actor_model_name_or_path in the command line; pass --model")
    if not a.critic_model_name_or_path:
        raise ValueError("--from_deepspeed_chat: no --critic_model_name_or_path in the command line "
                         "(main.py requires it)")
    if a.inference_tp_size > 1 and a.actor_zero_stage != 3:  # main.py's own check
        raise ValueError("--from_deepspeed_chat: --inference_tp_size > 1 needs --actor_zero_stage 3 (main.py)")
    if (a.actor_zero_stage == 2 and a.critic_zero_stage == 2 and a.enable_hybrid_engine and a.offload
            and a.actor_lora_dim == 0):
        raise ValueError("--from_deepspeed_chat: main.py refuses ZeRO-2 + hybrid engine + --offload without LoRA")
    for name in ("per_device_generation_batch_size", "per_device_training_batch_size", "max_prompt_seq_len",
                 "max_answer_seq_len", "gradient_accumulation_steps", "inference_tp_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--from_deepspeed_chat: --{name} must be >= 1; got {getattr(a, name)}")
    if gpus is None:
        gpus = _deepspeed_launcher_gpus(la, gpus_per_node)
    if gpus < 1 or gpus % a.inference_tp_size:
        raise ValueError(f"--from_deepspeed_chat: {gpus} GPU(s) is not a multiple of --inference_tp_size "
                         f"{a.inference_tp_size}")
    actor_arch = _actor_model(model, actor_name, f"--from_deepspeed_chat: --actor_model_name_or_path {actor_name}")
    critic_arch = _model(a.critic_model_name_or_path,
                         f"--from_deepspeed_chat: --critic_model_name_or_path {a.critic_model_name_or_path}",
                         _WRITE_MODEL)
    stage, critic_stage = a.actor_zero_stage, a.critic_zero_stage
    others = not a.only_optimize_lora  # rlhf_engine.py: only_optimize_lora_parameters only with the flag
    actor = Role("actor", actor_arch, trained=True, group="all", dtype_bytes=2, lora_rank=a.actor_lora_dim,
                 lora_trains_others=others and a.actor_lora_dim > 0)
    # rlhf_engine.py: get_train_ds_config(stage=--critic_zero_stage) for the critic, get_eval_ds_config with the
    # trained model's stage if 3 else 0 for the reference (the actor's: the deployment's sharding gives the same, so
    # it follows the actor) and the reward model (the critic's); the critic's checkpointing is switched on once in
    # DeepSpeedRLHFEngine.__init__ (RewardModel.gradient_checkpointing_enable), the actor's for each PPO update
    critic = Role("critic", critic_arch, trained=True, group="all", dtype_bytes=2, value_head=True,
                  lora_rank=a.critic_lora_dim, lora_trains_others=others and a.critic_lora_dim > 0,
                  sharding=_dschat_train_sharding(critic_stage, a.offload),
                  gradient_checkpointing=a.critic_gradient_checkpointing)
    reference = Role("reference", actor_arch, group="all", dtype_bytes=2,
                     offload=a.offload_reference_model and stage == 3)
    reward = Role("reward", critic_arch, group="all", dtype_bytes=2, value_head=True,
                  offload=a.offload_reward_model and critic_stage == 3, sharding=_dschat_eval_sharding(critic_stage))
    sharding = _dschat_train_sharding(stage, a.offload)
    unsup = bool(a.unsupervised_dataset_name and a.unsupervised_dataset_config_name)
    return Deployment(actor=actor, critic=critic, reference=reference, reward=reward, groups={"all": gpus},
                      gpus_per_node=min(gpus_per_node, la.num_gpus or gpus_per_node), gpu_memory=gpu_memory,
                      sharding=sharding, engine=Engine("hf", group="all"), optimizer="adamw",
                      optimizer_impl="fused", micro_batch=a.per_device_training_batch_size,
                      grad_accum=a.gradient_accumulation_steps * (2 if unsup else 1),
                      score_micro_batch=a.per_device_generation_batch_size, prompt_len=a.max_prompt_seq_len,
                      response_len=a.max_answer_seq_len, rollout_per_gpu=a.per_device_generation_batch_size,
                      gradient_checkpointing=a.actor_gradient_checkpointing,
                      gather_for_generation=a.enable_hybrid_engine and not a.unpin_actor_parameters,
                      attn="eager", logprob_head="model_dtype", framework="deepspeed-chat",
                      hybrid_engine=HybridEngine(tp=a.inference_tp_size,
                                                 tp_gather_partition_size=a.tp_gather_partition_size,
                                                 release_inference_cache=a.release_inference_cache,
                                                 max_out_tokens=a.max_prompt_seq_len + a.max_answer_seq_len)
                      if a.enable_hybrid_engine else None, actor_ema=a.enable_ema)
