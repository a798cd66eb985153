"""DeepSpeed-HE terms of memory.deploy (HybridEngine, lora_trains_others, actor_ema): each term against a hand
computation of its source formula on a tiny OPT, that TRL/OpenRLHF/veRL plans do not move, and the
DeepSpeed-Chat flags that switch each term."""
import json

import pytest

from memory.arch import arch_from_config, load_arch
from memory.cli import main
from memory.deploy import (
    PHASES,
    Deployment,
    Engine,
    HybridEngine,
    Role,
    Sharding,
    engine_memory,
    hybrid_generation_weights,
    hybrid_workspace_bytes,
    plan_deployment,
    trained_states,
)
from memory.inputs import from_deepspeed_chat, from_openrlhf, from_verl

GiB = 2**30
# 2 layers, hidden 256, 4 heads (head 64), ffn 1024, vocab 1000: params 1,852,928; a layer 789,760
TINY = arch_from_config({"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
                         "ffn_dim": 1024, "vocab_size": 1000, "max_position_embeddings": 64,
                         "word_embed_proj_dim": 256, "do_layer_norm_before": True}, name="tiny-opt")
LINEAR = 2 * (4 * 256 * 256 + 2 * 256 * 1024)      # q, k, v, out, fc1, fc2 weights of both layers
LORA8 = 2 * 8 * (4 * (256 + 256) + 2 * (256 + 1024))  # r x (in + out) per wrapped linear


HE16 = HybridEngine(max_out_tokens=16)


def dep(stage: int = 0, gpus: int = 1, lora: int = 8, he: HybridEngine | None = HE16, pinned: bool = True,
        **kw) -> Deployment:
    actor = Role("actor", TINY, trained=True, lora_rank=lora)
    return Deployment(actor=actor, reference=Role("reference", TINY), groups={"all": gpus},
                      sharding=Sharding(f"zero{stage}"), rollout_per_gpu=3, prompt_len=8, response_len=8,
                      gather_for_generation=pinned, hybrid_engine=he, framework="deepspeed-chat", **kw)


def test_tiny_counts():
    assert TINY.params == 1_852_928 and TINY.layer_params == 789_760 and TINY.largest_param == 256 * 1024
    r = Role("actor", TINY, trained=True, lora_rank=8)
    assert r.linear_weight_params() == LINEAR == 1_572_864 and r.lora_params() == LORA8 == 73_728


def test_workspace_is_genworkspace():
    # inference_context.h GenWorkSpace: (10*H*hp*B + B*(H/mp)*T + L*B*(H*hp/mp)*2) * T * elem, hp padded head
    assert hybrid_workspace_bytes(dep()) == (10 * 256 * 3 + 3 * 4 * 16 + 2 * 3 * 256 * 2) * 16 * 2 == 350_208
    # head 80 is padded to 128 (opt-2.7b's case); heads over 128 are not padded
    odd = arch_from_config({"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 320,
                            "num_attention_heads": 4, "ffn_dim": 1280, "vocab_size": 1000}, name="odd")
    d = dep().with_(actor=Role("actor", odd, trained=True))
    assert hybrid_workspace_bytes(d) == (10 * 512 * 3 + 3 * 4 * 16 + 2 * 3 * 512 * 2) * 16 * 2
    wide = arch_from_config({"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 1200,
                             "num_attention_heads": 4, "ffn_dim": 4800, "vocab_size": 1000}, name="wide")
    d = dep().with_(actor=Role("actor", wide, trained=True))
    assert hybrid_workspace_bytes(d) == (10 * 1200 * 3 + 3 * 4 * 16 + 2 * 3 * 1200 * 2) * 16 * 2
    # TP 2 under pinned ZeRO-3: generate all-gathers the TP group's prompts (batch 6) and the cache is 1/mp wide
    tp = dep(stage=3, gpus=2, he=HybridEngine(tp=2, max_out_tokens=16))
    assert hybrid_workspace_bytes(tp) == (10 * 256 * 6 + 6 * 2 * 16 + 2 * 6 * 128 * 2) * 16 * 2 == 595_968
    # sized by max_out_tokens, not by the lengths of the batch
    assert hybrid_workspace_bytes(dep().with_(prompt_len=1, response_len=1)) == 350_208
    assert hybrid_workspace_bytes(dep(he=None)) == 0


