"""``memory.json`` of a run: the estimator's prediction for the run's settings next to the measured peaks.

Measured peaks come from the step records (``mem/<phase>_peak_bytes``, written by the profiler's PhaseTimer)
read through :class:`rlhf_core.runformat.run_reader.Run`; the runner's phases are folded onto the estimator's three
with :data:`memory.estimator.PHASE_MAP` (maximum over steps and over the runner phases of one estimator
phase). On CUDA those peaks are ``max_memory_allocated`` and compare directly with the prediction. On the CPU
the PhaseTimer records process RSS, which also holds the interpreter, libraries and allocator caches: the
file says so (``measured.method`` and ``comparable: false``) instead of pretending the numbers match.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlhf_core.runformat.keys import phase_of_mem_key
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import write_json_atomic
from rlhf_core.tiny_model import TINY_CONFIG

from .estimator import PHASE_MAP, StepSpec, predict, shape_from_config

FORMAT_VERSION = 1
DEFAULT_PROMPT_LEN = 16  # the built-in prompts are short sentences; override with train_config["prompt_len"]
RSS_METHOD = ("rss: PhaseTimer's process resident set size at each phase end (CPU); includes the interpreter, "
              "libraries and allocator caches, so it is an upper bound, not comparable with tensor bytes")
CUDA_METHOD = "cuda.max_memory_allocated per phase (PhaseTimer)"


def _device(train_config: dict[str, Any], meta: dict[str, Any]) -> str:
    dev = str(train_config.get("device") or "auto")
    if dev == "auto":
        dev = str((meta.get("env") or {}).get("device") or "cpu")
    return "cuda" if dev.startswith("cuda") else "cpu"


def spec_from_train_config(train_config: dict[str, Any], model_config: Any, device: str = "cpu") -> StepSpec:
    """A :class:`StepSpec` from the runner's TrainConfig dict (unknown keys ignored, missing ones defaulted)."""
    if model_config is None:

        model_config = TINY_CONFIG
    tc = train_config
    batch = int(tc.get("batch_size") or 4)
    impl = str(tc.get("logprob_impl") or "auto")
    if impl == "auto":
        impl = "triton" if device == "cuda" else "chunked"
    return StepSpec(
        model=shape_from_config(model_config),
        batch_size=batch,
        rollout_batch_size=tc.get("rollout_batch_size") or batch,
        train_batch_size=tc.get("mini_batch_size") or batch,
        prompt_len=int(tc.get("prompt_len") or (tc.get("extra") or {}).get("prompt_len") or DEFAULT_PROMPT_LEN),
        gen_len=int(tc.get("max_new_tokens") or 15),
        dtype=str(tc.get("dtype") or "fp32"),
        ref_device=str(tc.get("ref_device") or "same"),
        gradient_checkpointing=bool(tc.get("gradient_checkpointing")),
        logprob_impl=impl,
        device=device,
    )


def measured_peaks(run: Run) -> dict[str, Any] | None:
    """Max over steps of ``mem/<phase>_peak_bytes``, per runner phase and per estimator phase."""
    runner: dict[str, int] = {}
    for rec in run.metrics():
        for key, value in rec.items():
            phase = phase_of_mem_key(key)
            if phase is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                continue
            runner[phase] = max(runner.get(phase, 0), int(value))
    if not runner:
        return None
    phases: dict[str, int] = {}
    for phase, value in runner.items():
        mine = PHASE_MAP.get(phase)
        if mine is not None:
            phases[mine] = max(phases.get(mine, 0), value)
    return {"phases": phases, "runner_phases": runner, "peak_bytes": max(runner.values())}


def probe_peaks(spec: StepSpec) -> dict[str, Any]:
    """Tensor-byte peaks of one replayed step with the run's settings (GPT-2 shapes, random init)."""
    from .probe_step import measure_step

    peaks = measure_step(spec)
    return {"phases": {ph: r.peak_bytes for ph, r in peaks.items()},
            "peak_bytes": max(r.peak_bytes for r in peaks.values()),
            "method": "memory.probe_step replay of one step with the run's settings; "
                      f"{next(iter(peaks.values())).method}"}


def build_memory_report(run_dir: str | Path, train_config: dict[str, Any], model_config: Any,
                        probe: bool = False) -> dict[str, Any]:
    run = Run(run_dir)
    device = _device(train_config, run.meta)
    spec = spec_from_train_config(train_config, model_config, device)
    pred = predict(spec)
    measured = measured_peaks(run)
    if measured is not None:
        measured["method"] = CUDA_METHOD if device == "cuda" else RSS_METHOD
    report = {
        "format_version": FORMAT_VERSION,
        "device": device,
        "prediction": pred.to_dict(),
        "measured": measured,
        "comparable": bool(measured is not None and device == "cuda"),
        "phase_map": PHASE_MAP,
    }
    if probe:
        report["measured_probe"] = probe_peaks(spec)
    if measured is not None:
        report["ratio"] = {ph: (pred.phases[ph]["total"] / v if v else None) for ph, v in measured["phases"].items()}
    return report


def write_run_memory(run_dir: str | Path, train_config: dict[str, Any], model_config: Any,
                     probe: bool = False) -> dict[str, Any]:
    """Compute the prediction for the run's settings, take measured peaks from its records, write memory.json.

    With ``probe`` also replay one step of the run's shape and record its tensor-byte peaks as
    ``measured_probe`` (comparable with the prediction on the CPU, where the records hold RSS).
    """
    report = build_memory_report(run_dir, train_config, model_config, probe)
    write_json_atomic(Path(run_dir) / "memory.json", report)
    return report
