"""Detectors on synthetic PPO-like series: each planted fault fires its rule at the planted step (within the
rule's window) and a healthy series stays silent."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import deque

import pytest

from devtools.synthetic import FAULTS, healthy_arrays, healthy_series, planted_series, rank_timings, to_records
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.analysis import diagnose_run
from rlhf_core.stability.detectors import SEVERITIES, Alert, DetectorConfig, Diagnoser, diagnose, rule_names
from rlhf_core.stability.rules.base import RollingQuantiles, RollingStats, RollingTrend

CFG = {"max_grad_norm": 1.0}


@pytest.mark.parametrize("seed", range(4))
def test_healthy_series_is_silent(seed):
    assert diagnose(healthy_series(1500, seed), CFG) == []


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_fault_fires_at_its_step(fault):
    _, rule, severity, late = FAULTS[fault]
    at = 100 if fault == "entropy_collapse_early" else 300
    alerts = diagnose(planted_series(fault, n=600, at=at), CFG)
    mine = [a for a in alerts if a.rule == rule and a.severity == severity]
    assert len(mine) == 1, (fault, alerts)  # once per episode, even when the fault lasts 300 steps
    a = mine[0]
    assert at <= a.step <= at + late, (fault, a)
    assert a.severity in SEVERITIES and a.evidence and a.suggestion and a.message


def test_kl_budget_notes_half_warns_on_the_first_step_over_and_is_critical_when_it_stays():
    cols = healthy_arrays(600, seed=1)
    budget = 0.015
    half = next(i for i, v in enumerate(cols["kl/ref_k3"]) if v > budget / 2)
    over = next(i for i, v in enumerate(cols["kl/ref_k3"]) if v > budget)
    alerts = diagnose(to_records(cols), {"kl_budget": budget})
    kl = cols["kl/ref_k3"]
    stays = next(i for i in range(len(kl) - 1) if kl[i] > budget and kl[i + 1] > budget)
    assert [(a.rule, a.severity, a.step) for a in alerts] == [("kl_budget", "info", half),
                                                              ("kl_budget", "warning", over),
                                                              ("kl_budget", "critical", stays + 1)]
    assert alerts[1].evidence["budget"] == budget and alerts[1].evidence["value"] > budget


def test_nonfinite_in_reader_form_and_only_for_training_keys():
    recs = healthy_series(80)
    recs[10]["grad/norm"] = math.inf           # a float Inf (the reader restores null+nonfinite to NaN)
    recs[70]["time/rollout"] = math.nan        # timings are not training signals
    alerts = diagnose(recs, CFG)
    assert [(a.rule, a.step, a.evidence["keys"]) for a in alerts] == [("nonfinite", 10, ["grad/norm"])]


def test_rule_rearms_after_healthy_steps_only():
    recs = healthy_series(400)
    for step in (100, 120, 300):
        recs[step]["loss/total"] = None
        recs[step]["nonfinite"] = ["loss/total"]
    steps = [a.step for a in diagnose(recs, {"rearm_steps": 50}) if a.rule == "nonfinite"]
    assert steps == [100, 300]  # 120 is the same episode; 300 comes after 50 healthy steps


def test_incremental_updates_match_one_batch():
    recs = planted_series("pattern_collapse", n=500, at=300)
    batch = diagnose(recs, CFG)
    live = Diagnoser(CFG)
    fired = [a for rec in recs for a in live.update([rec])]
    assert [a.as_dict() for a in fired] == [a.as_dict() for a in batch] and batch


def test_state_stays_bounded_by_the_windows():
    d = Diagnoser(CFG)
    d.update(healthy_series(3000, seed=2))
    bound = max(DetectorConfig().spike_window, DetectorConfig().grad_explosion_window)
    for rule in d.rules:
        for name, value in vars(rule).items():
            if isinstance(value, (deque, list, RollingStats, RollingTrend, RollingQuantiles)):
                assert len(value) <= bound, (rule.name, name, len(value))


def test_grad_explosion_needs_no_limit_and_clipping_needs_one():
    recs = planted_series("grad_explosion", n=500, at=200)
    for rec in recs:
        del rec["grad/max_norm"]
    assert [a.step for a in diagnose(recs) if a.rule == "grad_explosion"]
    assert not [a for a in diagnose(recs) if a.rule == "grad_clipping"]
    assert [a.severity for a in diagnose(recs, {"max_grad_norm": 1.0}) if a.rule == "grad_clipping"] == ["info"]


def test_bad_records_are_skipped_with_a_problem_not_an_exception():
    d = Diagnoser()
    alerts = d.update([{"loss/total": 1.0}, {"step": "x"}, {"step": 1, "reward/mean": "oops", "kl/ref_k3": None},
                       {"step": 2, "policy/entropy": [1, 2]}])
    assert alerts == [] and len(d.problems) == 2 and "without a numeric step" in d.problems[0]


def test_config_forms_and_errors():
    assert Diagnoser(None).config == DetectorConfig()
    cfg = DetectorConfig(kl_budget=0.5, max_grad_norm=2)
    assert Diagnoser(cfg).config is cfg
    assert Diagnoser({"kl_budget": None, "spike_keys": ["grad/norm"]}).config.spike_keys == ("grad/norm",)
    with pytest.raises(ValueError, match=r"unknown detector config key\(s\): 'kl_budgt' \(did you mean 'kl_budget'"):
        Diagnoser({"kl_budgt": 1.0})
    for bad in ({"kl_window": 0}, {"spike_sigma": "6"}, {"kl_z": math.nan}, {"spike_keys": "grad/norm"},
                {"entropy_key": 3}, {"clipfrac_steps": 2.5}, {"spike_sigma": -1}, {"kl_z": None}):
        with pytest.raises(ValueError, match="detector config"):
            Diagnoser(bad)
    with pytest.raises(ValueError, match="unknown rule"):
        Diagnoser({"disabled_rules": ["nope"]})
    with pytest.raises(ValueError, match="dict or DetectorConfig"):
        Diagnoser(["kl_budget"])  # type: ignore[arg-type]


def test_disabled_rule_and_thresholds_are_honoured():
    recs = planted_series("critic", n=400, at=200)
    assert not [a for a in diagnose(recs, {"disabled_rules": ["critic"]}) if a.rule == "critic"]
    assert not [a for a in diagnose(recs, {"critic_steps": 60}) if a.rule == "critic"]  # fault lasts 40 steps
    assert "critic" in rule_names() and "straggler" in rule_names()


def test_alert_to_event_round_trips_through_events_jsonl(tmp_path):
    d = Diagnoser(CFG)
    with RunWriter(tmp_path / "run", source="generic", tensorboard=False) as w:
        for rec in planted_series("negative_kl", n=400, at=200):
            rec = {k: v for k, v in rec.items() if k != "nonfinite"}
            logged = w.log(rec.pop("step"), rec)
            for alert in d.update([logged]):
                w.event(**alert.to_event())
    events = Run(tmp_path / "run").events()
    assert [(e["kind"], e["rule"], e["step"], e["data"]["first_step"]) for e in events] == \
        [("alert", "negative_kl", 200, 200)]
    data = events[0]["data"]
    assert data["suggestion"].startswith("check sampling settings") and data["values"][0] == -0.05


def _feed_ranks(d, per_rank, n):
    return [a for i in range(n) for a in d.update_ranks(i, {r: recs[i] for r, recs in per_rank.items()})]


@pytest.mark.parametrize("world_size", [2, 4])
def test_straggler_names_rank_and_phase(world_size):
    alerts = _feed_ranks(Diagnoser(), rank_timings(60, world_size, slow_rank=1, phase="update", at=30), 60)
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.step, a.rank, a.evidence["rank"], a.evidence["phase"]) == ("straggler", 30, 1, 1, "update")
    assert a.evidence["time_s"] > 1.5 * a.evidence["median_s"]
    assert _feed_ranks(Diagnoser(), rank_timings(60, world_size), 60) == []


def test_straggler_needs_consecutive_steps_and_a_real_gap():
    per_rank = rank_timings(40, 4, slow_rank=3, phase="update", at=20)
    for rec in per_rank[3][22:]:  # slow for 2 steps only
        rec["time/update"] = per_rank[0][0]["time/update"]
    assert _feed_ranks(Diagnoser(), per_rank, 40) == []
    tiny = rank_timings(40, 4, slow_rank=3, phase="advantages", at=10, factor=3.0)  # 3x of 5 ms < 50 ms gap
    assert _feed_ranks(Diagnoser(), tiny, 40) == []
    assert _feed_ranks(Diagnoser({"straggler_min_gap_s": 0.001}), tiny, 40)[0].evidence["phase"] == "advantages"


def test_rank_waiting_for_the_straggler_is_not_blamed():
    per_rank = rank_timings(20, 2, slow_rank=1, phase="rollout", at=0, factor=2.0)
    for r0, r1 in zip(per_rank[0], per_rank[1]):  # rank 0 sits in the next collective until rank 1 arrives
        r0["time/advantages"] += r1["time/rollout"] - r0["time/rollout"]
        r0["time/step"] = r1["time/step"]
    alerts = _feed_ranks(Diagnoser(), per_rank, 20)
    assert [(a.rank, a.evidence["phase"]) for a in alerts] == [(1, "rollout")]


def test_diagnose_run_covers_records_and_ranks(tmp_path):
    per_rank = rank_timings(50, 2, slow_rank=1, phase="rollout", at=10)
    metrics = healthy_series(50)
    writers = [RunWriter(tmp_path / "ddp", source="generic", rank=r, world_size=2, tensorboard=False)
               for r in (0, 1)]
    for i in range(50):
        for r, w in enumerate(writers):
            w.log(i, {k: v for k, v in per_rank[r][i].items() if k not in ("step", "rank")})
        reduced = {k: v for k, v in metrics[i].items() if k not in ("step", "nonfinite")}
        writers[0].log_reduced(i, {**reduced, "loss/total": math.nan} if i == 40 else reduced)
    for w in reversed(writers):
        w.close()
    alerts = diagnose_run(Run(tmp_path / "ddp"), CFG)
    assert [(a.rule, a.step, a.rank) for a in alerts] == [("straggler", 10, 1), ("nonfinite", 40, None)]


def test_detectors_do_not_import_torch():
    code = ("import sys, rlhf_core.stability.detectors, rlhf_core.stability.analysis, rlhf_core.cli.diagnose; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_alert_fields():
    a = Alert("x", "warning", 3, "m", "s", {"v": 1.0}, rank=2)
    ev = a.to_event()
    assert ev == {"step": 3, "kind": "alert", "rule": "x", "severity": "warning", "message": "m",
                  "data": {"v": 1.0, "suggestion": "s", "first_step": 3, "rank": 2}}
