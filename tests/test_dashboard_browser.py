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
from test_dashboard_data import metrics, write_run

from dashboard.app import create_app
from dashboard.figures import FIGURE_IDS
from devtools.headless import ServerThread, browser_paths, chromium, trace_points, wait_for
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter

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
    _nan_run(root / "nan")
    write_run(root / "klboom", 120, kl_jump_at=90).write_memory(MEMORY_REPORT)
    writers = {"live": write_run(root / "live", 10, status=None),
               "live2k": write_run(root / "live2k", 5, status=None)}
    write_run(root / "broken", 6)
    _dpo_run(root / "dpo")
    _ddp_run(root / "ddp")
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


def _nan_run(path: Path, steps: int = 30) -> None:
    """KL logged as NaN at step 10 and not logged at all at step 20."""
    w = RunWriter(path, source="generic", tensorboard=False)
    for s in range(steps):
        m = metrics(s)
        if s == 10:
            m["kl/ref_k3"] = float("nan")
        if s == 20:
            del m["kl/ref_k3"]
        w.log(s, m)
    w.close()


def _dpo_run(path: Path, steps: int = 40) -> None:
    """A finished DPO-like run: TRL's implicit rewards, loss and learning rate, none of the PPO keys."""
    w = RunWriter(path, source="trl", tensorboard=False, config={"trainer": "DPOTrainer"})
    for s in range(steps):
        w.log(s, {"reward/chosen": 0.02 * s, "reward/rejected": -0.01 * s, "reward/margin": 0.03 * s,
                  "reward/accuracy": min(1.0, 0.5 + 0.02 * s), "loss/total": 0.69 - 0.005 * s, "lr": 5e-7,
                  "grad/norm": 1.0})
    w.close()


def _ddp_run(path: Path, steps: int = 20) -> None:
    """Two ranks writing rank files only (no reduced metrics.jsonl) and one system.jsonl between them."""
    writers = [RunWriter(path, source="generic", tensorboard=False, rank=r, world_size=2) for r in (0, 1)]
    for s in range(steps):
        for r, w in enumerate(writers):
            w.log(s, {"kl/ref_k3": 0.01 * (r + 1), **{f"grad/layer/{b}": 0.1 for b in ("wte", "h.2", "h.10")}})
            w.system({"time": 1000.0 + s + 0.1 * r, "cpu/process_percent": 10.0 + 80.0 * r})
    for w in writers:
        w.close()


