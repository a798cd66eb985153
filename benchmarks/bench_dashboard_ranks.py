"""The dashboard on a 256-rank run: its rank view and its Timeline tab, first render in headless Chromium.

Issue 17 ("Scale"): a synthetic run of 256 ranks x 10k steps written through the run writer (the writer of
``bench_timeline.py``: ``RunWriter`` per rank with ``time/*`` and ``wait/*``, the reduced ``metrics.jsonl``,
and one ``TimelineRecorder`` file per rank, ~2 GB; rank 7 slow in rollout from mid-run), served by a fresh
``python -m dashboard.app`` process (what ``rlhfkit dashboard`` runs) for every measurement, so nothing is
read or cached on the server (the browser has the page's scripts cached, as after any earlier visit; the
process start-up is not timed: the clock starts at the page request). Targets: < 2 s to first render each.

- rank view: the page opened as ``/?run=big``, then the Profiler tab clicked: until the per-rank phase time
  (one stacked bar per rank, so a straggler stands out) and the phase time per step are drawn, and the rank
  selector lists every rank. Then one rank picked in the selector (rank 7, the straggler): until the tabs
  show that rank's own records (timed from the pick).
- timeline: the page opened as ``/?run=big``, the Timeline tab clicked and a 100-step range typed into its
  *steps* box (``A:B`` + Enter): until the Gantt of all 256 ranks over those steps is drawn (timed from the
  page request, and from the Enter).

Also measured in-process (server side, the same cold state, no browser): opening the run, the Profiler tab's
figures, one rank's view, the Timeline tab's outputs, and the JSON size of what the browser receives, which
splits a browser time into server work and drawing.

``python benchmarks/bench_dashboard_ranks.py [--quick] [--ranks N] [--steps N] [--repeats N] [--keep DIR]``
(``--quick``: 256 ranks x 300 steps, 2 repeats, result not written unless ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_dashboard import dashboard_process, free_port  # noqa: E402
from benchmarks.bench_timeline import SLOW_RANK, write_synthetic  # noqa: E402
from benchmarks.common import RESULTS, row, spread, write_result  # noqa: E402

RUN = "big"
WINDOW = 100  # steps of the timeline range
TARGET_S = 2.0

# JavaScript run in the page.
RANK_VIEW_JS = """
const ranks = arguments[0];
const bars = document.querySelector('#fig-rank_phases .js-plotly-plot');
const phases = document.querySelector('#fig-phases .js-plotly-plot');
const opts = document.getElementById('rank');
const barData = bars && (bars._fullData || bars.data), phaseData = phases && (phases._fullData || phases.data);
if (!barData || !barData.length || !phaseData || !phaseData.length) return null;
if (!barData.every(t => t.x && t.x.length === ranks)) return null;
if (!phaseData.every(t => t.x && t.x.length > 0)) return null;
if (document.querySelectorAll('#fig-rank_phases .bars .point').length < ranks) return null;
return barData.length;
"""
ONE_RANK_JS = """
const want = arguments[0];
const phases = document.querySelector('#fig-phases .js-plotly-plot');
const data = phases && (phases._fullData || phases.data);
if (!data || !data.length || !phases.layout) return null;
const title = (phases.layout.title && phases.layout.title.text) || '';
if (!title.includes(want) || !data.every(t => t.x && t.x.length > 0)) return null;
return title;
"""
TIMELINE_JS = """
const [ranks, want] = arguments;
const g = document.querySelector('#fig-timeline .js-plotly-plot');
const data = g && (g._fullData || g.data);
if (!data || !data.length || !g.layout) return null;
const title = (g.layout.title && g.layout.title.text) || '';
if (!title.includes(want)) return null;
const rows = new Set(data.flatMap(t => Array.from(t.y || [])));
if (rows.size !== ranks) return null;
const drawn = document.querySelectorAll('#fig-timeline .heatmaplayer image, #fig-timeline .bars .point').length;
return drawn ? title : null;
"""
ERRORS_JS = "return Array.from(document.querySelectorAll('.cb-error')).map(e => e.innerText).join(' ').trim();"


def _click_text(driver: Any, text: str, timeout: float = 120) -> None:
    from devtools.headless import wait_for

    wait_for(lambda: [e for e in driver.find_elements("xpath", f"//*[normalize-space(text())='{text}']")
                      if e.is_displayed()], timeout, 0.02)[0].click()


def _check_errors(driver: Any) -> None:
    errors = driver.execute_script(ERRORS_JS)
    if errors:
        raise RuntimeError(f"the page shows a callback error: {errors[:300]}")


def rank_view(driver: Any, url: str, ranks: int) -> dict[str, float]:
    """Page request -> Profiler tab -> the per-rank charts drawn; then rank SLOW_RANK picked -> its view drawn."""
    from devtools.headless import wait_for

    t0 = time.perf_counter()
    driver.get(f"{url}/?run={RUN}")
    _click_text(driver, "Profiler")
    wait_for(lambda: driver.execute_script(RANK_VIEW_JS, ranks), 300, 0.02)
    first = time.perf_counter() - t0
    _check_errors(driver)
    # the rank selector: type the rank's label into its search box and pick the option
    t1 = time.perf_counter()
    driver.find_element("css selector", "#rank").click()
    box = wait_for(lambda: [e for e in driver.find_elements("css selector", ".dash-dropdown-content input[type=search]")
                            if e.is_displayed()], 30, 0.02)[0]  # Dash 4's dropdown: a search box in its popover
    box.send_keys(f"rank {SLOW_RANK}")
    _click_text(driver, f"rank {SLOW_RANK}", 60)
    wait_for(lambda: driver.execute_script(ONE_RANK_JS, f"[rank {SLOW_RANK}]"), 300, 0.02)
    one = time.perf_counter() - t1
    _check_errors(driver)
    return {"first_render_s": first, "one_rank_s": one}


def timeline_view(driver: Any, url: str, ranks: int, lo: int, hi: int, last: int) -> dict[str, float]:
    """Page request -> Timeline tab -> its default range (the last 10 steps) drawn -> ``lo:hi`` typed, Enter ->
    the Gantt of every rank over that range drawn."""
    from selenium.webdriver.common.keys import Keys

    from devtools.headless import wait_for

    t0 = time.perf_counter()
    driver.get(f"{url}/?run={RUN}")
    _click_text(driver, "Timeline")
    default = f"steps {max(1, last - 9)}-{last}"
    wait_for(lambda: driver.execute_script(TIMELINE_JS, ranks, default), 300, 0.02)
    tab = time.perf_counter() - t0
    box = wait_for(lambda: [e for e in driver.find_elements("css selector", "#timeline-steps") if e.is_displayed()],
                   120, 0.02)[0]
    box.send_keys(f"{lo}:{hi}")
    t1 = time.perf_counter()
    box.send_keys(Keys.ENTER)
    wait_for(lambda: driver.execute_script(TIMELINE_JS, ranks, f"steps {lo}-{hi}"), 300, 0.02)
    done = time.perf_counter()
    _check_errors(driver)
    return {"tab_s": tab, "range_s": done - t1, "flow_s": done - t0}


def server_side(root: Path, ranks: int, lo: int, hi: int) -> dict[str, Any]:
    """The same work without a browser, each from a new cache (the OS file cache is warm), each inside
    ``serving()`` as a callback is (the background work of an opened run waits meanwhile): seconds and the JSON
    bytes the browser would receive."""
    from plotly.utils import PlotlyJSONEncoder

    from dashboard.callbacks import Builder, profiler_charts, timeline_outputs
    from dashboard.data import ALL, RunCache, serving
    from rlhf_core.runformat import timeline as T

    def size(obj: Any) -> int:
        return len(json.dumps(obj, cls=PlotlyJSONEncoder))

    out: dict[str, Any] = {}
    with serving():
        t0 = time.perf_counter()
        data = RunCache(root).get(RUN)
        out["open_run_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        charts = profiler_charts(data, ALL)
        out["profiler_tab_s"] = time.perf_counter() - t0
        out["profiler_tab_json_bytes"] = size(list(charts[:3]))
        t0 = time.perf_counter()
        Builder.series([data], SLOW_RANK)
        charts = profiler_charts(data, SLOW_RANK)
        out["one_rank_s"] = time.perf_counter() - t0
        data = RunCache(root).get(RUN)
        T._HEADER_SEARCHED.clear()  # as if nothing had searched the files ahead (the dashboard does when idle)
        t0 = time.perf_counter()
        fig, rows, summary, _ = timeline_outputs(data, f"{lo}:{hi}", ALL)
        out["timeline_outputs_s"] = time.perf_counter() - t0
        out["timeline_json_bytes"] = size([fig, rows, summary])
        out["timeline_summary"] = summary
        out["timeline_trace_types"] = sorted({t.get("type", "") for t in fig["data"]})
        t0 = time.perf_counter()
        timeline_outputs(data, f"{lo}:{hi}", ALL)
        out["timeline_unchanged_s"] = time.perf_counter() - t0
    out["ranks_seen"] = len(data.rank_ids)
    return out


def _ensure_run(root: Path, ranks: int, steps: int) -> float | None:
    """Write the synthetic run under ``root/big`` unless a run of that shape is there; seconds, or None."""
    run = root / RUN
    meta = run / "meta.json"
    if meta.exists():
        got = json.loads(meta.read_text())
        have = len(list(run.glob("timeline.rank*.jsonl")))
        last = run / "metrics.rank0.jsonl"
        tail = last.read_bytes()[-4096:].splitlines()[-1] if last.exists() else b"{}"
        if got.get("world_size") == ranks and have == ranks and json.loads(tail).get("step") == steps:
            return None
    return write_synthetic(run, ranks, steps)


def _rss_mib(port: int) -> float | None:
    """Resident memory of the dashboard process serving ``port`` (the benchmark's child)."""
    import psutil

    for child in psutil.Process().children():
        try:
            if "dashboard.app" in " ".join(child.cmdline()) and str(port) in child.cmdline():
                return child.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return None


def measure(root: Path, ranks: int, steps: int, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from dashboard.app import create_app
    from devtools.headless import ServerThread, chromium

    lo = steps // 2 + 1
    hi = min(steps, lo + WINDOW - 1)
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    timings: dict[str, list[float]] = {"rank_view": [], "one_rank": [], "timeline_tab": [], "timeline_range": [],
                                       "timeline_flow": []}
    rss: list[float] = []
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench_ranks_empty_") as empty, chromium() as driver:
        with ServerThread(create_app(empty).server) as server:  # the browser's own start-up, not timed
            driver.get(server.url)
            driver.execute_script("return document.title")
        with dashboard_process(root, port, "auto") as url:  # the browser caches this address's scripts
            driver.get(url)
            _click_text(driver, "Profiler")
        for _ in range(repeats):
            with dashboard_process(root, port, "auto") as url:
                got = rank_view(driver, url, ranks)
                rss.append(_rss_mib(port) or float("nan"))
            timings["rank_view"].append(got["first_render_s"])
            timings["one_rank"].append(got["one_rank_s"])
            with dashboard_process(root, port, "auto") as url:
                got = timeline_view(driver, url, ranks, lo, hi, steps)
            timings["timeline_tab"].append(got["tab_s"])
            timings["timeline_range"].append(got["range_s"])
            timings["timeline_flow"].append(got["flow_s"])
            loads.append(os.getloadavg())
    server = [server_side(root, ranks, lo, hi) for _ in range(max(1, min(repeats, 3)))]
    loads.append(os.getloadavg())
    sp = {k: spread(v) for k, v in timings.items()}
    srv = {k: statistics.median(s[k] for s in server) for k in server[0] if k.endswith(("_s", "_bytes"))}

    def note(s: dict[str, float]) -> str:
        return f"min {s['min']:.2f}, max {s['max']:.2f}, n={s['n']}"

    load_note = (f"load average {min(x[0] for x in loads):.1f}-{max(x[0] for x in loads):.1f} over the runs "
                 f"(2 cores)")
    size = f"{ranks} ranks x {steps} steps"
    rows = [
        row(f"rank view first render, cold server ({size})", round(sp["rank_view"]["median"], 2), "s",
            f"< {TARGET_S:g} s", sp["rank_view"]["median"] < TARGET_S,
            f"{note(sp['rank_view'])}; {load_note}; page request -> Profiler tab -> per-rank phase time of every "
            f"rank drawn; server side alone: open the run {srv['open_run_s']:.2f} s, the tab's figures "
            f"{srv['profiler_tab_s']:.2f} s, {srv['profiler_tab_json_bytes'] / 1e3:.0f} kB of JSON; server RSS "
            f"{statistics.median(rss):.0f} MiB"),
        row(f"one rank picked in the rank selector ({size})", round(sp["one_rank"]["median"], 2), "s", "", None,
            f"{note(sp['one_rank'])}; from the pick to rank {SLOW_RANK}'s own charts drawn; server side "
            f"{srv['one_rank_s']:.2f} s"),
        row(f"Timeline tab opened, cold server ({ranks} ranks, its default last 10 steps)", round(
            sp["timeline_tab"]["median"], 2), "s", f"< {TARGET_S:g} s", sp["timeline_tab"]["median"] < TARGET_S,
            f"{note(sp['timeline_tab'])}; page request -> Timeline tab clicked -> Gantt of every rank drawn"),
        row(f"timeline of {hi - lo + 1} steps x {ranks} ranks, first render", round(sp["timeline_range"]["median"], 2),
            "s", f"< {TARGET_S:g} s", sp["timeline_range"]["median"] < TARGET_S,
            f"{note(sp['timeline_range'])}; {load_note}; steps {lo}:{hi} entered (Enter) on the tab just opened on a "
            f"fresh server -> Gantt drawn (the whole flow from the page request: "
            f"{sp['timeline_flow']['median']:.2f} s); server side from a new cache, files not searched ahead: "
            f"{srv['timeline_outputs_s']:.2f} s "
            f"(an unchanged range {srv['timeline_unchanged_s']:.2f} s), {srv['timeline_json_bytes'] / 1e6:.2f} MB of "
            f"JSON ({', '.join(server[0]['timeline_trace_types'])})"),
    ]
    details = {"ranks": ranks, "steps": steps, "timeline_steps": [lo, hi], "timings_s": timings,
               "spread": sp, "server_side": server, "server_rss_mib": rss, "load_averages": loads,
               "note": "2-core VM shared with other jobs; a fresh dashboard process per measurement"}
    return rows, details


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 ranks x 300 steps, 2 repeats, no result file")
    parser.add_argument("--ranks", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--keep", help="runs folder to write the synthetic run into (as big/) and keep; a run of "
                                       "the same shape already there is reused (default: a temporary folder)")
    parser.add_argument("--out", help="result file (default: benchmarks/results/dashboard_ranks.json; --quick: none)")
    args = parser.parse_args(argv)
    ranks = args.ranks or 256
    steps = args.steps or (300 if args.quick else 10_000)
    repeats = args.repeats or (2 if args.quick else 3)

    def run(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        write_s = _ensure_run(root, ranks, steps)
        if hasattr(os, "sync"):
            os.sync()  # the kernel's write-back of the run just written would otherwise share the first timings
        rows, details = measure(root, ranks, steps, repeats)
        details["write_s"] = write_s  # None: a run of this shape was already in --keep's folder (reused)
        details["run_bytes"] = sum(p.stat().st_size for p in (root / RUN).iterdir() if p.is_file())
        return rows, details

    if args.keep:
        rows, details = run(Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_dashboard_ranks_") as tmp:
            rows, details = run(Path(tmp))
    for r in rows:
        print(f"{r['metric']}: {r['value']} {r['unit']} ({r['notes']})")
    if args.out or not args.quick:
        write_result("dashboard_ranks", rows, details, Path(args.out) if args.out else RESULTS / "dashboard_ranks.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
