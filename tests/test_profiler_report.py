"""``rlhfkit report``: per-phase numbers, slow-step attribution, bad input, and no torch import."""
import json
import math
import subprocess
import sys

import pytest

from profiler import report
from rlhf_core.cli.main import main as rlhfkit
from rlhf_core.runformat.run_writer import RunWriter

BASE = {"rollout": 0.30, "reward": 0.02, "update": 0.50, "optimizer": 0.10, "logging": 0.03}


def _write_run(path, steps=10, slow=None, extra=None):
    """Steps of known phase times; ``slow`` maps step -> (phase, extra seconds)."""
    slow = slow or {}
    with RunWriter(path, source="generic", tensorboard=False) as w:
        for step in range(1, steps + 1):
            times = dict(BASE)
            if step in slow:
                phase, more = slow[step]
                times[phase] += more
            rec = {f"time/{p}": t for p, t in times.items()}
            rec["time/step"] = sum(times.values()) + 0.05  # 50 ms outside any phase
            rec.update({f"mem/{p}_peak_bytes": (i + 1) * 2**20 * step for i, p in enumerate(BASE)})
            rec["mem/peak_bytes"] = max(v for k, v in rec.items() if k.endswith("_peak_bytes"))
            rec["throughput/tokens_per_s"] = 100.0
            rec.update((extra or {}).get(step, {}))
            w.log(step, rec)
        w.system({"cpu/process_percent": 150.0, "mem/rss_bytes": 2**30})
    return path


def test_phase_table_numbers(tmp_path):
    run = _write_run(tmp_path / "r")
    data = report.build_report(report.Run(run))
    rows = {r["phase"]: r for r in data["phases"]}
    assert list(rows) == list(BASE)  # canonical phase order
    assert rows["update"]["ms_per_step"] == pytest.approx(500.0)
    assert rows["update"]["share"] == pytest.approx(0.5 / 1.0)
    assert rows["logging"]["peak_bytes"] == 5 * 2**20 * 10
    assert data["untimed"]["ms_per_step"] == pytest.approx(50.0)
    assert data["step"]["mean_ms"] == pytest.approx(1000.0)
    assert data["throughput"]["tokens_per_s_median"] == 100.0
    assert data["trace"] is None and data["system"]["rss_max_bytes"] == 2**30


def test_slowest_steps_name_the_phase_that_made_them_slow(tmp_path):
    run = _write_run(tmp_path / "r", slow={4: ("rollout", 0.8), 7: ("optimizer", 0.3)})
    slow = report.build_report(report.Run(run), slowest=2)["slowest"]
    assert [(s["step"], s["phase"]) for s in slow] == [(4, "rollout"), (7, "optimizer")]
    assert slow[0]["over_median_ms"] == pytest.approx(800.0)
    assert slow[0]["phase_over_median_ms"] == pytest.approx(800.0)


def test_text_and_json_output(tmp_path, capsys):
    run = _write_run(tmp_path / "r", slow={3: ("update", 1.0)})
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "Phases (per step)" in out and "(untimed)" in out
    assert "top ops: no trace (kit.run(..., trace_steps=N) in adapters.generic)" in out  # a generic run's words
    assert report.main([str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["slowest"][0]["step"] == 3 and data["slowest"][0]["phase"] == "update"


def test_dispatch_through_rlhfkit(tmp_path, capsys):
    run = _write_run(tmp_path / "r")
    assert rlhfkit(["report", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["steps"] == 10


@pytest.mark.parametrize("make", ["missing", "no_meta", "bad_meta"])
def test_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make != "missing":
        target.mkdir()
    if make == "bad_meta":
        (target / "meta.json").write_text("{not json")
    assert report.main([str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhfkit report: ") and err.count("\n") == 1 and "Traceback" not in err


def test_run_without_steps_says_so(tmp_path, capsys):
    RunWriter(tmp_path / "empty", source="generic", tensorboard=False).close()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no step records yet" in capsys.readouterr().err


def test_nonfinite_and_torn_lines_are_survived(tmp_path, capsys):
    run = _write_run(tmp_path / "r", extra={2: {"time/update": math.nan}, 5: {"time/step": math.inf}})
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 11, "time/step": 0.')  # a writer killed mid-line
    assert report.main([str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["steps"] == 10
    assert any("torn last line" in p for p in data["problems"])
    assert all(s["step"] != 5 for s in data["slowest"])  # an infinite step time is not a "slow step"
    assert report.main([str(run)]) == 0
    assert "warning:" in capsys.readouterr().out


def test_unreadable_trace_is_a_warning_not_a_crash(tmp_path, capsys):
    run = _write_run(tmp_path / "r")
    (run / "traces").mkdir()  # the writer creates it only for a profiled run
    (run / "traces" / "rank0_steps000001-000002.pt.trace.json.gz").write_bytes(b"\x1f\x8bnot really gzip")
    assert report.main([str(run)]) == 0
    assert "not a readable Chrome trace" in capsys.readouterr().out


def test_report_does_not_import_torch(tmp_path, repo_root):
    run = _write_run(tmp_path / "r")
    code = ("import sys; from profiler import report; rc = report.main([sys.argv[1], '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], cwd=repo_root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
