"""Triton kernels for one chunk of logits: fused log-softmax, gather of the sampled token, and entropy.

Forward reads each row of logits once (online log-sum-exp with a running max) and writes three floats per
row, so no log-softmax tensor is ever built; backward rebuilds ``p`` from the saved log-sum-exp and writes
the logits' gradient over the logits buffer in place. The head matmul stays in PyTorch (cuBLAS is hard to
beat); :mod:`memory.logprobs` chunks the tokens and calls :func:`chunk_forward` / :func:`chunk_backward`.

On the CPU the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` must be in the environment
before ``triton`` is first imported (the interpreter patches ``triton.language`` at import time).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

_KERNELS: dict[bool, tuple] = {}


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """True when ``triton`` imports (it may still need CUDA or the interpreter to run)."""
    try:
        pass
    except Exception:  # noqa: BLE001 - a broken triton install must only turn the fast path off
        return False
    return True


def check_usable(device: torch.device) -> None:
    """Raise a clear ValueError where the kernel cannot run on ``device``."""
    if not available():
        raise ValueError("impl='triton' needs the triton package; use impl='chunked'")
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpret_mode():
        return
    raise ValueError(f"impl='triton' runs on CUDA, or on the CPU only with TRITON_INTERPRET=1 in the environment "
                     f"before triton is imported; tensors are on {device.type} (use impl='chunked')")


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(logits_ptr, targets_ptr, logp_ptr, lse_ptr, ent_ptr, n_cols, row_stride, inv_temp,
                   WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * row_stride
        cols = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        t = tl.zeros([], tl.float32)  # sum_j e^(z_j - m) (z_j - m): every term <= 0, so H needs no cancellation
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            z = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)
            shift = tl.where(s > 0, m - m_new, 0.0)
            e = tl.where(mask, tl.exp(z - m_new), 0.0)
            d = tl.where(mask, z - m_new, 0.0)
            if WITH_ENTROPY:
                t = scale * (t + s * shift) + tl.sum(e * d, axis=0)
            s = s * scale + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(targets_ptr + row)
        z_t = tl.load(base + target).to(tl.float32) * inv_temp
        tl.store(logp_ptr + row, z_t - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, tl.log(s) - t / s)
        else:
            tl.store(ent_ptr + row, 0.0)

    @triton.jit
    def bwd_kernel(logits_ptr, grad_ptr, targets_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, n_cols,
                   row_stride, grad_stride, inv_temp, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * row_stride
        gbase = grad_ptr + row.to(tl.int64) * grad_stride
        cols = tl.arange(0, BLOCK)
        lse = tl.load(lse_ptr + row)
        g_logp = tl.load(g_logp_ptr + row)
        target = tl.load(targets_ptr + row)
        if WITH_ENTROPY:
            ent = tl.load(ent_ptr + row)
            g_ent = tl.load(g_ent_ptr + row)
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            logsm = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse
            p = tl.exp(logsm)
            if WITH_ENTROPY:
                g = -p * (g_logp + g_ent * (logsm + ent))
            else:
                g = -p * g_logp
            g = g + tl.where(idx == target, g_logp, 0.0)
            tl.store(gbase + idx, g * inv_temp, mask=mask)

    return fwd_kernel, bwd_kernel


def _kernels():
    key = interpret_mode()
    if key not in _KERNELS:
        _KERNELS[key] = _build()
    return _KERNELS[key]


def _block(n_cols: int) -> int:
    import triton

    return min(4096, triton.next_power_of_2(n_cols))


def chunk_forward(logits: Tensor, targets: Tensor, inv_temp: float,
                  with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) in fp32 of one chunk of raw logits [c, V]."""
    fwd, _ = _kernels()
    logits = logits.contiguous()
    rows, n_cols = logits.shape
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    if rows:
        fwd[(rows,)](logits, targets.contiguous(), logp, lse, ent, n_cols, logits.stride(0), float(inv_temp),
                     WITH_ENTROPY=with_entropy, BLOCK=_block(n_cols))
    return logp, lse, ent


def chunk_backward(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor,
                   g_ent: Tensor | None, inv_temp: float) -> Tensor:
    """Gradient (fp32) w.r.t. one chunk of raw logits; written over ``logits`` when that is fp32."""
    _, bwd = _kernels()
    logits = logits.contiguous()
    rows, n_cols = logits.shape
    grad = logits if logits.dtype == torch.float32 else torch.empty(logits.shape, dtype=torch.float32,
                                                                     device=logits.device)
    with_entropy = g_ent is not None
    if rows:
        bwd[(rows,)](logits, grad, targets.contiguous(), lse.contiguous(), entropy.contiguous(),
                     g_logp.contiguous(), (g_logp if g_ent is None else g_ent).contiguous(), n_cols,
                     logits.stride(0), grad.stride(0), float(inv_temp), WITH_ENTROPY=with_entropy,
                     BLOCK=_block(n_cols))
    return grad
