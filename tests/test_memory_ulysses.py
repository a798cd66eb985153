"""Ulysses sequence parallelism in the MemTracker measurement (memory/memtrack.py) and in the planner.

The measured Ulysses step is first checked for what it computes, on two real gloo ranks: the same log-probs and,
summed over the group, the same gradients as one process with the whole sequence. Then its bytes, on a fake
process group in a fresh interpreter (the group is process-wide): one SP 2 rank against one GPU holding the same
tokens, and against the planner's ``sequence_parallel``. bench_memory_ulysses.py does the same at real size."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import launch_ranks
from memory.arch import arch_from_config
from memory.deploy import Deployment, Engine, Role, Sharding, plan_deployment

ROOT = Path(__file__).resolve().parents[1]
QWEN = dict(model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, vocab_size=3000, tie_word_embeddings=True)

RANK = """
import copy, json, torch, torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM
from memory.memtrack import _logprobs, _register_flash_attention, _ulysses_functions
dist.init_process_group("gloo")
rank, n, seq = dist.get_rank(), dist.get_world_size(), 64
cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
torch.manual_seed(0)
whole = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
split = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=_register_flash_attention(n),
                                         dtype=torch.float32)
split.load_state_dict(whole.state_dict())
ids = torch.randint(0, 300, (1, seq), generator=torch.Generator().manual_seed(1))
ref = _logprobs(whole, ids)
part = slice(rank * seq // n, (rank + 1) * seq // n)
_, gather = _ulysses_functions()
got = gather.apply(_logprobs(split, ids[:, part], torch.arange(seq)[part].unsqueeze(0)), 1)
ref.sum().backward()
got.sum().backward()
g_ref = torch.cat([p.grad.flatten() for p in whole.parameters()])
g_got = torch.cat([p.grad.flatten() for p in split.parameters()])
dist.all_reduce(g_got)
g_got /= n
print(json.dumps({"logprob_diff": (got - ref).abs().max().item(),
                  "grad_diff": (g_got - g_ref).abs().max().item(), "grad_scale": g_ref.abs().max().item()}))
"""

MEASURE = """
import json, sys
from memory.memtrack import TrackSpec, measure
cfg, batch, seq, ckpt, lora, sp = json.loads(sys.argv[1])
r = measure(TrackSpec(cfg, batch=batch, seq=seq, gradient_checkpointing=ckpt, lora_rank=lora, attn="flash",
                      sequence_parallel=sp))
print(json.dumps(r.peaks))
"""


def _measure(*args):
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(args)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ulysses_ranks_compute_what_one_process_computes():
    for r in launch_ranks("-c", 2, [RANK], "Ulysses gloo ranks", timeout=300):
        assert r["logprob_diff"] < 1e-5, r
        assert r["grad_diff"] < 1e-5 * max(1.0, r["grad_scale"]), r


@pytest.mark.parametrize("ckpt,lora", [(False, 0), (True, 8)])
def test_one_ulysses_rank_holds_what_one_gpu_with_its_tokens_holds_and_what_is_planned(ckpt, lora):
    batch, seq = 4, 256
    sp2 = _measure(QWEN, batch, seq, ckpt, lora, 2)
    sp1 = _measure(QWEN, batch // 2, seq, ckpt, lora, 1)
    dep = Deployment(actor=Role("actor", arch_from_config(QWEN), trained=True, lora_rank=lora),
                     groups={"all": 2}, sharding=Sharding("zero0", mixed_precision=False), engine=Engine("hf"),
                     micro_batch=batch, prompt_len=seq // 2, response_len=seq - seq // 2, rollout_per_gpu=1,
                     gradient_checkpointing=ckpt, attn="flash", optimizer_impl="single_tensor", sequence_parallel=2)
    totals = plan_deployment(dep).groups[0].totals
    assert sp2["scoring"] == pytest.approx(sp1["scoring"], rel=0.001)
    # the exchanged q, k, v and attention output are the size of the rank's own. Without checkpointing one
    # q-sized tensor per layer more is kept (measured: 1.06 of them); with it nothing is (measured +0.1%).
    # A kept copy of all four exchanged tensors would be 2.5 query sizes per layer here.
    q_bytes = batch * seq // 2 * QWEN["hidden_size"] * 2 * QWEN["num_hidden_layers"]
    extra = sp2["update"] - sp1["update"]
    assert 0 <= extra <= (0.02 * sp1["update"] if ckpt else 1.25 * q_bytes), (extra, q_bytes)
    for phase in ("scoring", "update"):
        assert totals[phase] == pytest.approx(sp2[phase], rel=0.10), (phase, totals[phase], sp2[phase])
