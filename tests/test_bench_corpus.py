"""The corpus benchmark's scoring (benchmarks/bench_corpus.py): detection deadline, detection step vs the
alert's back-dated step, rule names per outcome kind, false alarms."""
from __future__ import annotations

from benchmarks.bench_corpus import ACCEPTED, GRACE, judge


def alert(at: int, rule: str, severity: str = "warning", alert_step: int | None = None) -> dict:
    return {"at": at, "rule": rule, "severity": severity, "alert_step": at if alert_step is None else alert_step}


UNSTABLE = {"label": "unstable", "outcome_step": 10, "outcome_kinds": ["kl", "entropy"]}


def test_detected_when_a_named_alert_comes_by_the_deadline():
    got = judge(UNSTABLE, [alert(4, "clipfrac"), alert(8, "kl_budget")])
    assert got["detected"] and got["detection_step"] == 8 and got["lead"] == 2 and got["rule"] == "kl_budget"
    assert judge(UNSTABLE, [alert(10 + GRACE, "entropy_collapse", "critical")])["lead"] == -GRACE


def test_late_wrongly_named_or_info_alerts_do_not_count():
    assert not judge(UNSTABLE, [alert(10 + GRACE + 1, "kl_budget")])["detected"]
    assert not judge(UNSTABLE, [alert(5, "grad_spike"), alert(6, "reward_hacking_kl")])["detected"]
    assert not judge(UNSTABLE, [alert(5, "kl_budget", "info")])["detected"]


def test_detection_step_is_when_the_alert_was_returned_not_its_back_dated_step():
    # the rule says the trouble began at step 9, but it only told the user at step 20
    assert not judge(UNSTABLE, [alert(20, "kl_explosion", alert_step=9)])["detected"]


def test_false_alarm_is_any_warning_or_critical_on_a_healthy_run():
    healthy = {"label": "healthy", "outcome_step": None, "outcome_kinds": []}
    assert not judge(healthy, [alert(3, "critic", "info")])["false_alarm"]
    assert judge(healthy, [alert(3, "critic", "info"), alert(30, "grad_spike")])["false_alarm"]


def test_every_outcome_kind_has_accepted_rules():
    from benchmarks.corpus.labels import KINDS

    assert set(ACCEPTED) == set(KINDS) and all(ACCEPTED.values())
