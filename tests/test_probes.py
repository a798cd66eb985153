"""Stability probes: block grouping, gradient norms and drift against hand-computed values."""
import math

import pytest
import torch

from rlhf_core.train.probes import (
    block_drift,
    block_grad_norms,
    block_of,
    entropy_from_logits,
    kl_estimates,
    layer_metrics,
    param_snapshot,
)


@pytest.mark.parametrize(
    "name, block",
    [
        ("transformer.h.0.attn.c_attn.weight", "h.0"),
        ("transformer.h.11.mlp.c_fc.bias", "h.11"),
        ("transformer.wte.weight", "wte"),
        ("transformer.ln_f.weight", "ln_f"),
        ("module.model.transformer.h.1.ln_1.weight", "h.1"),
        ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight", "layers.3"),
        ("v_head.weight", "v_head"),
    ],
)
def test_block_of(name: str, block: str) -> None:
    assert block_of(name) == block


class TwoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = torch.nn.ModuleList([torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 1, bias=False)])


def test_block_grad_norms_match_hand_computation() -> None:
    m = TwoBlocks()
    m.h[0].weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(6*4)
    m.h[1].weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    total, per_block = block_grad_norms(m)
    assert per_block == pytest.approx({"h.0": math.sqrt(24.0), "h.1": 5.0})
    assert total == pytest.approx(math.sqrt(24.0 + 25.0))
    assert total == pytest.approx(torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9).item())


def test_block_grad_norms_without_grads_is_zero() -> None:
    assert block_grad_norms(TwoBlocks()) == (0.0, {})


def test_block_drift_matches_hand_computation_and_follows_reference_changes() -> None:
    m = TwoBlocks()
    with torch.no_grad():
        m.h[0].weight.fill_(1.0)
        m.h[1].weight.copy_(torch.tensor([[3.0, 4.0]]))
    ref = param_snapshot(m)
    assert block_drift(m, ref) == (0.0, {"h.0": 0.0, "h.1": 0.0})
    with torch.no_grad():
        m.h[1].weight.add_(torch.tensor([[0.3, 0.4]]))  # ‖Δ‖ = 0.5, ‖ref‖ = 5
    total, per_block = block_drift(m, ref)
    assert per_block["h.1"] == pytest.approx(0.1)
    assert per_block["h.0"] == pytest.approx(0.0)
    assert total == pytest.approx(0.5 / math.sqrt(6.0 + 25.0))
    # the reference norms are cached; an in-place change of the reference must not be served stale
    with torch.no_grad():
        ref["h.1.weight"].mul_(2.0)  # ref now [6, 8]: ‖Δ‖ = ‖[3.3,4.4]-[6,8]‖ = 4.5, ‖ref‖ = 10
    _, per_block = block_drift(m, ref)
    assert per_block["h.1"] == pytest.approx(0.45)


def test_layer_metrics_keys() -> None:
    assert layer_metrics("grad", {"h.0": 1.0}) == {"grad/layer/h.0": 1.0}


def test_entropy_of_uniform_and_peaked() -> None:
    logits = torch.stack([torch.zeros(8), torch.tensor([100.0] + [0.0] * 7)])
    ent = entropy_from_logits(logits)
    assert ent[0].item() == pytest.approx(math.log(8))
    assert ent[1].item() == pytest.approx(0.0, abs=1e-6)


def test_kl_estimates_are_zero_for_identical_policies_and_k3_nonnegative() -> None:
    logp = torch.log_softmax(torch.randn(4, 6), -1)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in kl_estimates(logp, logp).values())
    est = kl_estimates(logp, logp + 0.3 * torch.randn(4, 6))
    assert est["kl/ref_k3"] >= 0.0


def test_kl_estimates_average_over_unmasked_tokens_only() -> None:
    # log r = ref − logp: 0.2 and −0.4 on real tokens; the masked token's huge gap must not count
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-0.8, -2.4, 50.0]])
    est = kl_estimates(logp, ref, torch.tensor([[1, 1, 0]]))
    log_r = [0.2, -0.4]
    assert est["kl/ref_k1"] == pytest.approx(sum(-x for x in log_r) / 2, rel=1e-6)
    assert est["kl/ref_k2"] == pytest.approx(sum(0.5 * x * x for x in log_r) / 2, rel=1e-6)
    assert est["kl/ref_k3"] == pytest.approx(sum(math.expm1(x) - x for x in log_r) / 2, rel=1e-6)