def _click_at(page, xpath: str) -> None:
    """A real pointer click where an element is (a slider mark: the slider under it takes the click)."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page.driver).move_to_element(page.driver.find_element("xpath", xpath)).click().perform()


def _js(page, script: str):
    return page.driver.execute_script(script)


def _fig(fig_id: str) -> str:
    return f"document.querySelector('#{fig_id} .js-plotly-plot')"


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
    page.driver.find_element("xpath", "//*[text()='Samples']").click()  # the runner's completions
    last = max(r["step"] for r in Run(page.root / page.main).samples())
    page.wait_text("samples-summary", f"step {last}")
    page.wait_text("samples-table-left", "completion")
    assert page.screenshot("dashboard_samples.png").stat().st_size > 20_000


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


def test_live_follow_of_2000_steps_written_at_100_per_second_draws_every_point_once(page):
    """A run written at 100 steps/s for 2,000 steps while the page follows it (and its alert and list polls
    refresh the same run): every trace ends with each step exactly once, in order."""
    import threading
    import time

    page.open("?run=live2k")
    page.wait_points("fig-kl", lambda p: p[0] == 5)
    writer = page.writers["live2k"]

    def write() -> None:
        t0 = time.monotonic()
        for s in range(5, 2000):
            writer.log(s, metrics(s))
            delay = t0 + (s - 4) / 100.0 - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=120)
    page.wait_points("fig-kl", lambda p: p[0] >= 2000, timeout=60)
    for fig in ("fig-kl", "fig-reward", "fig-grad"):
        xs = _js(page, f"return {_fig(fig)}.data.map(t => t.x)")
        for x in xs:
            assert x == list(range(2000)), (fig, len(x), len(set(x)))
    heat = _js(page, f"return {_fig('fig-grad_layers')}.data[0]")
    assert heat["x"] == list(range(2000)) and all(len(row) == 2000 for row in heat["z"])
    assert page.errors().strip() == ""


def test_key_browser_charts_any_key_with_smoothing_and_log_toggles(page):
    page.open("?run=klboom")
    page.wait_points("fig-kl", lambda p: p[0] == 120)
    box = page.driver.find_element("css selector", "#key-filter")
    box.send_keys("^time/\n")
    page.wait_text("key-browser", "time/rollout")
    assert "kl/ref_k3" not in page.text("key-browser")  # filtered out by the regex
    label = [e for e in page.driver.find_elements("css selector", "#key-browser label")
             if e.text.strip() == "time/rollout"][0]
    label.click()
    pinned = "document.querySelector('.pinned-card .js-plotly-plot')"
    points = wait_for(lambda: _js(page, f"const e = {pinned}; return e && e.data[0] ? e.data[0].x.length : 0"), 30)
    assert points == 120
    assert _js(page, f"return {pinned}.layout.title.text") == "time/rollout"
    # smoothing: every line gets a faint raw trace and its EMA
    _click_at(page, "//*[@id='smoothing']//*[text()='0.9']")
    wait_for(lambda: _js(page, f"return {_fig('fig-kl')}.data.length") == 4, 30)
    traces = _js(page, f"return {_fig('fig-kl')}.data.map(t => [t.opacity || 1, t.x.length])")
    assert sorted(t[0] for t in traces) == [0.25, 0.25, 1, 1] and all(n == 120 for _, n in traces)
    assert _js(page, f"return {_fig('fig-kl')}.layout.xaxis.title.text") == "step"
    # log toggle of one chart only
    page.driver.find_element("css selector", "#card-kl input[type=checkbox]").click()
    wait_for(lambda: _js(page, f"return {_fig('fig-kl')}.layout.yaxis.type") == "log", 30)
    assert _js(page, f"return {_fig('fig-entropy')}.layout.yaxis.type") != "log"
    page.driver.find_element("css selector", "#card-grad input[type=checkbox]").click()  # grad: log -> linear
    wait_for(lambda: _js(page, f"return {_fig('fig-grad')}.layout.yaxis.type") == "linear", 30)
    from selenium.webdriver.common.keys import Keys

    page.driver.find_element("css selector", "#smoothing [role=slider]").send_keys(Keys.HOME)  # back to off
    wait_for(lambda: _js(page, f"return {_fig('fig-kl')}.data.length") == 2, 30)
    assert page.errors().strip() == ""


def test_a_dpo_run_gets_its_own_panels_and_says_what_it_does_not_log(page):
    page.open("?run=dpo")
    pref = page.wait_points("fig-preference", lambda p: p and p[0] == 40)
    assert pref == [40, 40, 40, 40]
    assert page.wait_points("fig-loss", lambda p: p and p[0] == 40)[0] == 40
    assert _js(page, "return getComputedStyle(document.getElementById('card-preference')).display") != "none"
    page.wait_text("fig-kl", "not logged by this run")
    assert "no data yet" not in page.text("fig-entropy").replace("so no data yet means none", "")
    page.open("?run=klboom")  # a PPO run: no preference panel
    page.wait_points("fig-kl", lambda p: p[0] == 120)
    wait_for(lambda: _js(page, "return getComputedStyle(document.getElementById('card-preference')).display")
             == "none", 30)


def test_ddp_system_chart_has_one_line_per_rank_and_follows_the_rank_selector(page):
    page.open("?run=ddp")
    page.wait_points("fig-kl", lambda p: p[0] == 20)
    order = _js(page, f"return {_fig('fig-grad_layers')}.data[0].y")
    assert order == ["wte", "h.2", "h.10"]  # model order in the rank-mean view, not alphabetical
    page.driver.find_element("xpath", "//*[text()='Profiler']").click()
    page.wait_points("fig-system", lambda p: len(p) == 2)
    names = _js(page, f"return {_fig('fig-system')}.data.map(t => t.name)")
    assert names == ["cpu/process_percent [rank 0]", "cpu/process_percent [rank 1]"]
    ys = _js(page, f"return {_fig('fig-system')}.data.map(t => Array.from(new Set(t.y)))")
    assert ys == [[10.0], [90.0]]  # no sawtooth
    page.driver.find_element("css selector", "#rank").click()
    wait_for(lambda: [e for e in page.driver.find_elements("xpath", "//*[normalize-space(text())='rank 1']")
                      if e.is_displayed()], 10)[0].click()
    wait_for(lambda: _js(page, f"return {_fig('fig-system')}.data.map(t => t.name).join()") == "cpu/process_percent",
             30)
    assert "rank 1" in _js(page, f"return {_fig('fig-system')}.layout.title.text")
    page.driver.find_element("xpath", "//*[text()='Stability']").click()
    assert _js(page, f"return {_fig('fig-grad_layers')}.data[0].y") == ["wte", "h.2", "h.10"]


def test_alert_zoom_rescales_y_and_keeps_the_other_runs_heatmap(page):
    page.open("?run=smoke&run=klboom" if page.main == "smoke" else f"?run={page.main}&run=klboom")
    page.wait_points("fig-kl", lambda p: len(p) == 4 and p[2] == 120)
    page.wait_text("alerts-panel", "kl_explosion")
    before = _js(page, f"return {_fig('fig-grad_layers')}.layout.xaxis.range")
    button = [b for b in page.driver.find_elements("css selector", ".alert-item") if "kl_explosion" in b.text][0]
    assert "klboom" in button.text  # overlaid runs: each alert names its run
    button.click()
    y = wait_for(lambda: _js(page, f"const l = {_fig('fig-kl')}.layout.yaxis; "
                                   "return l.autorange === false ? l.range : null;"), 30)
    assert y[1] > 0.3  # the window holds the KL explosion (~0.5): y rescaled to it
    assert _js(page, f"return {_fig('fig-grad_layers')}.layout.xaxis.range") == before  # not blanked
    labels = _js(page, f"return {_fig('fig-kl')}.layout.shapes.filter(s => s.line.dash === 'dashdot')"
                       ".map(s => s.label.text)")
    assert any("klboom" in t for t in labels)


def test_charts_have_no_cloud_or_share_button(page):
    page.open("?run=klboom")
    page.wait_points("fig-kl", lambda p: p[0] == 120)
    titles = _js(page, "return Array.from(document.querySelectorAll('.modebar-btn')).map(b => "
                       "b.getAttribute('data-title') || '')")
    assert titles and not [t for t in titles if any(w in t.lower() for w in ("cloud", "studio", "share"))]
    assert not _js(page, "return document.querySelectorAll('.modebar-btn--logo, a[href*=\"plot.ly\"], "
                         "a[href*=\"plotly.com\"]').length")
    page.driver.find_element("xpath", "//*[text()='Memory']").click()
    page.wait_points("fig-memory", lambda p: len(p) == 4)
    axes = _js(page, f"return {_fig('fig-memory')}.data.map(t => t.yaxis || 'y')")
    assert axes[-1] == "y2" and set(axes[:-1]) == {"y"}  # RSS is not on the tensor-byte axis


def test_an_empty_runs_folder_says_so_in_every_panel(tmp_path):
    _require_browser()
    with ServerThread(create_app(tmp_path / "no_runs_yet").server) as server, chromium() as driver:
        driver.get(server.url + "/")
        page = Page(driver, server.url, tmp_path, "", {}, tmp_path)
        page.wait_text("list-messages", "no runs under")
        page.wait_text("fig-kl", "no runs selected")
        for fid in FIGURE_IDS:
            script = f"const e = {_fig('fig-' + fid)}; return e && e.layout.title.text"
            title = wait_for(lambda script=script: _js(page, script))
            assert "loading" not in page.text(f"fig-{fid}") and title != fid and len(title) > 8, (fid, title)
        assert "KL to reference" in page.text("fig-kl")
        alerts = page.text("alerts-panel")
        assert "no alerts" not in alerts and "select a run" in alerts


def test_config_diff_of_two_runs_highlights_what_changed(page):
    page.open("?run=klboom&run=dpo")
    page.wait_points("fig-kl", lambda p: len(p) == 4)
    assert page.driver.current_url.endswith("?run=klboom&run=dpo")  # the URL says what is selected
    page.driver.find_element("xpath", "//*[text()='Config']").click()
    page.wait_text("config-summary", "settings differ between 2 runs")
    rows = _js(page, "return Array.from(document.querySelectorAll('#config-table tr')).map(r => "
                     "[r.innerText.replace(/\\s+/g, ' ').trim(), getComputedStyle(r.querySelector('td') || r)"
                     ".backgroundColor])")
    by_text = {text: colour for text, colour in rows}
    source = [c for t, c in by_text.items() if t.startswith("run source")][0]
    trainer = [c for t, c in by_text.items() if t.startswith("config trainer")][0]
    python = [c for t, c in by_text.items() if t.startswith("env python")][0]
    assert trainer == source != python  # source (generic vs trl) and config.trainer differ: highlighted
    page.driver.find_element("css selector", "#config-only-diff input").click()
    wait_for(lambda: "env python" not in page.text("config-table"), 30)
    assert "config trainer" in page.text("config-table").replace("\t", " ")


LINE_PATHS_JS = ("return Array.from(document.querySelector('#fig-kl .scatterlayer .trace')"
                 ".querySelectorAll('path.js-line')).map(p => p.getAttribute('d'))")


def test_a_nan_value_breaks_the_line_and_a_step_without_the_key_does_not(page):
    page.open("?run=nan")
    page.wait_points("fig-kl", lambda p: p[0] > 0)
    k3 = _js(page, f"return {_fig('fig-kl')}.data[0]")
    assert 20 not in k3["x"] and k3["y"][k3["x"].index(10)] is None  # skipped vs a gap
    assert _js(page, f"return {_fig('fig-kl')}.data[1].x.length") == 30  # k1 was logged at every step
    if _js(page, f"return {_fig('fig-kl')}.data[0].type") == "scatter":  # SVG: the drawn path itself
        paths = _js(page, LINE_PATHS_JS)  # two pieces: the line stops at step 9 and starts again at step 11
        assert len(paths) == 2 and [d.count("L") for d in paths] == [9, 17]  # 10 and 18 points (no step 20)


SECTIONS_JS = ("return Array.from(document.querySelectorAll('#{0} .run-section')).map(s => "
               "[s.querySelector('h4').innerText, Array.from(s.querySelectorAll('.js-plotly-plot')).map(g => "
               "[g.layout.title.text, g.data.length])])")


def test_heatmaps_profiler_and_memory_show_every_selected_run(page):
    page.open("?run=klboom&run=ddp")
    page.wait_points("fig-kl", lambda p: len(p) == 4)
    heat = wait_for(lambda: _js(page, f"const e = {_fig('fig-grad_layers')}; return e && e.data.length == 2 ? "
                                      "[e.data.map(t => [t.name, t.y, t.x.length]), "
                                      "e.layout.annotations.map(a => a.text)] : null"), 30)
    assert heat[0] == [["klboom", ["h.0", "h.1"], 120], ["ddp", ["wte", "h.2", "h.10"], 20]]  # each its own row
    assert heat[1] == ["<b>klboom</b>", "<b>ddp</b>"]  # titled with its run
    page.driver.find_element("xpath", "//*[text()='Profiler']").click()
    page.wait_text("profiler-title", "run: klboom")
    sections = wait_for(lambda: (lambda s: s if s and s[0][1] and s[0][1][2][1] == 2 else None)(
        _js(page, SECTIONS_JS.format("profiler-more"))), 30)
    assert [title for title, _ in sections] == ["run: ddp"]
    titles = [t for t, _ in sections[0][1]]
    assert len(titles) == 4 and "ddp" in titles[0]  # phases, per-rank phases, system (2 ranks), flame graph
    page.driver.find_element("xpath", "//*[text()='Memory']").click()
    page.wait_text("memory-title", "run: klboom")
    assert page.wait_points("fig-memory", lambda p: len(p) == 4) == [2, 2, 2, 2]
    sections = wait_for(lambda: _js(page, SECTIONS_JS.format("memory-more")), 30)
    assert [title for title, _ in sections] == ["run: ddp"] and "ddp" in sections[0][1][0][0]
    assert "no data yet" in page.text("memory-more")  # ddp has no memory.json
    page.open("?run=klboom")  # one run again: no other sections
    page.wait_points("fig-kl", lambda p: len(p) == 2)
    page.driver.find_element("xpath", "//*[text()='Memory']").click()
    page.wait_text("memory-title", "run: klboom")
    wait_for(lambda: not _js(page, SECTIONS_JS.format("memory-more")), 30)
    assert page.errors().strip() == ""
