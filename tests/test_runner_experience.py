"""The step's typed stages: Samples → Scores → Experience → UpdateStats, and each key's declared reduction."""
import math

import pytest
import torch

from rlhf_core.runformat.keys import reduction
from rlhf_core.train.config import parse_args
from rlhf_core.train.experience import Experience, Samples, Scores, UpdateStats
from rlhf_core.train.runner import PPORunner


def test_update_stats_reduce_each_key_as_it_declares():
    stats = UpdateStats()
    stats.add({"loss/total": 1.0, "policy/ratio_max": 1.1, "policy/ratio_min": 0.9, "grad/clipped": 0.0})
    stats.add({"loss/total": 3.0, "policy/ratio_max": 1.5, "policy/ratio_min": 0.7, "grad/clipped": 1.0})
    out = stats.reduced()
    assert out == {"loss/total": 2.0, "policy/ratio_max": 1.5, "policy/ratio_min": 0.7, "grad/clipped": 0.5}
    assert [reduction(k) for k in out] == ["mean", "max", "min", "mean"]
    assert UpdateStats().reduced() == {}


def test_stages_hand_typed_values_to_the_update(tmp_path):
    cfg = parse_args(["--batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "2", "--max_new_tokens", "5",
                      "--sample_interval", "0", "--no_tensorboard", "--run_dir", str(tmp_path / "r")])
    runner = PPORunner(cfg)
    try:
        runner.timer.start_step(1)
        samples, scores, ref_logp = runner._inputs(1)
        assert isinstance(samples, Samples) and isinstance(scores, Scores)
        assert len(samples.prompts) == len(scores.texts) == len(scores.rewards) == 4
        assert ref_logp.shape == samples.mask.shape
        exp = runner._experience(samples, scores, ref_logp)
        assert isinstance(exp, Experience) and exp.reward_finite
        for t in (exp.old_logp, exp.entropy, exp.old_values, exp.kl_tok, exp.advantages, exp.returns):
            assert t.shape == samples.mask.shape
        # whitened over the real tokens
        assert float((exp.advantages * exp.mask).sum() / exp.mask.sum()) == pytest.approx(0.0, abs=1e-5)
        stats = runner._ppo_update(1, exp)
        runner.timer.end_step(1)
        assert isinstance(stats, UpdateStats) and stats.skipped == 0
        assert {len(v) for v in stats.values.values()} == {cfg.ppo_epochs * cfg.batch_size // 2}
        out = stats.reduced()
        assert out["policy/ratio_max"] == max(stats.values["policy/ratio_max"])
        assert out["policy/ratio_min"] == min(stats.values["policy/ratio_min"])
        assert out["loss/total"] == pytest.approx(math.fsum(stats.values["loss/total"]) / 4)
        assert stats.layer_norms and all(math.isfinite(v) for v in stats.layer_norms.values())
        record = runner._step_metrics(1, exp, stats)
        assert record["policy/ratio_max"] == out["policy/ratio_max"] and record["skipped"] == 0
        assert torch.isfinite(torch.tensor([record["kl/ref_k3"], record["adv/std"]])).all()
    finally:
        runner._finish("finished")
