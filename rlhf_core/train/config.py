"""TrainConfig: every knob of the thin PPO runner, declared once, and the argparse front end generated from it.

Each field carries its help, group, bounds and choices in ``dataclasses.field(metadata=...)`` (the style of
TRL's configs); the ``train.py`` flags, their ``--help`` groups, the per-value checks and the ``--config
FILE`` loader are all derived from those fields, so a setting cannot be documented or bounded in one place
and not the other. One dataclass so the config can be saved in ``meta.json`` and restored on ``--resume``;
one parser so ``train.py`` and ``rlhfkit train`` share flags. A wrong value is a one-line ``parser.error``,
never a traceback. Torch-free: ``--help`` and flag errors stay fast.

Metadata keys: ``help`` and ``group`` (required), ``choices``, ``min``/``max`` (inclusive), ``gt`` (exclusive
lower bound), ``metavar``. The type is the annotation (``int``, ``float``, ``str``, ``bool``, optionally
``| None``); floats must be finite; bools are off by default and the flag turns them on.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import json
import math
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_core.train.checkpoint import latest_checkpoint
from rlhf_core.train.prompts import PromptError, load_prompts

REWARD_NAMES = ("sentiment", "preference", "length", "mix")
DEVICES = ("auto", "cpu", "cuda")
LOGPROB_IMPLS = ("auto", "torch", "chunked", "triton")
DTYPES = ("fp32", "bf16")
OLD_LOGPROBS = ("auto", "rollout", "recompute")
MAX_BATCH = 65536  # prompts per step or chunk: far past any machine's memory for a causal LM step
# settings a --resume may change without --resume_override: where and how the run is kept, observed and
# placed, not what it computes (--epochs may grow, never below the steps done)
RESUME_FREE = ("run_dir", "resume", "resume_override", "overwrite", "save_every", "save_model", "epochs", "device",
               "threads", "no_tensorboard", "sample_interval", "profile", "profile_wait", "profile_warmup",
               "profile_active", "profile_repeat", "profile_full", "kl_budget", "heldout_reward", "debug_slow_rank",
               "debug_slow_seconds", "debug_slow_from_step", "weight_guard", "engine", "ray_placement")
REF_DEVICES = ("same", "cpu")
ENGINES = ("local", "ray")
RAY_PLACEMENTS = ("colocated", "separate")
WEIGHT_GUARDS = ("restore", "check")


@dataclass
class TrainConfig:
    """Every setting of a runner run. Each field's metadata is the one source of its flag, help and checks."""

    # run
    seed: int = field(default=42, metadata={
        "group": "run", "min": 0, "max": 2 ** 63 - 1,
        "help": "seed of every random choice (prompts, sampling, shuffling)"})
    device: str = field(default="auto", metadata={
        "group": "run", "choices": DEVICES, "help": "auto picks cuda when available"})
    threads: int | None = field(default=None, metadata={
        "group": "run", "min": 1, "max": 1024,
        "help": "torch CPU threads (default: 1 for the built-in tiny model, whose ops are too small to gain from "
                "more, else torch's default)"})
    run_dir: str | None = field(default=None, metadata={
        "group": "run", "help": "output run directory (default runs/<timestamp>)"})
    resume: str | None = field(default=None, metadata={
        "group": "run", "metavar": "RUN_DIR",
        "help": "continue a run from its last complete checkpoint (from step 0 of the same run when none is "
                "complete); a flag that changes what the run computes is refused unless --resume_override"})
    resume_override: bool = field(default=False, metadata={
        "group": "run",
        "help": "with --resume, accept flags that change what the run computes (batch size, dtype, reward, "
                "seed, schedule…); the changed fields are recorded in meta.json"})
    overwrite: bool = field(default=False, metadata={
        "group": "run", "help": "replace an existing run in --run_dir"})
    save_every: int = field(default=0, metadata={
        "group": "run", "min": 0, "help": "checkpoint every N steps (0: only at the end)"})
    save_model: bool = field(default=False, metadata={
        "group": "run",
        "help": "at the end of a finished run, export the trained policy and its tokenizer with save_pretrained "
                "into <run_dir>/model/ (loads with AutoModelForCausalLM.from_pretrained), the value head beside "
                "them in value_head.pt; off by default: a full copy of the weights per run (make train_full "
                "turns it on)"})
    # schedule
    epochs: int = field(default=3, metadata={
        "group": "schedule", "min": 1, "max": 10 ** 6, "help": "epochs of --steps_per_epoch PPO steps each"})
    steps_per_epoch: int = field(default=8, metadata={
        "group": "schedule", "min": 1, "max": 10 ** 6, "help": "PPO steps (rollout + update) per epoch"})
    batch_size: int = field(default=4, metadata={
        "group": "schedule", "min": 1, "max": MAX_BATCH,
        "help": "prompts per step (per process); its memory is estimated against the machine's before the "
                "models are built"})
    rollout_batch_size: int | None = field(default=None, metadata={
        "group": "schedule", "min": 1, "max": MAX_BATCH,
        "help": "generate in chunks of N prompts to cap KV-cache memory (default: batch_size)"})
    mini_batch_size: int | None = field(default=None, metadata={
        "group": "schedule", "min": 1, "max": MAX_BATCH,
        "help": "PPO minibatch size (default: batch_size); must divide batch_size"})
    ppo_epochs: int = field(default=4, metadata={
        "group": "schedule", "min": 1, "max": 1000, "help": "PPO passes over each batch"})
    # model and data
    model: str = field(default="tiny", metadata={
        "group": "model and data", "help": "'tiny' (built locally) or a from_pretrained name/path"})
    prompts: str | None = field(default=None, metadata={
        "group": "model and data", "metavar": "FILE",
        "help": "JSON list, JSONL with a 'prompt' field, or plain text one per line (default: built-in prompts)"})
    reward: str = field(default="sentiment", metadata={
        "group": "model and data", "help": f"{'|'.join(REWARD_NAMES)} or module:function"})
    heldout_reward: str | None = field(default=None, metadata={
        "group": "model and data", "metavar": "REWARD",
        "help": "a second reward, logged as reward/heldout but not optimised (a rise of the optimised reward while "
                "this one falls is reward hacking); same names as --reward"})
    dtype: str = field(default="fp32", metadata={
        "group": "model and data", "choices": DTYPES, "help": "weights dtype of policy and reference"})
    ref_device: str = field(default="same", metadata={
        "group": "model and data", "choices": REF_DEVICES, "help": "where the frozen reference lives"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "group": "model and data", "help": "recompute activations in the backward pass (less memory, more time)"})
    logprob_impl: str = field(default="auto", metadata={
        "group": "model and data", "choices": LOGPROB_IMPLS,
        "help": "torch: logits + log_softmax; chunked/triton: memory.logprobs (no full logits)"})
    old_logprobs: str = field(default="auto", metadata={
        "group": "model and data", "choices": OLD_LOGPROBS,
        "help": "old-policy log-probs and values from the hidden states kept while sampling (rollout, no second "
                "forward; GPT-2 models) or from a fresh forward (recompute); auto: rollout in fp32, recompute in "
                "bf16, where a cached decode differs from a full forward by more than the PPO ratio can ignore"})
    # sampling
    max_new_tokens: int = field(default=15, metadata={
        "group": "sampling", "min": 1, "max": 65536, "help": "response length cap in tokens"})
    temperature: float = field(default=1.0, metadata={
        "group": "sampling", "gt": 0.0, "help": "softmax temperature of sampling"})
    top_k: int = field(default=0, metadata={
        "group": "sampling", "min": 0, "help": "sample among the k most likely tokens (0: off)"})
    top_p: float = field(default=1.0, metadata={
        "group": "sampling", "gt": 0.0, "max": 1.0, "help": "nucleus sampling probability mass (1.0: off)"})
    rollout_dtype: str | None = field(default=None, metadata={
        "group": "sampling", "choices": DTYPES,
        "help": "sample in this precision, like an inference engine beside the trainer, and log the rollout vs "
                "trainer log-prob mismatch (rollout/* keys) every step; the old log-probs then come from a fresh "
                "forward in --dtype, one extra no-grad forward per step where they came from the sampler "
                "(default: sample in --dtype, mismatch not measured)"})
    # optimisation
    learning_rate: float = field(default=1e-5, metadata={
        "group": "optimisation", "gt": 0.0, "max": 1.0,
        "help": "AdamW learning rate (an update that still makes a weight non-finite is undone and skipped; "
                "3 in a row fail the run)"})
    max_grad_norm: float = field(default=5.0, metadata={
        "group": "optimisation", "gt": 0.0,
        "help": "gradient clipping threshold (the tiny model's pre-clip norm is about 2-4)"})
    weight_decay: float = field(default=0.01, metadata={
        "group": "optimisation", "min": 0.0,
        "help": "AdamW decoupled weight decay, on all parameters but biases and normalisation weights (as HF "
                "Trainer and TRL)"})
    weight_guard: str = field(default="restore", metadata={
        "group": "optimisation", "choices": WEIGHT_GUARDS,
        "help": "after each optimizer step the weights are checked for non-finite values (one reduction); "
                "restore: undo such a step from a copy kept before it (3 copies of the trained parameters in "
                "memory), 3 in a row fail the run; check: no copy, the run fails at the first one"})
    # PPO
    gamma: float = field(default=1.0, metadata={"group": "PPO", "min": 0.0, "max": 1.0, "help": "discount"})
    lam: float = field(default=0.95, metadata={"group": "PPO", "min": 0.0, "max": 1.0, "help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={
        "group": "PPO", "gt": 0.0, "help": "policy ratio clip: 1 ± cliprange"})
    cliprange_value: float = field(default=0.2, metadata={
        "group": "PPO", "gt": 0.0, "help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"group": "PPO", "min": 0.0, "help": "value loss weight"})
    ent_coef: float = field(default=0.0, metadata={"group": "PPO", "min": 0.0, "help": "entropy bonus (0: off)"})
    # KL penalty
    kl_coef: float = field(default=0.1, metadata={
        "group": "KL penalty", "min": 0.0, "help": "per-token KL penalty coefficient (initial if adaptive)"})
    adaptive_kl: bool = field(default=False, metadata={
        "group": "KL penalty", "help": "Ziegler et al. adaptive coefficient"})
    kl_target: float = field(default=6.0, metadata={
        "group": "KL penalty", "gt": 0.0, "help": "target KL (nats per sequence) of --adaptive_kl"})
    kl_horizon: int = field(default=10000, metadata={
        "group": "KL penalty", "min": 1, "help": "horizon (samples) of the --adaptive_kl controller"})
    kl_budget: float | None = field(default=None, metadata={
        "group": "KL penalty", "gt": 0.0,
        "help": "KL budget in nats/token: a warning above it, critical 2 steps above, a note above half (unset: 1.0)"})
    # observability
    no_tensorboard: bool = field(default=False, metadata={
        "group": "observability", "help": "do not write TensorBoard event files"})
    sample_interval: float = field(default=1.0, metadata={
        "group": "observability", "min": 0.0, "metavar": "SECONDS", "help": "system sampler period (0: off)"})
    profile: bool = field(default=False, metadata={
        "group": "observability", "help": "torch.profiler traces into <run>/traces"})
    profile_wait: int = field(default=1, metadata={
        "group": "observability", "min": 0, "help": "steps the profiler skips before each cycle"})
    profile_warmup: int = field(default=1, metadata={
        "group": "observability", "min": 0, "help": "steps the profiler warms up without recording"})
    profile_active: int = field(default=2, metadata={
        "group": "observability", "min": 1, "help": "steps recorded per trace"})
    profile_repeat: int = field(default=1, metadata={
        "group": "observability", "min": 0, "help": "profiler cycles (0: until the run ends)"})
    profile_full: bool = field(default=False, metadata={
        "group": "observability",
        "help": "also Python stacks and the memory timeline HTML in each trace (an export several times slower)"})
    # engine
    engine: str = field(default="local", metadata={
        "group": "engine", "choices": ENGINES,
        "help": "local: every stage in this process (or per torchrun rank); ray: generation, reference, reward and "
                "trainer as Ray actors on a local Ray cluster the run starts and stops (or the running cluster "
                "RAY_ADDRESS names), the weights sent from the trainer to the generation actor every step (the "
                "weight_sync phase); needs the [ray] extra"})
    ray_placement: str = field(default="colocated", metadata={
        "group": "engine", "choices": RAY_PLACEMENTS,
        "help": "with --engine ray: colocated puts the four actors in one placement-group bundle (sharing its CPU "
                "or GPU, as OpenRLHF's --colocate_all_models), separate gives each its own bundle"})
    off_policy_steps: int = field(default=0, metadata={
        "group": "engine", "min": 0, "max": 1,
        "help": "with --engine ray: 1 generates step t+1 while step t trains (OpenRLHF's --async_train, veRL's "
                "one-step-off-policy recipe), from weights one update old; the old log-probs are then recomputed "
                "by the trainer and the sampler's gap logged as rollout/*; 0: every step samples the weights it "
                "trains, the same numbers as --engine local"})
    # debugging
    inject_nan_step: int | None = field(default=None, metadata={
        "group": "debugging", "min": 1, "help": "make the reward of step N NaN (exercises the non-finite guard)"})
    debug_slow_rank: int | None = field(default=None, metadata={
        "group": "debugging", "min": 0,
        "help": "rank that sleeps --debug_slow_seconds each step (a straggler); with --engine ray the actor of that "
                "timeline rank: 1 rollout, 2 reference, 3 reward"})
    debug_slow_seconds: float = field(default=0.0, metadata={
        "group": "debugging", "min": 0.0, "help": "sleep of --debug_slow_rank per step"})
    debug_slow_from_step: int = field(default=1, metadata={
        "group": "debugging", "min": 1,
        "help": "first step --debug_slow_rank sleeps: a process that *becomes* slow after healthy steps, which "
                "diagnose can date against the process's own earlier steps"})
    # keys of a saved config this version does not know (kept on --resume); not a setting
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

    def debug_sleep(self, rank: int, step: int) -> None:
        """``--debug_slow_rank``: the named process sleeps inside its phase from ``--debug_slow_from_step`` on."""
        if self.debug_slow_rank == rank and self.debug_slow_seconds > 0 and step >= self.debug_slow_from_step:
            time.sleep(self.debug_slow_seconds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from ``meta.json``; keys this version does not know are kept under ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        cfg = cls(**known)
        cfg.extra = {**cfg.extra, **unknown}
        return cfg


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Setting:
    """One TrainConfig field as the command line and a config file see it: its flag, type and rules."""

    name: str
    kind: type
    optional: bool
    default: Any
    group: str
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def expected(self, upper: bool = True) -> str:
        """What a valid value is, in words, for the error messages; an integer's upper bound (a sanity cap)
        only with ``upper`` (the value went past it)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        if self.kind is int:
            top = self.max if upper else None
            if self.min == 1 and top is None:
                return "a positive integer"
            if self.min is not None and top is None:
                return f"an integer >= {_num(self.min)}"
            if self.min is not None and top is not None:
                return f"an integer in [{_num(self.min)}, {_num(top)}]"
            return "an integer"
        low = self.gt if self.gt is not None else self.min
        if low is not None and self.max is not None:
            return f"a number in {'(' if self.gt is not None else '['}{_num(low)}, {_num(self.max)}]"
        if self.gt is not None:
            return f"a number > {_num(self.gt)}"
        if self.min is not None:
            return f"a number >= {_num(self.min)}"
        return "a finite number"

    def parse(self, text: str) -> Any:
        """A flag's text → checked value; raises ``ValueError`` with the message argparse shows."""
        if self.kind in (int, float):
            try:
                value: Any = self.kind(text)
            except ValueError:
                raise ValueError(f"expected {self.expected()}, got {text!r}") from None
            return self.check(value, shown=text)
        return self.check(text)

    def check(self, value: Any, shown: str | None = None) -> Any:
        """A typed value (from a config file, a saved run or the parser) → the value; ``ValueError`` if invalid."""
        over = (isinstance(value, (int, float)) and not isinstance(value, bool) and self.max is not None
                and value > self.max)
        bad = ValueError(f"expected {self.expected(upper=over)}, got {shown if shown is not None else repr(value)}")
        if value is None:
            if self.optional:
                return None
            raise bad
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind is int:
            if not isinstance(value, int):
                raise bad
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if ((self.gt is not None and not value > self.gt) or (self.min is not None and value < self.min)
                or (self.max is not None and value > self.max)):
            raise bad
        return value

    def coerce(self, value: Any) -> Any:
        """A config-file value → checked value. Numbers may come as strings (YAML 1.1 reads ``1e-5`` as one)."""
        if isinstance(value, str) and self.kind in (int, float):
            return self.parse(value)
        return self.check(value)


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every command-line setting of :class:`TrainConfig`, in declaration order (``extra`` is not one)."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        kind, optional = hints[f.name], False
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"TrainConfig.{f.name}: one type (optionally | None) per setting, got {kind}")
            kind, optional = args[0], True
        if kind not in (int, float, str, bool):
            raise TypeError(f"TrainConfig.{f.name}: settings are int, float, str or bool, got {kind}")
        if kind is bool and f.default is not False:
            raise TypeError(f"TrainConfig.{f.name}: a bool setting defaults to False (its flag turns it on)")
        meta = dict(f.metadata)
        unknown = set(meta) - {"help", "group", "choices", "min", "max", "gt", "metavar"}
        if unknown or "help" not in meta or "group" not in meta:
            raise TypeError(f"TrainConfig.{f.name}: metadata needs help and group, knows no {sorted(unknown)}")
        out.append(Setting(name=f.name, kind=kind, optional=optional, default=f.default, group=meta["group"],
                           help=meta["help"], choices=tuple(meta["choices"]) if "choices" in meta else None,
                           min=meta.get("min"), max=meta.get("max"), gt=meta.get("gt"),
                           metavar=meta.get("metavar")))
    return tuple(out)


def _arg_type(setting: Setting) -> Callable[[str], Any]:
    """The argparse ``type`` of a numeric setting: its parse, with the message argparse prints on failure."""
    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = setting.kind.__name__
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where X says something: not for None or an off switch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults: bool = False, prog: str = "train.py") -> argparse.ArgumentParser:
    """The ``train.py`` parser, one flag per setting in its group; with ``suppress_defaults`` only flags given
    explicitly appear in the result."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a policy with PPO against a toy reward and write a run directory (see docs/runner.md).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS if suppress_defaults else None,
                   help="YAML or JSON mapping of settings (keys are the flag names without --); flags given on "
                        "the command line override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in settings():
        group = groups.get(s.group)
        if group is None:
            group = groups[s.group] = p.add_argument_group(s.group)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS if suppress_defaults else s.default,
                              "help": s.help.replace("%", "%%")}
        if s.kind is bool:
            kw["action"] = "store_true"
        elif s.choices:
            kw["choices"] = s.choices
        elif s.kind is not str:
            kw["type"] = _arg_type(s)
        if s.metavar:
            kw["metavar"] = s.metavar
        group.add_argument(s.flag, **kw)
    return p


def load_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Settings from a YAML or JSON file (JSON by the ``.json`` suffix), each checked as its flag would be;
    an unknown key is a one-line error that names it and the nearest setting."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        parser.error(f"argument --config: cannot read {path} ({err.strerror or err})")
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = " ".join(str(err).split())
        parser.error(f"argument --config: {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                     f"({first})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"argument --config: {path} must hold a mapping of settings, not a {type(data).__name__}")
    by_name = {s.name: s for s in settings()}
    values: dict[str, Any] = {}
    for key, value in data.items():
        setting = by_name.get(str(key))
        if setting is None:
            near = difflib.get_close_matches(str(key).replace("-", "_").lstrip("_"), by_name, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            parser.error(f"argument --config: unknown key {key!r} in {path}{hint}")
        try:
            values[setting.name] = setting.coerce(value)
        except ValueError as err:
            parser.error(f"argument {setting.flag} (from {path}): {err}")
    return values


def _check_reward(parser: argparse.ArgumentParser, name: str, flag: str = "--reward") -> None:
    """A built-in reward name or an importable ``module:function``, checked before any model is loaded."""
    if name in REWARD_NAMES:
        return
    if ":" not in name:
        parser.error(f"argument {flag}: unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)} "
                     "or give module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        parser.error(f"argument {flag}: cannot load {name!r} ({err})")
    if not callable(fn):
        parser.error(f"argument {flag}: {name!r} is not callable")


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
    return meta


def computation_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Settings of ``cfg`` that differ from a run's ``saved`` config and change what the run computes (all but
    :data:`RESUME_FREE`): {name: (saved, now)}. Keys the saved config lacks (older versions) are not compared."""
    now = cfg.to_dict()
    return {name: (saved[name], now[name]) for name in now
            if name not in RESUME_FREE and name != "extra" and name in saved and saved[name] != now[name]}


def check_resume_config(parser: argparse.ArgumentParser, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A resume continues the same computation: a changed setting that alters it is refused (one line naming
    every such field) unless ``--resume_override``; ``--epochs`` may grow but not below the steps done."""
    changed = computation_changes(saved, cfg)
    if changed and not cfg.resume_override:
        shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
        parser.error(f"argument --resume: {len(changed)} setting(s) differ from the run's and change what it "
                     f"computes: {shown}; pass --resume_override to resume with them anyway")
    found = latest_checkpoint(cfg.run_dir or "")
    done = found[0] if found is not None else 0
    if cfg.total_steps < done:
        parser.error(f"argument --epochs: {cfg.epochs} epoch(s) of {cfg.steps_per_epoch} step(s) is "
                     f"{cfg.total_steps} step(s), fewer than the {done} the run has done")


def check_settings(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    """Each setting's own rules (type, bounds, choices) on a built config: values that did not come through a
    flag (a resumed run's saved config, a config built in Python) get the same checks as flags do."""
    for s in settings():
        try:
            s.check(getattr(cfg, s.name))
        except ValueError as err:
            parser.error(f"argument {s.flag}: {err}")


def validate(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    """The per-setting checks, then the cross-flag ones argparse cannot express; each failure is one
    ``parser.error`` line."""
    check_settings(parser, cfg)
    if not cfg.model.strip():
        parser.error("argument --model: empty; give 'tiny' or a from_pretrained name or path")
    _check_reward(parser, cfg.reward)
    if cfg.heldout_reward is not None:
        _check_reward(parser, cfg.heldout_reward, "--heldout_reward")
    if cfg.prompts is not None:
        try:
            load_prompts(cfg.prompts)
        except PromptError as err:
            parser.error(f"argument --prompts: {err}")
    if cfg.batch_size % cfg.effective_mini_batch_size:
        parser.error(f"argument --mini_batch_size: {cfg.mini_batch_size} must divide --batch_size {cfg.batch_size}")
    if cfg.engine == "ray":
        if importlib.util.find_spec("ray") is None:
            parser.error("argument --engine: ray is not installed (pip install 'rlhf-systems-kit[ray]')")
    elif cfg.off_policy_steps:
        parser.error("argument --off_policy_steps: needs --engine ray")
    if cfg.debug_slow_seconds and cfg.debug_slow_rank is None:
        parser.error("argument --debug_slow_seconds: needs --debug_slow_rank")
    if cfg.debug_slow_from_step != 1 and cfg.debug_slow_rank is None:
        parser.error("argument --debug_slow_from_step: needs --debug_slow_rank")
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
    if (cfg.run_dir is not None and cfg.resume is None and not cfg.overwrite
            and (Path(cfg.run_dir) / "meta.json").exists()):
        parser.error(f"argument --run_dir: {cfg.run_dir} already holds a run; pass --overwrite or "
                     f"--resume {cfg.run_dir}")


def parse_args(argv: list[str] | None, prog: str = "train.py") -> TrainConfig:
    """Flags → validated TrainConfig. Precedence, lowest first: the defaults (with ``--resume``, the saved
    config), the ``--config`` file, the flags given explicitly."""
    parser = build_parser(prog=prog)
    args = parser.parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True, prog=prog).parse_args(argv))
    explicit.pop("config", None)
    from_file = load_config_file(parser, args.config) if args.config is not None else {}
    given = {**from_file, **explicit}
    resume = given.get("resume")
    values: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if resume is not None:
        saved = _check_resume(parser, resume)["config"]
        values.update(saved)
        if given.get("run_dir") is not None and Path(given["run_dir"]).resolve() != Path(resume).resolve():
            parser.error(f"argument --run_dir: {given['run_dir']} is not the resumed run {resume}; a resume "
                         "continues in its own folder (copy the folder first to branch it)")
    values.update(given)
    if resume is not None:  # the override holds for this resume only, never inherited from the saved config
        values.update(run_dir=resume, resume=resume, overwrite=False,
                      resume_override=bool(given.get("resume_override", False)))
    elif values.get("resume_override"):
        parser.error("argument --resume_override: needs --resume")
    cfg = TrainConfig.from_dict(values)
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    validate(parser, cfg)
    if resume is not None:
        check_resume_config(parser, saved, cfg)
    return cfg
