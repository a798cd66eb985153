"""rollout_logprob_mismatch: a growing rollout-vs-trainer gap fires (warning, then critical), noise does not."""
import math

import pytest

from adapters.mapping import map_openrlhf, map_trl, map_verl
from rlhf_core.stability.detectors import DetectorConfig, Diagnoser
from rlhf_core.stability.rules.rollout import RolloutLogprobMismatch

DIFF, K3 = "rollout/logprob_diff_mean", "rollout/kl_k3"


def feed(values, key=DIFF, cfg=None, extra=None):
    rule = RolloutLogprobMismatch(DetectorConfig.from_any(cfg))
    alerts = []
    for step, value in enumerate(values, start=1):
        rec = {key: value, **(extra or {})}
        alerts += rule.update(step, rec)
    return alerts


def test_growing_mismatch_warns_then_goes_critical_at_the_right_steps():
    # healthy bf16 noise for 10 steps, then the gap grows 40% a step (an engine drifting from the trainer)
    values = [0.001] * 10 + [0.01 * 1.4 ** k for k in range(20)]
    alerts = feed(values)
    assert [a.severity for a in alerts] == ["warning", "critical"]
    warn, crit = alerts
    first_warn = next(i for i, v in enumerate(values, 1) if v > 0.05)
    first_crit = next(i for i, v in enumerate(values, 1) if v > 0.1)
    assert warn.step == first_warn and crit.step == first_crit
    assert warn.evidence["keys"] == [DIFF] and warn.evidence["thresholds"] == {DIFF: 0.05}
    assert sorted(map(int, warn.evidence["series"])) == [first_warn, first_warn + 1, first_warn + 2]
    assert "vllm_importance_sampling_correction" in warn.suggestion and "rollout_correction" in warn.suggestion


@pytest.mark.parametrize("producer, words", [
    ("rlhf_core", "--rollout_dtype"), ("trl", "vllm_importance_sampling_mode"),
    ("openrlhf", "--algo.advantage.is_correction_threshold"), ("verl", "algorithm.rollout_correction.rollout_is"),
    ("tensorboard", "truncated importance sampling")])
def test_the_suggestion_names_the_producers_own_options(producer, words):
    [alert] = feed([0.5] * 3, cfg={"producer": producer})
    assert words in alert.suggestion


def test_kl_alone_fires_k3_first_then_k1():
    alerts = feed([1e-4] * 5 + [5e-3] * 3, key=K3)
    assert [(a.severity, a.step, a.evidence["keys"]) for a in alerts] == [("warning", 6, [K3])]
    # OpenRLHF logs only k1 (vllm_kl), which can be negative: negative values are never "over"
    recs = [map_openrlhf({"train/vllm_kl": v}) for v in [-0.02, -0.03, -0.05, 0.02, 0.03, 0.05]]
    rule = RolloutLogprobMismatch(DetectorConfig())
    alerts = [a for step, rec in enumerate(recs, 1) for a in rule.update(step, rec)]
    assert [(a.severity, a.step) for a in alerts] == [("critical", 4)]


def test_both_levels_at_once_give_one_critical_alert():
    alerts = feed([0.5] * 3)
    assert [(a.severity, a.step) for a in alerts] == [("critical", 1)]


def test_verl_probability_gap_is_the_fallback_and_trl_logs_feed_the_rule():
    verl = [map_verl({"training/rollout_probs_diff_mean": v}) for v in [0.006] * 4 + [0.08] * 3]
    rule = RolloutLogprobMismatch(DetectorConfig())
    alerts = [a for step, rec in enumerate(verl, 1) for a in rule.update(step, rec)]
    assert [(a.severity, a.step, a.evidence["keys"]) for a in alerts] == [("warning", 5, ["rollout/prob_diff_mean"])]
    trl = [map_trl({"sampling/sampling_logp_difference/mean": v, "sampling/sampling_logp_difference/max": 2.0})
           for v in [0.004, 0.005, 0.2, 0.3, 0.4]]
    rule = RolloutLogprobMismatch(DetectorConfig())
    alerts = [a for step, rec in enumerate(trl, 1) for a in rule.update(step, rec)]
    assert [(a.severity, a.step) for a in alerts] == [("critical", 3)]


@pytest.mark.parametrize("values", [
    [0.001] * 50 + [1e8] + [0.001] * 50,            # one absurd batch: not a drift
    [0.04] * 300,                                   # a steady gap below the warning level
    [0.0] * 100,                                    # identical log-probs
    [0.001, 0.2, 0.001, 0.2, 0.001, 0.2],           # alternating: never 3 steps running
    [0.2, 0.2],                                     # a 2-step series is too short to judge
    [0.001] * 3,                                    # a 3-step healthy series
    [0.001] * 5 + [math.nan] * 2 + [0.001] * 5,     # a NaN burst shorter than the patience
])
def test_no_alert_on_noise_spikes_constants_and_short_series(values):
    assert feed(values) == []


def test_non_finite_mismatch_counts_as_over_every_level():
    assert [(a.severity, a.step) for a in feed([0.001, math.inf, math.nan, math.inf])] == [("critical", 2)]
    # as read back from metrics.jsonl: value null, key listed under "nonfinite"
    rule = RolloutLogprobMismatch(DetectorConfig())
    recs = [{DIFF: 0.001}] + [{DIFF: None, "nonfinite": [DIFF]}] * 3
    alerts = [a for step, rec in enumerate(recs, 1) for a in rule.update(step, rec)]
    assert [(a.severity, a.step) for a in alerts] == [("critical", 2)]
    assert alerts[0].evidence["values"] == {DIFF: None}  # JSON has no Inf
    assert "inf" in alerts[0].message


def test_odd_values_never_raise():
    rule = RolloutLogprobMismatch(DetectorConfig())
    odd = [math.nan, math.inf, -math.inf, 0.0, -1e8, 1e8, 1e-300, None, "x", [1], True]
    for step, value in enumerate(odd * 3):
        rule.update(step, {DIFF: value, K3: value, "rollout/kl_k1": value, "nonfinite": [[1], DIFF, None]})


def test_records_without_rollout_keys_are_ignored_and_streaks_survive_them():
    rule = RolloutLogprobMismatch(DetectorConfig())
    recs = [{DIFF: 0.07}, {"loss/total": 1.0}, {DIFF: 0.07}, {DIFF: 0.07}]
    alerts = [a for step, rec in enumerate(recs, 1) for a in rule.update(step, rec)]
    assert [(a.severity, a.step) for a in alerts] == [("warning", 1)]


def test_thresholds_and_disabling_come_from_the_config():
    assert feed([0.02] * 3, cfg={"rollout_diff_warn": 0.01}) != []
    assert feed([0.2] * 5, cfg={"rollout_patience": 6}) == []
    diag = Diagnoser({"disabled_rules": ["rollout_logprob_mismatch"]})
    assert diag.update([{"step": s, DIFF: 0.5} for s in range(1, 6)]) == []
    diag = Diagnoser()
    assert [a.rule for a in diag.update([{"step": s, DIFF: 0.5} for s in range(1, 6)])] == ["rollout_logprob_mismatch"]
