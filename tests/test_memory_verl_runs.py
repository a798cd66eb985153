"""The real veRL runs of memory/measured_runs.json and the torch-counted peak they are compared with."""
import json
from pathlib import Path

from memory.deploy import PHASES, plan_deployment, torch_counted_peak
from memory.inputs import from_verl

ROOT = Path(__file__).resolve().parents[1]
RUNS = json.loads((ROOT / "memory/measured_runs.json").read_text())["runs"]
BASE = ("actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct algorithm.adv_estimator=grpo data.train_batch_size=64 "
        "data.max_prompt_length=128 data.max_response_length=256 actor_rollout_ref.model.lora_rank=32 "
        "actor_rollout_ref.model.enable_gradient_checkpointing=True actor_rollout_ref.actor.ppo_mini_batch_size=64 "
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 actor_rollout_ref.rollout.n=5 "
        "actor_rollout_ref.actor.fsdp_config.param_offload=True actor_rollout_ref.rollout.name=vllm "
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3 actor_rollout_ref.rollout.tensor_model_parallel_size=2 "
        "trainer.n_gpus_per_node=8 trainer.nnodes=1")


def test_torch_counts_the_slept_engine_in_every_training_phase(tmp_path):
    """vLLM's sleep unmaps its weights and KV pool but torch's allocator still holds their blocks: the counter is
    each training phase's physical bytes with the engine's rows replaced by its weights + KV pool."""
    plan = plan_deployment(from_verl(BASE))
    g, e = plan.groups[0], plan.engine
    assert plan.deployment.engine.sleep and plan.deployment.engine.kind == "vllm"
    by_hand = {ph: g.totals[ph] - sum(row[ph] for c, row in g.table.items() if c.startswith("engine."))
               + e.weights + e.kv_pool for ph in PHASES if ph != "generation"}
    by_hand["generation"] = g.totals["generation"]
    assert torch_counted_peak(plan) == max(by_hand.values())
    assert torch_counted_peak(plan) > plan.peak_bytes  # the slept engine is counted on top of training
    from memory.cli import main

    assert main(["plan", "--from_verl", BASE, "--json", "--out", str(Path(tmp_path) / "p.json")]) == 0
    rep = json.loads((Path(tmp_path) / "p.json").read_text())
    assert rep["groups"]["all"]["torch_counted_peak_bytes"] == torch_counted_peak(plan)
    # and the report says so
    assert any(f"{torch_counted_peak(plan) / 2**30:.2f} GiB" in n for n in rep["groups"]["all"]["notes"])


def test_without_a_sleeping_vllm_the_counter_is_the_physical_peak():
    from dataclasses import replace

    dep = from_verl(BASE)
    for d in (from_verl(BASE.replace("rollout.name=vllm", "rollout.name=hf")),
              dep.with_(engine=replace(dep.engine, sleep=False))):
        plan = plan_deployment(d)
        assert torch_counted_peak(plan) == plan.peak_bytes


def test_runs_are_sourced_and_plan():
    from benchmarks.bench_memory_verl_runs import predict

    assert len({r["id"] for r in RUNS}) == len(RUNS) >= 8
    for r in RUNS:
        ref = r["source"].split("/blob/", 1)[1].split("/", 1)[0]
        assert len(ref) == 40 and r["source"].endswith(".log"), r["id"]
        assert 0 < r["max_memory_allocated_gib"] < r["max_memory_reserved_gib"], r["id"]
        p = predict(r)
        assert p["torch_counted_bytes"] >= p["physical_peak_bytes"] > 0, r["id"]


def test_bench_reports_every_run(tmp_path, monkeypatch):
    import sys

    from benchmarks.bench_memory_verl_runs import main

    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(out)])
    assert main() == 0
    res = json.loads(out.read_text())
    assert [r["id"] for r in res["details"]["runs"]] == [r["id"] for r in RUNS]
    assert all(abs(r["error"]) < 1 for r in res["details"]["runs"])
