"""The dashboard's Timeline tab on a real 2-rank torchrun run (committed: ``tests/fixtures/timeline_ddp2``,
made as in test_timeline_ddp.py with ``--debug_slow_rank 1 --debug_slow_seconds 0.2``, 6 steps, so the tests
need no torchrun): one Gantt row per rank, rank 0's waits for the slowed rank 1 in the wait trace and the
busy/wait table, the rank selector and the step range; and in headless Chromium, the tab with one row per rank.

``RLHFKIT_TIMELINE_SCREENSHOT=1`` writes the README's ``docs/img/timeline.png`` from the browser test."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dashboard import figures as F
from dashboard.callbacks import timeline_outputs
from dashboard.data import RunCache, timeline_view
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.timeline import analyse, read_timeline

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "timeline_ddp2"
BUNDLE_TRACES = {"scatter", "scattergl", "heatmap", "bar", "icicle"}


@pytest.fixture()
def ddp2(tmp_path) -> RunCache:
    shutil.copytree(FIXTURE, tmp_path / "ddp2")
    return RunCache(tmp_path)


def _rows_of(fig: dict) -> set[str]:
    return {y for t in fig["data"] for y in t["y"]}


def test_the_fixture_is_a_real_two_rank_run():
    run = Run(FIXTURE)
    assert run.meta["source"] == "rlhf_core" and run.world_size == 2
    tl = read_timeline(FIXTURE)
    assert sorted(tl.processes) == [0, 1] and tl.processes[0].pid != tl.processes[1].pid
    assert tl.step_numbers() == list(range(1, 7))


def test_gantt_has_one_row_per_rank_and_rank_0_waits_for_the_slowed_rank(ddp2):
    fig, rows, summary, _ = timeline_outputs(ddp2.get("ddp2"), None, "all")
    assert _rows_of(fig) == {"rank 0 (runner)", "rank 1 (runner)"}
    assert fig["layout"]["yaxis"]["categoryarray"] == ["rank 0 (runner)", "rank 1 (runner)"]
    assert {t["type"] for t in fig["data"]} == {"bar"} <= BUNDLE_TRACES
    wait = next(t for t in fig["data"] if t["name"] == "waiting")
    assert wait["marker"]["color"] == F.WAIT_COLOUR
    # rank 1 sleeps 0.2 s in its rollout each step: rank 0 waits in its first collective for about that long
    waited = {y: sum(x for yy, x in zip(wait["y"], wait["x"]) if yy == y) for y in set(wait["y"])}
    assert waited["rank 0 (runner)"] > 6 * 0.15 > waited.get("rank 1 (runner)", 0.0)
    assert all(b >= 0 for t in fig["data"] for b in t["base"])
    by_rank = {r["rank"]: r for r in rows}
    assert set(by_rank) == {0, 1} and by_rank[0]["wait"] > 50 > by_rank[1]["wait"]
    for r in rows:
        assert r["busy"] + r["wait"] + r["idle"] == pytest.approx(100, abs=0.2)
    # the table is the analysis of rlhf_core.runformat.timeline, not a second one
    shares = analyse(read_timeline(FIXTURE)).per_rank()
    assert by_rank[0]["wait"] == round(100 * shares[0]["wait_share"], 1)
    assert "steps 1-6" in summary and "2 ranks" in summary and "critical path mostly rank 1" in summary


def test_step_range_and_rank_selector(ddp2):
    data = ddp2.get("ddp2")
    fig, rows, summary, _ = timeline_outputs(data, "2:3", 1)
    assert _rows_of(fig) == {"rank 1 (runner)"} and [r["rank"] for r in rows] == [1]
    steps = {s for t in fig["data"] for s in t["customdata"]}
    assert steps == {2, 3} and "steps 2-3" in summary
    assert timeline_outputs(data, "50:60", "all")[2].startswith("no recorded steps")
    assert "expected A:B" in timeline_outputs(data, "x:y", "all")[2]
    assert data.timeline().steps == (1, 6) and data.timeline(last=2).steps == (5, 6)


def test_a_large_view_is_one_binned_heatmap_with_the_waits(ddp2, monkeypatch):
    monkeypatch.setattr(F, "MAX_TIMELINE_BARS", 10)
    fig = F.timeline_figure(timeline_view(ddp2.root / "ddp2", None))
    (heat,) = fig["data"]
    assert heat["type"] == "heatmap" and heat["y"] == ["rank 0 (runner)", "rank 1 (runner)"]
    wait_code = heat["colorbar"]["ticktext"].index("waiting")
    row0, row1 = heat["z"]
    assert len(row0) == F.TIMELINE_BINS
    assert row0.count(wait_code) > 0.3 * F.TIMELINE_BINS > row1.count(wait_code)
    # rows apart by one white path, not by the heatmap's ygap (which draws every cell on its own: ~5x slower)
    assert heat["ygap"] == 0 and fig["layout"]["shapes"][-1]["path"] == "M0,0.5L1,0.5"


def test_a_run_without_intervals_says_so(tmp_path):
    (tmp_path / "plain").mkdir()
    shutil.copy(FIXTURE / "meta.json", tmp_path / "plain" / "meta.json")
    shutil.copy(FIXTURE / "metrics.jsonl", tmp_path / "plain" / "metrics.jsonl")
    fig, rows, summary, _ = timeline_outputs(RunCache(tmp_path).get("plain"), None, "all")
    assert rows == [] and "no phase intervals" in summary
    assert fig["data"] == [] or all(not t.get("y") for t in fig["data"])


@pytest.mark.browser
def test_timeline_tab_in_chromium_shows_one_row_per_rank(tmp_path):
    from test_dashboard_browser import _require_browser

    from dashboard.app import create_app
    from devtools.headless import ServerThread, chromium, wait_for

    _require_browser()
    shutil.copytree(FIXTURE, tmp_path / "runs" / "ddp2")
    with ServerThread(create_app(tmp_path / "runs").server) as server, chromium() as driver:
        driver.get(server.url + "/?run=ddp2")
        wait_for(lambda: driver.find_elements("xpath", "//*[text()='Timeline']"), 60)[0].click()
        rows_js = ("const g = document.querySelector('#fig-timeline .js-plotly-plot');"
                   "if (!g || !g.data || !g.data.length) return null;"
                   "return [...new Set(g.data.flatMap(t => Array.from(t.y || [])))].sort();")
        rows = wait_for(lambda: driver.execute_script(rows_js), 60)
        assert rows == ["rank 0 (runner)", "rank 1 (runner)"]
        drawn = driver.execute_script("return document.querySelectorAll('#fig-timeline .bars .point').length")
        assert drawn > 100  # bars really drawn by plotly.js, not only data
        table = wait_for(lambda: (lambda t: t if "runner" in t else None)(driver.execute_script(
            "return document.getElementById('timeline-table').innerText")), 30)
        assert table.count("runner") == 2
        errors = driver.execute_script(
            "return Array.from(document.querySelectorAll('.cb-error')).map(e => e.innerText).join(' ');")
        assert not errors.strip(), errors
        if os.environ.get("RLHFKIT_TIMELINE_SCREENSHOT"):
            driver.set_window_size(1500, 900)
            wait_for(lambda: driver.execute_script(rows_js), 30)
            driver.save_screenshot(str(ROOT / "docs" / "img" / "timeline.png"))


def test_an_unchanged_timeline_is_not_analysed_again(ddp2):
    data = ddp2.get("ddp2")
    first = data.timeline()
    assert data.timeline() is first and timeline_outputs(data, None, "all")[3] == timeline_outputs(data, None, "all")[3]
    assert timeline_outputs(data, None, 0)[3] != timeline_outputs(data, None, "all")[3]  # the rank is part of it
    with open(data.path / "timeline.rank1.jsonl", "ab") as fh:  # a process appends: read and analysed afresh
        fh.write(b"\n")
    assert data.timeline() is not first and data.timeline().signature != first.signature
