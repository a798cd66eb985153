"""The corpus benchmark's scoring (benchmarks/bench_corpus.py): detection deadline, detection step vs the
alert's back-dated step, rule names per outcome kind, false alarms."""
from __future__ import annotations

import pytest

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


def test_spike_check_counts_healthy_runs_whose_gradient_norm_passed_the_spike_bar():
    from benchmarks.bench_corpus import spike_section, spiked

    split = {"split": "spike_check", "per_run": {
        "a": {"label": "healthy", "alerts": ["grad_spike:info@40", "kl_budget:info@90"]},
        "b": {"label": "healthy", "alerts": ["kl_budget:info@12"]},
        "c": {"label": "healthy", "alerts": ["grad_spike:warning@7"]},
        "d": {"label": "unstable", "alerts": ["grad_spike:warning@3"]},
    }}
    assert spiked(split) == 2
    rows = spike_section(split)
    assert "| a | info@40 | - | - |" in rows and "| b | - | - | - |" in rows
    assert "| c | warning@7 | grad_spike:warning@7 | - |" in rows and not any(r.startswith("| d ") for r in rows)


def test_spike_check_lists_the_notes_of_the_rules_that_judge_clipped_events():
    from benchmarks.bench_corpus import spike_section

    split = {"split": "spike_check3", "per_run": {
        "a": {"label": "healthy", "alerts": ["grad_explosion:info@97", "loss_spike:info@5", "kl_budget:info@9",
                                             "ppo_ratio_extreme:critical@40"]},
    }}
    row = "| a | - | ppo_ratio_extreme:critical@40 | grad_explosion:info@97, loss_spike:info@5 |"
    assert row in spike_section(split)


def test_spike_check_seeds_are_their_own_split_and_only_runner_settings():
    from benchmarks.corpus.grid import DEV_SEEDS, SEEDS, SPIKE_CHECK_SEEDS, specs, split_of

    assert not set(SPIKE_CHECK_SEEDS) & set(SEEDS) and {split_of(s) for s in SPIKE_CHECK_SEEDS} == {"spike_check"}
    assert {split_of(s) for s in SEEDS} == {"dev", "heldout"} and {split_of(s) for s in DEV_SEEDS} == {"dev"}
    spike = specs(spike_check=True)
    assert {s["trainer"] for s in spike} == {"runner"} and {s["split"] for s in spike} == {"spike_check"}
    assert {s["setting"] for s in spike} == {"lr1e-3_kl0.05_sentiment", "lr3e-2_kl0.1_sentiment",
                                              "lr1e-2_kl0.02_length"}
    assert len(spike) == 3 * len(SPIKE_CHECK_SEEDS) and len(specs()) == 18 * len(SEEDS)


def test_spike_check_without_its_runs_is_carried_over_marked_with_its_date(tmp_path):
    import json

    from benchmarks.bench_corpus import markdown, spike_split

    previous = tmp_path / "corpus.json"
    assert spike_split(tmp_path / "absent", previous) is None
    split = {"split": "spike_check", "runs": 1, "unstable": 0, "healthy": 1, "detected": 0, "recall": None,
             "lead": None, "false_alarms": 0, "false_alarm_rate": 0.0, "by_trainer": {}, "per_rule": {},
             "per_run": {"a": {"label": "healthy", "alerts": []}}}
    previous.write_text(json.dumps({"measured_at": "2026-11-30 20:30:00",
                                    "details": {"splits": [{"split": "dev"}, split]}}))
    got = spike_split(tmp_path / "absent", previous)
    assert got is not None and got["carried_over"] == "2026-11-30 20:30:00"
    assert "carried over from the run of 2026-11-30 20:30:00" in markdown("corpus", [got])
    # carried over twice: still the date of the run that scored it
    previous.write_text(json.dumps({"measured_at": "2026-12-01 09:00:00", "details": {"splits": [got]}}))
    assert spike_split(tmp_path / "absent", previous)["carried_over"] == "2026-11-30 20:30:00"


