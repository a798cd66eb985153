"""The `nonfinite` rule on updates that a finite guard skipped: the runner drops an optimizer step whose loss,
gradient or weights went non-finite and logs finite values plus its count in `skipped`, so without reading that
count a run whose updates are being dropped got no alert. Real runner runs that hit the guard, and adversarial
series of the count."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf_core.runformat.run_reader import Run
from rlhf_core.stability.analysis import diagnose_run
from rlhf_core.stability.detectors import Diagnoser, diagnose
from rlhf_core.train.config import TrainConfig
from rlhf_core.train.finite_guard import WeightGuard
from rlhf_core.train.runner import RunnerError, train

CALM = {"loss/total": 0.1, "reward/mean": 0.5, "kl/ref_k3": 0.01, "policy/entropy": 2.0, "grad/norm": 0.5}


def records(n: int, skipped: dict[int, object] | None = None) -> list[dict]:
    """``n`` calm records with ``skipped`` 0 except at the given steps."""
    return [{"step": s, **CALM, "skipped": (skipped or {}).get(s, 0)} for s in range(1, n + 1)]


def found(alerts) -> list[tuple[str, str, int]]:
    return [(a.rule, a.severity, a.step) for a in alerts]


def small_cfg(run_dir: Path, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), epochs=1, steps_per_epoch=3, batch_size=2, max_new_tokens=5, ppo_epochs=2,
                sample_interval=0, no_tensorboard=True, save_every=1)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- real runner runs that hit the guard


def test_real_run_whose_weights_overflow_gets_a_warning_in_the_runners_flags(tmp_path):
    """lr 1e308: both updates of step 1 leave non-finite weights and are undone; step 1's record is finite
    (nothing but ``skipped`` 2 shows it) and the third undone update stops the run in step 2."""
    run_dir = tmp_path / "lr"
    with pytest.raises(RunnerError, match="non-finite in 3 optimizer steps in a row"):
        train(small_cfg(run_dir, learning_rate=1e308))
    recs = Run(run_dir).metrics()
    assert [(r["step"], r["skipped"]) for r in recs] == [(1, 2)]
    assert not recs[0].get("nonfinite") and "loss/total" not in recs[0]
    alerts = diagnose_run(run_dir)
    assert found(alerts) == [("nonfinite", "warning", 1)]
    assert alerts[0].evidence == {"key": "skipped", "skipped": 2.0}
    assert "--learning_rate" in alerts[0].suggestion and "--max_grad_norm" in alerts[0].suggestion
    live = [e for e in Run(run_dir).events() if e["kind"] == "alert"]
    assert [(e["rule"], e["severity"], e["step"]) for e in live] == [("nonfinite", "warning", 1)]


def test_real_run_that_trains_on_through_undone_updates_gets_a_critical(tmp_path, monkeypatch):
    """The first update of every step leaves non-finite weights (the guard is told so; the runner's restore,
    counting and recording are real): never 3 in a row, so the run trains on with one skip per step. A warning
    at step 1, critical once 3 steps had skips."""
    calls = {"n": 0}
    real = WeightGuard.finite

    def every_other(self):
        calls["n"] += 1
        return False if calls["n"] % 2 == 1 else real(self)

    monkeypatch.setattr(WeightGuard, "finite", every_other)
    run_dir = tmp_path / "odd"
    with pytest.raises(RunnerError, match="non-finite in 3 optimizer step"):
        train(small_cfg(run_dir))
    assert [r["skipped"] for r in Run(run_dir).metrics()] == [1, 1, 1]
    alerts = diagnose_run(run_dir)
    assert found(alerts) == [("nonfinite", "warning", 1), ("nonfinite", "critical", 1)]
    assert alerts[1].evidence["skipped_steps"] == 3 and alerts[1].evidence["skipped_total"] == 3.0


def test_real_run_with_a_nan_reward_is_one_critical_that_names_the_skip(tmp_path):
    """A reward that returns NaN for one sample in step 2: the runner skips the whole update and the record's
    reward statistics are NaN; one critical alert names both."""
    calls = {"n": 0}

    def nan_once(prompts, responses):
        calls["n"] += 1
        return [math.nan if calls["n"] == 2 and i == 0 else 0.5 for i in range(len(responses))]

    run_dir = tmp_path / "nan"
    train(small_cfg(run_dir), reward_fn=nan_once)
    assert [r["skipped"] for r in Run(run_dir).metrics()] == [0, 2, 0]
    alerts = diagnose_run(run_dir)
    assert found(alerts) == [("nonfinite", "critical", 2)]
    assert "reward/mean" in alerts[0].evidence["keys"] and alerts[0].evidence["skipped"] == 2.0
    assert "2 optimizer step(s) skipped" in alerts[0].message


# ---------------------------------------------------------------- adversarial series of the count


def test_no_skip_and_odd_counts_give_no_alert():
    assert diagnose(records(200)) == []
    odd = {10: None, 11: math.nan, 12: math.inf, 13: "3", 14: True, 15: -1, 16: [2], 17: 1e-300 * 0}
    assert diagnose(records(200, odd)) == []


def test_one_skip_is_one_warning_and_three_steps_with_skips_are_critical():
    assert found(diagnose(records(200, {50: 1}))) == [("nonfinite", "warning", 50)]
    recs = records(200, {50: 1, 60: 4, 70: 1})
    alerts = diagnose(recs)
    assert found(alerts) == [("nonfinite", "warning", 50), ("nonfinite", "critical", 50)]
    assert alerts[1].evidence == {"key": "skipped", "skipped_steps": 3, "skipped_total": 6.0, "skipped": 1.0}
    # raised by the record of step 70, when the third step with skips was seen
    d = Diagnoser()
    raised = [(rec["step"], a.severity) for rec in recs for a in d.update([rec])]
    assert raised == [(50, "warning"), (70, "critical")]


def test_a_long_stretch_of_skips_is_one_warning_and_one_critical():
    alerts = diagnose(records(300, {s: 1e6 for s in range(20, 220)}))
    assert found(alerts) == [("nonfinite", "warning", 20), ("nonfinite", "critical", 20)]


def test_skips_rearm_after_a_healthy_stretch_and_count_afresh():
    recs = records(300, {10: 1, 11: 1, 100: 1, 150: 1, 151: 1, 152: 1})
    assert found(diagnose(recs)) == [("nonfinite", "warning", 10), ("nonfinite", "warning", 100),
                                     ("nonfinite", "critical", 100)]
    # with a shorter rearm the skip at 100 and the ones at 150-152 are separate episodes
    assert found(diagnose(recs, {"rearm_steps": 20})) == [
        ("nonfinite", "warning", 10), ("nonfinite", "warning", 100), ("nonfinite", "warning", 150),
        ("nonfinite", "critical", 150)]


def test_a_skip_warning_does_not_silence_later_nan_values():
    recs = records(100, {20: 1})
    recs[29]["loss/total"] = math.nan
    assert found(diagnose(recs)) == [("nonfinite", "warning", 20), ("nonfinite", "critical", 30)]


def test_nan_values_and_a_skip_on_one_step_are_one_critical():
    recs = records(100, {20: 2, 25: 1, 26: 1})
    recs[19]["reward/mean"] = math.nan
    alerts = diagnose(recs)
    assert found(alerts) == [("nonfinite", "critical", 20)]  # later skips are the same episode: no second critical
    assert alerts[0].evidence == {"keys": ["reward/mean"], "skipped": 2.0}


def test_skip_settings_and_producer_vocabulary():
    recs = records(50, {5: 1})
    assert found(diagnose(recs, {"nonfinite_skip_steps": 1})) == [("nonfinite", "critical", 5)]
    assert diagnose(recs, {"disabled_rules": ["nonfinite"]}) == []
    assert diagnose(recs, {"skipped_key": "src/skipped"}) == []
    trl = diagnose(recs, {"producer": "trl"})[0].suggestion
    assert trl.startswith("lower learning_rate and check max_grad_norm")
    with pytest.raises(ValueError, match="nonfinite_skip_steps"):
        diagnose(recs, {"nonfinite_skip_steps": 0})
