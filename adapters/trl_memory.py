"""The TRL adapter's memory prediction: the trainer's per-GPU bytes from its args and live model, at train start.

Why here and not in the callback: the prediction must never break training, so it is one call the callback
wraps in a single ``try`` (any failure is one warning line). The deployment comes from the same reader as
``rlhfkit memory plan --trl_config`` (:func:`memory.inputs.trl_deployment`), fed with ``args.to_dict()``;
the model's shape comes from the live model's config and its parameter count is exact (counted on the live
model, tied weights once, PEFT adapters excluded from the base).

Device memory: CUDA: ``torch.cuda.get_device_properties(device).total_memory``; CPU: the machine's total RAM
(``psutil.virtual_memory().total``), since a CPU run runs out of RAM. Tests (or users planning for a smaller
device) override it with ``device_memory=`` or ``RLHFKIT_DEVICE_MEMORY`` (e.g. ``"1MiB"``).

Measured peaks (CUDA only): ``torch.cuda.max_memory_allocated`` read and reset at the end of each of TRL's
spans and around the optimizer step, so each phase's peak is the peak since the previous span ended; spans
inside ``compute_loss`` count as the update; folded onto the planner's phases with :data:`PHASE_MAP`. On the
CPU nothing comparable exists (RSS holds the whole process), so ``measured`` stays ``None`` and ``comparable``
false.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from memory.arch import Arch, arch_from_config
from memory.deploy import PHASES, Deployment, plan_deployment, trl_head
from memory.deploy_json import deployment_to_dict
from memory.inputs import sharding_from_trl_args, trl_deployment
from memory.planner import parse_bytes

from .mapping import trl_profile_phase
from .trl_profiling import Span

FORMAT_VERSION = 1
ENV_DEVICE_MEMORY = "RLHFKIT_DEVICE_MEMORY"
# the adapter's phases (adapters.mapping.TRL_PROFILE_PHASES, the update and the optimizer) -> planner phases
PHASE_MAP = {"rollout": "generation", "reward": "scoring", "ref_logprobs": "scoring", "update": "update",
             "optimizer": "optimizer_step", "weight_sync": "weight_sync"}
CUDA_METHOD = ("cuda.max_memory_allocated since the previous TRL span ended (compute_loss and spans inside it: "
               "update), up to the optimizer step (update), over the step (optimizer); max over steps")
GENERATING = ("GRPO", "RLOO")


def _trl_version() -> str | None:
    """The installed TRL's version (its GRPO head differs by version, memory.deploy.TRL_HEAD)."""
    try:
        import trl
    except ImportError:
        return None
    return str(trl.__version__)


