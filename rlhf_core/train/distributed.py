"""torch.distributed helpers for the runner: works the same with one process (no process group) or many.

Launched by ``torchrun`` the usual env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR…) are set; the
backend is gloo on the CPU and NCCL on CUDA.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from rlhf_core.runformat.clock import ClockOffset, measure_offset
from rlhf_core.runformat.keys import REDUCTIONS, reduction

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched with several processes; a no-op for one."""
    if not launched_by_torchrun():
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def measure_clock_offset(info: DistInfo) -> ClockOffset:
    """This rank's wall-clock offset to rank 0 (:mod:`rlhf_core.runformat.clock`); a collective, called once at
    start-up.

    NCCL moves only CUDA tensors, asynchronously, so host time stamps around it would measure the launch; the
    ping-pong then runs over a gloo group made for it (CPU tensors, so each time stamp follows the transfer).
    """
    if not info.enabled:
        return ClockOffset()
    return measure_offset(info.rank, info.world_size, host_group(info))


_HOST_GROUP: list = []


def host_group(info: DistInfo):
    """A process group over CPU tensors: the default one under gloo, else a gloo group made once (a
    collective the first time: every rank must call it at the same point)."""
    if not info.enabled or dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's slice of a list (strided, so every rank gets a share when len ≥ world size)."""
    return list(items[info.rank:: info.world_size])


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_metrics(metrics: Mapping[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Every numeric metric combined over ranks by its declared reduction (:func:`rlhf_core.runformat.keys.reduction`):
    means stay means, extremes stay extremes, throughput adds up. Keys must match on all ranks (the runner logs
    the same set). One collective per reduction kind present.

    Non-finite values stay non-finite (NaN propagates), so a NaN on one rank is not hidden.
    """
    if not info.enabled:
        return dict(metrics)
    groups: dict[str, list[str]] = {}
    for key in sorted(metrics):
        groups.setdefault(reduction(key), []).append(key)
    out: dict[str, float] = {}
    for how in REDUCTIONS:  # the same order on every rank
        keys = groups.get(how)
        if not keys:
            continue
        buf = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
        nan = None
        if how in ("max", "min"):  # a backend's max/min may drop a NaN: count them and put them back
            nan = torch.isnan(buf).to(torch.float64)
            buf = torch.nan_to_num(buf, nan=-math.inf if how == "max" else math.inf)
            dist.all_reduce(nan, op=dist.ReduceOp.SUM)
        dist.all_reduce(buf, op=_OPS[how])
        if how == "mean":
            buf /= info.world_size
        if nan is not None:
            buf[nan > 0] = math.nan
        out.update(zip(keys, buf.tolist()))
    return out


def all_gather_object(obj: T, info: DistInfo) -> list[T]:
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, info: DistInfo, src: int = 0) -> T:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def param_checksum(module: torch.nn.Module) -> float:
    """Float64 sum of every parameter: equal on all ranks exactly when DDP kept the replicas in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()))


def any_nonfinite(value: float, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when any rank saw a non-finite value (so all ranks skip the same step)."""
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    if info.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
