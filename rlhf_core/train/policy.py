"""Policy (causal LM + scalar value head) and the frozen reference, with per-token log-probs and entropy.

Log-probs go through ``memory.logprobs.token_logprobs`` on the base model's last hidden state and the output
embedding, so the chunked/Triton paths never materialise the full ``b·s·V`` logits; ``--logprob_impl torch``
is the plain logits + log_softmax path. Dropout is switched off: PPO's ratio must be exactly 1 before the
first update, and rollouts must not depend on train/eval mode.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memory.logprobs import output_embedding, token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TokenScores:
    """Per response token: log-prob of the sampled token, entropy of the full distribution, value."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, identical in sampling and scoring (GPT-2 does not infer them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Last hidden states at the positions that predict the response tokens (no logits computed)."""
    hf: Any = model  # a transformers PreTrainedModel; nn.Module types its attributes only as Tensor | Module
    out = hf.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[:, prompt_len - 1: -1]


def score_tokens(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, impl: str,
                 temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = output_embedding(model)
    return token_logprobs(hidden, weight, targets, bias=bias, impl=impl, temperature=temperature,
                          with_entropy=with_entropy)


class PolicyWithValue(nn.Module):
    """The trained module: LM plus a linear value head on the last hidden state (one DDP wrapper for both).

    ``forward`` returns what the PPO loss needs, so under DistributedDataParallel every trained parameter is
    reached through the wrapper's forward and gradients are synchronised.
    """

    def __init__(self, model: PreTrainedModel, logprob_impl: str = "auto", temperature: float = 1.0):
        super().__init__()
        self.model = model
        head_weight, _ = output_embedding(model)
        hidden_size = head_weight.shape[1]
        self.v_head = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.v_head.weight.normal_(0.0, 1.0 / (hidden_size + 1))
            self.v_head.bias.zero_()
        self.v_head.to(device=head_weight.device, dtype=head_weight.dtype)
        self.logprob_impl = logprob_impl
        self.temperature = temperature

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.v_head(hidden).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                with_entropy: bool = True, with_values: bool = True) -> TokenScores:
        hidden = response_hidden(self.model, input_ids, attention_mask, prompt_len)
        targets = input_ids[:, prompt_len:]
        logp, entropy = score_tokens(self.model, hidden, targets, impl=self.logprob_impl,
                                     temperature=self.temperature, with_entropy=with_entropy)
        values = self.values_from_hidden(hidden) if with_values else None
        return TokenScores(logp, entropy, values)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str, dtype: str, device: torch.device) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    overrides = {}
    if getattr(AutoConfig.from_pretrained(path), "activation_function", None) == "gelu_new":
        # the same tanh-approximated GELU as one fused op instead of seven: ~8% less CPU per sampled token on
        # the tiny model, logits within 2e-7 (transformers' own equivalent, "gelu_pytorch_tanh")
        overrides["activation_function"] = "gelu_pytorch_tanh"
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers 5 draws a "Loading weights" bar per model: noise, not progress
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **overrides)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    disable_dropout(model)
    return model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to): typeshed sees it unbound


def make_reference(model: nn.Module, device: torch.device) -> nn.Module:
    """A frozen copy of the initial policy on ``device`` (the KL anchor and the drift reference)."""
    ref = copy.deepcopy(model).to(device)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logprobs(ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                       *, impl: str, temperature: float, out_device: torch.device) -> torch.Tensor:
    ref_device = output_embedding(ref)[0].device
    ids, mask = input_ids.to(ref_device), attention_mask.to(ref_device)
    hidden = response_hidden(ref, ids, mask, prompt_len)
    ref_impl = "chunked" if impl == "triton" and ref_device.type != "cuda" else impl
    logp, _ = score_tokens(ref, hidden, ids[:, prompt_len:], impl=ref_impl, temperature=temperature,
                           with_entropy=False)
    return logp.to(out_device)