def live_arch(model: Any) -> Arch:
    """The planner's shape of a live transformers model (PEFT-wrapped or not), its base parameters counted
    exactly on the model (shared tensors once, LoRA adapters not part of the base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.to_dict()
    arch = arch_from_config(cfg, name=str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"))
    seen: dict[int, int] = {}
    largest = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if "lora_" in name or "modules_to_save" in name:
            continue
        seen[id(p)] = p.numel()
        largest = max(largest, p.numel())
    return replace(arch, params=sum(seen.values()), largest_param=largest or arch.largest_param)


def _lora(model: Any) -> tuple[int, bool]:
    """(LoRA rank, 4-bit base) of a PEFT model; (0, False) for a plain one."""
    cfgs = getattr(model, "peft_config", None) or {}
    rank = 0
    for c in dict(cfgs).values():
        rank = max(rank, int(getattr(c, "r", 0) or 0))
    return rank, bool(getattr(model, "is_loaded_in_4bit", False))


def device_memory(device: str, override: int | str | None = None) -> tuple[int, str]:
    """(bytes, where from) of the memory the prediction is compared with (see the module docstring)."""
    if override is None:
        override = os.environ.get(ENV_DEVICE_MEMORY) or None
    if override is not None:
        return (override if isinstance(override, int) else parse_bytes(override)), "override"
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory), "cuda total_memory"
    import psutil

    return int(psutil.virtual_memory().total), "cpu: psutil total RAM"


def trainer_deployment(args: Any, model: Any, trainer_name: str, gpu_memory: int,
                       prompt_len: int | None = None, device: str = "cuda") -> tuple[Deployment, dict[str, Any]]:
    """The deployment of this trainer on its processes, and the inputs it was built from. ``device``: where it
    trains (TRL's fused log-prob head folds its tiles in a Triton kernel on CUDA/XPU, with torch ops elsewhere)."""
    cfg = {k: v for k, v in args.to_dict().items()}
    arch = live_arch(model)
    lora, four_bit = _lora(model)
    dtype_bytes = next(iter(model.parameters())).element_size()
    gpus = int(getattr(args, "world_size", 1) or 1)
    kind = next((k for k in GENERATING if k in trainer_name), "DPO" if "DPO" in trainer_name else "plain")
    if kind == "DPO":
        # chosen and rejected go through one forward; a reference unless PEFT or precomputed log-probs
        length = int(cfg.get("max_length") or 1024)
        cfg.update(per_device_train_batch_size=2 * int(cfg.get("per_device_train_batch_size") or 1),
                   max_prompt_length=max(1, length - 1), max_completion_length=1,
                   beta=0.0 if cfg.get("precompute_ref_log_probs") else cfg.get("beta"), use_vllm=False)
    elif kind == "plain":
        length = int(cfg.get("max_length") or cfg.get("max_seq_length") or 1024)
        cfg.update(max_prompt_length=max(1, length - 1), max_completion_length=1, beta=0.0, use_vllm=False)
    dep = trl_deployment(cfg, arch, gpus=gpus, sharding=sharding_from_trl_args(cfg), gpu_memory=gpu_memory,
                         gpus_per_node=gpus, dtype_bytes=dtype_bytes, lora_rank=lora, load_in_4bit=four_bit,
                         prompt_len=prompt_len if kind in GENERATING else None, trl_version=_trl_version())
    if kind in GENERATING:
        dep = dep.with_(rollout_per_gpu=max(dep.rollout_per_gpu, int(cfg.get("num_generations") or 1)),
                        logprob_head=trl_head(_trl_version(), triton=device.startswith(("cuda", "xpu"))))
    else:  # the loss covers every token, not a completion: the reference fp32 log-softmax head
        dep = dep.with_(logprob_head="torch")
    if dtype_bytes == 4 and (cfg.get("bf16") or cfg.get("fp16")):  # the Trainer runs under torch autocast
        dep = dep.with_(autocast_bytes=2)
    inputs = {"trainer": trainer_name, "kind": kind, "world_size": gpus, "model": arch.name,
              "family": arch.family, "params": arch.params, "dtype_bytes": dtype_bytes, "lora_rank": lora,
              "load_in_4bit": four_bit, "reference": dep.reference is not None, "sharding": dep.sharding.kind,
              "offload_optimizer": dep.sharding.offload_optimizer, "offload_params": dep.sharding.offload_params,
              "engine": dep.engine.kind, "engine_group": dep.engine.group,
              "vllm_gpu_memory_utilization": dep.engine.gpu_memory_utilization if dep.engine.kind != "hf" else None,
              "micro_batch": dep.micro_batch, "grad_accum": dep.grad_accum, "rollout_per_gpu": dep.rollout_per_gpu,
              "prompt_len": dep.prompt_len, "response_len": dep.response_len,
              "prompt_len_from": "argument" if prompt_len else ("max_prompt_length" if cfg.get("max_prompt_length")
                                                                else "default 512 (TRL does not cut prompts)"),
              "gradient_checkpointing": dep.gradient_checkpointing, "attn": dep.attn, "optimizer": dep.optimizer,
              "logprob_head": dep.logprob_head, "autocast_bytes": dep.autocast_bytes,
              **{k: cfg.get(k) for k in ("bf16", "fp16", "beta", "num_generations", "vllm_mode")}}
    return dep, inputs


def predict_trainer(args: Any, model: Any, trainer_name: str, device: str,
                    device_memory_override: int | str | None = None, prompt_len: int | None = None) -> dict[str, Any]:
    """The ``memory.json`` report of a TRL/transformers trainer at train start (prediction, no measurement)."""
    t0 = time.perf_counter()
    total, source = device_memory(device, device_memory_override)
    dep, inputs = trainer_deployment(args, model, trainer_name, total, prompt_len, device)
    report = deployment_report(dep, inputs, device, source, generating=inputs["kind"] in GENERATING)
    report["seconds"] = round(time.perf_counter() - t0, 4)
    return report


def deployment_report(dep: Deployment, inputs: dict[str, Any], device: str = "cpu", memory_source: str = "plan",
                      generating: bool = True) -> dict[str, Any]:
    """``memory.json`` for a deployment: the actor group's component x phase bytes per GPU (the format the
    dashboard's memory tab draws), the device comparison and the deployment itself (for its what-if)."""
    plan = plan_deployment(dep)
    group = next(g for g in plan.groups if g.name == dep.actor.group)
    phases = [ph for ph in PHASES if generating or ph != "generation"]
    table = {ph: {comp: row[ph] for comp, row in group.table.items() if row[ph]} for ph in phases}
    for ph in phases:
        table[ph]["total"] = group.totals[ph]
    peak_phase = max(phases, key=lambda ph: group.totals[ph])
    peak = group.totals[peak_phase]
    return {"format_version": FORMAT_VERSION, "kind": "deployment", "source": "adapters.trl",
            "device": "cuda" if device.startswith("cuda") else "cpu",
            "prediction": {"phases": table, "peak_phase": peak_phase, "peak_bytes": peak, "group": group.name,
                           "per": "GPU (process)"},
            "device_memory_bytes": dep.gpu_memory, "device_memory_source": memory_source,
            "fits_device": peak <= dep.gpu_memory, "inputs": inputs, "deployment": deployment_to_dict(dep),
            "measured": None, "comparable": False, "phase_map": PHASE_MAP, "notes": plan.notes}


class PhasePeaks:
    """Per-phase peaks of ``max_allocated``, max over steps. ``mark`` reads the peak since the previous mark and
    resets it; TRL's spans are marked when they end and attributed by :meth:`fold` once the update's
    ``compute_loss`` spans are known (a log-prob pass inside ``compute_loss`` is the update's forward)."""

    def __init__(self, max_allocated: Callable[[], int], reset: Callable[[], None]):
        self._max, self._reset = max_allocated, reset
        self.peaks: dict[str, int] = {}
        self._marks: list[tuple[Span, int]] = []

    @classmethod
    def cuda(cls, device: str) -> PhasePeaks:
        import torch

        dev = torch.device(device)
        return cls(lambda: int(torch.cuda.max_memory_allocated(dev)), lambda: torch.cuda.reset_peak_memory_stats(dev))

    def mark(self) -> int:
        value = self._max()
        self._reset()
        return value

    def add(self, phase: str, value: int) -> None:
        self.peaks[phase] = max(self.peaks.get(phase, 0), value)

    def span_ended(self, span: Span) -> None:
        self._marks.append((span, self.mark()))

    def fold(self) -> None:
        """Attribute the marked spans: ``compute_loss`` and spans inside it to ``update``, others to their phase
        (spans of no phase, such as ``_prepare_inputs``' tail, to none)."""
        losses = [s for s, _ in self._marks if s.short == "compute_loss"]
        for span, value in self._marks:
            inside = span.short == "compute_loss" or any(span.inside(loss) for loss in losses)
            phase = "update" if inside else trl_profile_phase(span.name)
            if phase is not None:
                self.add(phase, value)
        self._marks = []

    def measured(self) -> dict[str, Any] | None:
        if not self.peaks:
            return None
        folded: dict[str, int] = {}
        for phase, value in self.peaks.items():
            mine = PHASE_MAP.get(phase)
            if mine is not None:
                folded[mine] = max(folded.get(mine, 0), value)
        return {"phases": folded, "runner_phases": dict(self.peaks), "peak_bytes": max(self.peaks.values()),
                "method": CUDA_METHOD}


def with_measured(report: dict[str, Any], peaks: PhasePeaks) -> dict[str, Any]:
    """The report with CUDA peaks next to the prediction, and predicted/measured ratio per phase."""
    measured = peaks.measured()
    if measured is None:
        return report
    pred = report["prediction"]["phases"]
    ratio = {ph: (pred[ph]["total"] / v if v and ph in pred else None) for ph, v in measured["phases"].items()}
    return {**report, "measured": measured, "comparable": True, "ratio": ratio}
