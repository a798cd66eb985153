"""``rlhfkit memory``: ``plan`` (predict, fit a budget, suggest) and ``measure RUN_DIR`` (re-write memory.json).

Bad input is a one-line error and exit code 2, never a traceback. ``measure`` exits 0 when memory.json was
written (what the reader could not use in the run is a warning on stderr, at most five lines) and 2 when the
run cannot be read, its config is not an object or unusable, or memory.json cannot be written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .arch import builtin_names
from .estimator import OPTIMIZERS, Prediction, StepSpec, shape_from_config
from .planner import human, parse_bytes, plan, render, table

# GPT-2 family shapes, built from their published sizes (no download).
PRESETS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024),
}


class CliError(Exception):
    pass


def load_model_config(name: str) -> Any:
    """'tiny', a preset, a folder or config.json path, or a hub name already in the local cache."""
    from rlhf_core.tiny_model import is_tiny, tiny_model_path

    if is_tiny(name):  # the built model's own config (its vocabulary comes from the trained tokenizer)
        return json.loads((tiny_model_path() / "config.json").read_text())
    if name in PRESETS:
        return dict(PRESETS[name], model_type="gpt2")
    path = Path(name)
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CliError(f"--model {name}: unreadable config ({err})") from None
        if not isinstance(data, dict):
            raise CliError(f"--model {name}: config.json is not a JSON object")
        return data
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the kit never downloads a model
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - any loader failure is one line for the user
        raise CliError(f"--model {name}: not 'tiny', a preset ({', '.join(PRESETS)}), a built-in config "
                       f"({', '.join(n for n in builtin_names() if n not in PRESETS)}), a config.json or a "
                       f"loadable model folder ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help=f"tiny, {', '.join(PRESETS)}, a built-in config such as Llama-3-8B, Qwen2.5-7B or "
                        "Llama-3-70B (an unknown name lists them all), a model folder or a config.json")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per step (scored together)")
    p.add_argument("--rollout_batch_size", type=int, default=None, help="prompts generated together")
    p.add_argument("--mini_batch_size", type=int, default=None, help="train micro-batch of the update")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default fp32 for the single-device step, bf16 for deployments")
    p.add_argument("--mixed_precision", action="store_true", help="fp32 master weights and gradients")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    p.add_argument("--value", choices=("head", "critic", "none"), default="head")
    p.add_argument("--no_reference", action="store_true")
    p.add_argument("--ref_device", choices=("same", "cpu"), default="same")
    p.add_argument("--reward_model", action="store_true", help="a separate reward model of the policy's shape")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank")
    p.add_argument("--share_reference", action="store_true", help="with --lora: reference = base, adapters off")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--logprob_impl", choices=("auto", "torch", "chunked", "triton"), default="torch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="where the step runs")


def spec_from_args(a: argparse.Namespace) -> StepSpec:
    for name in ("batch_size", "rollout_batch_size", "mini_batch_size", "prompt_len", "max_new_tokens", "lora"):
        v = getattr(a, name)
        if v is not None and v < (0 if name == "lora" else 1):
            raise CliError(f"--{name} must be >= 1; got {v}")
    cfg = load_model_config(a.model)
    try:
        return StepSpec(
            model=shape_from_config(cfg), batch_size=a.batch_size, rollout_batch_size=a.rollout_batch_size,
            train_batch_size=a.mini_batch_size, prompt_len=a.prompt_len, gen_len=a.max_new_tokens,
            dtype=a.dtype or "fp32", master_weights=a.mixed_precision, optimizer=a.optimizer, value=a.value,
            reference=not a.no_reference,
            ref_device=a.ref_device, reward_model=a.reward_model, policy_training="lora" if a.lora else "full",
            lora_rank=a.lora or 8, share_reference=a.share_reference,
            gradient_checkpointing=a.gradient_checkpointing, logprob_impl=a.logprob_impl, device=a.device)
    except ValueError as err:
        raise CliError(str(err)) from None


def _plan(argv: list[str]) -> int:

    p = argparse.ArgumentParser(prog="rlhfkit memory plan",
                                description="Predict the memory of an RLHF step per component and phase, find the "
                                            "largest batches that fit a budget, and rank ways to save memory.")
    _spec_args(p)
    p.add_argument("--budget", default="16GiB", help="device memory budget, e.g. 16GiB, 80GB")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the JSON report to FILE (default: nowhere, so no stray memory.json lands in "
                        "the current folder)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    from . import deploy_cli  # lazy: deploy_cli imports this module

    deploy_cli.add_args(p)
    a = p.parse_args(argv)
    if deploy_cli.wanted(a):
        return _plan_deployment(a)
    try:
        budget = parse_bytes(a.budget)
    except ValueError as err:
        raise CliError(f"--budget: {err}") from None
    spec = spec_from_args(a)
    result = plan(spec, budget)
    report = {"format_version": 1, "device": spec.device, "prediction": result.prediction.to_dict(),
              "measured": None, "plan": result.to_dict()}
    if a.out not in (None, "-"):  # '-' kept from when the default was ./memory.json
        try:
            Path(a.out).write_text(json.dumps(report, indent=2))
        except OSError as err:
            raise CliError(f"--out {a.out}: cannot write ({err.strerror})") from None
    print(json.dumps(report, indent=2) if a.json else render(result))
    if a.out not in (None, "-") and not a.json:
        print(f"\nwrote {a.out}")
    return 0


def _plan_deployment(a: argparse.Namespace) -> int:
    """Multi-GPU deployment plan (memory/deploy.py); same --json/--out conventions as the step plan."""
    from . import deploy_cli  # lazy: deploy_cli imports this module

    try:
        report = deploy_cli.run(a)
    except (ValueError, OSError) as err:
        raise CliError(str(err).splitlines()[0][:300]) from None
    if a.out not in (None, "-"):
        try:
            Path(a.out).write_text(json.dumps(report, indent=2))
        except OSError as err:
            raise CliError(f"--out {a.out}: cannot write ({err.strerror})") from None
    print(json.dumps(report, indent=2) if a.json else deploy_cli.render(report))
    if a.out not in (None, "-") and not a.json:
        print(f"\nwrote {a.out}")
    return 0


def _measure(argv: list[str]) -> int:
    from rlhf_core.runformat.run_reader import Run, RunError, file_problem, summarize

    from .run_memory import write_run_memory

    p = argparse.ArgumentParser(prog="rlhfkit memory measure",
                                description="Re-write RUN_DIR/memory.json: prediction for the run's config next "
                                            "to the measured per-phase peaks of its records.")
    p.add_argument("run_dir")
    p.add_argument("--prompt_len", type=int, default=None, help="prompt tokens (default: 16, the built-in prompts)")
    p.add_argument("--probe", action="store_true",
                   help="also replay one step of the run's shape and measure its tensor bytes (GPT-2 models)")
    a = p.parse_args(argv)
    try:
        run = Run(a.run_dir)
        config = dict(run.meta.get("config") or {})
        run.metrics()  # read once here so the reader's problems can be shown; the report re-reads the run
    except RunError as err:
        raise CliError(str(err)) from None
    if "config" in run.meta_invalid:  # without the run's settings the prediction would be for some other run
        raise CliError(f"{run.meta_path}: config is not a JSON object, so the run's settings are unknown")
    target = Path(a.run_dir) / "memory.json"
    why = file_problem(target)
    if why is not None and why not in ("missing", "a symlink loop"):  # a loop is only a name: it is replaced
        raise CliError(f"{target}: is {why}; not overwritten")
    kept = _deployment_memory(target)
    if kept is not None:  # the TRL adapter's prediction for the trainer's own settings: never replaced
        print(kept)
        return 0
    if a.prompt_len:
        config["prompt_len"] = a.prompt_len
    model = str(config.get("model") or "tiny")
    model_cfg = load_model_config(model)
    try:
        report = write_run_memory(a.run_dir, config, model_cfg, probe=a.probe)
    except RunError as err:
        raise CliError(str(err)) from None
    except (ValueError, TypeError, OverflowError) as err:  # a config value of the wrong type (batch_size: "four")
        raise CliError(f"{run.meta_path}: config cannot be used ({type(err).__name__}: {str(err)[:160]})") from None
    except OSError as err:
        raise CliError(f"{target}: cannot write ({err.strerror or err})") from None
    for problem in summarize(run.problems()):
        print(f"warning: {problem}", file=sys.stderr)
    pred = report["prediction"]
    print(table(Prediction(pred["phases"], pred["peak_phase"], pred["peak_bytes"])))
    meas = report["measured"]
    if meas is None:
        print("measured: none (the run's records have no mem/<phase>_peak_bytes)")
    else:

        print("measured: " + ", ".join(f"{ph} {human(v)}" for ph, v in sorted(meas["phases"].items()))
              + f"  [{meas['method'].split(':')[0]}]")
    if "measured_probe" in report:

        print("measured (probe replay, tensor bytes): " + ", ".join(
            f"{ph} {human(v)}" for ph, v in report["measured_probe"]["phases"].items()))
    print(f"wrote {target}")
    return 0


def _deployment_memory(path: Path) -> str | None:
    """What to print for a memory.json the TRL adapter wrote (``kind: deployment``), or None for any other.

    Its prediction was made from the trainer's live arguments and model, which the run's config only partly
    records, so ``measure`` shows it (and the CUDA peaks the adapter measured next to it) instead of
    re-predicting the run as if the kit's runner had made it."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("kind") != "deployment":
        return None

    pred = report.get("prediction") or {}
    phases = pred.get("phases") or {}
    lines = [f"{path}: the TRL adapter's prediction (per GPU), kept as written at train start"]
    for ph, comps in phases.items():
        lines.append(f"  {ph:<15} {human(comps.get('total', 0)):>11}  " + ", ".join(
            f"{c} {human(v)}" for c, v in comps.items() if c != "total"))
    lines.append(f"  peak {human(pred.get('peak_bytes', 0))} in {pred.get('peak_phase')}; device "
                 f"{human(report.get('device_memory_bytes', 0))} ({report.get('device_memory_source')})")
    meas = report.get("measured")
    if isinstance(meas, dict) and meas.get("phases"):
        lines.append("  measured: " + ", ".join(f"{ph} {human(v)}" for ph, v in meas["phases"].items())
                     + f"  [{str(meas.get('method', '')).split(' ')[0]}]")
    else:
        lines.append("  measured: none (the adapter measures per-phase peaks on CUDA only)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    usage = "usage: rlhfkit memory {plan,measure} ...  (rlhfkit memory plan --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("  plan      predict a step's memory, fit a budget, rank savings (--out FILE: the JSON too)")
        print("  measure   re-write RUN_DIR/memory.json from the run's config and records")
        return 0
    commands = {"plan": _plan, "measure": _measure}
    if argv[0] not in commands:
        print(f"rlhfkit memory: unknown subcommand {argv[0]!r}; choose plan or measure", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except CliError as err:
        print(f"rlhfkit memory {argv[0]}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
