"""Same seed → same metrics; resume → the metrics of an uninterrupted run; NaN reward → skipped, finite weights."""
import json
import math

import pytest
import torch

from rlhf_core.cli.train import main
from rlhf_core.runformat.run_reader import Run

BASE = ["--batch_size", "2", "--max_new_tokens", "5", "--steps_per_epoch", "2", "--sample_interval", "0",
        "--no_tensorboard", "--ppo_epochs", "2"]


def train(run_dir, *extra):
    assert main([*BASE, "--run_dir", str(run_dir), *extra]) == 0
    return Run(run_dir)


def comparable(rec):
    """Everything but wall-clock and machine state."""
    return {k: v for k, v in rec.items()
            if k != "time" and not k.startswith(("time/", "mem/", "sys/", "throughput/"))}


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, float) and math.isnan(va):
            assert isinstance(vb, float) and math.isnan(vb), k
        else:
            assert va == vb, (a.get("step"), k, va, vb)


def test_same_seed_gives_identical_metrics(tmp_path):
    a = train(tmp_path / "a", "--epochs", "1", "--seed", "7").metrics()
    b = train(tmp_path / "b", "--epochs", "1", "--seed", "7").metrics()
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        same(comparable(ra), comparable(rb))
    c = train(tmp_path / "c", "--epochs", "1", "--seed", "8").metrics()
    assert comparable(c[0]) != comparable(a[0])


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = train(tmp_path / "full", "--epochs", "2", "--adaptive_kl", "--kl_target", "0.01").metrics()
    part_dir = tmp_path / "part"
    train(part_dir, "--epochs", "1", "--adaptive_kl", "--kl_target", "0.01")
    # a crash after the checkpoint: a record past it and a torn line must not survive the resume
    with open(part_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "time": 0, "rank": 0, "loss/total": 123.0}) + "\n")
        fh.write('{"step": 4, "ti')
    assert main(["--resume", str(part_dir), "--epochs", "2"]) == 0
    run = Run(part_dir)
    resumed = run.metrics()
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert not run.problems()
    for ra, rb in zip(full, resumed):
        same(comparable(ra), comparable(rb))
    assert run.meta["status"] == "finished" and len(run.meta["resumed_at"]) == 1
    assert run.meta["config"]["epochs"] == 2
    assert [p.name for p in run.checkpoints()] == ["step_2", "step_4"]


def test_nan_reward_skips_the_update_and_keeps_weights_finite(tmp_path):
    run = train(tmp_path / "nan", "--epochs", "1", "--inject_nan_step", "2")
    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2]
    bad = recs[1]
    assert math.isnan(bad["reward/mean"]) and "reward/mean" in bad["nonfinite"]
    assert bad["skipped"] == 2 and "loss/total" not in bad
    assert recs[0]["skipped"] == 0
    events = run.events()
    assert any(e["kind"] == "skip" and e["step"] == 2 for e in events)
    assert any(e["kind"] == "alert" and e["rule"] == "nonfinite" and e["severity"] == "critical" for e in events)
    state = torch.load(run.checkpoints()[-1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["policy"].values())
    raw = (tmp_path / "nan" / "metrics.jsonl").read_text()
    assert "NaN" not in raw


@pytest.mark.parametrize("bad_dir", ["missing", "empty", "foreign"])
def test_resume_refuses_what_is_not_a_resumable_run(tmp_path, capsys, bad_dir):
    target = tmp_path / bad_dir
    if bad_dir != "missing":
        target.mkdir()
    if bad_dir == "foreign":
        (target / "meta.json").write_text(json.dumps({"source": "trl", "config": {}}))
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: argument --resume:")


def test_resume_from_a_per_tensor_optimizer_state_is_one_line(tmp_path, capsys):
    """Checkpoints from before the flat parameter buffer hold one AdamW state per tensor: refused, in a line."""
    run_dir = tmp_path / "old"
    train(run_dir, "--epochs", "1")
    state_path = run_dir / "checkpoints" / "step_2" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    n = len(state["policy"])
    state["optimizer"]["param_groups"][0]["params"] = list(range(n))
    state["optimizer"]["state"] = {}
    torch.save(state, state_path)
    assert main(["--resume", str(run_dir), "--epochs", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "optimizer state does not fit this runner" in err[-1] and "Traceback" not in "\n".join(err)
