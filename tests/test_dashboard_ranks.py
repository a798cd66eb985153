"""A many-rank run in the dashboard: a rank's records are read only when that rank is shown, the per-rank phase
chart reads only the end of each rank file, and the detectors' straggler pass reads the rank files itself
without keeping them, and waits while a callback is served (``benchmarks/bench_dashboard_ranks.py`` measures
the same at 256 ranks x 10k steps)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from test_dashboard_data import _wait_alerts

from dashboard import figures as F
from dashboard.callbacks import Builder, profiler_charts
from dashboard.data import ALL, RunCache, View, serving, yield_to_requests
from rlhf_core.runformat.run_reader import tail_records
from rlhf_core.runformat.run_writer import RunWriter

RANKS, SLOW = 4, 2


def _log(writers: list[RunWriter], steps: range) -> None:
    for s in steps:
        recs = [{"time/rollout": 0.2 + (0.6 if r == SLOW and s >= 10 else 0.0), "time/update": 0.1,
                 "kl/ref_k3": 0.01 * r} for r in range(len(writers))]
        for w, rec in zip(writers, recs):
            w.log(s, rec)
        writers[0].log_reduced(s, {k: sum(r[k] for r in recs) / len(recs) for k in recs[0]})


def _run(path: Path, steps: int = 60) -> list[RunWriter]:
    writers = [RunWriter(path, source="generic", tensorboard=False, rank=r, world_size=RANKS) for r in range(RANKS)]
    _log(writers, range(steps))
    return writers


def _rank_files_read(data) -> set[str]:
    return {name for name in data.run._cursors if name.startswith("metrics.rank")}


def test_a_rank_file_is_read_only_when_that_rank_is_shown(tmp_path):
    writers = _run(tmp_path / "ddp")
    cache = RunCache(tmp_path)
    data = cache.get("ddp")
    assert data.rank_ids == list(range(RANKS)) and set(data.views) == {ALL} and not _rank_files_read(data)
    figs, _, _ = Builder(cache).full(["ddp"], 3)
    kl = figs[F.FIGURE_IDS.index("kl")]
    assert kl["data"][0]["name"].startswith("ddp[rank 3]") and set(kl["data"][0]["y"]) == {0.03}
    assert set(data.views) == {ALL, 3} and _rank_files_read(data) == {"metrics.rank3.jsonl"}
    _log(writers, range(60, 65))  # the shown rank follows the run, the others stay unread (lines are flushed)
    cache.get("ddp")
    assert len(data.view(3)) == 65 and set(data.views) == {ALL, 3}
    for w in writers:
        w.close()


def test_the_per_rank_phase_chart_reads_the_end_of_each_rank_file(tmp_path):
    for w in _run(tmp_path / "ddp"):
        w.close()
    data = RunCache(tmp_path).get("ddp")
    tails = data.rank_tails(50)
    assert sorted(tails) == list(range(RANKS)) and all(len(v) == 50 for v in tails.values())
    assert list(tails[SLOW].steps()[[0, -1]]) == [10, 59]
    assert data.rank_tails(50) is tails  # unchanged files: not read again
    fig = profiler_charts(data, ALL)[1]
    rollout = [t for t in fig.data if t.name == "rollout"][0]
    assert list(rollout.x) == [f"rank {r}" for r in range(RANKS)] and rollout.y[SLOW] == pytest.approx(0.8)
    assert not _rank_files_read(data)  # no layers logged: not even rank 0 (read for the layer order otherwise)
    assert F.rank_phase_figure(RunCache(tmp_path).get("ddp").rank_tails(50)).data  # a fresh cache too


def test_the_straggler_pass_reads_the_rank_files_without_keeping_them(tmp_path):
    for w in _run(tmp_path / "ddp"):
        w.close()
    data = RunCache(tmp_path).get("ddp")
    alerts = _wait_alerts(data)
    straggler = [a for a in alerts if a.rule == "straggler"]
    assert straggler and straggler[0].rank == SLOW and "rollout" in straggler[0].message
    assert set(data.views) == {ALL} and not data._rank_pending  # every step fed, no rank records kept


def test_tail_records_reads_back_from_the_end(tmp_path):
    path = tmp_path / "metrics.rank0.jsonl"
    lines = [json.dumps({"step": i, "x": i}) for i in range(1000)]
    path.write_text("\n".join(lines[:500]) + "\nnot json\n" + "\n".join(lines[500:]) + '\n{"step": 1000, "x"')
    assert [r["step"] for r in tail_records(path, 5, chunk=64)] == list(range(995, 1000))  # torn last line: left
    assert len(tail_records(path, 501, chunk=64)) == 500  # the bad line is one of the 501, skipped
    assert [r["step"] for r in tail_records(path, 5000)] == list(range(1000))  # fewer lines than asked for
    assert tail_records(tmp_path / "missing.jsonl", 5) == []


def test_the_detectors_wait_while_a_callback_is_served():
    done = threading.Event()
    with serving():
        waiter = threading.Thread(target=lambda: (yield_to_requests(10), done.set()))
        waiter.start()
        time.sleep(0.3)
        assert not done.is_set()
    waiter.join(5)
    assert done.is_set()
    t0 = time.monotonic()
    yield_to_requests(10)  # nothing served: at once
    assert time.monotonic() - t0 < 0.5


def test_the_per_rank_chart_of_many_ranks_labels_some_bars_and_draws_no_outlines():
    views = {ALL: View()}
    for r in range(F.MANY_RANKS + 1):
        views[r] = View()
        views[r].extend([{"step": s, "time/rollout": 0.1 * (1 + (r == 7)), "time/update": 0.05} for s in range(3)])
    fig = F.rank_phase_figure(views)
    assert len(fig.data[0].x) == F.MANY_RANKS + 1 and fig.layout.xaxis.nticks == 16  # plotly.js: ~0.1 s, not ~0.33
    assert all(t.marker.line.width == 0 for t in fig.data) and fig.data[0].y[7] == pytest.approx(0.2)
    few = F.rank_phase_figure({ALL: View(), **{r: views[r] for r in range(4)}})
    assert few.layout.xaxis.nticks is None and few.data[0].marker.line.width is None
