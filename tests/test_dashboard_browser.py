"""The dashboard in real headless Chromium: charts with data, switching runs, a planted KL explosion's alert
(and zooming to it), live points while a run is written, bad input as messages, the profiler and memory tabs.

Skipped only where no browser exists and ``RLHFKIT_REQUIRE_BROWSER`` is unset (CI sets it: then a missing
browser fails). Screenshots go to the test's temporary folder; ``RLHFKIT_SCREENSHOT_RUN=<run dir>`` uses that
run instead of the smoke run and writes the README's ``docs/img/dashboard*.png``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dashboard.app import create_app
from dashboard.figures import FIGURE_IDS
from dashboard.headless import ServerThread, browser_paths, chromium, trace_points, wait_for
from rlhf_core.run_writer import RunWriter
from test_dashboard_data import metrics, write_run

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
README_IMAGES = ROOT / "docs" / "img"
LINE_IDS = [f"fig-{f}" for f in FIGURE_IDS]
MEMORY_REPORT = {
    "format_version": 1, "device": "cpu",
    "prediction": {"phases": {"rollout": {"weights": 2**24, "kv_cache": 2**22, "total": 2**24 + 2**22},
                              "update": {"weights": 2**24, "activations": 2**25, "total": 2**24 + 2**25}},
                   "peak_phase": "update", "peak_bytes": 2**24 + 2**25},
    "measured": {"phases": {"rollout": 2**24, "update": 2**25 + 2**24 + 2**20}, "peak_bytes": 2**25, "method": "rss"},
}


def _require_browser() -> None:
    chrome, driver = browser_paths()
    if chrome and driver:
        return
    message = "headless Chromium/chromedriver not found (apt-get install chromium chromium-driver)"
    if os.environ.get("RLHFKIT_REQUIRE_BROWSER"):
        pytest.fail(message + " and RLHFKIT_REQUIRE_BROWSER is set")
    pytest.skip(message)


class Page:
    """The app on a runs root with one headless browser; helpers that wait on what the page shows."""

    def __init__(self, driver, url: str, root: Path, main: str, writers: dict[str, RunWriter], shots: Path):
        self.driver, self.url, self.root, self.main, self.writers = driver, url, root, main, writers
        self.shots = shots

    def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / name
        self.driver.save_screenshot(str(path))
        return path

    def open(self, query: str = "") -> None:
        self.driver.get(self.url + "/" + query)

    def points(self, ids=LINE_IDS) -> dict:
        return trace_points(self.driver, list(ids))

    def wait_points(self, fig: str, predicate, timeout: float = 60) -> list[int]:
        return wait_for(lambda: (lambda p: p if p and predicate(p) else None)(self.points([fig])[fig]), timeout)

    def text(self, element_id: str) -> str:
        return self.driver.execute_script(f"const e = document.getElementById('{element_id}'); "
                                          "return e ? e.innerText : '';")

    def wait_text(self, element_id: str, needle: str, timeout: float = 60) -> str:
        return wait_for(lambda: (lambda t: t if needle in t else None)(self.text(element_id)), timeout)

    def errors(self) -> str:
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('.cb-error')).map(e => e.innerText).join(' ');")


@pytest.fixture(scope="module")
def page(tmp_path_factory, request):
    _require_browser()
    root = tmp_path_factory.mktemp("dash_runs")
    shot_src = os.environ.get("RLHFKIT_SCREENSHOT_RUN")
    smoke = Path(shot_src) if shot_src else request.getfixturevalue("smoke_run_dir")
    main = smoke.name if shot_src else "smoke"
    shutil.copytree(smoke, root / main, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    write_run(root / "klboom", 120, kl_jump_at=90).write_memory(MEMORY_REPORT)
    writers = {"live": write_run(root / "live", 10, status=None)}
    write_run(root / "broken", 6)
    (root / "klboom" / "traces").mkdir(exist_ok=True)
    (root / "klboom" / "traces" / "rank0_steps000001-000002.folded").write_text(
        "step;rollout;aten::mm 30\nstep;update;aten::mm 50\nstep;update;aten::add 20\n")
    with open(root / "broken" / "metrics.jsonl", "a") as fh:
        fh.write("{garbage line\n")
    with ServerThread(create_app(root).server) as server, chromium() as driver:
        shots = README_IMAGES if shot_src else root.parent / "screenshots"
        yield Page(driver, server.url, root, main, writers, shots)
    for w in writers.values():
        w.close()


def test_smoke_run_charts_have_data_and_screenshot(page):
    page.open(f"?run={page.main}")
    steps = page.wait_points("fig-kl", lambda p: p[0] > 0)[0]
    drawn = page.points()
    for fig in ("fig-kl", "fig-reward", "fig-entropy", "fig-ppo", "fig-grad", "fig-drift", "fig-length"):
        assert drawn[fig] and drawn[fig][-1] == steps, (fig, drawn[fig])
    assert drawn["fig-grad_layers"][0] == steps  # per-layer heatmap: one column per step
    renderer, trace = page.driver.execute_script(
        "const gl = document.createElement('canvas').getContext('webgl'); "
        "const i = gl && gl.getExtension('WEBGL_debug_renderer_info'); "
        "return [gl ? String(gl.getParameter(i ? i.UNMASKED_RENDERER_WEBGL : gl.RENDERER)) : 'none', "
        "document.querySelector('#fig-kl .js-plotly-plot').data[0].type];")
    software = any(word in renderer.lower() for word in ("swiftshader", "llvmpipe", "software")) or renderer == "none"
    assert trace == ("scatter" if software else "scattergl"), (renderer, trace)  # --render auto
    wait_for(lambda: page.text("alerts-panel") not in ("", "select a run"), 60)
    assert page.errors().strip() == ""
    assert page.main in page.text("run-table")
    assert page.screenshot("dashboard.png").stat().st_size > 20_000


def test_switch_runs_then_alert_of_planted_kl_explosion_zooms(page):
    page.open(f"?run={page.main}")
    page.wait_points("fig-kl", lambda p: p[0] > 0)
    rows = page.driver.find_elements("css selector", "#run-table tr")
    boxes = {r.text.split()[0]: r.find_element("css selector", "input") for r in rows[1:] if r.text}
    boxes[page.main].click()  # deselect the smoke run, select the one with the planted explosion
    boxes["klboom"].click()
    names = wait_for(lambda: (lambda n: n if n and all(x.startswith("klboom") for x in n) else None)(
        page.driver.execute_script("return document.querySelector('#fig-kl .js-plotly-plot').data.map(t => t.name)")),
        60)
    assert names == ["klboom k3", "klboom k1"]
    assert page.points(["fig-kl"])["fig-kl"] == [120, 120]
    page.wait_text("alerts-panel", "kl_explosion")
    button = [b for b in page.driver.find_elements("css selector", ".alert-item") if "kl_explosion" in b.text][0]
    assert "step 90" in button.text
    button.click()
    lo, hi = wait_for(lambda: page.driver.execute_script(
        "const l = document.querySelector('#fig-kl .js-plotly-plot').layout.xaxis; "
        "return l.autorange === false ? l.range : null;"), 30)
    assert lo < 90 < hi and hi - lo < 120


def test_live_run_shows_new_points_without_reload(page):
    page.open("?run=live")
    assert page.wait_points("fig-kl", lambda p: p[0] == 10) == [10, 10]
    page.driver.execute_script("window.__marker = 'same page';")
    writer = page.writers["live"]
    for s in range(10, 15):
        writer.log(s, metrics(s))
    assert page.wait_points("fig-kl", lambda p: p[0] >= 15, timeout=30) == [15, 15]  # each point exactly once
    assert page.driver.execute_script("return window.__marker") == "same page"
    assert page.points(["fig-grad_layers"])["fig-grad_layers"] == [15]
    page.wait_text("live-status", "live:")


def test_bad_input_shows_messages_and_the_page_stays_alive(page):
    page.open("?run=broken&run=../outside")
    page.wait_text("run-messages", "malformed JSON")
    page.wait_text("list-messages", "refused run id '../outside'")
    assert page.wait_points("fig-kl", lambda p: p[0] == 6) == [6, 6]
    assert page.errors().strip() == ""


def test_profiler_and_memory_tabs(page):
    page.open(f"?run={page.main}")
    page.wait_points("fig-kl", lambda p: p[0] > 0)
    page.driver.find_element("xpath", "//*[text()='Profiler']").click()
    phases = page.wait_points("fig-phases", lambda p: len(p) >= 2)
    assert all(n > 0 for n in phases)
    page.wait_points("fig-system", lambda p: p[0] > 0)
    page.wait_text("trace-links", "race")  # a link to the newest trace, or its "no data yet" line
    flame = page.text("fig-flame")
    assert "Flame graph" in flame or "flame" in flame.lower()
    page.screenshot("dashboard_profiler.png")
    page.driver.find_element("xpath", "//*[text()='Memory']").click()
    if not (page.root / page.main / "memory.json").exists():
        page.wait_text("fig-memory", "no data yet")
    page.open("?run=klboom")
    page.wait_points("fig-kl", lambda p: p[0] > 0)
    page.driver.find_element("xpath", "//*[text()='Memory']").click()
    assert page.wait_points("fig-memory", lambda p: len(p) == 4) == [2, 2, 2, 2]  # 3 components + measured
    page.wait_text("fig-memory", "predicted peak: update")


TRACE_TYPES_JS = "return Object.keys(Plotly.PlotSchema.get().traces)"
SCRIPTS_JS = "return performance.getEntriesByType('resource').map(e => e.name)"


def test_the_page_runs_the_dashboards_own_plotly_bundle_with_every_trace_type_it_draws(page):
    """The page loads dashboard/assets' partial plotly.js (1.7 MB instead of 4.8 MB), never the full bundle,
    and that bundle has every trace type the dashboard's figures use: line panels (scatter, and scattergl
    where WebGL runs on a GPU), heatmaps, the memory bars, the system charts (scattergl) and the flame graph
    (icicle), which is drawn here from a folded-stacks file."""
    page.open("?run=klboom")
    page.wait_points("fig-kl", lambda p: p[0] > 0)
    assert {"scatter", "scattergl", "heatmap", "bar", "icicle"} <= set(page.driver.execute_script(TRACE_TYPES_JS))
    scripts = page.driver.execute_script(SCRIPTS_JS)
    assert any("/assets/plotly-rlhfkit.min.js" in u for u in scripts)
    assert not any("package_data/plotly" in u for u in scripts)
    page.driver.find_element("xpath", "//*[text()='Profiler']").click()
    flame = page.wait_points("fig-flame", lambda p: p and p[0] > 0)
    assert page.driver.execute_script(
        "return document.querySelector('#fig-flame .js-plotly-plot').data[0].type") == "icicle"
    assert flame[0] >= 4  # root, step, rollout/update and the ops under them
