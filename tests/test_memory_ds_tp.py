"""DeepSpeed AutoTP training (OpenRLHF --ds_tensor_parallel_size / --ds.tensor_parallel_size): the reader, the
planner's per-GPU terms against hand computation and against DeepSpeed's own tensors (measured by
benchmarks/bench_memory_ds_autotp.py), and the identity at tensor_parallel 1."""
import json

import pytest

from memory.advise import suggest
from memory.arch import arch_from_config, layer_saved
from memory.cli import main
from memory.deploy import (
    Deployment,
    Engine,
    Role,
    Sharding,
    engine_memory,
    plan_deployment,
    tp_local,
    trained_states,
    update_transient,
)
from memory.inputs import from_openrlhf

# the model of benchmarks/bench_memory_ds_autotp.py: untied Llama, h 256, i 768, 4 layers, 4 heads, 2 KV heads
SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 256,
         "tie_word_embeddings": False}
FLAT = ("--pretrain Qwen2.5-7B --vllm_num_engines 8 --colocate_all_models --bf16 --zero_stage 2 "
        "--advantage_estimator reinforce --micro_train_batch_size 2")
DOTTED = ("--actor.model_name_or_path Qwen2.5-7B --vllm.num_engines 8 --train.colocate_all "
          "--algo.advantage.estimator reinforce --train.micro_batch_size 2")


def _small(tp: int, world: int, stage: int = 2, head: bool = True, **kw) -> Deployment:
    arch = arch_from_config(dict(SMALL), name="llama-small")
    return Deployment(actor=Role("actor", arch, trained=True), groups={"all": world}, sharding=Sharding(f"zero{stage}"),
                      tensor_parallel=tp, tensor_parallel_head=head, micro_batch=2, prompt_len=32, response_len=32,
                      **kw)


# ---- the reader ---------------------------------------------------------------------------------------------

def test_reader_flat_and_dotted_tp():
    assert from_openrlhf(FLAT).tensor_parallel == 1  # the flag's default
    flat = from_openrlhf(FLAT + " --ds_tensor_parallel_size 2")
    # flat versions pin DeepSpeed <= 0.18.9: the LM head stays whole
    assert (flat.tensor_parallel, flat.tensor_parallel_head, flat.groups) == (2, False, {"actor": 8})
    dotted = from_openrlhf(DOTTED + " --ds.tensor_parallel_size 4")
    # read as 3c3be623 (DeepSpeed 0.19.5): transformers' _tp_plan splits an untied LM head too
    assert (dotted.tensor_parallel, dotted.tensor_parallel_head) == (4, True)
    # the micro-batch flags count sequences of a TP group, as they do of a ring group: not divided by tp
    assert flat.micro_batch == dotted.micro_batch == 2
    both = from_openrlhf(DOTTED + " --ds.tensor_parallel_size 2 --ds.ring_attn_size 2")
    assert (both.tensor_parallel, both.sequence_parallel) == (2, 2)
    # ZeRO-3 under AutoTP: refused by the flat versions' DeepSpeed, allowed by 3c3be623's
    assert from_openrlhf(DOTTED + " --ds.tensor_parallel_size 2 --ds.zero_stage 3").sharding.kind == "zero3"


def test_reader_tp_errors_are_one_line():
    bad = {
        FLAT.replace("--bf16 ", "") + " --ds_tensor_parallel_size 2": "needs bf16 weights.*--bf16",
        FLAT.replace("--bf16", "--param_dtype fp16") + " --ds_tensor_parallel_size 2": "needs bf16.*--param_dtype bf16",
        DOTTED + " --ds.param_dtype fp16 --ds.tensor_parallel_size 2": "--ds.tensor_parallel_size 2 needs bf16",
        FLAT.replace("--zero_stage 2", "--zero_stage 3") + " --ds_tensor_parallel_size 2": "ZeRO stage 0-2 only",
        FLAT + " --ds_tensor_parallel_size 3": "8 GPUs do not split.*tensor parallel 3",
        DOTTED + " --ds.tensor_parallel_size 4 --ds.ring_attn_size 4": "ring attention 4 x tensor parallel 4",
        FLAT + " --ds_tensor_parallel_size 0": "--ds_tensor_parallel_size 0: must be at least 1",
        FLAT + " --ds_tensor_parallel_size 2 --lora_rank 16": "LoRA or 4-bit weights is not modelled",
        # one syntax per command, as for every other flag
        FLAT + " --ds.tensor_parallel_size 2": "mixes OpenRLHF's flat flags",
    }
    for cmd, msg in bad.items():
        with pytest.raises(ValueError, match=msg) as err:
            from_openrlhf(cmd)
        assert "\n" not in str(err.value) and str(err.value).startswith("--from_openrlhf:")


