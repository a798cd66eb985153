"""The memory of one step checked against the machine before any model is built.

Why: a batch far too large for the machine used to run for tens of seconds (loading, tokenising) and then
abort in a native library, or swap the machine to a halt. The memory estimator (``memory.estimator``) predicts
a step's peak from the model's shape and the run's settings in microseconds, so the runner refuses such a
batch first, in one line naming the flags to lower.
"""
from __future__ import annotations

from typing import Any

import torch

from memory.estimator import predict
from memory.run_memory import spec_from_train_config
from rlhf_core.tiny_model import is_tiny, resolve_model_path
from rlhf_core.train.config import TrainConfig

MARGIN = 1.0  # refuse only what the estimate says cannot fit at all: the estimate is calibrated, not a bound


def _model_config(cfg: TrainConfig) -> Any:
    """The model's config without its weights (the tiny model's is a constant); None when it cannot be read
    (loading the model reports that)."""
    if is_tiny(cfg.model):
        return None  # memory.run_memory uses TINY_CONFIG for None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    except Exception:  # noqa: BLE001 - unreadable config: the model load gives the one-line error
        return False


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free bytes, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def step_memory_problem(cfg: TrainConfig, device: torch.device, available: int | None = None) -> str | None:
    """One line when the estimated peak of a step exceeds ``available`` (default: what the device has free),
    else None."""
    model_config = _model_config(cfg)
    if model_config is False:
        return None
    spec = spec_from_train_config(cfg.to_dict(), model_config, device="cuda" if device.type == "cuda" else "cpu")
    peak = predict(spec).peak_bytes
    free = available_bytes(device) if available is None else available
    if peak <= free * MARGIN:
        return None
    return (f"--batch_size {cfg.batch_size} with --max_new_tokens {cfg.max_new_tokens} needs an estimated "
            f"{_gib(peak)} per step on {device.type}, more than the {_gib(free)} free; lower --batch_size or "
            "--max_new_tokens, or set --mini_batch_size and --rollout_batch_size")
