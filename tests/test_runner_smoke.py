"""The run directory a real (tiny) PPO run writes: keys, phases, meta, checkpoints, reader round trip."""
import json
import math

import pytest
import torch

from rlhf_core.runformat.keys import is_canonical
from rlhf_core.runformat.run_reader import Run
from rlhf_core.train.runner import LOCAL_PHASES as PHASES  # the local runner's phases (no weight_sync)

REQUIRED = [
    "loss/total", "loss/policy", "loss/value", "loss/entropy", "reward/mean", "reward/std", "reward/min",
    "reward/max", "kl/ref_k1", "kl/ref_k3", "kl/coef", "policy/entropy", "policy/approx_kl", "policy/clipfrac",
    "policy/ratio_mean", "policy/ratio_min", "policy/ratio_max", "value/explained_var", "value/clipfrac",
    "adv/mean", "adv/std", "grad/norm", "drift/rel", "response/length_mean", "response/eos_rate", "time/step",
    "mem/peak_bytes", "lr", "throughput/tokens_per_s", "epoch",
]


@pytest.fixture(scope="module")
def run(smoke_run_dir):
    return Run(smoke_run_dir)


def test_every_step_record_has_the_contract_keys(run):
    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert not run.problems()
    for rec in recs:
        missing = [k for k in REQUIRED if k not in rec]
        assert not missing, f"step {rec['step']} lacks {missing}"
        assert any(k.startswith("grad/layer/h.") for k in rec)
        assert any(k.startswith("drift/layer/h.") for k in rec)
        assert {f"time/{p}" for p in PHASES} <= set(rec)
        assert not run.unknown_keys(), run.unknown_keys()
        assert all(is_canonical(k) for k in rec)
        assert rec["epoch"] == 1 and rec["kl/coef"] == pytest.approx(0.1)
        assert 0 < rec["response/length_mean"] <= 6
        assert rec["kl/ref_k3"] >= 0


def test_phase_times_add_up_to_the_step_time(run):
    """No untimed work in a step: over the run within 5%; per step within 15%, because on a busy machine one
    OS preemption between two phases of a 30 ms step is already several percent."""
    recs = run.metrics()
    phases = [sum(rec[f"time/{p}"] for p in PHASES) for rec in recs]
    steps = [rec["time/step"] for rec in recs]
    assert sum(phases) == pytest.approx(sum(steps), rel=0.05)
    for rec, ph, st in zip(recs, phases, steps):
        assert ph <= st and ph == pytest.approx(st, rel=0.15), rec["step"]


def test_first_update_starts_at_ratio_one_and_drift_grows(run):
    recs = run.metrics()
    assert recs[0]["policy/ratio_max"] < 1.5 and recs[0]["policy/ratio_min"] > 0.5
    assert recs[0]["drift/rel"] > 0
    assert recs[-1]["drift/rel"] > recs[0]["drift/rel"]


def test_meta_tensorboard_sampler_and_checkpoint(run, smoke_run_dir):
    meta = run.meta
    assert meta["source"] == "rlhf_core" and meta["status"] == "finished" and meta["world_size"] == 1
    assert meta["config"]["batch_size"] == 2 and meta["config"]["max_new_tokens"] == 6
    assert list((smoke_run_dir / "tb").glob("events.out.tfevents.*"))
    assert run.system(), "the system sampler wrote nothing"
    ckpts = run.checkpoints()
    assert [p.name for p in ckpts] == ["step_4"]
    state = torch.load(ckpts[0] / "state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["policy"].values())
    assert "v_head.weight" in state["policy"]
    assert json.loads((ckpts[0] / "checkpoint.json").read_text())["step"] == 4


def test_values_are_finite(run):
    for rec in run.metrics():
        assert "nonfinite" not in rec
        for k in REQUIRED:
            if k != "value/explained_var":
                assert math.isfinite(rec[k]), (rec["step"], k)
