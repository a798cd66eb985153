"""A lean GPT-2 forward for sampling (nanoGPT style) over the model's own weight tensors.

Why: at the sizes RLHF experiments start with, a decode step of ``transformers``' GPT-2 is dominated by
Python module overhead, not arithmetic; rollout is the largest phase of a step. This path runs the same
maths (pre-LN blocks, Conv1D projections, scaled dot-product attention, tied head) in a few fused calls per
layer with a preallocated KV cache. It shares the parameters (no copy), so it always samples from the
current policy. Only plain GPT-2 configs qualify (:func:`supports`); everything else uses the HF modules.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def supports(model: nn.Module) -> bool:
    """True for a plain ``GPT2LMHeadModel`` whose maths this module reproduces exactly."""
    cfg = getattr(model, "config", None)
    return (
        type(model).__name__ == "GPT2LMHeadModel"
        and getattr(cfg, "model_type", None) == "gpt2"
        and not getattr(cfg, "add_cross_attention", False)
        and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        and not getattr(cfg, "reorder_and_upcast_attn", False)
        and getattr(cfg, "scale_attn_weights", True)
        and getattr(cfg, "activation_function", None) in _ACTIVATIONS
    )


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D: x @ W + b with W stored as [in, out]."""
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)


class GPT2Decoder:
    """Prefill + one-token steps with a static KV cache of ``max_len`` positions.

    ``dtype`` other than the weights' decodes with a cast copy of the weights (made once per decoder, i.e. per
    rollout chunk), like an inference engine next to the trainer; the KV cache and hidden states take that dtype.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain GPT-2 model")
        hf: Any = model  # a transformers GPT2LMHeadModel; nn.Module types its submodules only as Tensor | Module
        cfg = hf.config
        self.tf = hf.transformer
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = _ACTIVATIONS[cfg.activation_function]
        cast: dict[int, torch.Tensor] = {}  # one copy per tensor (the head is tied to wte)

        def w(t: torch.Tensor) -> torch.Tensor:
            if dtype is None or t.dtype == dtype:
                return t
            if id(t) not in cast:
                cast[id(t)] = t.detach().to(dtype)
            return cast[id(t)]

        self.head_weight = w(hf.get_output_embeddings().weight)
        self.wte, self.wpe = w(self.tf.wte.weight), w(self.tf.wpe.weight)
        self.ln_f = (w(self.tf.ln_f.weight), w(self.tf.ln_f.bias))
        # the weight tensors themselves, looked up once: nn.Module attribute access per token and layer was
        # ~5% of a decode step (the optimizer updates these tensors in place, so the references stay current)
        self.blocks = [
            tuple(w(t) for t in (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                                 b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                                 b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias))
            for b in self.tf.h
        ]
        shape = (batch, self.n_head, max_len, self.head_dim)
        self.k = [self.wte.new_zeros(shape) for _ in self.tf.h]
        self.v = [self.wte.new_zeros(shape) for _ in self.tf.h]
        self.length = 0
        self.hidden: torch.Tensor | None = None  # final-norm hidden state of the last position, [b, n_embd]

    def _block(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mlp_w, mlp_b = self.blocks[i]
        b, t, c = x.shape
        a = F.layer_norm(x, (c,), ln1_w, ln1_b, self.eps)
        q, k, v = _conv1d(a, attn_w, attn_b).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        end = self.length + t
        self.k[i][:, :, self.length:end] = k
        self.v[i][:, :, self.length:end] = v
        y = F.scaled_dot_product_attention(q, self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=mask)
        x = x + _conv1d(y.transpose(1, 2).reshape(b, t, c), proj_w, proj_b)
        m = F.layer_norm(x, (c,), ln2_w, ln2_b, self.eps)
        return x + _conv1d(self.act(_conv1d(m, fc_w, fc_b)), mlp_w, mlp_b)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the last position for ``ids`` [b, t] appended to the cache.

        ``key_mask`` [b, length + t] marks real (non-pad) tokens of the whole sequence so far. The final-norm
        hidden state behind those logits stays in ``self.hidden``: the policy's scoring pass reads it instead
        of running the model again (see ``Rollout.hidden``).
        """
        t = ids.shape[1]
        end = self.length + t
        if t == 1 and bool(key_mask[:, end - 1].all()):
            # one new real token per row: every cached key is in its past, so the padding mask is the whole mask
            mask = key_mask[:, None, None, :end].bool()
        else:
            causal = torch.ones(t, end, dtype=torch.bool, device=ids.device).tril(self.length)
            allowed = causal[None] & key_mask[:, None, :end].bool()
            # a left-pad query may see no real key at all: let it see itself so its row stays finite
            rows = torch.arange(t, device=ids.device)
            allowed[:, rows, self.length + rows] = True
            mask = allowed[:, None]
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        for i in range(len(self.blocks)):
            x = self._block(i, x, mask)
        self.length = end
        self.hidden = F.layer_norm(x[:, -1], (x.shape[-1],), *self.ln_f, self.eps)
        return self.hidden @ self.head_weight.t()

