"""Stability probes computed during training, shared by the runner and every adapter.

KL estimators follow Schulman, "Approximating KL Divergence": with r = π_ref/π on tokens sampled from π,
k1 = −log r, k2 = ½(log r)², k3 = (r − 1) − log r. k1 is unbiased but can be negative per batch; k3 is
unbiased and always ≥ 0. "Blocks" group parameters the way people read a transformer: embeddings, each
numbered layer, the final norm, heads.
"""
from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from functools import lru_cache, partial

import torch

_INDEXED = re.compile(r"^(.*?\b(?:h|layers|layer|blocks|block|decoder\.layers|encoder\.layer)\.\d+)\.")
_NUMBERED = re.compile(r"^(.*?\.\d+)\.")
_STRIP = ("base_model.model.", "module.", "_orig_mod.", "pretrained_model.", "policy.", "model.")


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log π − log π_ref."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (r − 1) − log r, r = π_ref/π; ≥ 0 and low-variance."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def kl_estimates(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Token-mean k1/k2/k3 under the canonical keys ``kl/ref_k1`` … ``kl/ref_k3`` (float64, one host sync).

    With l = log r per token: k1 = −l, k2 = ½l², k3 = expm1(l) − l, so three weighted sums (of l, l², expm1 l)
    give all three means: a handful of ops, as this runs every step.
    """
    with torch.no_grad():
        log_r = (ref_logp.double() - logp.double()).reshape(-1)
        weights = torch.ones_like(log_r) if mask is None else mask.reshape(-1).to(log_r.dtype)
        sums = torch.stack([log_r, log_r * log_r, torch.expm1(log_r)]) @ weights
        s_l, s_l2, s_exp, count = torch.cat([sums, weights.sum().reshape(1)]).tolist()
    count = max(count, 1.0)
    k1, k2, k3 = -s_l / count, 0.5 * s_l2 / count, (s_exp - s_l) / count
    return {"kl/ref_k1": k1, "kl/ref_k2": k2, "kl/ref_k3": k3}


def rollout_mismatch(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's (the ``rollout/*`` keys).

    With Δ = log π_trainer − log π_rollout per token (r = e^Δ, the importance ratio a truncated-IS correction
    would use): mean and max |Δ|, KL(π_rollout ‖ π_trainer) on the rollout's samples as k1 = mean(−Δ)
    (OpenRLHF's ``vllm_kl``, veRL's ``rollout_corr/kl``) and k3 = mean(r − 1 − Δ) (veRL's ``k3_kl``; ≥ 0 per
    token), and the extreme ratios. Float64 and one host sync; empty when the mask selects no token.
    """
    with torch.no_grad():
        delta = (trainer_logp.double() - rollout_logp.double()).reshape(-1)
        keep = torch.ones_like(delta, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
        delta = delta[keep]
        if delta.numel() == 0:
            return {}
        stats = torch.stack([delta.abs().mean(), delta.abs().max(), (-delta).mean(),
                             (torch.expm1(delta) - delta).mean(), delta.min().exp(), delta.max().exp()])
        mean_abs, max_abs, k1, k3, ratio_min, ratio_max = stats.tolist()
    return {"rollout/logprob_diff_mean": mean_abs, "rollout/logprob_diff_max": max_abs, "rollout/kl_k1": k1,
            "rollout/kl_k3": k3, "rollout/ratio_min": ratio_min, "rollout/ratio_max": ratio_max}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the full next-token distribution (not of the sampled token alone)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@lru_cache(maxsize=65536)
def block_of(param_name: str) -> str:
    """Block name of a parameter: ``h.0`` for ``transformer.h.0.attn.c_attn.weight``, ``wte``, ``ln_f``…"""
    name = param_name
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    for prefix in ("transformer.", "gpt_neox.", "decoder."):
        if name.startswith(prefix) and name.count(".") > 1:
            name = name[len(prefix):]
    m = _INDEXED.match(name) or _NUMBERED.match(name)
    if m:
        return m.group(1)
    parts = name.split(".")
    return parts[0] if len(parts) <= 2 else ".".join(parts[:-1])


def named_trainable(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


@lru_cache(maxsize=64)
def _block_index(names: tuple[str, ...]) -> tuple[list[str], torch.Tensor]:
    """Blocks in first-seen order and each tensor's block number (cached: a model's names do not change)."""
    blocks: dict[str, int] = {}
    index = [blocks.setdefault(block_of(n), len(blocks)) for n in names]
    return list(blocks), torch.tensor(index, dtype=torch.long)


def _sum_sq_by_block(names: list[str], norms: list[torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Per-block sums of squared per-tensor norms, as one tensor (a handful of ops, whatever the model size)."""
    blocks, index = _block_index(tuple(names))
    dev = norms[0].device  # a model split over devices gives norms on several: gather them on one
    sq = torch.stack([n.float().to(dev) for n in norms]).square()
    sums = sq.new_zeros(len(blocks)).index_add_(0, index.to(sq.device), sq)
    return blocks, sums


def _norm_groups(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Per-tensor L2 norms with one fused kernel per (device, dtype) group (``torch._foreach_norm``)."""
    if not tensors:
        return []
    return list(torch._foreach_norm(tensors))


def block_grad_norms(model: torch.nn.Module) -> tuple[float, dict[str, float]]:
    """Total and per-block L2 norms of the current gradients (call before clipping for the pre-clip norm).

    One fused norm kernel and one host sync per call: this runs every minibatch, so it must stay cheap.
    """
    names, grads = [], []
    for name, p in named_trainable(model):
        if p.grad is not None:
            names.append(name)
            grads.append(p.grad.detach())
    if not grads:
        return 0.0, {}
    with torch.no_grad():
        blocks, sq = _sum_sq_by_block(names, _norm_groups(grads))
        values = torch.cat([sq.sum().sqrt().reshape(1), sq.sqrt()]).tolist()
    return values[0], dict(zip(blocks, values[1:]))


def param_snapshot(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters, the reference point for :func:`block_drift`."""
    params = named_trainable(model) if trainable_only else model.named_parameters()
    return {n: p.detach().to("cpu", copy=True) for n, p in params}


# id(tensor) -> (weak reference to it, its _version, its norm). Tensors compare elementwise, so a
# WeakKeyDictionary cannot hold them; the weak reference confirms the id was not reused.
_REF_NORMS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _forget_norm(key: int, _ref: object) -> None:
    """The weak reference's callback: the tensor is gone, so is its cached norm."""
    _REF_NORMS.pop(key, None)


def _reference_norms(originals: list[torch.Tensor], as_float: list[torch.Tensor]) -> list[torch.Tensor]:
    """Norms of the reference tensors, cached while a tensor is unchanged (its ``_version``): the reference
    is frozen, so recomputing them every step would be half the cost of the drift probe."""
    out: list[torch.Tensor | None] = []
    missing = []
    for i, r in enumerate(originals):
        hit = _REF_NORMS.get(id(r))
        if hit is not None and hit[0]() is r and hit[1] == r._version and hit[2].device == as_float[i].device:
            out.append(hit[2])
        else:
            out.append(None)
            missing.append(i)
    for i, n in zip(missing, _norm_groups([as_float[i] for i in missing])):
        r = originals[i]
        _REF_NORMS[id(r)] = (weakref.ref(r, partial(_forget_norm, id(r))), r._version, n)
        out[i] = n
    return out  # type: ignore[return-value]  # the loop above filled in every None


def block_drift(
    model: torch.nn.Module, ref_params: Mapping[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """‖θ−θ_ref‖/‖θ_ref‖ overall and per block, over the parameters both sides share.

    Fused per-tensor norms and one host sync; runs every step.
    """
    names, cur, ref, originals = [], [], [], []
    for name, p in model.named_parameters():
        r = ref_params.get(name)
        if r is None or r.shape != p.shape:
            continue
        names.append(name)
        originals.append(r)
        cur.append(p.detach().float())
        ref.append(r.detach().to(p.device, torch.float32))
    if not names:
        return 0.0, {}
    with torch.no_grad():
        blocks, d = _sum_sq_by_block(names, _norm_groups(torch._foreach_sub(cur, ref)))
        _, n = _sum_sq_by_block(names, _reference_norms(originals, ref))
        total = (d.sum().sqrt() / n.sum().sqrt().clamp_min(1e-12)).reshape(1)
        values = torch.cat([total, d.sqrt() / n.sqrt().clamp_min(1e-12)]).tolist()
    return values[0], dict(zip(blocks, values[1:]))


def layer_metrics(prefix: str, per_block: Mapping[str, float]) -> dict[str, float]:
    """``{prefix}/layer/<block>`` keys for a per-block dict (prefix ``grad`` or ``drift``)."""
    return {f"{prefix}/layer/{b}": v for b, v in per_block.items()}
