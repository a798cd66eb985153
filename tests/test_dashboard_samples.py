"""Samples in the run format (``samples.jsonl``): picked and bounded, written by the runner, read by
``Run.samples()``, printed by ``rlhfkit samples``, and the Samples tab's rows. The TRL adapter's samples and
the tab in the browser: ``test_dashboard_samples_trl.py``."""
from __future__ import annotations

import json
import math

import pytest

from dashboard.data import sample_rows
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.runformat.samples import main as samples_main
from rlhf_core.runformat.samples import pick, repeated_ngram_frac, sample_records, text_of


def test_pick_keeps_the_best_the_worst_and_a_spread():
    rewards = [0.5, 3.0, -2.0, 0.1, float("nan"), 0.7, 0.2, 0.9]
    chosen = pick(rewards, 4)
    assert 1 in chosen and 2 in chosen and len(chosen) == 4 and chosen == sorted(chosen)
    assert pick(rewards, 20) == list(range(8)) and pick(rewards, 0) == [] and pick([], 3) == []
    assert len(pick([None] * 10, 3)) == 3  # no rewards at all: an even spread


def test_sample_records_bound_the_text_and_null_non_finite_numbers():
    recs = sample_records(7, [{"prompt": [{"role": "user", "content": "hi"}], "completion": "x" * 50,
                               "reward": float("nan"), "rewards": {"len": float("inf"), "fmt": 1.0},
                               "kl": 0.25, "length": 50, "kind": "chosen"}], count=2, max_chars=10)
    rec = recs[0]
    assert rec["step"] == 7 and rec["prompt"] == "user: hi" and rec["completion"].startswith("x" * 10 + " …[+40")
    assert rec["truncated"] == ["completion"] and rec["reward"] is None and rec["rewards"] == {"len": None, "fmt": 1.0}
    assert set(rec["nonfinite"]) == {"reward", "rewards/len"} and rec["length"] == 50 and rec["kind"] == "chosen"
    json.dumps(recs, allow_nan=False)
    assert text_of(["a", {"content": "b"}]) == "a\nb"


def test_repeated_ngram_fraction_sees_a_completion_loop():
    assert repeated_ngram_frac(["a b c d e f"]) == 0.0
    assert repeated_ngram_frac(["go go go go go go"]) == pytest.approx(3 / 4)
    assert repeated_ngram_frac(["", "one"]) == 0.0


def test_writer_keeps_a_bounded_configurable_sample_per_step_and_the_reader_follows_it(tmp_path):
    w = RunWriter(tmp_path / "r", source="generic", tensorboard=False)
    w.samples_per_step, w.sample_chars = 3, 20
    for step in range(2):
        w.log(step, {"reward/mean": 0.0})
        w.log_samples(step, [{"prompt": f"p{i}", "completion": "word " * (i + 1) * 10, "reward": float(i),
                              "kl": 0.01 * i, "length": 10 * (i + 1)} for i in range(16)])
    run = Run(tmp_path / "r")
    assert len(run.samples()) == 6 and {r["step"] for r in run.samples(1)} == {1}
    assert all(len(r["completion"]) <= 20 + len(" …[+999 chars]") for r in run.samples())
    assert max(r["reward"] for r in run.samples(0)) == 15.0 and min(r["reward"] for r in run.samples(0)) == 0.0
    w.log_samples(2, [{"prompt": "late", "completion": "c", "reward": 1.0}])
    assert [r["prompt"] for r in run.samples(2)] == ["late"]  # followed incrementally
    w.close()
    assert not (tmp_path / "none").exists()
    quiet = RunWriter(tmp_path / "quiet", source="generic", tensorboard=False)
    quiet.close()
    assert not (tmp_path / "quiet" / "samples.jsonl").exists()  # no samples: no file


def test_runner_writes_samples_and_the_text_signal(smoke_run_dir):
    run = Run(smoke_run_dir)
    samples = run.samples()
    steps = sorted({r["step"] for r in samples})
    assert steps == [r["step"] for r in run.metrics()]  # every step of the 4-step smoke run
    for rec in samples:
        assert isinstance(rec["prompt"], str) and rec["prompt"] and isinstance(rec["completion"], str)
        assert math.isfinite(rec["reward"]) and math.isfinite(rec["kl"]) and 0 < rec["length"] <= 6
    assert len(run.samples(steps[0])) == 2  # batch 2 < 4 kept per step
    assert all(0.0 <= r["text/repeated_ngram_frac"] <= 1.0 for r in run.metrics())


def test_samples_cli_prints_a_step_and_fails_in_one_line(smoke_run_dir, tmp_path, capsys):
    run = Run(smoke_run_dir)
    last = max(r["step"] for r in run.samples())
    assert samples_main([str(smoke_run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"=== step {last} " in out and "completion:" in out and "reward" in out
    first = min(r["step"] for r in run.samples())
    assert samples_main([str(smoke_run_dir), "--step", str(first)]) == 0
    out = capsys.readouterr().out
    assert f"=== step {first} " in out and f"=== step {last} " not in out
    assert samples_main([str(smoke_run_dir), "--step", "999"]) == 1
    assert "no samples at step 999" in capsys.readouterr().err
    RunWriter(tmp_path / "bare", source="generic", tensorboard=False).close()
    assert samples_main([str(tmp_path / "bare")]) == 1
    assert "has no samples" in capsys.readouterr().err
    assert samples_main([str(tmp_path / "missing")]) == 2


def test_sample_rows_filter_sort_and_components():
    recs = [{"step": 1, "index": i, "prompt": f"p{i}", "completion": txt, "reward": r, "kl": k, "length": n,
             "rewards": {"len": r / 2}}
            for i, (txt, r, k, n) in enumerate([("Hello world", 1.0, 0.3, 2), ("bye", 3.0, None, 1),
                                                ("hello again", -1.0, 0.1, 2)])]
    recs.append({"step": 2, "index": 0, "prompt": "other", "completion": "x", "reward": 0.0})
    rows = sample_rows(recs, 1, sort="reward")
    assert [r["index"] for r in rows] == [1, 0, 2] and rows[0]["reward:len"] == 1.5
    assert [r["index"] for r in sample_rows(recs, 1, sort="kl", descending=False)] == [2, 0, 1]  # missing last
    assert [r["index"] for r in sample_rows(recs, 1, text="HELLO")] == [0, 2]
    assert sample_rows(recs, 3) == []
