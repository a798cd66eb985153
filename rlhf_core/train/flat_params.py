"""The trained parameters as views into one contiguous buffer, their gradients as views into another.

Why: the small models RLHF experiments start with have dozens of tensors and little arithmetic in each, so
every per-tensor op (AdamW, gradient clipping, the per-block gradient-norm and drift probes) costs more in
dispatch than in maths. Over one buffer each of those is a handful of ops (Megatron-LM and DeepSpeed keep
contiguous buffers for the same reason). The ``Parameter`` objects stay the same, so modules, DDP and
``state_dict`` see nothing new; only their storage moves. Gradients exist from a step's first backward to its
end, as with ``zero_grad(set_to_none=True)``, so the memory a step needs does not change.

Layout: parameters the reference shares (same name and shape) first, then the rest (the value head), each
part ordered by block, so every (block, shared) group is one contiguous segment. The frozen reference's
shared parameters are moved into a buffer of their own in the same layout, so drift is one subtraction.

Weight decay: one AdamW over the buffer would shrink biases and normalisation weights too, which HF's
``Trainer`` and TRL leave alone (decay pulls a LayerNorm gain towards 0, not towards its neutral 1).
:meth:`FlatParams.adamw` decays only the other parameters, in one fused op over their views.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf_core.train.probes import block_drift, block_of


@dataclass(frozen=True)
class Segment:
    block: str
    start: int
    end: int
    shared: bool  # present in the reference (counts for drift)


def _flatten_into(tensors: Sequence[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """A new buffer holding ``tensors`` back to back; each tensor's storage becomes its slice of it."""
    first = tensors[0]
    buffer = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
    start = 0
    with torch.no_grad():
        for t, n in zip(tensors, sizes):
            view = buffer[start: start + n]
            view.copy_(t.detach().reshape(-1))
            t.data = view.view_as(t)
            start += n
    return buffer


def no_decay_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters weight decay must not touch, chosen as HF ``Trainer`` chooses them: biases, and every
    parameter of a normalisation layer (``nn.LayerNorm`` or any module class named ``*Norm``, e.g. RMSNorm)."""
    out: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        is_norm = isinstance(mod, nn.LayerNorm) or type(mod).__name__.lower().endswith("norm")
        for name, p in mod.named_parameters(recurse=False):
            if is_norm or name.endswith("bias"):
                out[id(p)] = p
    return list(out.values())


class FlatAdamW(torch.optim.AdamW):
    """AdamW over the flat buffer whose decoupled weight decay, θ ← θ·(1 − lr·wd) before the Adam update (what
    ``torch.optim.AdamW`` does), applies only to ``decayed`` (views into the buffer): the same numbers as AdamW
    with a no-decay parameter group, without splitting the buffer. Its param group keeps ``weight_decay`` 0."""

    def __init__(self, buffer: torch.Tensor, decayed: Sequence[torch.Tensor], *, lr: float, weight_decay: float,
                 **kwargs: Any):
        super().__init__([buffer], lr=lr, weight_decay=0.0, **kwargs)
        self.decayed = list(decayed)
        self.masked_weight_decay = float(weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        lr = self.param_groups[0]["lr"]
        if self.masked_weight_decay and self.decayed:
            torch._foreach_mul_(self.decayed, 1.0 - lr * self.masked_weight_decay)
        return super().step(closure)

    def load_state_dict(self, state_dict: dict) -> None:
        """A state saved by a plain AdamW (decay in its param group) must not bring that decay back here."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["weight_decay"] = 0.0


