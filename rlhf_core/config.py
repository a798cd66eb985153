"""TrainConfig: every knob of the thin PPO runner, and the argparse front end that validates it.

One dataclass so the config can be saved in ``meta.json`` and restored on ``--resume``; one parser so
``train.py`` and ``rlhfkit train`` share flags. A wrong value is a one-line ``parser.error``, never a
traceback. Torch-free: ``--help`` and flag errors stay fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REWARD_NAMES = ("sentiment", "preference", "length", "mix")
DEVICES = ("auto", "cpu", "cuda")
LOGPROB_IMPLS = ("auto", "torch", "chunked", "triton")
DTYPES = ("fp32", "bf16")
OLD_LOGPROBS = ("auto", "rollout", "recompute")
REF_DEVICES = ("same", "cpu")


@dataclass
class TrainConfig:
    # run
    seed: int = 42
    device: str = "auto"
    threads: int | None = None
    run_dir: str | None = None
    resume: str | None = None
    overwrite: bool = False
    save_every: int = 0
    # schedule
    epochs: int = 3
    steps_per_epoch: int = 8
    batch_size: int = 4
    rollout_batch_size: int | None = None
    mini_batch_size: int | None = None
    ppo_epochs: int = 4
    # model and data
    model: str = "tiny"
    prompts: str | None = None
    reward: str = "sentiment"
    dtype: str = "fp32"
    ref_device: str = "same"
    gradient_checkpointing: bool = False
    logprob_impl: str = "auto"
    old_logprobs: str = "auto"
    # sampling
    max_new_tokens: int = 15
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # optimisation
    learning_rate: float = 1e-5
    max_grad_norm: float = 5.0
    # PPO
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    # KL penalty
    kl_coef: float = 0.1
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_budget: float | None = None
    # observability
    no_tensorboard: bool = False
    sample_interval: float = 1.0
    profile: bool = False
    profile_wait: int = 1
    profile_warmup: int = 1
    profile_active: int = 2
    profile_repeat: int = 1
    # debugging
    inject_nan_step: int | None = None
    debug_slow_rank: int | None = None
    debug_slow_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def effective_mini_batch_size(self) -> int:
        return self.mini_batch_size or self.batch_size

    @property
    def effective_rollout_batch_size(self) -> int:
        return self.rollout_batch_size or self.batch_size

    @property
    def old_logprobs_from_rollout(self) -> bool:
        return self.old_logprobs == "rollout" or (self.old_logprobs == "auto" and self.dtype == "fp32")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``meta.json``; keys this version does not know are kept under ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        cfg = cls(**known)
        cfg.extra = {**cfg.extra, **unknown}
        return cfg


def _int_at_least(minimum: int, what: str):
    """An argparse ``type`` for integers ≥ ``minimum`` whose error says what was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if value != value or too_low or too_high:
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low}, {high}{hi}, got {text}")
        return value

    return parse


_POS = _float_in(0.0, float("inf"), low_open=True, high_open=True)
_NONNEG = _float_in(0.0, float("inf"), high_open=True)
_UNIT = _float_in(0.0, 1.0)


