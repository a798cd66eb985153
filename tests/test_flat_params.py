"""FlatParams: the runner's parameters as views of one buffer give the per-tensor code's numbers, faster."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rlhf_core.train.flat_params import FlatParams, no_decay_parameters
from rlhf_core.train.probes import block_drift, block_grad_norms


class Tiny(nn.Module):
    """Embedding tied to the head, two numbered blocks, a final norm: the shape of a small LM."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.h = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.ln_f = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for layer in self.h:
            x = torch.tanh(layer(x))
        return self.head(self.ln_f(x))


class WithValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Tiny()
        self.v_head = nn.Linear(6, 1)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids)
        return logits.logsumexp(-1).mean() + self.v_head(self.model.wte(ids)).square().mean()


def make(seed: int = 0) -> tuple[WithValue, Tiny]:
    torch.manual_seed(seed)
    m = WithValue()
    ref = copy.deepcopy(m.model).requires_grad_(False)
    return m, ref


def ref_map(ref: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{n}": p for n, p in ref.named_parameters()}


IDS = torch.tensor([[1, 4, 7, 2], [3, 3, 9, 10]])


def test_parameters_become_views_and_keep_their_values_and_ties() -> None:
    m, ref = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flat = FlatParams(m, ref_map(ref))
    assert sum(p.numel() for p in m.parameters()) == flat.data.numel()
    for p in m.parameters():
        assert p.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.model.head.weight is m.model.wte.weight
    with torch.no_grad():
        flat.data.add_(1.0)  # one write to the buffer is seen by every parameter, tied ones included
    assert torch.equal(m.model.head.weight, before["model.wte.weight"] + 1)
    assert [s.block for s in flat.segments] == ["wte", "h.0", "h.1", "ln_f", "v_head"]
    assert [s.shared for s in flat.segments] == [True, True, True, True, False]


def test_gradients_accumulate_in_the_flat_buffer_and_match_per_tensor_norms() -> None:
    m, ref = make()
    plain = copy.deepcopy(m)
    flat = FlatParams(m, ref_map(ref))
    flat.zero_grads()
    m.loss(IDS).backward()
    m.loss(IDS[:1]).backward()  # accumulates into the same views
    plain.loss(IDS).backward()
    plain.loss(IDS[:1]).backward()
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
        assert p.grad.untyped_storage().data_ptr() == flat.data.grad.untyped_storage().data_ptr()
    total, per_block = flat.grad_norms()
    want_total, want_blocks = block_grad_norms(plain)
    assert total == pytest.approx(want_total, rel=1e-5)
    assert per_block.keys() == want_blocks.keys()
    for block, value in want_blocks.items():
        assert per_block[block] == pytest.approx(value, rel=1e-5), block
    assert flat.clip_grads(0.1) == pytest.approx(want_total, rel=1e-5)
    assert flat.grad_norms()[0] == pytest.approx(0.1, rel=1e-4)
    assert flat.clip_grads(10.0) == pytest.approx(0.1, rel=1e-4)  # under the threshold: unchanged
    assert flat.grad_norms()[0] == pytest.approx(0.1, rel=1e-4)
    assert flat.clip_grads(0.05, total=0.1) == 0.1  # the caller's norm is used as given
    assert flat.grad_norms()[0] == pytest.approx(0.05, rel=1e-4)
    flat.data.grad[0] = float("nan")
    assert math.isnan(flat.clip_grads(0.01))  # reported, gradients left for the caller to skip
    flat.release_grads()
    assert flat.data.grad is None and all(p.grad is None for p in m.parameters())


def test_one_flat_adamw_equals_per_tensor_adamw() -> None:
    m, ref = make()
    plain = copy.deepcopy(m)
    flat = FlatParams(m, ref_map(ref))
    opt = torch.optim.AdamW([flat.data], lr=1e-2, eps=1e-5)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, eps=1e-5)
    for _ in range(3):
        flat.zero_grads()
        m.loss(IDS).backward()
        flat.clip_grads(1.0)
        opt.step()
        plain.loss(IDS).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
    flat.release_grads()
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert m.model.head.weight is m.model.wte.weight


