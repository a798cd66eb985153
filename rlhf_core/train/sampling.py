"""Generation: a short sampling loop over the KV cache, temperature/top-k/top-p.

HF ``generate()`` spends most of its time per token in Python bookkeeping that this runner does not need;
one forward per new token with the cache is all sampling is. Plain GPT-2 models decode through
:mod:`rlhf_core.train.gpt2_decode` (same weights and maths, ~2.5× less time per token on the tiny model); any
other causal LM through its own modules and their ``cache``. Randomness comes from an explicit
``torch.Generator`` so a step's samples depend only on (seed, step, rank) and the weights.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_core.train import gpt2_decode
from rlhf_core.train.policy import position_ids_from_mask


@dataclass
class Rollout:
    """Prompt + response token ids (left-padded prompts, right-padded responses) and the masks."""

    input_ids: torch.Tensor        # [b, P + R]
    attention_mask: torch.Tensor   # [b, P + R]
    prompt_len: int                # P
    response_mask: torch.Tensor    # [b, R] 1 for real response tokens (through the first EOS)
    eos: torch.Tensor              # [b] bool: the response ended with EOS
    # [b, R, H] final-norm hidden states that predicted each response token, as sampled (the lean GPT-2
    # decoder keeps them; None otherwise): the old-policy log-probs and values without a second forward
    hidden: torch.Tensor | None = None
    # [b, R] float32 log-prob of each sampled token under the sampler's own (temperature-scaled, unfiltered)
    # distribution, as an inference engine returns it; only when asked for (``with_logprobs``), 0 after EOS
    logprobs: torch.Tensor | None = None

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (−inf) tokens outside the top-k and outside the smallest set whose probability reaches top-p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int,
                top_p: float) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: exact, and several times cheaper than ``torch.multinomial``
    (which draws an exponential variate per vocabulary entry) on the CPU."""
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(-1)


def generate(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             eos_token_id: int, pad_token_id: int, generator: torch.Generator, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, dtype: torch.dtype | None = None,
             with_logprobs: bool = False) -> Rollout:
    """Sample up to ``max_new_tokens`` per prompt; stops early once every row has produced EOS.

    The loop runs under ``torch.inference_mode`` (~15% faster per token than ``no_grad`` on the tiny model);
    the returned tensors are ordinary copies, so the update pass can use them with autograd.
    ``dtype`` other than the weights' runs the sampler in that precision, as an inference engine with its own copy
    of the weights does (bf16 vLLM next to an fp32 trainer); its hidden states are then not the trainer's and are
    not kept. ``with_logprobs`` also returns the sampler's log-prob of each sampled token (one logsumexp per token).
    """
    with torch.inference_mode():
        roll = _sample(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, generator=generator, temperature=temperature, top_k=top_k,
                       top_p=top_p, dtype=dtype, with_logprobs=with_logprobs)
    return Rollout(roll.input_ids.clone(), roll.attention_mask.clone(), roll.prompt_len,
                   roll.response_mask.clone(), roll.eos.clone(),
                   None if roll.hidden is None else roll.hidden.clone(),
                   None if roll.logprobs is None else roll.logprobs.clone())


class HFDecoder:
    """Decode through the model's own modules and their KV cache (any causal LM).

    The cache goes in and out as ``cache``: transformers 5.24 renamed ``past_key_values`` to it (the old name
    warns, and is removed in 5.40), hence the ``transformers>=5.24,<6`` requirement.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        self.model = model
        self.past = None
        self.hidden = None  # hidden states are not kept on this path: the runner recomputes them
        weight = next(model.parameters())
        # another precision without a second copy of the weights: autocast runs the matmuls in it
        self.device_type = weight.device.type
        self.dtype = dtype if dtype is not None and dtype != weight.dtype else None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with cast:
            out = self.model(input_ids=ids, attention_mask=key_mask, position_ids=positions,
                             cache=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.cache
        return out.logits[:, -1]


def make_decoder(model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None):
    """The lean GPT-2 decoder where it applies, else the model's own modules."""
    if gpt2_decode.supports(model):
        return gpt2_decode.GPT2Decoder(model, batch, max_len, dtype=dtype)
    return HFDecoder(model, dtype)


