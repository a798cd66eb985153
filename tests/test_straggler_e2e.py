"""A planted slow rank in a real 2-rank torchrun run is named by the straggler rule, live and offline.

``--debug_slow_rank 1 --debug_slow_seconds 0.3`` makes rank 1 sleep inside its rollout phase every step. The
runner feeds each step's per-rank records to ``Diagnoser.update_ranks`` (alerts land in ``events.jsonl``);
``rlhfkit diagnose RUN --json`` recomputes them from the rank files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slow_rank_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straggler") / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--epochs", "1", "--steps_per_epoch", "4", "--batch_size", "2",
           "--max_new_tokens", "6", "--no_tensorboard", "--sample_interval", "0",
           "--debug_slow_rank", "1", "--debug_slow_seconds", "0.3", "--run_dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"2-rank run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return run_dir


def _stragglers(alerts: list[dict]) -> list[tuple[int, str]]:
    """(rank, phase) of each straggler alert, from events (``data``) or diagnose JSON (``evidence``)."""
    out = []
    for a in alerts:
        if a.get("rule") != "straggler":
            continue
        facts = a.get("data") or a.get("evidence") or {}
        out.append((facts.get("rank"), facts.get("phase")))
    return out


def test_slow_rank_recorded_in_its_rollout_time(slow_rank_run: Path) -> None:
    for line in (slow_rank_run / "metrics.rank1.jsonl").read_text().splitlines():
        assert json.loads(line)["time/rollout"] >= 0.3


def test_straggler_alert_in_events(slow_rank_run: Path) -> None:
    events = [json.loads(line) for line in (slow_rank_run / "events.jsonl").read_text().splitlines() if line]
    assert (1, "rollout") in _stragglers(events), events
    alert = next(e for e in events if e["rule"] == "straggler" and e["data"]["rank"] == 1
                 and e["data"]["phase"] == "rollout")
    assert alert["kind"] == "alert" and alert["step"] == 1 and "rank 1" in alert["message"]


def test_straggler_alert_from_diagnose_cli(slow_rank_run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlhf_core.cli.main", "diagnose", str(slow_rank_run), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    alerts = json.loads(proc.stdout)
    assert (1, "rollout") in _stragglers(alerts), alerts
    assert {rank for rank, _ in _stragglers(alerts)} == {1}, alerts


def test_waiting_rank_not_blamed(slow_rank_run: Path) -> None:
    """Rank 0 waits for rank 1 at the first collective (phase 'advantages'); that wait is not a straggler."""
    events = [json.loads(line) for line in (slow_rank_run / "events.jsonl").read_text().splitlines() if line]
    assert {rank for rank, _ in _stragglers(events)} == {1}, events
