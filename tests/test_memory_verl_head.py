"""veRL's log-prob head in the planner: what the reader takes from a veRL command line, what each role's pass
costs per token, and the table checked against the real kernels measured on CPU."""
import json

import pytest

from benchmarks.bench_memory_verl_head import measure
from benchmarks.common import head_entry_matches
from memory.deploy import (
    VERL_ENTROPY_CHUNK,
    VERL_HEAD,
    _chunk_head_bytes,
    _head_bytes_per_token,
    plan_deployment,
)
from memory.inputs import from_verl

BASE = ("python3 -m verl.trainer.main_ppo algorithm.adv_estimator=grpo actor_rollout_ref.model.path=Qwen/Qwen2.5-7B "
        "trainer.n_gpus_per_node=8 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 "
        "actor_rollout_ref.actor.use_kl_loss=True")


@pytest.mark.parametrize("extra, head, impl, in_update", [
    ("", "verl", "compiled", False),
    ("actor_rollout_ref.actor.entropy_coeff=0.001", "verl", "compiled", True),
    ("actor_rollout_ref.actor.entropy_coeff=0", "verl", "compiled", False),
    ("actor_rollout_ref.actor.calculate_entropy=True", "verl", "compiled", True),
    ("actor_rollout_ref.actor.use_torch_compile=False", "verl", "eager", False),
    ("actor_rollout_ref.actor.entropy_checkpointing=True", "verl", "checkpointed", False),
    ("actor_rollout_ref.actor.entropy_checkpointing=True actor_rollout_ref.actor.use_torch_compile=False",
     "verl", "checkpointed_eager", False),
    ("actor_rollout_ref.actor.entropy_from_logits_with_chunking=True", "verl", "chunked", False),
    ("actor_rollout_ref.actor.entropy_from_logits_with_chunking=True actor_rollout_ref.actor.use_torch_compile=False",
     "verl", "chunked_eager", False),
    ("actor_rollout_ref.model.use_fused_kernels=True", "chunked", None, False),
])
def test_reader_takes_the_head_from_the_command_line(extra, head, impl, in_update):
    dep = from_verl(f"{BASE} {extra}")
    assert dep.logprob_head == head
    if impl is not None:
        assert (dep.entropy_impl, dep.entropy_in_update) == (impl, in_update)


def test_json_names_the_head(capsys):
    from memory.cli import main

    assert main(["plan", "--from_verl", f"{BASE} actor_rollout_ref.actor.use_torch_compile=False", "--json"]) in (0, 1)
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["logprob_head"], inputs["entropy_impl"], inputs["entropy_in_update"]) == ("verl", "eager", False)


def test_a_bad_entropy_coeff_is_named():
    with pytest.raises(ValueError, match=r"entropy_coeff=lots: not a number"):
        from_verl(f"{BASE} actor_rollout_ref.actor.entropy_coeff=lots")


def test_unknown_entropy_impl_is_refused():
    with pytest.raises(ValueError, match="entropy_impl"):
        from_verl(BASE).with_(entropy_impl="fast")


def test_each_pass_pays_its_own_head():
    """The actor's old-log-prob pass computes the entropy (fsdp_workers.py compute_log_prob), a separate reference
    never; the update only when entropy_in_update."""
    dep = from_verl(f"{BASE} actor_rollout_ref.actor.entropy_coeff=0.001")
    actor, ref = dep.actor, dep.reference
    assert ref is not None
    V = actor.arch.vocab
    assert _head_bytes_per_token(actor, dep, grad=True) == VERL_HEAD["compiled"][0] * V
    assert _head_bytes_per_token(actor, dep, grad=False) == VERL_HEAD["compiled"][1] * V
    assert _head_bytes_per_token(ref, dep, grad=False) == VERL_HEAD["none"][1] * V
    off = dep.with_(entropy_in_update=False)
    assert _head_bytes_per_token(actor, off, grad=True) == VERL_HEAD["none"][0] * V
    assert _head_bytes_per_token(actor, off, grad=False) == VERL_HEAD["compiled"][1] * V
    # the update's activations shrink by the difference, per token of the micro-batch
    tokens = dep.micro_batch * dep.seq
    diff = (VERL_HEAD["compiled"][0] - VERL_HEAD["none"][0]) * V * tokens
    on_upd, off_upd = (plan_deployment(d).groups[0].table["actor.activations"]["update"] for d in (dep, off))
    assert on_upd - off_upd == pytest.approx(diff, rel=1e-6)


def test_the_chunked_eager_entropy_adds_one_chunk():
    dep = from_verl(f"{BASE} actor_rollout_ref.actor.entropy_from_logits_with_chunking=True "
                    "actor_rollout_ref.actor.use_torch_compile=False actor_rollout_ref.actor.entropy_coeff=0.01")
    V = dep.actor.arch.vocab
    assert _chunk_head_bytes(dep.actor, dep, True, 100) == int(VERL_HEAD["chunked_eager"][2] * V * 100)
    assert _chunk_head_bytes(dep.actor, dep, True, 10_000) == int(VERL_HEAD["chunked_eager"][2] * V
                                                                  * VERL_ENTROPY_CHUNK)
    assert _chunk_head_bytes(dep.reference, dep, False, 10_000) == 0
    assert _chunk_head_bytes(dep.actor, dep.with_(entropy_impl="compiled"), True, 10_000) == 0


def test_verl_head_is_smaller_than_the_reference_head():
    """The point of the change: veRL's default actor pass (compiled entropy, no entropy in the update) plans
    fewer activation bytes than the fp32 log-softmax head, and the scoring pass's head is a third of it."""
    dep = from_verl(BASE)
    V = dep.actor.arch.vocab
    torch_head = dep.with_(logprob_head="torch")
    assert _head_bytes_per_token(dep.actor, dep, True) == 4 * V < _head_bytes_per_token(dep.actor, torch_head, True)
    assert plan_deployment(dep).groups[0].totals["update"] < plan_deployment(torch_head).groups[0].totals["update"]


@pytest.mark.slow
@pytest.mark.parametrize("mode, grad, tokens, chunk", [("none", True, (256, 512), 2048),
                                                       ("eager", True, (256, 512), 2048),
                                                       ("chunked_eager", False, (256, 512), 128)])
def test_table_matches_the_measured_kernels(mode, grad, tokens, chunk):
    """flash-attn's Triton cross entropy (Triton's CPU interpreter) and veRL's eager entropy functions, measured
    at two token counts in fresh processes: per token and vocabulary entry (and per chunk token: two and four
    128-token chunks, the bytes of a token of veRL's 2048-token chunk) within 5% of VERL_HEAD. Every mode,
    compiled ones included, both ways: benchmarks/bench_memory_verl_head.py."""
    m = measure(mode, grad, tokens=tokens, chunk=chunk)
    planned = VERL_HEAD[mode]
    assert head_entry_matches(m["per_token_vocab"], m["per_chunk_token_vocab"], planned[0 if grad else 1],
                              planned[2 if grad else 3]), m