def build_parser(suppress_defaults: bool = False, prog: str = "train.py") -> argparse.ArgumentParser:
    """The ``train.py`` parser; with ``suppress_defaults`` only flags given explicitly appear in the result."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a policy with PPO against a toy reward and write a run directory (see docs/runner.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if suppress_defaults:
        p.argument_default = argparse.SUPPRESS

    def add(*names: str, **kw: Any) -> None:
        if suppress_defaults:
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*names, **kw)

    g = p.add_argument_group("run")
    add("--seed", type=int, default=d.seed, help="seed of every random choice (prompts, sampling, shuffling)")
    add("--device", choices=DEVICES, default=d.device, help="auto picks cuda when available")
    add("--threads", type=_positive_int, default=d.threads,
        help="torch CPU threads (default: 1 for the built-in tiny model, whose ops are too small to gain from "
             "more, else torch's default)")
    add("--run_dir", default=d.run_dir, help="output run directory (default runs/<timestamp>)")
    add("--resume", default=d.resume, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    add("--overwrite", action="store_true", default=d.overwrite, help="replace an existing run in --run_dir")
    add("--save_every", type=_non_negative_int, default=d.save_every,
        help="checkpoint every N steps (0: only at the end)")
    g = p.add_argument_group("schedule")
    add("--epochs", type=_positive_int, default=d.epochs)
    add("--steps_per_epoch", type=_positive_int, default=d.steps_per_epoch)
    add("--batch_size", type=_positive_int, default=d.batch_size, help="prompts per step (per process)")
    add("--rollout_batch_size", type=_positive_int, default=d.rollout_batch_size,
        help="generate in chunks of N prompts to cap KV-cache memory (default: batch_size)")
    add("--mini_batch_size", type=_positive_int, default=d.mini_batch_size,
        help="PPO minibatch size (default: batch_size); must divide batch_size")
    add("--ppo_epochs", type=_positive_int, default=d.ppo_epochs, help="PPO passes over each batch")
    g = p.add_argument_group("model and data")
    add("--model", default=d.model, help="'tiny' (built locally) or a from_pretrained name/path")
    add("--prompts", default=d.prompts, metavar="FILE",
        help="JSON list, JSONL with a 'prompt' field, or plain text one per line (default: built-in prompts)")
    add("--reward", default=d.reward, help=f"{'|'.join(REWARD_NAMES)} or module:function")
    add("--dtype", choices=DTYPES, default=d.dtype, help="weights dtype of policy and reference")
    add("--ref_device", choices=REF_DEVICES, default=d.ref_device, help="where the frozen reference lives")
    add("--gradient_checkpointing", action="store_true", default=d.gradient_checkpointing)
    add("--logprob_impl", choices=LOGPROB_IMPLS, default=d.logprob_impl,
        help="torch: logits + log_softmax; chunked/triton: memory.logprobs (no full logits)")
    add("--old_logprobs", choices=OLD_LOGPROBS, default=d.old_logprobs,
        help="old-policy log-probs and values from the hidden states kept while sampling (rollout, no second "
             "forward; GPT-2 models) or from a fresh forward (recompute); auto: rollout in fp32, recompute in "
             "bf16, where a cached decode differs from a full forward by more than the PPO ratio can ignore")
    g = p.add_argument_group("sampling")
    add("--max_new_tokens", type=_positive_int, default=d.max_new_tokens)
    add("--temperature", type=_POS, default=d.temperature)
    add("--top_k", type=_non_negative_int, default=d.top_k, help="0: off")
    add("--top_p", type=_float_in(0.0, 1.0, low_open=True), default=d.top_p, help="1.0: off")
    g = p.add_argument_group("optimisation")
    add("--learning_rate", type=_POS, default=d.learning_rate, help="AdamW learning rate")
    add("--max_grad_norm", type=_POS, default=d.max_grad_norm,
        help="gradient clipping threshold (the tiny model's pre-clip norm is about 2-4)")
    g = p.add_argument_group("PPO")
    add("--gamma", type=_UNIT, default=d.gamma, help="discount")
    add("--lam", type=_UNIT, default=d.lam, help="GAE lambda")
    add("--cliprange", type=_POS, default=d.cliprange)
    add("--cliprange_value", type=_POS, default=d.cliprange_value)
    add("--vf_coef", type=_NONNEG, default=d.vf_coef)
    add("--ent_coef", type=_NONNEG, default=d.ent_coef, help="entropy bonus (0: off)")
    g = p.add_argument_group("KL penalty")
    add("--kl_coef", type=_NONNEG, default=d.kl_coef, help="per-token KL penalty coefficient (initial if adaptive)")
    add("--adaptive_kl", action="store_true", default=d.adaptive_kl, help="Ziegler et al. adaptive coefficient")
    add("--kl_target", type=_POS, default=d.kl_target, help="target KL (nats per sequence) of --adaptive_kl")
    add("--kl_horizon", type=_positive_int, default=d.kl_horizon)
    add("--kl_budget", type=_POS, default=d.kl_budget, help="alert when kl/ref_k3 exceeds this")
    g = p.add_argument_group("observability")
    add("--no_tensorboard", action="store_true", default=d.no_tensorboard)
    add("--sample_interval", type=_NONNEG, default=d.sample_interval,
        metavar="SECONDS", help="system sampler period (0: off)")
    add("--profile", action="store_true", default=d.profile, help="torch.profiler traces into <run>/traces")
    add("--profile_wait", type=_non_negative_int, default=d.profile_wait)
    add("--profile_warmup", type=_non_negative_int, default=d.profile_warmup)
    add("--profile_active", type=_positive_int, default=d.profile_active)
    add("--profile_repeat", type=_non_negative_int, default=d.profile_repeat)
    g = p.add_argument_group("debugging")
    add("--inject_nan_step", type=_positive_int, default=d.inject_nan_step,
        help="make the reward of step N NaN (exercises the non-finite guard)")
    add("--debug_slow_rank", type=_non_negative_int, default=d.debug_slow_rank)
    add("--debug_slow_seconds", type=_NONNEG, default=d.debug_slow_seconds)
    return p


def _check_reward(parser: argparse.ArgumentParser, name: str) -> None:
    if name in REWARD_NAMES:
        return
    if ":" not in name:
        parser.error(f"argument --reward: unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)} "
                     "or give module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        parser.error(f"argument --reward: cannot load {name!r} ({err})")
    if not callable(fn):
        parser.error(f"argument --reward: {name!r} is not callable")


def _check_resume(parser: argparse.ArgumentParser, run_dir: str) -> dict[str, Any]:
    path = Path(run_dir)
    meta_path = path / "meta.json"
    if not path.is_dir():
        parser.error(f"argument --resume: {run_dir} is not a directory")
    if not meta_path.exists():
        parser.error(f"argument --resume: {run_dir} has no meta.json, so it is not a run directory")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"argument --resume: unreadable {meta_path} ({err})")
    if not isinstance(meta, dict) or meta.get("source") != "rlhf_core" or not isinstance(meta.get("config"), dict):
        parser.error(f"argument --resume: {run_dir} was not written by this runner (source "
                     f"{meta.get('source') if isinstance(meta, dict) else None!r})")
    from .checkpoint import latest_checkpoint

    if latest_checkpoint(path) is None:
        parser.error(f"argument --resume: {run_dir} has no checkpoints/step_<N>/ to resume from")
    return meta


def validate(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    """Cross-flag checks argparse cannot express; each failure is one ``parser.error`` line."""
    _check_reward(parser, cfg.reward)
    if cfg.prompts is not None:
        from .prompts import PromptError, load_prompts

        try:
            load_prompts(cfg.prompts)
        except PromptError as err:
            parser.error(f"argument --prompts: {err}")
    if cfg.batch_size % cfg.effective_mini_batch_size:
        parser.error(f"argument --mini_batch_size: {cfg.mini_batch_size} must divide --batch_size {cfg.batch_size}")
    if cfg.effective_mini_batch_size > cfg.batch_size:
        parser.error("argument --mini_batch_size: larger than --batch_size")
    if cfg.debug_slow_seconds and cfg.debug_slow_rank is None:
        parser.error("argument --debug_slow_seconds: needs --debug_slow_rank")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("argument --device: cuda requested but torch sees no CUDA device")
    if cfg.logprob_impl == "triton" and cfg.device != "cuda":
        import torch

        if not (cfg.device == "auto" and torch.cuda.is_available()):
            parser.error("argument --logprob_impl: triton needs a CUDA device; use chunked or torch on the CPU")
    if cfg.run_dir is not None and Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        parser.error(f"argument --run_dir: {cfg.run_dir} exists and is not a directory")
    if cfg.run_dir is not None and cfg.resume is None and not cfg.overwrite and (Path(cfg.run_dir) / "meta.json").exists():
        parser.error(f"argument --run_dir: {cfg.run_dir} already holds a run; pass --overwrite or --resume {cfg.run_dir}")


def parse_args(argv: list[str] | None, prog: str = "train.py") -> TrainConfig:
    """Flags → validated TrainConfig. With ``--resume`` the saved config is the base and given flags override it."""
    parser = build_parser(prog=prog)
    args = parser.parse_args(argv)
    if args.resume is not None:
        meta = _check_resume(parser, args.resume)
        explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
        saved = dict(meta["config"])
        saved.update(explicit)
        saved["run_dir"] = args.resume
        saved["resume"] = args.resume
        saved["overwrite"] = False
        cfg = TrainConfig.from_dict(saved)
    else:
        cfg = TrainConfig(**vars(args))
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    validate(parser, cfg)
    return cfg