def test_drift_matches_the_per_tensor_probe_and_skips_unshared_blocks() -> None:
    m, ref = make()
    plain = copy.deepcopy(m)
    flat = FlatParams(m, ref_map(ref))
    assert flat.drift() == (0.0, {"wte": 0.0, "h.0": 0.0, "h.1": 0.0, "ln_f": 0.0})
    with torch.no_grad():
        for a, b in ((m, plain),):
            for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
                step = torch.linspace(-0.3, 0.2, p.numel()).view_as(p)
                p.add_(step)
                q.add_(step)
    total, per_block = flat.drift()
    want_total, want_blocks = block_drift(plain.model, dict(copy.deepcopy(ref).named_parameters()))
    assert total == pytest.approx(want_total, rel=1e-5)
    assert per_block.keys() == want_blocks.keys()
    for block, value in want_blocks.items():
        assert per_block[block] == pytest.approx(value, rel=1e-5), block


def test_reference_of_another_dtype_falls_back_to_the_per_tensor_drift() -> None:
    m, ref = make()
    ref = ref.double()
    flat = FlatParams(m, ref_map(ref))
    assert flat.ref_data is None
    with torch.no_grad():
        for p in m.model.h[0].parameters():
            p.mul_(1.5)
    total, per_block = flat.drift()
    assert per_block["h.0"] == pytest.approx(0.5, rel=1e-6)
    assert per_block["h.1"] == 0.0 and 0.0 < total < 0.5


def test_mixed_dtypes_are_refused_in_one_line() -> None:
    m, ref = make()
    m.v_head.double()
    with pytest.raises(ValueError, match="several devices or dtypes"):
        FlatParams(m, ref_map(ref))


def test_state_dict_round_trip_keeps_the_views() -> None:
    m, ref = make()
    flat = FlatParams(m, ref_map(ref))
    other, _ = make(seed=1)
    m.load_state_dict(other.state_dict())
    for p, q in zip(m.parameters(), other.parameters()):
        assert torch.equal(p, q)
        assert p.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr()


def test_a_block_the_reference_shares_in_part_is_one_block_for_gradients() -> None:
    m, ref = make()
    plain = copy.deepcopy(m)
    partial = {k: v for k, v in ref_map(ref).items() if k != "model.h.1.bias"}
    flat = FlatParams(m, partial)
    assert [(s.block, s.shared) for s in flat.segments if s.block == "h.1"] == [("h.1", True), ("h.1", False)]
    flat.zero_grads()
    m.loss(IDS).backward()
    plain.loss(IDS).backward()
    total, per_block = flat.grad_norms()
    want_total, want_blocks = block_grad_norms(plain)
    assert total == pytest.approx(want_total, rel=1e-5)
    assert per_block == pytest.approx(want_blocks, rel=1e-5)
    with torch.no_grad():
        m.model.h[1].weight.mul_(2.0)
        m.model.h[1].bias.mul_(5.0)  # not in the reference: no effect on drift
    assert flat.drift()[1]["h.1"] == pytest.approx(1.0, rel=1e-6)


def test_weight_decay_spares_biases_and_norms_as_a_two_group_adamw_does() -> None:
    """The flat AdamW decays matrices and embeddings only, and equals per-tensor AdamW with HF's two groups."""
    m, ref = make()
    plain = copy.deepcopy(m)
    spared = {id(p) for p in no_decay_parameters(plain)}
    names = {n for n, p in plain.named_parameters() if id(p) in spared}
    assert names == {"model.h.0.bias", "model.h.1.bias", "model.ln_f.weight", "model.ln_f.bias", "v_head.bias"}
    flat = FlatParams(m, ref_map(ref))
    opt = flat.adamw(lr=1e-2, weight_decay=0.5, eps=1e-5)
    groups = [{"params": [p for p in plain.parameters() if id(p) not in spared], "weight_decay": 0.5},
              {"params": [p for p in plain.parameters() if id(p) in spared], "weight_decay": 0.0}]
    opt_plain = torch.optim.AdamW(groups, lr=1e-2, eps=1e-5)
    for _ in range(3):
        flat.zero_grads()
        m.loss(IDS).backward()
        opt.step()
        plain.loss(IDS).backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
    flat.release_grads()
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name  # a decayed bias would be off by ~1e-3


def test_a_saved_plain_adamw_state_does_not_bring_its_decay_back() -> None:
    m, ref = make()
    flat = FlatParams(m, ref_map(ref))
    old = torch.optim.AdamW([flat.data], lr=1e-2, weight_decay=0.01)
    opt = flat.adamw(lr=1e-2, weight_decay=0.01)
    opt.load_state_dict(old.state_dict())
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.masked_weight_decay == 0.01
