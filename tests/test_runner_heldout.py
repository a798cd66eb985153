"""``--heldout_reward``: a second reward the runner logs (``reward/heldout``) but never optimises, and the text
statistics it logs every step (``text/distinct2``, ``text/identical_frac``)."""
from __future__ import annotations

import pytest

from rlhf_core.cli.train import main
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.samples import distinct2, identical_frac
from rlhf_core.train.config import parse_args
from rlhf_core.train.rewards import length_reward

BASE = ["--batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens", "6", "--steps_per_epoch", "2",
        "--epochs", "1", "--sample_interval", "0", "--no_tensorboard", "--ppo_epochs", "1", "--seed", "3"]


def test_text_statistics():
    assert distinct2(["good good good", "good good"]) == pytest.approx(1 / 3)
    assert distinct2(["one", ""]) == 0.0
    assert identical_frac(["A b", "a  b", "c d", "e"]) == 0.5
    assert identical_frac([]) == 0.0


def test_heldout_reward_is_logged_not_optimised(tmp_path):
    assert parse_args(["--run_dir", str(tmp_path / "x")]).heldout_reward is None
    assert main([*BASE, "--run_dir", str(tmp_path / "plain")]) == 0
    assert main([*BASE, "--run_dir", str(tmp_path / "held"), "--heldout_reward", "length"]) == 0
    plain, held = Run(tmp_path / "plain").metrics(), Run(tmp_path / "held").metrics()
    assert all("reward/heldout" not in r for r in plain)
    for a, b in zip(plain, held):
        # same seed: the held-out reward changes nothing that is trained on
        for key in ("reward/mean", "loss/total", "kl/ref_k3", "policy/entropy", "text/distinct2"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        assert -1.0 <= b["reward/heldout"] <= 1.0
        assert 0.0 <= b["text/distinct2"] <= 1.0 and 0.0 < b["text/identical_frac"] <= 1.0
    assert Run(tmp_path / "held").meta["config"]["heldout_reward"] == "length"


def test_heldout_value_is_the_batch_mean(tmp_path, monkeypatch):
    seen = []

    def spy(prompts, responses):
        scores = length_reward(prompts, responses)
        seen.append(sum(scores) / len(scores))
        return scores

    import rlhf_core.train.rewards as rewards

    monkeypatch.setitem(rewards.BUILTIN, "length", spy)
    assert main([*BASE, "--run_dir", str(tmp_path / "r"), "--heldout_reward", "length"]) == 0
    logged = [r["reward/heldout"] for r in Run(tmp_path / "r").metrics()]
    assert logged == pytest.approx(seen)