def test_second_spike_check_has_fresh_seeds_of_the_same_settings():
    from benchmarks.corpus.grid import SEEDS, SPIKE_CHECK2_SEEDS, SPIKE_CHECK_SEEDS, specs, split_of

    assert not set(SPIKE_CHECK2_SEEDS) & (set(SPIKE_CHECK_SEEDS) | set(SEEDS))
    assert {split_of(s) for s in SPIKE_CHECK2_SEEDS} == {"spike_check2"}
    second, first = specs(spike_check="spike_check2"), specs(spike_check=True)
    assert {s["split"] for s in second} == {"spike_check2"} and {s["seed"] for s in second} == set(SPIKE_CHECK2_SEEDS)
    assert {(s["setting"], s["steps"]) for s in second} == {(s["setting"], s["steps"]) for s in first}
    with pytest.raises(ValueError, match="unknown spike check"):
        specs(spike_check="spike_check4")


def test_third_spike_check_has_fresh_seeds_of_the_same_settings():
    from benchmarks.corpus.grid import SEEDS, SPIKE_CHECK2_SEEDS, SPIKE_CHECK3_SEEDS, SPIKE_CHECK_SEEDS, specs, split_of

    assert len(SPIKE_CHECK3_SEEDS) == 20
    assert not set(SPIKE_CHECK3_SEEDS) & (set(SPIKE_CHECK_SEEDS) | set(SPIKE_CHECK2_SEEDS) | set(SEEDS))
    assert {split_of(s) for s in SPIKE_CHECK3_SEEDS} == {"spike_check3"}
    third, first = specs(spike_check="spike_check3"), specs(spike_check=True)
    assert {s["split"] for s in third} == {"spike_check3"} and {s["seed"] for s in third} == set(SPIKE_CHECK3_SEEDS)
    assert {(s["setting"], s["steps"]) for s in third} == {(s["setting"], s["steps"]) for s in first}


def test_labels_name_the_second_spike_check_split():
    from benchmarks.corpus.labels import _splits

    assert _splits("spike_check2") == {"spike_check2": "seeds 28-47, runner settings only (not for tuning)"}
    assert set(_splits()) == {"dev", "heldout"}


def test_second_spike_check_carried_over_on_its_own(tmp_path):
    import json

    from benchmarks.bench_corpus import markdown, spike_split

    previous = tmp_path / "corpus.json"
    first = {"split": "spike_check", "per_run": {}}
    second = {"split": "spike_check2", "runs": 1, "unstable": 0, "healthy": 1, "detected": 0, "recall": None,
              "lead": None, "false_alarms": 0, "false_alarm_rate": 0.0, "by_trainer": {}, "per_rule": {},
              "per_run": {"a": {"label": "healthy", "alerts": ["grad_spike:info@9"]}}}
    previous.write_text(json.dumps({"measured_at": "2026-11-30 21:30:00", "details": {"splits": [first, second]}}))
    got = spike_split(tmp_path / "absent", previous, "spike_check2")
    assert got is not None and got["split"] == "spike_check2" and got["carried_over"] == "2026-11-30 21:30:00"
    md = markdown("corpus", [got])
    assert "## spike_check2: healthy runs" in md and "--spike-check2" in md and "| a | info@9 | - | - |" in md


def test_committed_spike_check_labels_hold_their_own_seeds_and_settings():
    """Each spike check's committed labels name only its split, its seeds and the three runner settings."""
    import json
    from pathlib import Path

    from benchmarks.corpus.grid import SPIKE_CHECKS, specs

    here = Path(__file__).resolve().parent.parent / "benchmarks" / "corpus"
    for split in SPIKE_CHECKS:
        path = here / f"{split}_labels.json"
        if not path.exists():
            continue
        labels = json.loads(path.read_text())
        assert set(labels["splits"]) == {split}
        assert set(labels["runs"]) == {s["name"] for s in specs(spike_check=split)}
        assert {e["split"] for e in labels["runs"].values()} == {split}