def test_workspace_replaces_kv_cache_and_stays_unless_released():
    kept = plan_deployment(dep()).groups[0].table
    assert "engine.kv_cache" not in kept
    assert kept["engine.inference_workspace"] == {ph: 350_208 for ph in PHASES}
    assert kept["engine.sampling"]["generation"] == 3 * 1000 * 4
    released = plan_deployment(dep(he=HybridEngine(max_out_tokens=16, release_inference_cache=True))).groups[0].table
    assert released["engine.inference_workspace"] == {ph: (350_208 if ph == "generation" else 0) for ph in PHASES}
    em = engine_memory(dep())
    assert em.kv_pool == 350_208 and em.max_seqs == 3 and em.kv_tokens == 3 * 16
    plain = plan_deployment(dep(he=None)).groups[0].table  # plain HF generate: the KV cache, generation only
    assert "engine.inference_workspace" not in plain
    assert plain["engine.kv_cache"]["generation"] == 3 * 16 * TINY.kv_bytes_per_token(2)


def test_zero3_generation_weights():
    db = 2
    assert hybrid_generation_weights(dep().actor, dep()) == 0  # ZeRO-0..2: resident, LoRA fused in place
    d = dep(stage=3, gpus=2)
    assert hybrid_generation_weights(d.actor, d) == (TINY.params + LORA8) * db == 3_853_312  # every parameter
    u = dep(stage=3, gpus=2, pinned=False)  # _zero3_forward: one layer + its adapters
    assert hybrid_generation_weights(u.actor, u) == (TINY.layer_params + LORA8 // 2) * db == 1_653_248
    tp = dep(stage=3, gpus=2, he=HybridEngine(tp=2, tp_gather_partition_size=1, max_out_tokens=16))
    slices, group, non_tp = LINEAR * db // 2, (TINY.layer_params + LORA8 // 2) * db, (TINY.params - LINEAR) * db
    assert (slices, group, non_tp) == (1_572_864, 1_653_248, 560_128)
    assert hybrid_generation_weights(tp.actor, tp) == slices + max(group, non_tp) == 3_226_112
    tp8 = tp.with_(hybrid_engine=HybridEngine(tp=2, tp_gather_partition_size=8, max_out_tokens=16))
    assert hybrid_generation_weights(tp8.actor, tp8) == slices + 2 * group  # a group never exceeds the layers
    full = dep(stage=3, gpus=2, lora=0)  # without LoRA too (the plain HF rule counted full - shard)
    assert hybrid_generation_weights(full.actor, full) == TINY.params * db
    row = plan_deployment(d).groups[0].table["actor.gathered_for_generation"]
    assert row == {ph: (3_853_312 if ph == "generation" else 0) for ph in PHASES}


def test_lora_trains_others():
    plain = Role("actor", TINY, trained=True, lora_rank=8)
    others = Role("actor", TINY, trained=True, lora_rank=8, lora_trains_others=True)
    assert plain.trained_params == LORA8
    assert others.trained_params == LORA8 + TINY.params - LINEAR == 73_728 + 280_064
    a, b = trained_states(plain, Sharding("zero0"), 1, "adamw"), trained_states(others, Sharding("zero0"), 1, "adamw")
    assert a.weights == b.weights == TINY.params * 2 + LORA8 * 2  # the others' 16-bit weights are the base's
    assert b.gradients == 353_792 * 2 and b.optimizer == 353_792 * 12 and b.step_extra == 353_792 * 4
    z3 = trained_states(others, Sharding("zero3"), 2, "adamw")
    assert z3.weights == TINY.params * 2 // 2 + LORA8 * 2 and z3.optimizer == 353_792 * 12 // 2
    full = Role("actor", TINY, trained=True, lora_trains_others=True)  # no LoRA: the flag changes nothing
    assert full.trained_params == TINY.params


def test_actor_ema_copy():
    w = (TINY.params + LORA8) * 2
    g = plan_deployment(dep(actor_ema=True)).groups[0]
    assert g.table["actor_ema.weights"] == {ph: w for ph in PHASES}
    z3 = plan_deployment(dep(stage=3, gpus=2, actor_ema=True)).groups[0]
    assert z3.table["actor_ema.weights"]["update"] == w // 2
    off = dep(stage=3, gpus=2, actor_ema=True)
    off = off.with_(reference=Role("reference", TINY, offload=True))
    base = plan_deployment(off.with_(actor_ema=False)).groups[0]
    g = plan_deployment(off).groups[0]
    assert "actor_ema.weights" not in g.table and g.host_bytes == base.host_bytes + w // 2
    assert "actor_ema.weights" not in plan_deployment(dep()).groups[0].table


def test_hybrid_engine_validation():
    with pytest.raises(ValueError, match="hybrid engine tp"):
        HybridEngine(tp=0)
    with pytest.raises(ValueError, match="engine kind 'hf'"):
        dep(engine=Engine("vllm"))


# Totals per group and phase of TRL / OpenRLHF / veRL plans, computed with memory/deploy.py before the
# hybrid-engine terms were added: none of them may move.
Q7 = load_arch("Qwen2.5-7B")
OPENRLHF = ("python3 -m openrlhf.cli.train_ppo_ray --pretrain meta-llama/Meta-Llama-3-8B "
            "--reward_pretrain Qwen2.5-0.5B --critic_pretrain Llama-3-8B --actor_num_gpus_per_node 4 "
            "--critic_num_gpus_per_node 2 --reward_num_gpus_per_node 2 --ref_num_gpus_per_node 2 "
            "--colocate_critic_reward --vllm_num_engines 2 --vllm_tensor_parallel_size 2 "
            "--vllm_gpu_memory_utilization 0.8 --zero_stage 3 --bf16 --gradient_checkpointing --adam_offload "
            "--micro_train_batch_size 2 --micro_rollout_batch_size 4 --prompt_max_len 1024 --generate_max_len 2048 "
            "--flash_attn")
VERL = ("python3 -m verl.trainer.main_ppo algorithm.adv_estimator=grpo data.max_prompt_length=512 "
        "data.max_response_length=1024 actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct "
        "actor_rollout_ref.model.enable_gradient_checkpointing=True actor_rollout_ref.actor.use_kl_loss=True "
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 actor_rollout_ref.rollout.name=vllm "
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.4 actor_rollout_ref.model.lora_rank=32 "
        "actor_rollout_ref.rollout.tensor_model_parallel_size=2 trainer.n_gpus_per_node=8 trainer.nnodes=1")
# LoRA's frozen norms (memory.arch.layer_saved(trained_norms=False), final_norm_saved) since the anchor: each
# LoRA update lower by the dtype copies a frozen norm does not keep (22,020,096 B for the TRL rows, 88,080,384 B
# for veRL's); no other phase and no full fine-tuning row moved. HF generate's prefill (memory.deploy.engine_memory,
# measured on real CPU tensors by benchmarks/bench_memory_small_real.py) since: the two HF-generate rows' generation
# phase higher by 83,886,080 B (the prompt's forward, one layer at a time); no other phase moved. The no-grad
# layer read allocation by allocation (memory.arch.nograd_layer_bytes) since: the layer's input (kept by the model's
# loop) and rotary cos/sin, 7,680 B per prompt token of the 8 x 512, and for LoRA the adapter's scaled output beside
# the MLP's (37,888 B), while generate's sampling tensors no longer coexist with the prefill (-4,866,048 B): the
# two HF-generate rows +26,591,232 and +181,780,480 B; OpenRLHF's critic scores with the first two (12,288 tokens)
BEFORE = {
    "trl_zero3_lora_hf": {"all": (5924279552, 9475806464, 9172249856, 4989474048, 7129093376)},
    "trl_zero3_full_hf": {"all": (30378548352, 20757935616, 21566393856, 23846849536, 18411222528)},
    "trl_zero2_lora_vllm": {"all": (41142332416, 43489045504, 45275483648, 41172610048, 41142332416)},
    "openrlhf": {"actor": (5015130624, 22977237504, 18384499200, 5015130624, 7116476928),
                 "ref": (8030261248, 25992368128, 8030261248, 8030261248, 8030261248),
                 # a critic has no LM head (Role.__post_init__): Llama-3-8B's 128256 x 4096 head, less the value
                 # head's 4096, in bf16 over the critic's 2 GPUs = 525,332,480 B below the first anchor
                 "critic": (8998961536, 12566217088, 15178842496, 8998961536, 8998961536),
                 "vllm": (68719476736,) * 5},
    # veRL's own log-prob head (memory.deploy.VERL_HEAD) since the anchor: scoring 3737124864 B lower, exactly
    # (10 - 6) B x vocabulary x 4 x 1536 tokens; the update 6542018560 B lower (its head no longer the larger of
    # head and recomputed layer)
    "verl_lora": {"all": (38288657152, 11758642944, 12099501824, 3969288960, 34714346240)},
}


def _others() -> dict[str, Deployment]:
    return {
        "trl_zero3_lora_hf": Deployment(actor=Role("actor", Q7, trained=True, lora_rank=16),
                                        reference=Role("reference", Q7), sharding=Sharding("zero3"),
                                        rollout_per_gpu=8, framework="trl"),
        "trl_zero3_full_hf": Deployment(actor=Role("actor", Q7, trained=True), reference=Role("reference", Q7),
                                        sharding=Sharding("zero3"), rollout_per_gpu=8, framework="trl"),
        "trl_zero2_lora_vllm": Deployment(actor=Role("actor", Q7, trained=True, lora_rank=16),
                                          sharding=Sharding("zero2"), engine=Engine("vllm", gpu_memory_utilization=0.3),
                                          framework="trl"),
        "openrlhf": from_openrlhf(OPENRLHF),
        "verl_lora": from_verl(VERL),
    }


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_other_frameworks_unchanged(name):
    d = _others()[name]
    assert d.hybrid_engine is None and not d.actor_ema and not d.actor.lora_trains_others
    plan = plan_deployment(d)
    assert {g.name: tuple(g.totals[ph] for ph in PHASES) for g in plan.groups} == BEFORE[name]
    for g in plan.groups:
        assert "engine.inference_workspace" not in g.table and "actor_ema.weights" not in g.table


BASE = ("deepspeed --num_gpus 8 main.py --actor_model_name_or_path facebook/opt-1.3b "
        "--critic_model_name_or_path facebook/opt-350m --max_prompt_seq_len 128 --max_answer_seq_len 64 ")


def test_reader_flags_switch_each_term():
    off = from_deepspeed_chat(BASE + "--actor_zero_stage 3 --actor_lora_dim 8")
    assert off.hybrid_engine is None and not off.actor_ema and off.actor.lora_trains_others
    he = from_deepspeed_chat(BASE + "--actor_zero_stage 3 --enable_hybrid_engine")
    assert he.hybrid_engine == HybridEngine(tp=1, tp_gather_partition_size=8, release_inference_cache=False,
                                            max_out_tokens=192)  # prompt + answer (rlhf_engine.py _init_actor)
    assert he.gather_for_generation  # pin_parameters
    tp = from_deepspeed_chat(BASE + "--actor_zero_stage 3 --enable_hybrid_engine --inference_tp_size 2 "
                             "--tp_gather_partition_size 4 --release_inference_cache")
    assert tp.hybrid_engine == HybridEngine(tp=2, tp_gather_partition_size=4, release_inference_cache=True,
                                            max_out_tokens=192)
    assert not from_deepspeed_chat(BASE + "--actor_zero_stage 3 --enable_hybrid_engine "
                                   "--unpin_actor_parameters").gather_for_generation
    lora = from_deepspeed_chat(BASE + "--actor_lora_dim 8 --critic_lora_dim 4")
    assert lora.actor.lora_trains_others and lora.critic.lora_trains_others
    only = from_deepspeed_chat(BASE + "--actor_lora_dim 8 --critic_lora_dim 4 --only_optimize_lora")
    assert not only.actor.lora_trains_others and not only.critic.lora_trains_others
    assert not from_deepspeed_chat(BASE).actor.lora_trains_others  # no LoRA: full fine-tuning
    assert from_deepspeed_chat(BASE + "--enable_ema").actor_ema
    # each switch moves the plan the way its term says
    peak = {k: plan_deployment(from_deepspeed_chat(BASE + "--actor_zero_stage 3 --actor_lora_dim 8 " + k)
                               ).groups[0].totals
            for k in ("--enable_hybrid_engine", "--enable_hybrid_engine --release_inference_cache",
                      "--enable_hybrid_engine --unpin_actor_parameters", "--enable_hybrid_engine --enable_ema",
                      "--enable_hybrid_engine --only_optimize_lora")}
    pinned = peak["--enable_hybrid_engine"]
    assert peak["--enable_hybrid_engine --release_inference_cache"]["update"] < pinned["update"]
    assert peak["--enable_hybrid_engine --unpin_actor_parameters"]["generation"] < pinned["generation"]
    assert peak["--enable_hybrid_engine --enable_ema"]["update"] > pinned["update"]
    assert peak["--enable_hybrid_engine --only_optimize_lora"]["optimizer_step"] < pinned["optimizer_step"]


def test_cli_reports_hybrid_engine(capsys):
    cmd = BASE + "--actor_zero_stage 3 --enable_hybrid_engine --inference_tp_size 2 --enable_ema"
    assert main(["plan", "--from_deepspeed_chat", cmd, "--gpu_memory", "40GiB", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["inputs"]["hybrid_engine"] == {"tp": 2, "tp_gather_partition_size": 8,
                                              "release_inference_cache": False, "max_out_tokens": 192}
    assert rep["inputs"]["actor_ema"] is True
    table = rep["groups"]["all"]["table"]
    assert "engine.inference_workspace" in table and "actor_ema.weights" in table


def test_hybrid_engine_has_no_separate_weight_sync():
    """DeepSpeed-HE generates with the actor's own (gathered) weights: the gather is the generation row and the
    generic one-unit weight-sync gather of a ZeRO-3 actor is not added; plain HF generate under ZeRO-3 keeps it."""
    with_he = plan_deployment(dep(stage=3, gpus=4)).groups[0].table
    without = plan_deployment(dep(stage=3, gpus=4, he=None)).groups[0].table
    assert "actor.gathered_for_sync" not in with_he
    assert without["actor.gathered_for_sync"]["weight_sync"] == 2 * TINY.largest_param * 2


def test_deepspeed_chat_deployment_round_trips_through_json():
    """memory.json carries the deployment for the dashboard's what-if: the hybrid engine comes back as itself."""
    from memory.deploy_json import deployment_from_dict, deployment_to_dict

    d = from_deepspeed_chat("deepspeed --num_gpus 8 main.py --actor_model_name_or_path facebook/opt-13b "
                            "--critic_model_name_or_path facebook/opt-350m --actor_zero_stage 3 --critic_zero_stage 3 "
                            "--enable_hybrid_engine --inference_tp_size 2 --enable_ema", gpu_memory=40 * GiB)
    back = deployment_from_dict(json.loads(json.dumps(deployment_to_dict(d))))
    assert back == d and isinstance(back.hybrid_engine, HybridEngine)
    assert plan_deployment(back).peak_bytes == plan_deployment(d).peak_bytes
