"""Per-token log-probs and entropy of sampled tokens without the full ``b·s·V`` log-softmax.

The plain path (``impl="torch"``) materialises logits and log-softmax for every token: for a small model with
GPT-2's 50257-token vocabulary that is the largest tensor of an RLHF step. The chunked path runs the head
matmul over a few tokens at a time, keeps only the log-sum-exp and entropy per token, and recomputes each
chunk's logits in backward, so at most ``chunk_size × V`` logits are alive at once. ``impl="triton"`` uses the
same chunking with the softmax/gather/entropy fused in one Triton kernel per chunk (CUDA, or the CPU under
``TRITON_INTERPRET=1``). ``impl="auto"`` picks Triton on CUDA when it imports, the chunked path otherwise.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import triton_logprobs
from .chunking import CHUNK_ELEMENTS, default_chunk_size

IMPLS = ("auto", "torch", "chunked", "triton")
__all__ = ["CHUNK_ELEMENTS", "IMPLS", "default_chunk_size", "output_embedding", "resolve_impl", "token_logprobs"]


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` stands for on ``device`` (``auto`` resolved; unknown names refused)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown logprob impl {impl!r}; choose from {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if device.type == "cuda" and triton_logprobs.available():
        return "triton"
    return "chunked"


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float) -> None:
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., h] (e.g. [b, s, h]); got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, h] with h={hidden.shape[-1]}; got shape {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without h); "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids; got dtype {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V]={weight.shape[0]}; got shape {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"target ids must lie in [0, {weight.shape[0]}); got range [{lo}, {hi}]")


def _plain(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float,
           with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1) if with_entropy else None
    return logp, entropy


# ---- chunk kernels in plain PyTorch (the CPU path); the Triton module provides the same two functions.
def _torch_chunk_forward(logits: Tensor, targets: Tensor, inv_temp: float,
                         with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) of one chunk of raw logits [c, V]; ``logits`` may be overwritten."""
    z = logits.float().mul_(inv_temp)
    lse = torch.logsumexp(z, dim=-1)
    z.sub_(lse.unsqueeze(-1))  # z now holds log-softmax
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if with_entropy:
        entropy = -(z.exp() * z).sum(-1)
    else:
        entropy = torch.zeros_like(lse)
    return logp, lse, entropy


def _torch_chunk_backward(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor,
                          g_ent: Tensor | None, inv_temp: float) -> Tensor:
    """Gradient w.r.t. the raw logits [c, V] (fp32), built in the buffer of ``logits`` where possible.

    d logp_t/dz_k = δ_tk − p_k and dH/dz_k = −p_k (log p_k + H), with z = logits / temperature.
    """
    z = logits.float()
    z.mul_(inv_temp).sub_(lse.unsqueeze(-1))  # log-softmax
    p = z.exp()
    if g_ent is not None:
        z.add_(entropy.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1)).add_(g_logp.unsqueeze(-1))
    else:
        z.copy_(g_logp.unsqueeze(-1).expand_as(z))
    z.mul_(p).neg_()
    del p
    z.scatter_add_(-1, targets.unsqueeze(-1), g_logp.unsqueeze(-1))
    return z.mul_(inv_temp)


ChunkForward = Callable[[Tensor, Tensor, float, bool], tuple[Tensor, Tensor, Tensor]]
ChunkBackward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


class _ChunkedLogprobs(torch.autograd.Function):
    """Head matmul + log-softmax/gather/entropy over token chunks; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float,
                with_entropy: bool, chunk_size: int, fwd: ChunkForward, bwd: ChunkBackward):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = torch.nn.functional.linear(hidden[sl], weight, bias)
            logp[sl], lse[sl], entropy[sl] = fwd(logits, targets[sl], inv_temp, with_entropy)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temp, ctx.with_entropy, ctx.chunk_size, ctx.bwd = inv_temp, with_entropy, chunk_size, bwd
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None, _g_lse: Tensor | None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n = hidden.shape[0]
        if g_logp is None:
            g_logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        g_logp = g_logp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (g_ent is not None and ctx.with_entropy) else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, n, ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            logits = torch.nn.functional.linear(hidden[sl], weight, bias)
            g = ctx.bwd(logits, targets[sl], lse[sl], entropy[sl], g_logp[sl],
                        None if g_ent is None else g_ent[sl], ctx.inv_temp)
            del logits
            if grad_h is not None:
                grad_h[sl] = g.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t(), hidden[sl].float())
            if grad_b is not None:
                grad_b += g.sum(0)
            del g
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _chunked(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float,
             with_entropy: bool, chunk_size: int | None, fwd: ChunkForward,
             bwd: ChunkBackward) -> tuple[Tensor, Tensor | None]:
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).long().contiguous()
    size = chunk_size or default_chunk_size(weight.shape[0])
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    logp, entropy, _ = _ChunkedLogprobs.apply(flat_h, weight, bias, flat_t, 1.0 / temperature, with_entropy,
                                              size, fwd, bwd)
    return logp.reshape(lead), (entropy.reshape(lead) if with_entropy else None)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                   impl: str = "auto", temperature: float = 1.0, with_entropy: bool = True,
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Log-prob of ``targets`` and entropy under ``softmax((hidden @ weight.T + bias) / temperature)``.

    hidden [b, s, h] (any leading dims), weight [V, h], targets [b, s] already aligned with hidden.
    Returns fp32 ``logp`` [b, s] and ``entropy`` [b, s] (None when ``with_entropy`` is False). Gradients
    flow to hidden, weight and bias on every path.
    """
    impl = resolve_impl(impl, hidden.device)
    _check_inputs(hidden, weight, targets, bias, temperature)
    if impl == "torch":
        return _plain(hidden, weight, targets.long(), bias, temperature, with_entropy)
    if impl == "chunked":
        return _chunked(hidden, weight, targets, bias, temperature, with_entropy, chunk_size,
                        _torch_chunk_forward, _torch_chunk_backward)

    triton_logprobs.check_usable(hidden.device)
    return _chunked(hidden, weight, targets, bias, temperature, with_entropy, chunk_size,
                    triton_logprobs.chunk_forward, triton_logprobs.chunk_backward)


def output_embedding(model: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, h], bias or None) of a ``transformers`` causal LM's output head."""
    hf: Any = model  # a transformers PreTrainedModel; nn.Module types its attributes only as Tensor | Module
    head = hf.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)")
    return head.weight, getattr(head, "bias", None)
