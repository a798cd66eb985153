"""A run whose writer was killed (SIGKILL: no chance to write ``failed``) still says so to readers on its host."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from dashboard import data as D
from profiler.report import build_report
from rlhf_core.cli import diagnose as diagnose_cli
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter

_WRITER = textwrap.dedent("""
    import sys, time
    from rlhf_core.runformat.run_writer import RunWriter
    w = RunWriter(sys.argv[1], source="generic", tensorboard=False)
    w.log(1, {"loss/total": 1.0})
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_killed_writer_is_named_by_every_reader(tmp_path, capsys):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    run = Run(run_dir)
    assert run.status == "running" and not run.process_gone()  # alive: nothing to say
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    run = Run(run_dir)
    assert run.status == "running" and run.process_gone()
    assert f"process {proc.pid} has ended" in run.status_line()
    diagnose_cli.main([str(run_dir)])
    assert "has ended without closing the run" in capsys.readouterr().out
    assert build_report(Run(run_dir))["run"]["process_gone"] is True
    row = D.RunCache(tmp_path).get("killed").summary()
    assert row["status"].startswith("running? (its process has ended")


def test_a_live_or_foreign_or_closed_run_is_not_called_gone(tmp_path):
    w = RunWriter(tmp_path / "live", source="generic", tensorboard=False)
    assert not Run(tmp_path / "live").process_gone()  # this very process writes it
    meta = json.loads((tmp_path / "live" / "meta.json").read_text())
    meta["process"]["host"] = "another-host"
    meta["process"]["pid"] = 2**22 + 12345  # no such pid here, but on another host we cannot know
    (tmp_path / "live" / "meta.json").write_text(json.dumps(meta))
    assert not Run(tmp_path / "live").process_gone()
    w.close()
    assert Run(tmp_path / "live").status == "finished" and not Run(tmp_path / "live").process_gone()