class FlatParams:
    """Trainable parameters of ``module`` in one buffer, with the gradient and probe maths done over it.

    ``ref_params`` maps the module's parameter names to the frozen reference's tensors (drift's anchor).
    """

    def __init__(self, module: nn.Module, ref_params: Mapping[str, torch.Tensor]):
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        kinds = {(p.device, p.dtype) for _, p in named}
        if len(kinds) > 1:
            raise ValueError("trainable parameters span several devices or dtypes: "
                             + ", ".join(sorted(f"{d}/{t}" for d, t in {(str(a), str(b)) for a, b in kinds})))
        blocks: dict[str, int] = {}
        for n, _ in named:
            blocks.setdefault(block_of(n), len(blocks))
        shared = {n for n, p in named if n in ref_params and ref_params[n].shape == p.shape}
        named.sort(key=lambda item: (item[0] not in shared, blocks[block_of(item[0])]))  # stable: module order
        self.params = [p for _, p in named]
        self.sizes = [p.numel() for p in self.params]
        self.data = nn.Parameter(_flatten_into(self.params, self.sizes))
        self.segments: list[Segment] = []
        start = 0
        for (name, _), size in zip(named, self.sizes):
            block, is_shared = block_of(name), name in shared
            last = self.segments[-1] if self.segments else None
            if last is not None and last.block == block and last.shared == is_shared:
                self.segments[-1] = Segment(block, last.start, start + size, is_shared)
            else:
                self.segments.append(Segment(block, start, start + size, is_shared))
            start += size
        self.blocks = list(blocks)
        # a block is one segment unless the reference shares only part of it: then its norm sums two
        seg_block = [blocks[seg.block] for seg in self.segments]
        self._seg_block = (None if len(set(seg_block)) == len(seg_block)
                           else torch.tensor(seg_block, device=self.data.device))
        self._seg_names = [seg.block for seg in self.segments] if self._seg_block is None else self.blocks
        self._init_reference([ref_params[n] for n, _ in named if n in shared], {n: ref_params[n] for n in shared})
        skip = {id(p) for p in no_decay_parameters(module)}
        self.decayed = [p for p in self.params if id(p) not in skip]

    def adamw(self, *, lr: float, weight_decay: float, **kwargs: object) -> FlatAdamW:
        """The optimizer of the buffer: AdamW, with weight decay on all but biases and norm weights."""
        return FlatAdamW(self.data, self.decayed, lr=lr, weight_decay=weight_decay, **kwargs)

    # ------------------------------------------------------------------ reference
    def _init_reference(self, ref: list[torch.Tensor], ref_named: dict[str, torch.Tensor]) -> None:
        """``ref``: the shared reference tensors in buffer order."""
        self._ref_named = ref_named
        same_place = all(r.device == self.data.device and r.dtype == self.data.dtype for r in ref)
        ref_storages = {r.untyped_storage().data_ptr() for r in ref}
        self.ref_data: torch.Tensor | None = None
        if ref and same_place and len(ref_storages) == len(ref):  # tied reference tensors cannot be re-laid
            self.ref_data = _flatten_into(ref, [r.numel() for r in ref])
            shared_segs = [seg for seg in self.segments if seg.shared]  # one per block: blocks are contiguous
            self._drift_blocks = [seg.block for seg in shared_segs]
            self._drift_slices = [(seg.start, seg.end) for seg in shared_segs]
            self._ref_views = [self.ref_data[a:b] for a, b in self._drift_slices]
            with torch.no_grad():  # the reference is frozen: its norms once
                self._ref_norms = [max(v, 1e-12) for v in torch.stack(torch._foreach_norm(self._ref_views)).tolist()]
                self._ref_total = max(math.sqrt(sum(v * v for v in self._ref_norms)), 1e-12)

    # ------------------------------------------------------------------ gradients
    def open_grads(self) -> None:
        """Zeroed gradient buffer with every parameter's ``.grad`` a view of it (backward accumulates in place)."""
        grad = torch.zeros_like(self.data)
        self.data.grad = grad
        start = 0
        for p, n in zip(self.params, self.sizes):
            p.grad = grad[start: start + n].view_as(p)
            start += n

    def zero_grads(self) -> None:
        if self.data.grad is None:
            self.open_grads()
        else:
            self.data.grad.zero_()

    def release_grads(self) -> None:
        """Free the gradients (end of a step), as ``zero_grad(set_to_none=True)`` would."""
        self.data.grad = None
        for p in self.params:
            p.grad = None

    def grad_norms(self) -> tuple[float, dict[str, float]]:
        """Total and per-block L2 norms of the current gradients (before clipping); one host sync."""
        grad = self.data.grad
        if grad is None:
            return 0.0, {}
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm([grad[s.start: s.end] for s in self.segments])).float()
            if self._seg_block is not None:
                norms = norms.new_zeros(len(self.blocks)).index_add_(0, self._seg_block, norms.square()).sqrt()
            values = norms.tolist()  # the total from these few numbers on the host: fewer ops than on tensors
        return math.sqrt(sum(v * v for v in values)), dict(zip(self._seg_names, values))

    def clip_grads(self, max_norm: float, total: float | None = None) -> float:
        """Scale the gradients to L2 norm ``max_norm`` at most; returns the pre-clip norm.

        ``clip_grad_norm_``'s rule (coefficient max_norm / (norm + 1e-6)) without its grouping of tensors by
        device and dtype, which costs more than the maths on one buffer. ``total``: the norm, when the caller
        has it already (from :meth:`grad_norms`). A non-finite norm leaves the gradients as they are: the
        caller skips that optimizer step.
        """
        grad = self.data.grad
        if grad is None:
            return 0.0
        with torch.no_grad():
            if total is None:
                total = torch.linalg.vector_norm(grad, dtype=torch.float32).item()
            if total > max_norm and math.isfinite(total):
                grad.mul_(max_norm / (total + 1e-6))
        return total

    # ------------------------------------------------------------------ drift
    def drift(self) -> tuple[float, dict[str, float]]:
        """‖θ−θ_ref‖/‖θ_ref‖ overall and per block over the shared parameters (``probes.block_drift``'s
        numbers); one subtraction, one fused norm, one host sync."""
        if self.ref_data is None:  # reference on another device or dtype: the per-tensor probe
            return block_drift(self.module, self._ref_named)
        with torch.no_grad():
            cur = self.data.detach()
            diffs = torch._foreach_sub([cur[a:b] for a, b in self._drift_slices], self._ref_views)
            d = torch.stack(torch._foreach_norm(diffs)).tolist()
        total = math.sqrt(sum(v * v for v in d)) / self._ref_total
        return total, {b: v / n for b, v, n in zip(self._drift_blocks, d, self._ref_norms)}