def test_reader_dynamic_batch_budget_counts_the_tp_group():
    # seqlen_balancing.get_minimum_num_micro_batch_size multiplies the budget by ring x tp; dp = GPUs // (ring x tp).
    # tp 2 on 8 GPUs: dp 4, 128 // 4 = 32 sequences of 2048 a step, 16192 x 2 // 2048 = 15 a bin -> 3 bins ->
    # ceil(32 / 3) = 11 a micro-batch; scoring: 1024 sequences, 15 a bin -> 69 bins, rounded down to 68 (a multiple
    # of dp 4) -> ceil(1024 / 68) = 16. Without tp: dp 8, 16 a step, 7 a bin -> 3 bins -> 6; 147 bins -> 144 -> 8
    cmd = ("--actor.model_name_or_path Qwen2.5-0.5B --vllm.num_engines 8 --data.max_len 2048 "
           "--train.dynamic_batch_enable")
    one, two = from_openrlhf(cmd), from_openrlhf(cmd + " --ds.tensor_parallel_size 2")
    assert (one.micro_batch, one.score_micro_batch) == (6, 8)
    assert (two.micro_batch, two.score_micro_batch) == (11, 16)


def test_suggestions_and_json_name_tp(capsys):
    dep = from_openrlhf(DOTTED + " --data.max_len 16384 --ds.tensor_parallel_size 2")
    changes = {c.key: c for c in suggest(dep)}
    assert changes["train_tp"].flag == "--ds.tensor_parallel_size 4"
    assert "lora" not in changes and "qlora" not in changes  # LoRA under AutoTP is not modelled
    flat = from_openrlhf(FLAT + " --prompt_max_len 8192 --generate_max_len 8192")
    flat_changes = {c.key: c for c in suggest(flat)}
    assert flat_changes["train_tp"].flag == "--ds_tensor_parallel_size 2"
    # the flat versions' DeepSpeed refuses ZeRO-3 with AutoTP: not suggested together
    assert "zero3" not in {c.key for c in suggest(flat.with_(tensor_parallel=2))}
    assert main(["plan", "--from_openrlhf", DOTTED + " --ds.tensor_parallel_size 2", "--json"]) in (0, 1)
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["tensor_parallel"] == 2 and out["inputs"]["tensor_parallel_head"] is True


# ---- the planner ----------------------------------------------------------------------------------------------

def test_tp_local_shapes_by_hand():
    # per layer: q 256x256, k/v 256x128, o 256x256 = 196608; MLP 3 x 256 x 768 = 589824; norms 512. Whole:
    # 4 x 786944 + embeddings 524288 + final norm 256 + head 524288 = 4196608. At tp 2 the projections halve
    # (393216 a layer) and, split by vocabulary, the head: 4 x 393728 + 524288 + 256 + 262144 = 2361600
    full = _small(1, 2)
    assert full.actor.arch.params == 4_196_608 and tp_local(full.actor, full) is full.actor
    two = _small(2, 2)
    local = tp_local(two.actor, two).arch
    assert (local.heads, local.kv_heads, local.intermediate, local.hidden) == (2, 1, 384, 256)
    assert (local.params, local.layer_params, local.head_params) == (2_361_600, 393_728, 262_144)
    assert local.largest_param == 2048 * 256  # the embedding stays whole on every rank
    assert tp_local(two.actor, _small(2, 2, head=False)).arch.params == 2_361_600 + 262_144
    # a critic has no LM head, only its (hidden x 1) value head, which stays whole
    critic = Role("critic", two.actor.arch, trained=True, value_head=True)
    assert tp_local(critic, two).arch.params == 2_361_600 - 262_144 + 256
    # more ranks than KV heads: whole KV heads, queries with theirs (rank 0 holds one KV head and 2 query heads)
    four = tp_local(two.actor, _small(4, 4)).arch
    assert (four.kv_heads, four.heads, four.intermediate) == (1, 2, 192)


