"""Per-role sharding and checkpointing (Role.sharding / Role.gradient_checkpointing): a role under its own ZeRO stage
next to an actor under another, byte for byte; the settings moved from the deployment onto the roles plan the same;
readers that set no override; DeepSpeed-Chat's and veRL's critic settings; the model-dtype log-prob head measured."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memory.advise import suggest
from memory.arch import load_arch
from memory.deploy import (
    PHASES,
    Deployment,
    Engine,
    HybridEngine,
    Role,
    Sharding,
    _head_bytes_per_token,
    plan_deployment,
    role_checkpointing,
    role_sharding,
)
from memory.inputs import GiB, from_deepspeed_chat, from_openrlhf, from_verl, trl_from_mappings
from memory.measure import measure_peak

ROOT = Path(__file__).resolve().parents[1]
OPT13, OPT350 = load_arch("opt-1.3b"), load_arch("opt-350m")
DSCHAT = ("deepspeed --num_gpus 8 main.py --actor_model_name_or_path facebook/opt-1.3b "
          "--critic_model_name_or_path facebook/opt-350m --max_prompt_seq_len 128 --max_answer_seq_len 64 ")


def _tables(dep: Deployment) -> dict:
    p = plan_deployment(dep)
    return {g.name: (g.table, g.totals, g.host_bytes) for g in p.groups} | {"engine": p.engine}


def test_critic_under_its_own_zero3_next_to_a_zero0_actor():
    """Actor ZeRO-0 (the deployment's), critic ZeRO-3 (its own) on the same 4 GPUs, fp16 + fp32 Adam (18 B/param):
    per GPU in the optimizer step the actor holds 2P weights, 12P master + moments, 2P gradients and 4P fp32
    gradients; the critic 2P/4 weights, 12P/4 states and ZeRO-3's 1 GB reduce bucket (5e8 elements x 2 B), its
    gradients and step temporaries giving way to the actor's larger ones (roles step one after another)."""
    pa, pc, n = OPT13.params, OPT350.params, 4
    dep = Deployment(actor=Role("actor", OPT13, trained=True),
                     critic=Role("critic", OPT350, trained=True, value_head=True, sharding=Sharding("zero3")),
                     groups={"all": n}, sharding=Sharding("zero0"), micro_batch=1, prompt_len=64, response_len=64,
                     rollout_per_gpu=1, framework="deepspeed-chat")
    g = plan_deployment(dep).groups[0]
    step = {k: v["optimizer_step"] for k, v in g.table.items() if v["optimizer_step"]}
    assert step == {"actor.weights": 2 * pa, "actor.optimizer": 12 * pa, "actor.gradients": 2 * pa,
                    "actor.step": 4 * pa, "critic.weights": 2 * pc // n, "critic.optimizer": 12 * pc // n,
                    "critic.reduce_bucket": 500_000_000 * 2}
    assert g.totals["optimizer_step"] == 20 * pa + 2 * pc // n + 12 * pc // n + 10**9
    assert g.table["critic.reduce_bucket"]["generation"] == 10**9  # ZeRO-3 allocates it at init, for good
    assert "actor.reduce_bucket" not in step  # ZeRO-0 has none
    # without its own stage the critic follows the actor's ZeRO-0: whole weights and states on every GPU
    follows = plan_deployment(dep.with_(critic=replace(dep.critic, sharding=None))).groups[0].table
    assert follows["critic.weights"]["optimizer_step"] == 2 * pc and follows["critic.optimizer"]["update"] == 12 * pc


def test_critic_on_its_own_group_keeps_its_transients():
    """Alone on 8 GPUs the ZeRO-3 critic's gradient partition, fp32 sub-group gradient (4 B) and the 16-bit flat
    copy the step makes of it (2 B) are its own; the ZeRO-2 actor on 2 GPUs: 2P weights, 2P/2 grads, 12P/2 states."""
    pa, pc = OPT13.params, OPT350.params
    dep = Deployment(actor=Role("actor", OPT13, trained=True, group="a"),
                     critic=Role("critic", OPT350, trained=True, value_head=True, group="c",
                                 sharding=Sharding("zero3")),
                     groups={"a": 2, "c": 8}, sharding=Sharding("zero2"), engine=Engine("hf", group="a"),
                     micro_batch=1, prompt_len=64, response_len=64, rollout_per_gpu=1)
    groups = {g.name: g.table for g in plan_deployment(dep).groups}
    c, a = groups["c"], groups["a"]
    sub = pc // 8
    assert c["critic.gradients"]["optimizer_step"] == 2 * pc // 8
    assert c["critic.step"]["optimizer_step"] == 4 * sub + 2 * sub
    assert c["critic.weights"]["update"] == 2 * pc // 8
    assert a["actor.weights"]["update"] == 2 * pa and a["actor.optimizer"]["update"] == 12 * pa // 2
    assert a["actor.gradients"]["optimizer_step"] == 2 * pa // 2


def test_critic_checkpointing_switch_is_its_own():
    """A critic that does not checkpoint next to an actor that does: each role's update activations are those of
    a deployment whose single switch is that role's."""
    base = Deployment(actor=Role("actor", OPT13, trained=True, group="a"),
                      critic=Role("critic", OPT350, trained=True, value_head=True, group="c"),
                      groups={"a": 1, "c": 1}, engine=Engine("hf", group="a"), micro_batch=8, prompt_len=512,
                      response_len=512, rollout_per_gpu=1, gradient_checkpointing=True)
    mixed = base.with_(critic=replace(base.critic, gradient_checkpointing=False))

    def acts(dep: Deployment, group: str, role: str) -> int:
        return next(g for g in plan_deployment(dep).groups if g.name == group).table[f"{role}.activations"]["update"]

    assert acts(mixed, "c", "critic") == acts(base.with_(gradient_checkpointing=False), "c", "critic")
    assert acts(mixed, "c", "critic") > 2 * acts(base, "c", "critic")
    assert acts(mixed, "a", "actor") == acts(base, "a", "actor")
    assert role_checkpointing(mixed.critic, mixed) is False and role_checkpointing(mixed.actor, mixed) is True


def _published() -> list[Deployment]:
    from benchmarks.bench_memory_published import apart, deployment

    rows = json.loads((ROOT / "memory/published.json").read_text())
    return [deployment(r) for r in (rows if isinstance(rows, list) else rows["rows"]) if not apart(r)]


def _own_settings(dep: Deployment) -> dict[str, Role]:
    return {r.name: replace(r, sharding=role_sharding(r, dep), gradient_checkpointing=role_checkpointing(r, dep))
            for r in dep.roles()}


def _cases() -> list[Deployment]:
    q = load_arch("Qwen2.5-0.5B")
    return _published() + [
        Deployment(actor=Role("actor", q, trained=True), reference=Role("reference", q), sharding=Sharding("zero3"),
                   rollout_per_gpu=8, framework="trl"),
        Deployment(actor=Role("actor", q, trained=True, lora_rank=16), reference=Role("reference", q),
                   sharding=Sharding("zero3", frozen_zero3=False), gather_for_generation=False, rollout_per_gpu=8),
        from_deepspeed_chat(DSCHAT + "--actor_zero_stage 3 --critic_zero_stage 2 --enable_hybrid_engine "
                            "--inference_tp_size 2 --enable_ema --offload_reference_model"),
    ]


@pytest.mark.parametrize("dep", _cases(), ids=lambda d: f"{d.framework}-{d.actor.arch.name}")
def test_settings_moved_onto_the_roles_plan_the_same(dep):
    """Every role given its effective sharding and switch as its own, and the deployment's set to something else:
    the same plan, component by component. A term still reading the deployment's setting would move."""
    other = Sharding("zero1") if role_sharding(dep.actor, dep).kind != "zero1" else Sharding("zero2")
    moved = dep.with_(**_own_settings(dep), sharding=other, gradient_checkpointing=not dep.gradient_checkpointing)
    assert _tables(moved) == _tables(dep)
    assert _tables(dep.with_(**_own_settings(dep))) == _tables(dep)  # the same settings stated twice: no change


def test_readers_without_per_model_settings_set_no_override():
    """TRL and OpenRLHF (and veRL without a critic) leave every role on the deployment's settings, so their plans
    are the ones of a planner without overrides."""
    for dep in _published():
        if dep.framework == "deepspeed-chat":
            continue
        for r in dep.roles():
            if not (dep.framework == "verl" and r.name == "critic"):
                assert r.sharding is None and r.gradient_checkpointing is None, (dep.framework, r.name)
    trl = trl_from_mappings({"model_name_or_path": "Qwen2.5-0.5B", "beta": 0.04})
    assert all(r.sharding is None and r.gradient_checkpointing is None for r in trl.roles())
    orl = from_openrlhf("--pretrain Qwen2.5-0.5B --critic_pretrain Qwen2.5-0.5B --zero_stage 3 --bf16")
    assert all(r.sharding is None and r.gradient_checkpointing is None for r in orl.roles())


@pytest.mark.parametrize("actor,critic,ref_kind,reward_kind", [
    (3, 2, "zero3", "zero0"), (2, 3, "zero2", "zero3"), (0, 1, "zero0", "zero0"), (1, 3, "zero1", "zero3")])
def test_deepspeed_chat_stages_per_model(actor, critic, ref_kind, reward_kind):
    """rlhf_engine.py: the critic trains under --critic_zero_stage, the reward model is ZeRO-3 only when the critic
    is (else 0), the reference follows the actor (ZeRO-3 or unsharded)."""
    dep = from_deepspeed_chat(DSCHAT + f"--actor_zero_stage {actor} --critic_zero_stage {critic} --offload")
    assert dep.sharding.kind == f"zero{actor}" and dep.reference.sharding is None
    assert role_sharding(dep.critic, dep).kind == f"zero{critic}"
    assert role_sharding(dep.critic, dep).offload_optimizer == (critic > 0)
    assert role_sharding(dep.critic, dep).offload_params == (critic == 3)
    assert role_sharding(dep.reference, dep).kind == ref_kind and role_sharding(dep.reward, dep).kind == reward_kind
    table = plan_deployment(dep).groups[0].table
    pc, n = OPT350.params, 8
    assert table["reward.weights"]["scoring"] == 2 * pc // (n if critic == 3 else 1)
    assert table["reference.weights"]["scoring"] == 2 * OPT13.params // (n if actor == 3 else 1)
    assert table["critic.weights"]["scoring"] == (0 if critic == 3 else 2 * pc)  # ZeRO-3 + --offload: on the CPU


def test_deepspeed_chat_checkpointing_per_model():
    both = from_deepspeed_chat(DSCHAT + "--actor_gradient_checkpointing --critic_gradient_checkpointing")
    actor_only = from_deepspeed_chat(DSCHAT + "--actor_gradient_checkpointing")
    critic_only = from_deepspeed_chat(DSCHAT + "--critic_gradient_checkpointing")
    assert [role_checkpointing(d.critic, d) for d in (both, actor_only, critic_only)] == [True, False, True]
    assert [role_checkpointing(d.actor, d) for d in (both, actor_only, critic_only)] == [True, True, False]


def test_deepspeed_chat_checkpointing_suggestion_reaches_the_critic():
    """The suggestion names --actor_gradient_checkpointing --critic_gradient_checkpointing: appended to the command
    and read back, it plans what the suggestion promised, although the actor already checkpoints."""
    cmd = DSCHAT + "--actor_zero_stage 2 --critic_zero_stage 2 --actor_gradient_checkpointing " \
                   "--per_device_training_batch_size 8"
    dep = from_deepspeed_chat(cmd, gpu_memory=40 * GiB)
    change = next(c for c in suggest(dep) if c.key == "gradient_checkpointing")
    assert change.flag == "--actor_gradient_checkpointing --critic_gradient_checkpointing"
    reread = from_deepspeed_chat(f"{cmd} {change.flag}", gpu_memory=40 * GiB)
    assert plan_deployment(reread).peak_bytes == change.peak_after < plan_deployment(dep).peak_bytes
    z3 = next(c for c in suggest(dep) if c.key == "zero3")
    assert plan_deployment(from_deepspeed_chat(f"{cmd} {z3.flag}", gpu_memory=40 * GiB)).peak_bytes == z3.peak_after


def test_verl_critic_settings():
    """veRL's CriticWorker: its own enable_gradient_checkpointing (ppo_trainer.yaml default True) and model_dtype
    (default fp32, so fp32 FSDP states even when the actor is bf16)."""
    base = ("actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct algorithm.adv_estimator=gae "
            "trainer.n_gpus_per_node=2 actor_rollout_ref.actor.fsdp_config.model_dtype=bf16 ")
    default = from_verl(base)  # both switches default to on (veRL 9fca71d2c and later)
    assert role_checkpointing(default.critic, default) and role_checkpointing(default.actor, default)
    base += "actor_rollout_ref.model.enable_gradient_checkpointing=False "
    dep = from_verl(base)
    assert role_checkpointing(dep.critic, dep) and not role_checkpointing(dep.actor, dep)
    assert role_sharding(dep.critic, dep) == Sharding("fsdp_full", mixed_precision=True)
    assert not role_sharding(dep.actor, dep).mixed_precision
    off = from_verl(base + "critic.model.enable_gradient_checkpointing=False critic.model.fsdp_config.model_dtype=bf16")
    assert not role_checkpointing(off.critic, off) and not role_sharding(off.critic, off).mixed_precision
    p = off.critic.arch.params
    w = [plan_deployment(d).groups[0].table["critic.weights"]["update"] for d in (dep, off)]
    assert w == [4 * p // 2, 2 * p // 2]


def test_round_trip_keeps_role_settings():
    from memory.deploy_json import deployment_from_dict, deployment_to_dict

    dep = from_deepspeed_chat(DSCHAT + "--actor_zero_stage 3 --critic_zero_stage 1 --critic_gradient_checkpointing")
    back = deployment_from_dict(json.loads(json.dumps(deployment_to_dict(dep))))
    assert back == dep and isinstance(back.critic.sharding, Sharding)


# ---- DeepSpeed-Chat's log-prob head, measured ------------------------------------------------------------------

def gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """dschat/rlhf/ppo_trainer.py gather_log_probs, as at DeepSpeedExamples 83757d9."""
    log_probs = F.log_softmax(logits, dim=-1)
    log_probs_labels = log_probs.gather(dim=-1, index=labels.unsqueeze(-1))
    return log_probs_labels.squeeze(-1)


B, S, H, V = 4, 64, 32, 4096


def _head_role(dtype_bytes: int = 2) -> tuple[Role, Deployment]:
    role = Role("actor", replace(OPT350, vocab=V), trained=True, dtype_bytes=dtype_bytes)
    return role, Deployment(actor=role, logprob_head="model_dtype")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_head_scoring_measured(dtype):
    """generate_experience: logits of the batch, then gather_log_probs on the shifted view. Beyond the logits the
    CPU allocator sees log-softmax's contiguous copy of the view and its output (fp16 log-softmax runs on the CPU
    too); the planner's 3·2·V per token is logits + both, rounded up from S-1 to S positions."""
    db = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, V, generator=g).to(dtype)
    seq = torch.randint(0, V, (B, S), generator=g)
    with torch.no_grad():
        out, peak = measure_peak(lambda: gather_log_probs(logits[:, :-1, :], seq[:, 1:]))
    assert out.dtype == dtype and out.shape == (B, S - 1)
    shifted = B * (S - 1) * V * db
    assert 2 * shifted <= peak.delta_peak_bytes <= 2 * shifted + 4096
    role, dep = _head_role(db)
    planned = B * S * _head_bytes_per_token(role, dep, grad=False)
    measured = logits.numel() * db + peak.delta_peak_bytes
    assert measured <= planned <= measured * S / (S - 1) + 4096


def _replayed_peak(events: list[tuple[int, int, int, int]], skip_size: int = -1) -> int:
    """Peak of live bytes over the allocator's events (as memory.measure replays them), blocks of ``skip_size``
    bytes left out."""
    live = peak = 0
    mine: dict[int, int] = {}
    for _, _, ptr, size in events:
        if size > 0 and size != skip_size:
            mine[ptr] = size
            live += size
            peak = max(peak, live)
        elif size < 0 and ptr in mine:
            live -= mine.pop(ptr)
    return peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_head_update_measured(dtype):
    """train_rlhf: ``actor_prob`` (the logits) stays referenced through backward next to the saved log-softmax,
    gather's backward zeros and log-softmax's gradient: the planner's 4·2·V per token. The CPU kernel of the
    16-bit log-softmax backward makes one fp32 temporary of the view (4 B per element) before its 16-bit
    output, where the CUDA kernel accumulates in registers (no GPU here to measure it): the CPU peak is the
    planner's bytes with that temporary in place of the output, and without it the replayed peak is the
    planner's. The fp32 head ('torch', 12·V beside the logits) would be ~1.75x."""
    from torch.profiler import ProfilerActivity, profile

    from memory.measure import cpu_allocation_events

    db = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    seq = torch.randint(0, V, (B, S), generator=g)

    def step() -> None:
        actor_prob = hidden @ weight.T
        gather_log_probs(actor_prob[:, :-1, :], seq[:, 1:]).float().sum().backward()

    _, peak = measure_peak(step)
    hidden.grad = weight.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = cpu_allocation_events(prof)
    view = B * (S - 1) * V * db  # one 16-bit tensor of the shifted view
    fp32_temporary = B * (S - 1) * V * 4
    assert _replayed_peak(events) == peak.delta_peak_bytes  # the same replay as memory.measure's
    assert any(size == fp32_temporary for *_, size in events)
    small = 64 * 1024  # hidden/weight gradients and per-row scalars
    logits = B * S * V * db
    assert logits + 2 * view + fp32_temporary <= peak.delta_peak_bytes <= logits + 2 * view + fp32_temporary + small
    role, dep = _head_role(db)
    planned = B * S * _head_bytes_per_token(role, dep, grad=True)
    without = _replayed_peak(events, skip_size=fp32_temporary)
    assert logits + 3 * view <= without <= planned <= without * S / (S - 1) + small
    assert B * S * _head_bytes_per_token(role, dep.with_(logprob_head="torch"), grad=True) + logits > 1.7 * planned
    fp32 = B * S * _head_bytes_per_token(role, dep.with_(logprob_head="torch"), grad=True)
    assert fp32 + B * S * V * db > 1.5 * planned


def test_model_dtype_head_in_the_plan():
    """The variant moves scoring and update activations only; value heads are unchanged."""
    role, dep = _head_role()
    assert _head_bytes_per_token(role, dep, grad=False) == 6 * V and _head_bytes_per_token(role, dep, True) == 8 * V
    critic = replace(role, name="critic", value_head=True)
    assert _head_bytes_per_token(critic, dep, grad=True) == _head_bytes_per_token(
        critic, dep.with_(logprob_head="torch"), grad=True)
    dsc = from_deepspeed_chat(DSCHAT)
    assert dsc.logprob_head == "model_dtype"
    new, old = plan_deployment(dsc).groups[0], plan_deployment(dsc.with_(logprob_head="torch")).groups[0]
    for comp in new.table:
        if not comp.endswith(".activations"):
            assert new.table[comp] == old.table[comp]
    assert new.table["actor.activations"]["scoring"] < old.table["actor.activations"]["scoring"]
    assert {ph for ph in PHASES if new.totals[ph] != old.totals[ph]} <= {"scoring", "update"}


def test_hybrid_engine_follows_the_actors_own_stage():
    """DeepSpeed-HE's ZeRO-3 gather is the actor's: an actor given ZeRO-3 as its own under a ZeRO-2 deployment
    gathers, a ZeRO-2 actor under a ZeRO-3 deployment does not."""
    he = HybridEngine(tp=2, max_out_tokens=192)
    a = Role("actor", OPT13, trained=True)
    own3 = Deployment(actor=replace(a, sharding=Sharding("zero3")), sharding=Sharding("zero2"), hybrid_engine=he)
    own2 = Deployment(actor=replace(a, sharding=Sharding("zero2")), sharding=Sharding("zero3"), hybrid_engine=he)
    gen = {k: plan_deployment(d).groups[0].table.get("actor.gathered_for_generation", {}).get("generation", 0)
           for k, d in (("own3", own3), ("own2", own2))}
    assert gen["own3"] > 0 and gen["own2"] == 0
