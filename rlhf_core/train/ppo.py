"""PPO maths as pure tensor functions (no model, no state but the KL controllers), so each is testable by hand.

Shapes: ``[batch, response_len]`` per-token tensors with a 0/1 ``mask`` marking real response tokens (up to
and including the first EOS). Follows the PPO-for-language recipe of Ziegler et al. 2019 and TRL/CleanRL:
per-token KL penalty plus the score on the last token, GAE, whitened advantages, clipped surrogate, clipped
value loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean)/std over the masked entries; masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an empty row)."""
    return (mask.sum(-1).long() - 1).clamp_min(0)


def kl_penalised_rewards(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``−β·(log π − log π_ref)``, plus the sequence score on the last real token.

    Returns (rewards, per-token k1) both masked.
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    idx = last_token_index(mask)
    rewards = rewards.scatter_add(1, idx[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016); the value after the last real token is 0.

    Padding after the last real token has zero reward and value, so it contributes nothing going backwards.

    Returns (advantages, returns = advantages + values), both masked.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> PolicyLossStats:
    """Clipped surrogate ``max(−A·r, −A·clip(r, 1−ε, 1+ε))``, token-mean; approx_kl is k3 against the old policy."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        big = torch.finfo(ratio.dtype).max
        real = mask.bool()
        ratio_min = torch.where(real, ratio, torch.full_like(ratio, big)).min()
        ratio_max = torch.where(real, ratio, torch.full_like(ratio, -big)).max()
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossStats(loss, clipfrac, approx_kl, ratio_mean, ratio_min, ratio_max)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``½·max((V−R)², (V_clip−R)²)``; returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        # counted only where the clamp is active: elsewhere V_clip = V_old + (V − V_old) can still differ from
        # V in the last bit, and ``err_clipped > err`` alone counted that rounding as clipping (~5% of tokens)
        active = (values - old_values).abs() > cliprange_value
        clipfrac = masked_mean((active & (err_clipped > err)).to(values.dtype), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V)/Var(R) over real tokens (1 = perfect critic, ≤ 0 = no better than a constant)."""
    var_r = masked_var(returns, mask)
    if var_r.item() == 0.0:
        return float("nan")
    return (1.0 - masked_var(returns - values, mask) / var_r).item()


class FixedKLController:
    """A constant KL penalty coefficient."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·n_steps/horizon), KL per sequence."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
