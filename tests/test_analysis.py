"""One analysis of a run: the same alerts from the live producer, ``rlhfkit diagnose``, the report and the
dashboard, with the run's own settings (its KL budget) read the same way by all of them."""
from __future__ import annotations

import json
import time

import pytest

import adapters.generic as kit
from dashboard import data as D
from profiler.report import build_report
from rlhf_core.cli import diagnose as diagnose_cli
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.analysis import META_KEY, Analysis, LiveAlerts, RunAnalysis, rule_config


def _kl_series(steps: int = 30, jump_at: int = 12) -> list[dict[str, float]]:
    """Flat, healthy-looking PPO records whose KL rises to 0.01 nats/token at ``jump_at``."""
    return [{"kl/ref_k3": 0.0005 if s < jump_at else 0.01, "kl/ref_k1": 0.0005 if s < jump_at else 0.01,
             "reward/mean": 0.1, "policy/entropy": 5.0, "loss/total": 1.0, "grad/norm": 0.5}
            for s in range(1, steps + 1)]


def _cli_alerts(run_dir, capsys, *flags: str) -> tuple[int, list[dict]]:
    code = diagnose_cli.main([str(run_dir), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def _dashboard_alerts(run_dir, timeout: float = 30.0) -> list[D.Alert]:
    data = D.RunCache(run_dir.parent).get(run_dir.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alerts, progress = data.alerts()
        if not progress and not (data._detector and data._detector.is_alive()):
            return [a for a in alerts if a.origin == "detector"]
        time.sleep(0.05)
    raise TimeoutError("dashboard detectors did not finish")


def test_rule_config_precedence_defaults_meta_then_overrides():
    meta = {"source": "rlhf_core", "config": {"kl_budget": 0.5, "max_grad_norm": 2.0},
            META_KEY: {"kl_budget": 0.3, "rearm_steps": 7}}
    cfg = rule_config(meta)
    assert (cfg.kl_budget, cfg.max_grad_norm, cfg.rearm_steps) == (0.3, 2.0, 7)
    cfg = rule_config(meta, {"kl_budget": 0.2})
    assert (cfg.kl_budget, cfg.rearm_steps) == (0.2, 7)
    with pytest.raises(ValueError, match="kl_budgt"):
        rule_config(meta, {"kl_budgt": 0.2})


def test_rule_config_reads_trl_args_and_drops_bad_meta_values():
    trl_meta = {"source": "trl", "config": {"args": {"max_grad_norm": 1.0, "learning_rate": 1e-5}}}
    assert rule_config(trl_meta).max_grad_norm == 1.0
    bad = {"config": {"kl_budget": "high", "max_grad_norm": -1}, META_KEY: {"rearm_steps": 0, "kl_z": 5.0}}
    cfg = rule_config(bad)
    assert cfg.kl_budget == rule_config({}).kl_budget and cfg.max_grad_norm is None
    assert cfg.rearm_steps == rule_config({}).rearm_steps and cfg.kl_z == 5.0


def test_cli_reads_the_runs_budget_like_the_dashboard(tmp_path, capsys):
    """The issue's case: a runner run with kl_budget 0.001 in its meta and KL 0.01 gets the kl_budget alerts (a
    warning the step KL passes it, critical the next step it is still past) from the CLI too, not only from the
    dashboard."""
    run_dir = tmp_path / "budget"
    with RunWriter(run_dir, source="rlhf_core", config={"kl_budget": 0.001}, tensorboard=False) as w:
        for step, rec in enumerate(_kl_series(), start=1):
            w.log(step, rec)
    code, alerts = _cli_alerts(run_dir, capsys)
    budget = [a for a in alerts if a["rule"] == "kl_budget"]
    assert code == 1 and [(a["severity"], a["step"]) for a in budget] == [("warning", 12), ("critical", 13)]
    assert budget[0]["evidence"]["budget"] == 0.001 and budget[0]["run"] == "budget"
    dash = [(a.rule, a.step, a.severity) for a in _dashboard_alerts(run_dir)]
    assert dash == [(a["rule"], a["step"], a["severity"]) for a in alerts]


def test_live_cli_report_and_dashboard_agree_on_a_real_generic_run(tmp_path, capsys):
    """A producer given its own settings (kl_budget through ``diagnoser_config``) writes them into meta.json, so
    every later view rebuilds the same rules and finds the same alerts, each labelled with its run."""
    run_dir = tmp_path / "live"
    with kit.run(run_dir, diagnoser_config={"kl_budget": 0.004}) as run:
        for step, rec in enumerate(_kl_series(), start=1):
            run.log(step, rec)
        live = [(a.rule, a.step, a.severity) for a in run.alerts]
        assert all(a.run == "live" for a in run.alerts)
    assert ("kl_budget", 12, "warning") in live and ("kl_budget", 13, "critical") in live
    assert json.loads((run_dir / "meta.json").read_text())[META_KEY] == {"kl_budget": 0.004}
    events = [(e["rule"], e["step"], e["severity"]) for e in Run(run_dir).events() if e["kind"] == "alert"]
    _, cli = _cli_alerts(run_dir, capsys)
    cli_alerts = [(a["rule"], a["step"], a["severity"]) for a in cli]
    report = [(a["rule"], a["step"], a["severity"]) for a in build_report(Run(run_dir))["alerts"]]
    dash = [(a.rule, a.step, a.severity) for a in _dashboard_alerts(run_dir)]
    assert sorted(live) == sorted(events) == sorted(cli_alerts) == sorted(report) == sorted(dash)
    _, stricter = _cli_alerts(run_dir, capsys, "--kl-budget", "100")  # the user's flag wins over the run's
    assert "kl_budget" not in {a["rule"] for a in stricter}


def test_run_analysis_reads_only_what_was_appended(tmp_path):
    run_dir = tmp_path / "grow"
    writer = RunWriter(run_dir, source="generic", config={"kl_budget": 0.004}, tensorboard=False)
    series = _kl_series()
    for step, rec in enumerate(series[:10], start=1):
        writer.log(step, rec)
    analysis = RunAnalysis(run_dir)
    assert analysis.alerts() == [] and analysis.records_seen == 10
    for step, rec in enumerate(series[10:], start=11):
        writer.log(step, rec)
    writer.close()
    alerts = analysis.alerts()
    assert analysis.records_seen == len(series)
    assert [(a.rule, a.step) for a in alerts if a.rule == "kl_budget"] == [("kl_budget", 12), ("kl_budget", 13)]


def test_live_alerts_label_a_ranks_own_records(tmp_path):
    writer = RunWriter(tmp_path / "r", source="generic", tensorboard=False)
    live = LiveAlerts(writer, rank=1)
    alerts = live.update([{"step": 1, "loss/total": float("nan")}])
    writer.close()
    assert [(a.rule, a.rank, a.run) for a in alerts] == [("nonfinite", 1, "r")]
    assert Run(tmp_path / "r").events()[0]["data"]["rank"] == 1


def test_analysis_without_meta_uses_defaults():
    analysis = Analysis()
    assert analysis.run_id is None and analysis.config == rule_config()
    assert analysis.update([{"step": 1, "grad/norm": float("inf")}])[0].rule == "nonfinite"


def test_replay_catches_the_rules_up_without_writing_the_alerts_again(tmp_path):
    """A resumed producer feeds the kept records first: their alerts are in events.jsonl already."""
    writer = RunWriter(tmp_path / "resumed", source="generic", tensorboard=False)
    live = LiveAlerts(writer)
    live.replay([{"step": 1, "loss/total": float("nan")}])
    assert [a.rule for a in live.alerts] == ["nonfinite"] and Run(tmp_path / "resumed").events() == []
    assert live.update([{"step": 2, "loss/total": float("nan")}]) == []  # the same episode: not raised twice
    assert live.update([{"step": 3, "kl/ref_k3": 2.0}])[0].rule == "kl_budget"  # writing is back on
    writer.close()
    assert [e["rule"] for e in Run(tmp_path / "resumed").events()] == ["kl_budget"]
