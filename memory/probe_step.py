"""A real PPO step built from model pieces, measured phase by phase: the ground truth of the estimator.

Whole runs are too slow to sweep on two CPU cores, so the calibration, the benchmark grid and the tests of
the planner's savings run this step instead: generate with a KV cache (rollout), score the sequences with the
reference and the policy without gradients (scoring), then one PPO minibatch forward + backward + AdamW step
(update). It mirrors the runner's phases (see ``PHASE_MAP`` in :mod:`memory.estimator`) and takes the same
switches as the runner's flags (dtype, gradient checkpointing, reference on CPU, rollout batch, log-prob path).
Random-init GPT-2 models only: nothing is downloaded.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .estimator import StepSpec, torch_dtype
from .logprobs import token_logprobs
from .measure import PeakResult, tensor_bytes, track_peak

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel


@dataclass
class ProbeModels:
    policy: GPT2LMHeadModel
    value_head: torch.nn.Module
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer


def build_models(spec: StepSpec, seed: int = 0) -> ProbeModels:
    """Policy (+ value head), frozen reference copy and AdamW, as :class:`StepSpec` describes them."""
    from transformers import GPT2LMHeadModel

    dtype = torch_dtype(spec.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers wraps PreTrainedModel.to with functools.wraps, which typeshed types as an unbound callable
        policy = GPT2LMHeadModel(spec.hf_config()).to(dtype=dtype, device=spec.device)  # type: ignore[call-arg]
    if spec.gradient_checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = True
    policy.train()
    value_head = torch.nn.Linear(spec.hidden, 1).to(dtype=dtype, device=spec.device)
    reference = None
    if spec.reference:
        ref_device = "cpu" if spec.ref_device == "cpu" else spec.device
        reference = copy.deepcopy(policy).to(ref_device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value_head.parameters()), lr=1e-5, foreach=False)
    return ProbeModels(policy, value_head, reference, opt)


def _logprobs(model, ids, prompt_len: int, impl: str, with_grad: bool):
    out = model.transformer(input_ids=ids, use_cache=False)
    hidden = out.last_hidden_state[:, prompt_len - 1:-1]
    weight = model.get_output_embeddings().weight
    logp, ent = token_logprobs(hidden, weight, ids[:, prompt_len:], impl=impl, with_entropy=with_grad)
    return logp, ent, out.last_hidden_state


def rollout(spec: StepSpec, m: ProbeModels, prompts: torch.Tensor) -> torch.Tensor:
    """Sequences [batch, prompt + generation] sampled in chunks of ``rollout_batch_size`` prompts."""
    chunks = []
    m.policy.eval()  # as the runner does: in train mode a checkpointed model would generate without its KV cache
    try:
        with torch.no_grad():
            step = spec.rollout_batch_size
            assert step is not None  # set by StepSpec.__post_init__
            for start in range(0, prompts.shape[0], step):
                chunk = prompts[start:start + step]
                chunks.append(m.policy.generate(
                    chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=spec.gen_len,
                    min_new_tokens=spec.gen_len, do_sample=True, top_k=0, pad_token_id=0, use_cache=True))
    finally:
        m.policy.train()
    return torch.cat(chunks)


def scoring(spec: StepSpec, m: ProbeModels, seqs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference log-probs, old log-probs and values of the whole batch, without gradients."""
    with torch.no_grad():
        out = {}
        if m.reference is not None:
            ref_dev = next(m.reference.parameters()).device
            impl = spec.logprob_impl if ref_dev.type == seqs.device.type else "chunked"
            out["ref"] = _logprobs(m.reference, seqs.to(ref_dev), spec.prompt_len, impl, False)[0].to(seqs.device)
        logp, _, hidden = _logprobs(m.policy, seqs, spec.prompt_len, spec.logprob_impl, False)
        out["old"] = logp
        out["values"] = m.value_head(hidden[:, spec.prompt_len - 1:-1]).squeeze(-1).float()
    return out


def update(spec: StepSpec, m: ProbeModels, seqs: torch.Tensor, scores: dict[str, torch.Tensor]) -> float:
    """One PPO minibatch: clipped policy loss + value loss, backward, clip, AdamW step."""
    mb = slice(0, spec.train_batch_size)
    ids = seqs[mb]
    logp, ent, hidden = _logprobs(m.policy, ids, spec.prompt_len, spec.logprob_impl, True)
    values = m.value_head(hidden[:, spec.prompt_len - 1:-1]).squeeze(-1).float()
    old, old_v = scores["old"][mb], scores["values"][mb]
    adv = torch.randn_like(old)
    ratio = torch.exp(logp - old)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    vloss = ((values - (old_v + adv)) ** 2).mean()
    loss = pg + 0.1 * vloss - 0.0 * ent.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(m.policy.parameters()) + list(m.value_head.parameters()), 1.0)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_step(spec: StepSpec, m: ProbeModels, seed: int = 0, measure: bool = True) -> dict[str, PeakResult]:
    """One full step; with ``measure`` each phase's peak (baseline: the models and optimizer state)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, spec.vocab_size, (spec.batch_size, spec.prompt_len), generator=g).to(spec.device)
    state = (m.policy, m.value_head, m.reference, m.optimizer)
    peaks: dict[str, PeakResult] = {}

    def phase(name, fn):
        if not measure:
            return fn()
        baseline = tensor_bytes(*state, device=spec.device) + tensor_bytes(*carry, device=spec.device)
        with track_peak(spec.device, baseline) as res:
            out = fn()
        peaks[name] = res
        return out

    carry: list = [prompts]
    seqs = phase("rollout", lambda: rollout(spec, m, prompts))
    carry = [seqs]
    scores = phase("scoring", lambda: scoring(spec, m, seqs))
    carry = [seqs, scores]
    phase("update", lambda: update(spec, m, seqs, scores))
    return peaks


def measure_step(spec: StepSpec, seed: int = 0, threads: int | None = 1) -> dict[str, PeakResult]:
    """Build the models, run one warm-up update (so AdamW state exists), then measure one whole step.

    Runs on ``threads`` intra-op threads (restored afterwards): these matmuls are tiny, and one thread is as
    fast and immune to oversubscription on a shared machine. Allocations do not depend on it.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        m = build_models(spec, seed)
        g = torch.Generator().manual_seed(seed)
        seqs = torch.randint(1, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=g).to(spec.device)
        update(spec, m, seqs, scoring(spec, m, seqs))
        return run_step(spec, m, seed + 1, measure=True)
    finally:
        torch.set_num_threads(before)