def test_per_gpu_bytes_at_tp2_by_hand_and_as_measured():
    # 4 GPUs, tp 2: ZeRO over 2. DeepSpeed 0.19.8 on CPU ranks (benchmarks/results/memory_ds_autotp.json) holds
    # 4723200 B of 16-bit weights, 14169600 B of fp32 master + Adam moments (ZeRO-1/2/3), 2361600 B of 16-bit
    # gradient partition (ZeRO-3; ZeRO-2's measured 2425856 counts whole storages of views), 2361600 B of
    # ZeRO-3 weight partition: 2 / 12 / 2 B x 2361600 local parameters over 1 or 2
    P = 2_361_600
    for stage in (1, 2, 3):
        dep = _small(2, 4, stage)
        st = trained_states(tp_local(dep.actor, dep), dep.sharding, 2, dep.optimizer)
        assert st.optimizer == 12 * P // 2 == 14_169_600
        assert st.weights == (2 * P // 2 if stage == 3 else 2 * P) and st.gradients == 2 * P // (1 + (stage > 1))
        group = plan_deployment(dep).groups[0]
        assert group.gpus == 4 and group.table["actor.weights"]["update"] == st.weights
        assert group.table["actor.optimizer"]["optimizer_step"] == 14_169_600
    # 2 GPUs, tp 2: no data parallelism left, every state whole on each rank (measured 28339200 = 12 x P)
    dep = _small(2, 2, 1)
    assert plan_deployment(dep).groups[0].table["actor.optimizer"]["update"] == 12 * P == 28_339_200


def test_activations_at_tp2_by_hand():
    # one layer at tp 2 (flash): norms 2 x 2 x 256 dtype + 2 x 257 fp32; q, attention output 2 x 128, k, v 2 x 64;
    # MLP 4 x 384; 2 heads' log-sum-exp fp32: (1024 + 384 + 1536) x 2 + (514 + 2) x 4 = 7952 B a token; the
    # hidden-width tensors stay whole. Measured on DeepSpeed's TP layers (saved_tensors_hooks, 128 tokens):
    # 1034240 B a layer against 7952 x 128 = 1017856 (+16384 B: rotary cos/sin, at tp 1 too)
    dep = _small(2, 2, 1, gradient_checkpointing=False)
    local = tp_local(dep.actor, dep)
    assert layer_saved(local.arch, "flash", 64).bytes(2) == 7952
    assert layer_saved(dep.actor.arch, "flash", 64).bytes(2) == 11800  # tp 1: 1510400 / 128, measured 1526784
    # the update: 4 layers x 128 tokens x 7952 + the head, whose logits are gathered whole (12 B x vocab of fp32
    # log-softmax and its backward) + the final norm (2 x 256 dtype + 257 fp32)
    head = 128 * (12 * 2048 + 2 * 256 * 2 + 257 * 4)
    assert update_transient(local, dep) == 4 * 128 * 7952 + head
    assert plan_deployment(dep).groups[0].table["actor.activations"]["update"] == 4 * 128 * 7952 + head
    # tokens per GPU are a TP group's micro-batch: every rank holds all of them
    whole = _small(1, 2, 1, gradient_checkpointing=False)
    assert update_transient(whole.actor, whole) - update_transient(local, dep) == 4 * 128 * (11800 - 7952)


def test_hf_generate_kv_and_weight_sync_at_tp():
    # HF generate with the TP actor: each rank holds its KV heads (1 of 2) for the same sequences
    one, two = _small(1, 2, 2), _small(2, 2, 2)
    assert engine_memory(one).kv_pool == 2 * engine_memory(two).kv_pool
    # the sync to vLLM gathers one whole parameter at a time (GatherReplacedLayerParams) and copies it for the engine;
    # HF generate has no sync
    vllm = two.with_(engine=Engine("vllm", group="all"))
    assert plan_deployment(vllm).groups[0].table["actor.gathered_for_sync"]["weight_sync"] == 2 * 2048 * 256 * 2
    assert "actor.gathered_for_sync" not in plan_deployment(two).groups[0].table


def test_tp_validation():
    with pytest.raises(ValueError, match="tensor_parallel must be >= 1"):
        _small(0, 2)
    with pytest.raises(ValueError, match="do not split"):
        _small(2, 3)
    with pytest.raises(ValueError, match="do not split"):
        _small(2, 4, sequence_parallel=4)
    with pytest.raises(ValueError, match="ZeRO sharding"):
        _small(2, 2).with_(sharding=Sharding("fsdp_full"))
    with pytest.raises(ValueError, match="LoRA or 4-bit"):
        dep = _small(2, 2)
        dep.with_(actor=Role("actor", dep.actor.arch, trained=True, lora_rank=8))


def test_tp1_is_the_plan_without_tp():
    # tensor_parallel 1 leaves every role and term as it was (benchmarks/bench_memory_published.py and
    # bench_memory_deepspeed.py print the same bytes before and after the field)
    dep = from_openrlhf(FLAT)
    same = dep.with_(tensor_parallel=1, tensor_parallel_head=True)
    assert plan_deployment(dep).to_dict() == plan_deployment(same).to_dict()
    assert all(tp_local(r, same) is r for r in same.roles())
    # and tp 2 changes them
    assert plan_deployment(dep.with_(tensor_parallel=2)).peak_bytes < plan_deployment(dep).peak_bytes


def test_deepspeed_autotp_ranks_hold_what_the_planner_says():
    # DeepSpeed's own engine on 2 gloo CPU ranks at tp 2, ZeRO-1 (benchmarks/bench_memory_ds_autotp.py, one setting);
    # DeepSpeed is a test requirement (requirements-dev.txt): a missing install fails here rather than skips
    from benchmarks.bench_memory_ds_autotp import compare, run_ranks

    c = compare(run_ranks({"world": 2, "tp": 2, "stage": 1}))
    m, p = c["measured"], c["planned"]
    assert c["dp_world"] == 1 and c["ranks_equal"]
    assert [m[k] for k in ("local_params", "weights_16bit", "master_and_moments")] == \
        [p[k] for k in ("local_params", "weights_16bit", "master_and_moments")]
    assert c["layer_shapes"]["model.layers.0.mlp.down_proj.weight"] == [256, 384]  # row-split: input halved
    assert c["layer_shapes"]["model.embed_tokens.weight"] == [2048, 256]  # whole on every rank
    assert p["saved_per_layer"] == pytest.approx(m["saved_per_layer"], rel=0.02)
