"""The planner's FSDP per-GPU phases against torch's FSDPMemTracker on a fake process group (small models).

Each measurement runs in its own interpreter: the fake process group is process-wide and must not leak into
other tests. benchmarks/bench_memory_fsdp.py does the same at real size."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_memory_fsdp1_verl import run
from memory.arch import arch_from_config
from memory.deploy import Deployment, Engine, Role, Sharding, plan_deployment

ROOT = Path(__file__).resolve().parents[1]
QWEN = dict(model_type="qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, vocab_size=5000, tie_word_embeddings=True)
LLAMA = dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=3, vocab_size=4000, tie_word_embeddings=False)
MEASURE = """
import json, sys
from memory.memtrack import TrackSpec, measure_fsdp
cfg, gpus, batch, seq, ckpt, lora = json.loads(sys.argv[1])
r = measure_fsdp(TrackSpec(cfg, batch=batch, seq=seq, gradient_checkpointing=ckpt, lora_rank=lora, attn="flash"),
                 gpus)
print(json.dumps({"peaks": r.peaks, "breakdown": r.breakdown}))
"""


def _measure(cfg, gpus, batch, seq, ckpt, lora):
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([cfg, gpus, batch, seq, ckpt, lora])],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cfg,gpus,batch,seq,ckpt,lora", [
    (QWEN, 4, 2, 128, False, 0), (QWEN, 4, 2, 128, True, 0), (LLAMA, 8, 2, 128, True, 8),
])
def test_fsdp_phases_within_10_percent_of_fsdp_memtracker(cfg, gpus, batch, seq, ckpt, lora):
    m = _measure(cfg, gpus, batch, seq, ckpt, lora)
    arch = arch_from_config(cfg)
    dep = Deployment(actor=Role("actor", arch, trained=True, lora_rank=lora, storage_bytes=4), groups={"all": gpus},
                     sharding=Sharding("fsdp_full"), engine=Engine("hf"), micro_batch=batch,
                     prompt_len=seq // 2, response_len=seq - seq // 2, rollout_per_gpu=1, gradient_checkpointing=ckpt,
                     attn="flash", optimizer_impl="single_tensor")
    totals = plan_deployment(dep).groups[0].totals
    for phase, measured in m["peaks"].items():
        assert totals[phase] == pytest.approx(measured, rel=0.10), (phase, totals[phase], measured)
    # sharding arithmetic, measured: each rank holds 1/N of the fp32 parameters
    if not lora:
        assert m["breakdown"]["optimizer_step"]["SHARDED_PARAM"] == pytest.approx(arch.params * 4 / gpus, rel=0.01)


def test_fsdp1_state_dict_and_summon_match_verls_weight_sync_terms():
    """veRL's FSDP1 LoRA actor on two gloo CPU ranks (benchmarks/bench_memory_fsdp1_verl.py): state_dict()
    keeps a P*4/N clone (memory.deploy.sync_terms' actor.state_dict_copy), peaking with the root unit and the
    largest tensor in fp32; the layered summon holds one fp32 layer beyond gloo's measured gather copy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run(2, 4, port)
    copy = r["params"] * 4 / 2
    assert r["state_dict_held"] == pytest.approx(copy, rel=0.05)
    assert r["state_dict_peak"] == pytest.approx(copy + (r["root_params"] + r["largest_param"]) * 4, rel=0.05)
    net = r["layered_summon_peak"] - r["gather_temp_per_output_byte"] * r["layer_params"] * 4
    assert net == pytest.approx(r["layer_params"] * 4, rel=0.1)
