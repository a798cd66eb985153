"""The text-level signals as canonical keys (issue 15): the key contract, the producers' names, and the corpus
labeller reading both the canonical names and the ``src/text/...`` names of runs written before."""
from __future__ import annotations

import pytest

from adapters.mapping import map_trl
from benchmarks.corpus.labels import text_outcome
from rlhf_core.cli.train import main
from rlhf_core.runformat.keys import TEXT_KEY_ALIASES, is_canonical, text_value, unknown_keys
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.samples import text_stats

TEXT_KEYS = ("text/distinct2", "text/identical_frac", "text/repeated_ngram_frac")


def test_text_keys_are_canonical_with_their_old_names_as_aliases():
    assert all(is_canonical(k) for k in TEXT_KEYS)
    assert unknown_keys(TEXT_KEYS) == []
    assert set(TEXT_KEY_ALIASES) == set(TEXT_KEYS)
    assert all(old == "src/" + new for new, old in TEXT_KEY_ALIASES.items())
    assert text_value({"text/distinct2": 0.5}, "text/distinct2") == 0.5
    assert text_value({"src/text/distinct2": 0.25}, "text/distinct2") == 0.25
    assert text_value({"text/distinct2": 0.5, "src/text/distinct2": 0.25}, "text/distinct2") == 0.5
    assert text_value({}, "text/distinct2") is None


def test_text_stats_uses_the_canonical_keys():
    stats = text_stats(["a b c a b c a b c", "a b c a b c a b c", "x y z"])
    assert set(stats) == set(TEXT_KEYS)
    assert stats["text/identical_frac"] == pytest.approx(2 / 3)
    assert 0.0 < stats["text/distinct2"] < 1.0
    assert stats["text/repeated_ngram_frac"] == pytest.approx(8 / 15)  # 4 of 7 3-grams repeat, twice; 0 of 1


def test_trl_log_metric_of_a_text_key_stays_canonical():
    out = map_trl({"text/distinct2": 0.4, "text/identical_frac": 0.5, "loss": 1.0})
    assert out["text/distinct2"] == 0.4 and out["text/identical_frac"] == 0.5
    assert not any(k.startswith("src/text/") for k in out)


@pytest.mark.parametrize("prefix", ["", "src/"])
def test_labeller_reads_old_and_new_names_alike(prefix):
    rows = [{"step": 1, f"{prefix}text/identical_frac": 0.25, f"{prefix}text/distinct2": 0.9},
            {"step": 2, f"{prefix}text/identical_frac": 0.75, f"{prefix}text/distinct2": 0.2}]
    got = text_outcome(rows)
    assert got is not None and got.kind == "text_collapse" and got.step == 2 and got.value == 0.75
    assert got.detail == f"{prefix}text/identical_frac"
    assert text_outcome(rows[:1]) is None


def test_runner_logs_the_canonical_text_keys(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["--batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens", "6", "--steps_per_epoch", "2",
                 "--epochs", "1", "--sample_interval", "0", "--no_tensorboard", "--ppo_epochs", "1", "--seed", "3",
                 "--run_dir", str(run_dir)]) == 0
    rows = Run(run_dir).metrics()
    assert len(rows) == 2
    for row in rows:
        assert all(0.0 <= row[k] <= 1.0 for k in TEXT_KEYS)
        assert not any(k.startswith("src/text/") for k in row)
