"""memory.deploy / memory.advise: sharding arithmetic, engine KV pools, placement, fit, min GPUs, suggestions,
and the planner against torch's MemTracker on small real models of three families."""
from dataclasses import replace

import pytest

from memory.advise import FLAGS, suggest
from memory.arch import arch_from_config, load_arch
from memory.deploy import (
    Deployment,
    Engine,
    Role,
    Sharding,
    deepspeed_model_states,
    deepspeed_terms,
    engine_memory,
    largest_micro_batch,
    largest_rollout_batch,
    min_gpus,
    plan_deployment,
    trained_states,
)

GiB = 2**30
Q7 = load_arch("Qwen2.5-7B")


def actor(arch=Q7, **kw):
    return Role("actor", arch, trained=True, **kw)


def test_zero_stage_arithmetic_per_gpu():
    """Mixed-precision AdamW: 2 B weights, 2 B grads, 12 B fp32 master+moments, 4 B fp32 grads in the step."""
    P, n, role = Q7.params, 8, actor()
    z0 = trained_states(role, Sharding("zero0"), n, "adamw")
    assert (z0.weights, z0.gradients, z0.optimizer, z0.step_extra) == (2 * P, 2 * P, 12 * P, 4 * P)
    z1 = trained_states(role, Sharding("zero1"), n, "adamw")
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * P, 2 * P, 12 * P // n)
    z2 = trained_states(role, Sharding("zero2"), n, "adamw")
    assert (z2.weights, z2.gradients, z2.optimizer, z2.step_extra) == (2 * P, 2 * P // n, 12 * P // n, 4 * P // n)
    z3 = trained_states(role, Sharding("zero3"), n, "adamw")
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * P // n, 2 * P // n, 12 * P // n)
    assert z3.buffers == 4 * Q7.largest_param  # gathered layer + its gradient, as DeepSpeed counts it
    # DeepSpeed's reduce (IPG) bucket: reduce_bucket_size 16-bit elements, doubled by overlap_comm in ZeRO-1/2
    assert z0.bucket == 0 and z2.bucket == z3.bucket == 500_000_000 * 2
    assert trained_states(role, Sharding("zero2", overlap_comm=True), n, "adamw").bucket == 2 * 500_000_000 * 2
    off = trained_states(role, Sharding("zero3", offload_optimizer=True, offload_params=True), n, "adamw")
    assert off.weights == off.optimizer == off.gradients == 0 and off.host > 14 * P // n
    fsdp = trained_states(role, Sharding("fsdp_full"), n, "adamw")
    assert fsdp.weights == 4 * P // n and fsdp.optimizer == 8 * P // n  # fp32 flat params, moments
    pure = trained_states(role, Sharding("zero0", mixed_precision=False), 1, "adamw")
    assert (pure.weights, pure.optimizer, pure.step_extra) == (2 * P, 4 * P, 0)
    eight = trained_states(role, Sharding("zero0", mixed_precision=False), 1, "adamw8bit")
    assert eight.optimizer == 2 * P
    lora = trained_states(actor(lora_rank=16), Sharding("zero2"), n, "adamw")
    assert lora.weights == 2 * P + 2 * actor(lora_rank=16).lora_params() and lora.optimizer < 0.01 * P
    q = trained_states(actor(lora_rank=16, load_in_4bit=True), Sharding("zero0"), 1, "adamw")
    assert q.weights < 0.6 * P


@pytest.mark.parametrize("n", [8, 64])
def test_zero2_model_states_equal_deepspeeds_formula(n):
    """DeepSpeed's estimate_zero2_model_states_mem_needs: 2P + 18P/N (offload: 2P), reproduced byte for byte."""
    P, role = Q7.params, actor()
    assert deepspeed_model_states(role, Sharding("zero2"), n) == 2 * P + 2 * P // n + 12 * P // n + 4 * P // n
    assert deepspeed_model_states(role, Sharding("zero2", offload_optimizer=True), n) == 2 * P
    # ZeRO-3 with both offloads: only the gathered layer stays (DeepSpeed: 4 x largest layer)
    assert deepspeed_model_states(role, Sharding("zero3", offload_optimizer=True, offload_params=True), n) == \
        4 * Q7.largest_param


@pytest.mark.parametrize("n", [8, 64])
def test_zero3_model_states_equal_deepspeeds_formula_over_its_terms(n):
    """estimate_zero3_model_states_mem_needs without offload: 4 x largest layer + 18P/N. The 16-bit weight
    partition stage3.py keeps is a term the formula lacks (reported, not counted); fp32 gradients are built
    one optimizer sub-group at a time, so a small sub_group_size shrinks that term and nothing else."""
    P, role = Q7.params, actor()
    terms = deepspeed_terms(role, Sharding("zero3"), n)
    assert terms["weights_16bit"] == (2 * P // n, False)
    assert deepspeed_model_states(role, Sharding("zero3"), n) == \
        4 * Q7.largest_param + 2 * P // n + 12 * P // n + 4 * (P // n)
    small = deepspeed_terms(role, Sharding("zero3", sub_group_size=10**8), n)
    assert small["gradients_32bit"] == (4 * min(P // n, 10**8), True)
    assert {k: v for k, v in small.items() if k != "gradients_32bit"} == \
        {k: v for k, v in terms.items() if k != "gradients_32bit"}
    # with the optimizer offloaded the formula does count the 16-bit partition (2 x total_params / total_gpus)
    assert deepspeed_terms(role, Sharding("zero3", offload_optimizer=True), n)["weights_16bit"] == (2 * P // n, True)


@pytest.mark.parametrize("impl,per_element", [("fused", 2), ("foreach", 4), ("single_tensor", 8)])
def test_zero3_step_temporaries_follow_the_optimizer(impl, per_element):
    """Per optimizer sub-group, beside its fp32 gradient: the 16-bit flatten copy, or the optimizer's own fp32
    temporaries when larger (benchmarks/bench_memory_ds_stage3.py measured 6 B/element with fused AdamW and 12 with
    single-tensor AdamW on DeepSpeed's ZeRO-3 optimizer, fp32 gradient included)."""
    from memory.deploy import step_temporaries

    n, sub = 8, 10**8
    dep = Deployment(actor=actor(), groups={"all": n}, sharding=Sharding("zero3", sub_group_size=sub),
                     optimizer_impl=impl)
    assert step_temporaries(dep.actor, dep, n) == per_element * min(Q7.params // n, sub)


def test_vllm_kv_pool_is_a_share_of_total_memory():
    dep = Deployment(actor=actor(), groups={"all": 8}, engine=Engine("vllm", group="all", gpu_memory_utilization=0.5,
                                                                     max_num_batched_tokens=8192))
    e = engine_memory(dep)
    weights = Q7.params * 2
    assert e.weights == weights and e.footprint == int(80 * GiB * 0.5)
    assert e.kv_pool == int(80 * GiB * 0.5) - weights - e.overhead
    assert e.kv_tokens == e.kv_pool // Q7.kv_bytes_per_token(2)
    assert e.max_seqs == e.kv_tokens // dep.seq
    tp2 = engine_memory(dep.with_(engine=replace(dep.engine, tp=2)))
    assert tp2.weights == weights // 2 and tp2.kv_pool > e.kv_pool  # TP splits weights and KV heads
    # the share is of TOTAL memory: what training already holds on the GPU does not shrink it
    assert engine_memory(dep.with_(reserve_bytes=10 * GiB)).kv_pool == e.kv_pool
    small = engine_memory(dep.with_(engine=replace(dep.engine, gpu_memory_utilization=0.15)))
    assert small.kv_pool == 0 and small.max_seqs == 0
    assert not plan_deployment(dep.with_(engine=replace(dep.engine, gpu_memory_utilization=0.15))).fits


def test_sglang_pool_is_a_share_of_free_memory():
    dep = Deployment(actor=actor(), groups={"all": 8},
                     engine=Engine("sglang", group="all", gpu_memory_utilization=0.5))
    full = engine_memory(dep, free_at_start=80 * GiB)
    half = engine_memory(dep, free_at_start=40 * GiB)
    assert full.weights + full.kv_pool == int(80 * GiB * 0.5)
    assert half.weights + half.kv_pool == int(40 * GiB * 0.5)  # colocated training leaves less free memory


def test_phases_placement_sleep_and_host_memory():
    base = Deployment(actor=actor(), reference=Role("reference", Q7), groups={"all": 8}, sharding=Sharding("zero3"),
                      engine=Engine("vllm", group="all", gpu_memory_utilization=0.4), micro_batch=2,
                      prompt_len=512, response_len=1024)
    g = plan_deployment(base).groups[0]
    assert set(g.totals) == {"generation", "scoring", "update", "optimizer_step", "weight_sync"}
    assert g.table["engine.kv_pool"]["update"] > 0  # vLLM keeps its pool while training runs
    assert g.peak_bytes == max(g.totals.values()) and g.totals[g.peak_phase] == g.peak_bytes
    slept = plan_deployment(base.with_(engine=replace(base.engine, sleep=True))).groups[0]
    assert slept.table["engine.kv_pool"]["update"] == 0 and slept.totals["update"] < g.totals["update"]
    assert slept.table["engine.weights"]["generation"] > 0
    off = plan_deployment(base.with_(sharding=Sharding("zero3", offload_optimizer=True))).groups[0]
    assert off.host_bytes > 0 and off.totals["optimizer_step"] < g.totals["optimizer_step"]
    ref_off = plan_deployment(base.with_(reference=Role("reference", Q7, offload=True))).groups[0]
    assert ref_off.table["reference.weights"]["update"] == 0 and ref_off.table["reference.weights"]["scoring"] > 0
    # separate groups: the engine's GPUs hold no training state
    sep = Deployment(actor=actor(group="train"), groups={"train": 8, "gen": 8},
                     engine=Engine("vllm", group="gen", gpu_memory_utilization=0.9), sharding=Sharding("zero3"))
    plan = plan_deployment(sep)
    gen = next(x for x in plan.groups if x.name == "gen")
    assert not any(k.startswith("actor") for k in gen.table)
    assert gen.peak_bytes == int(80 * GiB * 0.9)
    with pytest.raises(ValueError, match="group"):
        Deployment(actor=actor(group="nowhere"), groups={"all": 8})


def test_fit_min_gpus_and_largest_micro_batch():
    dep = Deployment(actor=actor(load_arch("Llama-3-70B")), groups={"all": 8}, sharding=Sharding("zero3"),
                     engine=Engine("hf", group="all"), micro_batch=1, prompt_len=256, response_len=256,
                     rollout_per_gpu=4, gather_for_generation=False)
    assert not plan_deployment(dep).fits  # 70B full fine-tuning: 20 B/param does not fit 8 x 80 GB
    n = min_gpus(dep)
    assert n is not None and n > 8
    assert plan_deployment(dep.with_(groups={"all": n})).fits
    smaller = max(c for c in (8, 16, 24, 32, 40, 48, 56, 64) if c < n)
    assert not plan_deployment(dep.with_(groups={"all": smaller})).fits
    q = Deployment(actor=actor(), groups={"all": 8}, sharding=Sharding("zero3"), engine=Engine("hf", group="all"),
                   prompt_len=512, response_len=1024, rollout_per_gpu=8)
    mb = largest_micro_batch(q)
    assert mb >= 1
    assert plan_deployment(q.with_(micro_batch=mb)).fits and not plan_deployment(q.with_(micro_batch=mb + 1)).fits
    rb = largest_rollout_batch(q)  # HF generate: the KV cache grows with the generation batch
    assert plan_deployment(q.with_(rollout_per_gpu=rb)).fits
    assert not plan_deployment(q.with_(rollout_per_gpu=rb + 1)).fits
    v = q.with_(engine=Engine("vllm", group="all", gpu_memory_utilization=0.3))
    assert largest_rollout_batch(v) == engine_memory(v).max_seqs


def test_planning_70b_gives_the_whole_report():
    """The deployment the planning-time benchmark times (benchmarks/bench_memory_plan_time.py: under 2 s)."""
    from memory.deploy_cli import report

    dep = Deployment(actor=actor(load_arch("Llama-3-70B")), reference=Role("reference", load_arch("Llama-3-70B")),
                     critic=Role("critic", load_arch("Llama-3-70B"), trained=True, value_head=True),
                     groups={"all": 32}, sharding=Sharding("zero3", offload_optimizer=True),
                     engine=Engine("vllm", group="all", tp=8, gpu_memory_utilization=0.5, sleep=True))
    rep = report(dep)
    assert rep["groups"]["all"]["peak_bytes"] > 0 and "min_gpus" in rep


def test_suggestions_make_it_fit_with_framework_flags():
    dep = Deployment(actor=actor(), reference=Role("reference", Q7), groups={"all": 8}, sharding=Sharding("zero2"),
                     engine=Engine("vllm", group="all", gpu_memory_utilization=0.4), micro_batch=2,
                     prompt_len=512, response_len=1024, gradient_checkpointing=False, framework="openrlhf")
    plan = plan_deployment(dep)
    assert not plan.fits
    changes = suggest(dep, plan)
    keys = [c.key for c in changes]
    assert {"gradient_checkpointing", "zero3", "sleep", "micro_batch", "offload_optimizer"} <= set(keys)
    assert changes[0].fits_after
    fitting = [c.fits_after for c in changes]
    assert fitting == sorted(fitting, reverse=True)  # fixes first
    by_key = {c.key: c for c in changes}
    assert by_key["gradient_checkpointing"].flag == "--gradient_checkpointing"
    assert by_key["sleep"].flag == "--vllm_enable_sleep --deepspeed_enable_sleep"
    assert by_key["micro_batch"].flag.startswith("--micro_train_batch_size ")
    for c in changes:
        assert c.peak_after == plan_deployment(_apply(dep, c.key)).peak_bytes or c.key in ("micro_batch",
                                                                                           "engine_util", "more_gpus")
    verl = {c.key: c.flag for c in suggest(dep.with_(framework="verl"))}
    assert verl["gradient_checkpointing"] == "actor_rollout_ref.model.enable_gradient_checkpointing=True"
    # veRL loads the optimizer back for the update, which is this plan's peak: its offload saves nothing here, so
    # it is not offered (a change that neither fits nor lowers the peak is left out)
    assert "offload_optimizer" not in verl
    assert FLAGS["offload_optimizer"]["verl"] == "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True"
    assert set(FLAGS["sleep"]) == {"trl", "openrlhf", "openrlhf-dotted", "verl"}


def _apply(dep, key):
    from memory.advise import candidates

    return next(new for k, _, new, _, _ in candidates(dep) if k == key)


# ---- against MemTracker (FakeTensorMode) on small real models ----------------------------------------------

TINY = {
    "qwen2": dict(model_type="qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=5000, tie_word_embeddings=True),
    "llama": dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=3, vocab_size=4000, tie_word_embeddings=False),
    "opt": dict(model_type="opt", hidden_size=128, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=3000, word_embed_proj_dim=128, max_position_embeddings=512),
}


@pytest.mark.parametrize("family,ckpt,lora,batch,seq", [
    ("qwen2", False, 0, 2, 96), ("qwen2", True, 8, 2, 96), ("llama", False, 8, 2, 96), ("opt", False, 0, 2, 96),
    ("llama", True, 0, 1, 8),  # few tokens: backward peaks at its end, with every gradient alive
])
def test_planner_within_5_percent_of_memtracker(family, ckpt, lora, batch, seq):
    from memory.memtrack import TrackSpec, measure

    cfg = TINY[family]
    r = measure(TrackSpec(cfg, batch=batch, seq=seq, gradient_checkpointing=ckpt, lora_rank=lora, attn="flash"))
    dep = Deployment(actor=actor(arch_from_config(cfg), lora_rank=lora), groups={"all": 1},
                     sharding=Sharding("zero0", mixed_precision=False), engine=Engine("hf", group="all"),
                     micro_batch=batch, prompt_len=seq // 2, response_len=seq - seq // 2, rollout_per_gpu=1,
                     gradient_checkpointing=ckpt,
                     attn="flash", optimizer_impl="single_tensor")
    totals = plan_deployment(dep).groups[0].totals
    for phase, measured in r.peaks.items():
        assert totals[phase] == pytest.approx(measured, rel=0.05), (phase, totals[phase], measured)


def test_colocated_roles_update_one_after_another():
    """PPO actor and critic on the same GPUs: the group's update/step peak is the larger role's, not the sum."""
    L8 = load_arch("Llama-3-8B")
    both = Deployment(actor=actor(L8), critic=Role("critic", L8, trained=True, value_head=True),
                      groups={"all": 8}, sharding=Sharding("zero3"), engine=Engine("hf", group="all"),
                      micro_batch=8, prompt_len=256, response_len=256, rollout_per_gpu=2)
    alone = both.with_(critic=None)
    g, a = plan_deployment(both).groups[0], plan_deployment(alone).groups[0]
    critic_states = sum(g.table[f"critic.{c}"]["optimizer_step"] for c in ("weights", "optimizer", "reduce_bucket"))
    assert g.totals["optimizer_step"] == a.totals["optimizer_step"] + critic_states  # critic grads not added
    assert g.table["critic.activations"]["update"] == 0 and g.table["actor.activations"]["update"] > 0


def _verl(dep_kw=None, **actor_kw):
    """A veRL hybrid-engine deployment: fp32 FSDP actor, vLLM asleep outside generation and weight sync."""
    kw = dict(groups={"all": 8}, sharding=Sharding("fsdp_full"), framework="verl", phase_offload_params=True,
              phase_offload_optimizer=True, engine=Engine("vllm", tp=2, gpu_memory_utilization=0.4, sleep=True))
    kw.update(dep_kw or {})
    return Deployment(actor=actor(storage_bytes=4, **actor_kw), **kw)


def test_verl_weight_sync_fsdp1_holds_a_cloned_copy_of_the_shards():
    """veRL full fine-tuning (fsdp_vllm.py __enter__): FSDP1's sharded state_dict() clones each rank's chunk in
    fp32 and keeps it until after load_weights, next to the woken engine weights; FSDP2's state_dict() returns
    the shards themselves; both gather one full parameter at a time while loading."""
    p, big = Q7.params, Q7.largest_param
    one = plan_deployment(_verl({"fsdp_version": 1})).groups[0]
    two = plan_deployment(_verl({"fsdp_version": 2})).groups[0]
    assert one.table["actor.state_dict_copy"]["weight_sync"] == p * 4 // 8
    assert "actor.state_dict_copy" not in two.table
    assert one.table["actor.gathered_for_sync"]["weight_sync"] == two.table["actor.gathered_for_sync"]["weight_sync"] \
        == big * 4
    assert one.totals["weight_sync"] - two.totals["weight_sync"] == p * 4 // 8
    assert all(one.table["actor.state_dict_copy"][ph] == 0 for ph in ("generation", "scoring", "update"))
    # one GPU: FULL_STATE_DICT clones the whole (unsharded) model and nothing is gathered
    single = plan_deployment(_verl({"fsdp_version": 1, "groups": {"all": 1},
                                    "engine": Engine("vllm", tp=1, sleep=True)})).groups[0]
    assert single.table["actor.state_dict_copy"]["weight_sync"] == p * 4
    assert single.table["actor.gathered_for_sync"]["weight_sync"] == 0


def test_verl_lora_sync_summons_before_the_engine_wakes():
    """veRL LoRA: layered_summon gathers one fp32 layer before vLLM wakes (smaller than the engine's weights:
    nothing extra at the peak); without it summon_full_params unshards the whole fp32 model at once."""
    layered = plan_deployment(_verl({"layered_summon": True}, lora_rank=32)).groups[0]
    whole = plan_deployment(_verl({"layered_summon": False}, lora_rank=32)).groups[0]
    eng = plan_deployment(_verl({}, lora_rank=32)).engine.weights
    lora = actor(lora_rank=32).lora_params()
    assert layered.table["actor.gathered_for_sync"]["weight_sync"] == 0
    assert whole.table["actor.gathered_for_sync"]["weight_sync"] == (Q7.params + lora) * 4 - eng
    shards = whole.table["actor.weights"]["weight_sync"]
    assert whole.totals["weight_sync"] == shards + (Q7.params + lora) * 4  # the earlier, pre-wake-up peak
    # other frameworks keep the generic rule: one gathered unit and its prefetch
    trl = plan_deployment(_verl({"framework": "trl"}, lora_rank=32)).groups[0]
    assert trl.table["actor.gathered_for_sync"]["weight_sync"] == 2 * Q7.largest_param * 2


def test_verl_lora_without_layered_summon_is_told_to_use_it():
    """The whole-model fp32 summon of veRL's LoRA sync runs a 14B actor on 2 x 80 GB out of memory; the
    suggestion with veRL's keys makes it fit."""
    q14 = load_arch("Qwen2.5-14B")
    dep = Deployment(actor=actor(q14, storage_bytes=4, lora_rank=32), groups={"all": 2}, framework="verl",
                     sharding=Sharding("fsdp_full"), phase_offload_params=True, phase_offload_optimizer=True,
                     engine=Engine("vllm", tp=2, gpu_memory_utilization=0.25, sleep=True), micro_batch=8,
                     prompt_len=128, response_len=128)
    plan = plan_deployment(dep)
    assert not plan.fits and plan.groups[0].peak_phase == "weight_sync"
    top = suggest(dep, plan)[0]
    assert top.key == "layered_summon" and top.fits_after
    assert top.flag == FLAGS["layered_summon"]["verl"] and "layered_summon=True" in top.flag
    assert all(c.key != "layered_summon" for c in suggest(dep.with_(layered_summon=True)))


def test_sequence_parallel_splits_a_micro_batch_tokens_over_its_group():
    """Ulysses / ring attention: a group of sp GPUs shares each micro-batch and every GPU holds 1/sp of its tokens,
    so 8 sequences over sp=8 plan like 1 sequence without it, and one long sequence over sp=8 is not planned whole."""
    from memory.deploy import micro_tokens

    base = Deployment(actor=actor(), groups={"all": 8}, sharding=Sharding("fsdp_full"), prompt_len=1024,
                      response_len=31 * 1024, micro_batch=1)
    split = base.with_(micro_batch=8, sequence_parallel=8)
    assert micro_tokens(split, 8) == micro_tokens(base, 1) == 32 * 1024
    assert plan_deployment(split).groups[0].totals == plan_deployment(base).groups[0].totals
    one = base.with_(sequence_parallel=8)
    assert micro_tokens(one, 1) == 4 * 1024
    assert plan_deployment(one).groups[0].totals["update"] < plan_deployment(base).groups[0].totals["update"]
    with pytest.raises(ValueError, match="sequence_parallel"):
        base.with_(sequence_parallel=0)
