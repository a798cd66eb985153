"""veRL's FSDP1 actor (LoRA, fp32 base, bf16 compute) measured on CPU ranks: what one rank holds in training and
in the weight sync, next to the planner's terms.

    python benchmarks/bench_memory_fsdp1_verl.py [--out benchmarks/results/memory_fsdp1_verl.json]

Why: veRL's multi-GPU LoRA rows of memory/published.json run out of memory ~2·P/N bytes per GPU earlier than
the planner predicts (bench_memory_published.py). This measures the FSDP side of that question with the real
FSDP1 code veRL runs at 49b08e9 (``actor.strategy=fsdp``): a Qwen2-shaped model built the way
``fsdp_workers.py _build_model_optimizer`` builds it (fp32 weights, HF non-reentrant gradient checkpointing,
``enable_input_require_grads``, peft LoRA on all linear layers, ``MixedPrecision(bf16, fp32, fp32)``,
``use_orig_params=False``, the LoRA wrap policy of ``get_fsdp_wrap_policy``: each adapter Linear and each
decoder layer its own unit), FULL_SHARD over N gloo ranks (NO_SHARD at N = 1, as FSDP1 switches to it).

Per rank, the live CPU tensor bytes are replayed from the profiler's allocation events (memory.measure):
- ``train``: one forward + backward (a few tokens, so the FSDP buffers dominate); fitted against the number of
  decoder layers, its slope says whether a rank keeps a copy that grows with the model (a bf16 copy of the
  local shards would add 2·layer/N bytes per layer);
- ``state_dict``: ``module.state_dict()`` with the type veRL's FSDPVLLMShardingManager sets (SHARDED_STATE_DICT
  with DTensors for N > 1, FULL_STATE_DICT for N = 1): bytes still held when it returns (planner:
  ``actor.state_dict_copy`` = P·4/N) and its peak (planner: that plus the root unit and one layer in fp32);
- ``layered_summon`` / ``summon_full``: veRL's ``layered_summon_lora_params`` (one decoder layer at a time) and
  ``FSDP.summon_full_params(module)`` (all at once), fp32 (planner: one layer, or the whole model).

Limits: CPU tensors and gloo, so no CUDA streams, caching-allocator fragmentation, NCCL buffers or vLLM; a
small model (hidden 512), not the published sizes; Ulysses sequence parallelism is not included.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import row, write_result  # noqa: E402

HIDDEN, INTER, HEADS, KV, VOCAB, RANK, TOKENS = 512, 2048, 8, 2, 8192, 8, 16


def _worker() -> None:
    """One rank: build veRL's FSDP1 LoRA actor and print its measured regions as one JSON line."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy, StateDictType
    from torch.distributed.fsdp.api import FullStateDictConfig, ShardedStateDictConfig
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from memory.measure import measure_peak

    world, layers = int(os.environ["WORLD_SIZE"]), int(os.environ["LAYERS"])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", bias="none",
                                             task_type="CAUSAL_LM"))
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.base_model.model.model.layers[0].parameters())
    root = params - layers * layer
    largest = max(p.numel() for p in model.parameters())
    adapters = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: len(list(m.named_children())) == 0
                                 and getattr(m, "weight", None) is not None and m.weight.requires_grad)
    blocks = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Qwen2DecoderLayer})
    mesh = init_device_mesh("cpu", (world,))
    fsdp = FSDP(model, auto_wrap_policy=functools.partial(_or_policy, policies=[adapters, blocks]),
                use_orig_params=False, device_id=torch.device("cpu"), device_mesh=mesh,
                sharding_strategy=ShardingStrategy.FULL_SHARD if world > 1 else ShardingStrategy.NO_SHARD,
                mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               buffer_dtype=torch.float32))
    opt = torch.optim.AdamW([p for p in fsdp.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, VOCAB, (1, TOKENS))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fsdp(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
        loss.backward()

    step()
    opt.step()
    opt.zero_grad()  # warm-up: lazy init and optimizer state exist before the measured step
    _, train = measure_peak(step)
    opt.zero_grad()
    if world > 1:  # fsdp_vllm.py FSDPVLLMShardingManager.__init__: full_params = (world size == 1)
        FSDP.set_state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig())
    else:
        FSDP.set_state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig())
    held, sd = measure_peak(fsdp.state_dict)
    del held

    def layered() -> None:  # verl/utils/fsdp_utils.py layered_summon_lora_params, per decoder layer
        for name, sub in fsdp.named_modules():
            if isinstance(sub, FSDP) and name.endswith(tuple(f"layers.{i}" for i in range(layers))):
                with FSDP.summon_full_params(sub, writeback=False):
                    [p.detach().clone() for n, p in sub.named_parameters() if "lora_" in n]

    def whole() -> None:  # the same without layered_summon: FSDP.summon_full_params(self.module)
        with FSDP.summon_full_params(fsdp, writeback=False):
            [p.detach().clone() for n, p in fsdp.named_parameters() if "lora_" in n]

    _, lay = measure_peak(layered)
    _, full = measure_peak(whole)
    # what the transport itself adds to a gather into a preallocated buffer (gloo copies through a flat temp;
    # NCCL writes in place), measured so the summon peaks can be read without it
    out_buf, inp = torch.empty(layer * world), torch.ones(layer)
    _, gather = measure_peak(lambda: dist.all_gather_into_tensor(out_buf, inp))
    print(json.dumps({"world": world, "layers": layers, "rank": dist.get_rank(), "params": params,
                      "layer_params": layer, "root_params": root, "train_peak": train.delta_peak_bytes,
                      "state_dict_peak": sd.delta_peak_bytes, "state_dict_held": sd.end_delta_bytes,
                      "layered_summon_peak": lay.delta_peak_bytes, "summon_full_peak": full.delta_peak_bytes,
                      "gather_temp_per_output_byte": gather.delta_peak_bytes / (out_buf.numel() * 4),
                      "largest_param": largest}))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, layers: int, port: int) -> dict:
    """Launch ``world`` ranks; the largest per-rank numbers (ranks differ by padding only)."""
    env = {**os.environ, "WORLD_SIZE": str(world), "LAYERS": str(layers), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker"], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"rank failed (world {world}, layers {layers}): {err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    keys = ("train_peak", "state_dict_peak", "state_dict_held", "layered_summon_peak", "summon_full_peak")
    return {**outs[0], **{k: max(o[k] for o in outs) for k in keys}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_fsdp1_verl.json"))
    a = p.parse_args()
    if a.worker:
        _worker()
        sys.stdout.flush()
        sys.stderr.flush()
        # the numbers are out; skip interpreter teardown, where gloo's threads now and then abort the process
        # ("terminate called without an active exception", about 1 run in 5 here) after a clean measurement
        os._exit(0)
    runs = [run(w, L, 29700 + 10 * w + L) for w in (1, 2, 4) for L in (4, 16)]
    for r in runs:
        print(f"N={r['world']} layers={r['layers']:2d}: train {r['train_peak'] / 1e6:6.1f} MB, state_dict held "
              f"{r['state_dict_held'] / 1e6:6.1f} MB (P*4/N {r['params'] * 4 / r['world'] / 1e6:6.1f}), peak "
              f"{r['state_dict_peak'] / 1e6:6.1f} MB; layered summon {r['layered_summon_peak'] / 1e6:5.1f} MB "
              f"(layer*4 {r['layer_params'] * 4 / 1e6:5.1f}), full summon {r['summon_full_peak'] / 1e6:6.1f} MB "
              f"(P*4 {r['params'] * 4 / 1e6:6.1f})")
    write_result("memory_fsdp1_verl", summary(runs), {"runs": runs, "model": {
        "hidden": HIDDEN, "intermediate": INTER, "heads": HEADS, "kv_heads": KV, "vocab": VOCAB, "lora_rank": RANK,
        "tokens": TOKENS}}, path=Path(a.out))
    return 0


def summary(runs: list[dict]) -> list[dict]:
    """Rows: the training slope per decoder layer against a bf16 shard copy, and the weight-sync terms."""
    out = []
    by = {(r["world"], r["layers"]): r for r in runs}
    for n in sorted({r["world"] for r in runs}):
        lo, hi = by[(n, 4)], by[(n, 16)]
        slope = (hi["train_peak"] - lo["train_peak"]) / 12
        copy = 2 * hi["layer_params"] / n
        out.append(row(f"FSDP1 LoRA fwd+bwd peak growth per decoder layer, N={n}", round(slope), "bytes",
                       f"< {round(copy)} (a bf16 copy of the shards)", slope < copy,
                       "few tokens: the slope is what a rank keeps per layer of model"))
    held = max(abs(r["state_dict_held"] / (r["params"] * 4 / r["world"]) - 1) for r in runs)
    out.append(row("FSDP1 state_dict() held bytes vs the planner's P*4/N copy, worst error", f"{held:.1%}", "",
                   "within 5%", held <= 0.05,
                   "SHARDED_STATE_DICT (DTensor) for N > 1, FULL_STATE_DICT for N = 1, as fsdp_vllm.py sets"))
    multi = [r for r in runs if r["world"] > 1]
    peak = max(abs(r["state_dict_peak"] / (r["state_dict_held"] + (r["root_params"] + r["largest_param"]) * 4) - 1)
               for r in multi)
    out.append(row("FSDP1 state_dict() peak vs copy + root + largest tensor in fp32, worst error", f"{peak:.1%}",
                   "", "within 5%", peak <= 0.05, "N > 1: the planner's weight-sync term before vLLM wakes"))

    def net(r: dict, key: str) -> float:  # less the transport's own copy of the last gathered layer
        return r[key] - r["gather_temp_per_output_byte"] * r["layer_params"] * 4

    lay = max(abs(net(r, "layered_summon_peak") / (r["layer_params"] * 4) - 1) for r in multi)
    full = max(abs(net(r, "summon_full_peak") / (r["params"] * 4) - 1) for r in multi)
    out.append(row("FSDP1 summon peaks vs the planner (one fp32 layer / whole fp32 model), worst error",
                   f"{lay:.1%} / {full:.1%}", "", "within 10%", lay <= 0.1 and full <= 0.1,
                   "layered_summon_lora_params vs FSDP.summon_full_params(module), N > 1, less gloo's measured "
                   "copy of one gathered layer (NCCL gathers in place)"))
    return out


if __name__ == "__main__":
    sys.exit(main())
