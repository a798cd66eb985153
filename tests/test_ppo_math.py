"""PPO maths against values computed by hand (numbers in the comments)."""
import math

import pytest
import torch

from rlhf_core.train import ppo
from rlhf_core.train.probes import kl_estimates, kl_k1, kl_k3
from rlhf_core.train.sampling import filter_logits


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_full_mask():
    # gamma 0.9, lam 0.8 → γλ = 0.72
    # t2: δ = 2 − 0.1 = 1.9                     A2 = 1.9
    # t1: δ = 0 + 0.9·0.1 − 0.2 = −0.11          A1 = −0.11 + 0.72·1.9 = 1.258
    # t0: δ = 1 + 0.9·0.2 − 0.5 = 0.68           A0 = 0.68 + 0.72·1.258 = 1.58576
    adv, ret = ppo.gae(t([1.0, 0.0, 2.0]), t([0.5, 0.2, 0.1]), t([1.0, 1.0, 1.0]), gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([1.58576, 1.258, 1.9])
    assert ret.tolist()[0] == pytest.approx([2.08576, 1.458, 2.0])


def test_gae_ignores_padding_after_the_last_token():
    # the value 9 of the padded position must not leak back: A1 = 2 − 0.2 = 1.8, A0 = 0.68 + 0.72·1.8 = 1.976
    adv, ret = ppo.gae(t([1.0, 2.0, 5.0]), t([0.5, 0.2, 9.0]), t([1.0, 1.0, 0.0]), gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([1.976, 1.8, 0.0])
    assert ret.tolist()[0] == pytest.approx([2.476, 2.0, 0.0])


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    adv, _ = ppo.gae(t([0.0, 0.0, 1.0]), t([0.3, 0.4, 0.5]), t([1.0, 1.0, 1.0]), gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.7, 0.6, 0.5])


def test_clipped_surrogate_by_hand():
    # token 1: A=1, r=1.5 → max(−1.5, −1.2) = −1.2 (clipped); token 2: A=−1, r=0.5 → max(0.5, 0.8) = 0.8 (clipped)
    old = t([0.0, 0.0])
    logp = torch.log(t([1.5, 0.5]))
    stats = ppo.policy_loss(logp, old, t([1.0, -1.0]), t([1.0, 1.0]), cliprange=0.2)
    assert stats.loss.item() == pytest.approx(-0.2)
    assert stats.clipfrac.item() == pytest.approx(1.0)
    assert stats.ratio_min.item() == pytest.approx(0.5)
    assert stats.ratio_max.item() == pytest.approx(1.5)
    assert stats.ratio_mean.item() == pytest.approx(1.0)
    # approx_kl = mean((r − 1) − log r) = ((0.5 − log 1.5) + (−0.5 − log 0.5)) / 2
    assert stats.approx_kl.item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)


def test_clipped_surrogate_inside_the_trust_region_and_masking():
    # r = 1.1 with A = 2 is not clipped: loss = −2.2; the masked token (r = 5) changes nothing
    logp = torch.log(t([1.1, 5.0]))
    stats = ppo.policy_loss(logp, t([0.0, 0.0]), t([2.0, 100.0]), t([1.0, 0.0]), cliprange=0.2)
    assert stats.loss.item() == pytest.approx(-2.2)
    assert stats.clipfrac.item() == 0.0
    assert stats.ratio_max.item() == pytest.approx(1.1)


def test_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.log(t([1.5])).requires_grad_(True)
    ppo.policy_loss(logp, t([0.0]), t([1.0]), t([1.0]), cliprange=0.2).loss.backward()
    assert logp.grad.item() == 0.0


def test_clipped_value_loss_by_hand():
    # V = 1.5, V_old = 1.0, R = 2: V_clip = 1.2; max((1.5−2)², (1.2−2)²) = 0.64 → ½·0.64 = 0.32
    loss, clipfrac = ppo.value_loss(t([1.5]), t([1.0]), t([2.0]), t([1.0]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.32)
    assert clipfrac.item() == 1.0
    # inside the clip range: ½·(1.1 − 2)² = 0.405
    loss, clipfrac = ppo.value_loss(t([1.1]), t([1.0]), t([2.0]), t([1.0]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.405)
    assert clipfrac.item() == 0.0


def test_value_clipfrac_ignores_rounding_inside_the_clip_range():
    # values seen in a run: V_old + (V − V_old) rounds away from V, well inside the clip range
    f32 = torch.float32
    old = torch.tensor([-0.01983799785375595, -0.07858191430568695, -0.11095918715000153], dtype=f32)
    values = torch.tensor([0.04529251530766487, -0.012059684842824936, -0.014016401953995228], dtype=f32)
    returns = values.clone()  # a critic that is exactly right: any difference in V_clip shows in the loss
    clipped = old + torch.clamp(values - old, -0.2, 0.2)
    assert ((clipped - returns) ** 2 > (values - returns) ** 2).all()
    _, clipfrac = ppo.value_loss(values, old, returns, torch.ones(3), cliprange_value=0.2)
    assert clipfrac.item() == 0.0


def test_kl_estimators_by_hand():
    # π = 0.5, π_ref = 0.25: k1 = log 2; r = 0.5, k3 = (0.5 − 1) − log 0.5 = log 2 − 0.5
    logp, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k3(logp, ref).item() == pytest.approx(math.log(2) - 0.5)
    est = kl_estimates(logp, ref)
    assert est["kl/ref_k1"] == pytest.approx(math.log(2))
    assert est["kl/ref_k3"] == pytest.approx(math.log(2) - 0.5)


def test_kl_penalised_rewards_put_the_score_on_the_last_real_token():
    # k1 = [0.5, 0, (masked)], β = 0.1 → [−0.05, 0 + score 1.0, 0]
    rewards, kl = ppo.kl_penalised_rewards(t(1.0)[None].flatten(), t([-1.0, -2.0, -3.0]), t([-1.5, -2.0, -2.0]),
                                           t([1.0, 1.0, 0.0]), kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 1.0, 0.0])
    assert kl.tolist()[0] == pytest.approx([0.5, 0.0, 0.0])


def test_whitening_by_hand():
    x = t([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = t([1.0, 1.0, 1.0, 1.0, 0.0])
    out = ppo.masked_whiten(x, mask)
    std = math.sqrt(5.0 / 3.0)  # unbiased variance of 1..4
    assert out.tolist()[0] == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0], rel=1e-6)


def test_explained_variance():
    r = t([1.0, 2.0, 3.0])
    m = t([1.0, 1.0, 1.0])
    assert ppo.explained_variance(r, r, m) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros_like(r), r, m) == pytest.approx(0.0)
    assert math.isnan(ppo.explained_variance(r, t([2.0, 2.0, 2.0]), m))


def test_kl_controllers():
    fixed = ppo.FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    ada = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(12.0, 256)  # error clipped to +0.2 → ×(1 + 0.2·256/10000)
    assert ada.value == pytest.approx(0.1 * 1.00512)
    ada.update(0.0, 256)  # error clipped to −0.2
    assert ada.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    restored = ppo.AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ada.state_dict())
    assert restored.value == ada.value


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False]]
    # top_p 0.6: 0.5 alone is below 0.6, so the token that crosses it (0.3) is kept too
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits[:, [3, 2, 1, 0]], top_p=0.9))
    assert kept.tolist() == [[False, True, True, True]]
