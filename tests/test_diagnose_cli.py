"""``rlhfkit diagnose`` end to end on run directories written with RunWriter: output, --json, exit codes."""
from __future__ import annotations

import json
import math

import pytest

from devtools.synthetic import healthy_series, planted_series
from rlhf_core.cli import main as cli
from rlhf_core.cli.diagnose import main
from rlhf_core.runformat.run_writer import RunWriter


def write_run(path, records):
    with RunWriter(path, source="generic", tensorboard=False) as w:
        for rec in records:
            rec = dict(rec)
            step, nonfinite = rec.pop("step"), rec.pop("nonfinite", [])
            w.log(step, {k: (math.nan if k in nonfinite else v) for k, v in rec.items()})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "healthy": write_run(root / "healthy", healthy_series(400)),
        "nan": write_run(root / "nan", planted_series("nonfinite", n=400, at=200)),
        "clip": write_run(root / "clip", planted_series("clipfrac", n=400, at=200)),
    }


def test_healthy_run_exits_zero(runs, capsys):
    assert main([str(runs["healthy"])]) == 0
    out = capsys.readouterr()
    assert "healthy: no alerts over 400 steps (status finished)" in out.out and out.err == ""


def test_critical_alert_exits_one_with_json(runs, capsys):
    assert main([str(runs["nan"]), "--json"]) == 1
    alerts = json.loads(capsys.readouterr().out)
    assert [(a["rule"], a["severity"], a["step"], a["evidence"]["keys"]) for a in alerts] == \
        [("nonfinite", "critical", 200, ["loss/total"])]
    assert alerts[0]["suggestion"]


def test_warnings_only_exit_zero_and_read_as_lines(runs, capsys):
    assert main([str(runs["clip"])]) == 0
    out = capsys.readouterr().out
    assert "WARNING   clipfrac" in out and "step 200" in out and "suggestion: lower the learning rate" in out
    assert "1 alert(s): 0 critical, 1 warning" in out


def test_flags_config_file_and_set(runs, tmp_path, capsys):
    assert main([str(runs["healthy"]), "--kl-budget", "0.01", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["rule"] == "kl_budget"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"kl_budget": 0.01, "disabled_rules": ["kl_budget"]}))
    assert main([str(runs["healthy"]), "--config", str(cfg)]) == 0
    assert main([str(runs["clip"]), "--set", "clipfrac_steps=30"]) == 0
    assert "no alerts" in capsys.readouterr().out
    assert main([str(runs["nan"]), "--disable", "nonfinite"]) == 0


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "no such run directory"),
    (["{tmp}"], "no meta.json"),
    (["{run}", "--config", "{tmp}/absent.json"], "cannot read config"),
    (["{run}", "--config", "{tmp}/bad.json"], "cannot read config"),
    (["{run}", "--set", "kl_budgt=1"], "did you mean 'kl_budget'"),
    (["{run}", "--set", "kl_window"], "--set expects KEY=VALUE"),
    (["{run}", "--disable", "nope"], "unknown rule(s) nope"),
])
def test_bad_input_is_one_line_and_exit_two(runs, tmp_path, capsys, args, message):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path, run=runs["healthy"]) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhfkit diagnose: ") and message in err and "\n" not in err


def test_reader_problems_become_warnings_and_the_run_is_still_diagnosed(tmp_path, capsys):
    run = write_run(tmp_path / "torn", planted_series("nonfinite", n=300, at=100))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(50, "{garbage\n")
    (run / "metrics.jsonl").write_text("".join(lines) + '{"step": 300, "loss/to')
    assert main([str(run)]) == 1
    out = capsys.readouterr()
    assert "metrics.jsonl:51: malformed JSON" in out.err and "torn last line" in out.err
    assert "non-finite values at step 100" in out.out and "over 300 steps" in out.out


def test_dispatcher_and_usage_errors(runs, capsys):
    assert cli.main(["diagnose", str(runs["nan"])]) == 1
    assert "CRITICAL  nonfinite" in capsys.readouterr().out
    assert main([]) == 2 and "required: run_dir" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "--kl-budget" in capsys.readouterr().out


def test_synthetic_demo_writer_feeds_diagnose(tmp_path, capsys):
    from devtools import synthetic

    assert synthetic.main([str(tmp_path / "demo"), "entropy_collapse", "300"]) == 0
    assert main([str(tmp_path / "demo"), "--json"]) == 1
    alerts = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    # the planted collapse buys no reward (it falls back to its start while KL grows): reward_hacking_kl sees that
    assert [(a["rule"], a["severity"], a["step"]) for a in alerts] == [("entropy_collapse", "warning", 150),
                                                                        ("entropy_collapse", "critical", 150),
                                                                        ("reward_hacking_kl", "warning", 160)]
    assert synthetic.main([str(tmp_path / "x"), "nope"]) == 2
    assert "unknown fault 'nope'" in capsys.readouterr().err