def _sample(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
            eos_token_id: int, pad_token_id: int, generator: torch.Generator, temperature: float, top_k: int,
            top_p: float, dtype: torch.dtype | None = None, with_logprobs: bool = False) -> Rollout:
    batch = prompt_ids.shape[0]
    max_len = prompt_ids.shape[1] + max_new_tokens
    decoder = make_decoder(model, batch, max_len) if dtype is None else make_decoder(model, batch, max_len, dtype)
    # hidden states of another precision are the sampler's, not the trainer's: the runner must recompute them
    keep_hidden = dtype is None or dtype == next(model.parameters()).dtype
    # the lean decoder calls no dropout module; only the HF path needs eval mode (a walk over every module)
    toggle = isinstance(decoder, HFDecoder) and model.training
    if toggle:
        model.eval()
    try:
        prompt_len = prompt_ids.shape[1]
        # the key mask of the whole sequence at once: every sampled position is real; each step takes a view
        mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones((batch, max_new_tokens), dtype=torch.long)], 1)
        logits = decoder.forward(prompt_ids, position_ids_from_mask(mask[:, :prompt_len]), mask[:, :prompt_len])
        next_pos = mask[:, :prompt_len].sum(-1, keepdim=True)
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
        pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=prompt_ids.device)
        tokens, real, hidden, logprobs = [], [], [], []
        for _ in range(max_new_tokens):
            if keep_hidden and decoder.hidden is not None:
                hidden.append(decoder.hidden)
            nxt = torch.where(finished, pad, sample_next(logits, generator, temperature, top_k, top_p))
            if with_logprobs:
                scaled = logits.float() / temperature
                lp = scaled.gather(-1, nxt[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
                logprobs.append(lp.masked_fill(finished, 0.0))
            tokens.append(nxt)
            real.append(~finished)
            finished = finished | (nxt == eos_token_id)
            if bool(finished.all()) or len(tokens) == max_new_tokens:
                break
            logits = decoder.forward(nxt[:, None], next_pos, mask[:, : prompt_len + len(tokens)])
            next_pos = next_pos + 1
        response = torch.stack(tokens, dim=1)
        response_mask = torch.stack(real, dim=1).long()
        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_mask.long(), torch.ones_like(response)], dim=1)
        return Rollout(input_ids, attention_mask, prompt_ids.shape[1], response_mask, finished,
                       torch.stack(hidden, dim=1) if len(hidden) == len(tokens) else None,
                       torch.stack(logprobs, dim=1) if with_logprobs else None)
    finally:
        if toggle:
            model.train(True)


def pad_and_concat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts generated in chunks (``--rollout_batch_size``): left-pad prompts, right-pad responses."""
    if len(rollouts) == 1:
        return rollouts[0]
    p_len = max(r.prompt_len for r in rollouts)
    r_len = max(r.response_mask.shape[1] for r in rollouts)
    ids, attn, rmask, eos, hidden, logprobs = [], [], [], [], [], []
    for r in rollouts:
        b, lp, lr = r.input_ids.shape[0], p_len - r.prompt_len, r_len - r.response_mask.shape[1]
        prompt, resp = r.input_ids[:, : r.prompt_len], r.response_ids
        pm, ra = r.attention_mask[:, : r.prompt_len], r.attention_mask[:, r.prompt_len:]
        ids.append(torch.cat([prompt.new_full((b, lp), pad_token_id), prompt, resp,
                              resp.new_full((b, lr), pad_token_id)], 1))
        attn.append(torch.cat([pm.new_zeros((b, lp)), pm, ra, ra.new_ones((b, lr))], 1))
        rmask.append(torch.cat([r.response_mask, r.response_mask.new_zeros((b, lr))], 1))
        eos.append(r.eos)
        if r.hidden is not None:
            hidden.append(torch.cat([r.hidden, r.hidden.new_zeros((b, lr, r.hidden.shape[-1]))], 1))
        if r.logprobs is not None:
            logprobs.append(torch.cat([r.logprobs, r.logprobs.new_zeros((b, lr))], 1))
    return Rollout(torch.cat(ids), torch.cat(attn), p_len, torch.cat(rmask), torch.cat(eos),
                   torch.cat(hidden) if len(hidden) == len(rollouts) else None,
                   torch.cat(logprobs) if len(logprobs) == len(rollouts) else None)
