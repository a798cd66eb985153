"""Dashboard first render of a 100k-step × 50-key run in headless Chromium, against TensorBoard's load.

Both read the same scalars: the run is written as ``metrics.jsonl`` (through ``RunWriter``) and the same
generator writes a TensorBoard event file; TensorBoard's side is ``EventAccumulator.Reload()`` keeping every
scalar. Without TensorFlow installed its record reader and writer are pure Python (CRC32C per record), ~1 ms
per 50-key step here, so TensorBoard gets the first 20k steps only and the comparison is given both raw and
per step.

Three states of the page, each in the same headless Chromium:

- cold server: ``python -m dashboard.app`` (``rlhfkit dashboard``) started afresh in its own process, on the
  address the browser used before, as when the dashboard is restarted: nothing cached on the server, the
  page's scripts in the browser's cache. The clock starts at the page request, sent as soon as the server
  accepts connections. The server starts reading the newest run (the one a page without a selection shows,
  here the only one) on a background thread as it starts up, before it imports Dash; the part of that read
  done before it accepts connections is not in this number, so the same renders are also timed from the
  process's start (a row of their own, with the start-up alone in its notes).
- first visit: the same on an address the browser has never seen, so it downloads and compiles every script
  too (their size is measured in the page). Also measured with the run already read on the server
  (in-process), which isolates the browser's share.
- warm: the page reopened with the run cached and the detectors done.

Before any of these the browser opens one page of an empty dashboard on another address, as a browser in
use has: the first page a new Chromium process loads pays ~0.3-0.5 s of its own start-up here.
"""
from __future__ import annotations

import gc
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboard.figures import FIGURE_IDS, HEATMAPS, PANELS  # noqa: E402

STEPS = 100_000
BLOCKS = 8  # grad/layer and drift/layer blocks: 34 run-level keys + 2 × 8 per-layer keys = 50 keys

RUN_KEYS = (
    "loss/total", "loss/policy", "loss/value", "loss/entropy", "reward/mean", "reward/std", "reward/min",
    "reward/max", "kl/ref_k1", "kl/ref_k3", "kl/coef", "policy/entropy", "policy/approx_kl", "policy/clipfrac",
    "policy/ratio_mean", "policy/ratio_min", "policy/ratio_max", "value/explained_var", "value/clipfrac",
    "adv/mean", "adv/std", "grad/norm", "drift/rel", "response/length_mean", "response/eos_rate", "time/step",
    "time/rollout", "time/reward", "time/ref_logprobs", "time/update", "lr", "throughput/tokens_per_s",
    "mem/peak_bytes", "grad/max_norm",
)


def metrics_at(step: int, rnd: random.Random) -> dict[str, float]:
    """Plausible values for every key at ``step``, with a KL spike planted at 70% of the run."""
    t = step / STEPS
    out = {k: rnd.random() for k in RUN_KEYS}
    out.update({
        "kl/ref_k3": 0.02 + 0.05 * t + 0.005 * rnd.random(), "kl/ref_k1": 0.02 + 0.045 * t,
        "reward/mean": math.log1p(10 * t) + rnd.gauss(0, 0.05), "reward/std": 0.3 + 0.05 * rnd.random(),
        "policy/entropy": 2.5 - 1.5 * t + rnd.gauss(0, 0.02), "grad/norm": 0.4 + 0.3 * rnd.random(),
        "grad/max_norm": 1.0, "drift/rel": 0.05 * t,
    })
    if step == int(0.7 * STEPS):
        out["kl/ref_k3"] *= 50
    for b in range(BLOCKS):
        out[f"grad/layer/h.{b}"] = rnd.random() * (b + 1) * 0.1
        out[f"drift/layer/h.{b}"] = 0.01 * t * (b + 1)
    return out


def write_big_run(run_dir: str | Path, steps: int = STEPS) -> None:
    from rlhf_core.runformat.run_writer import RunWriter

    rnd = random.Random(0)
    with RunWriter(run_dir, source="generic", tensorboard=False, overwrite=True,
                   config={"max_grad_norm": 1.0}) as writer:
        for step in range(steps):
            writer.log(step, metrics_at(step, rnd))


TB_STEPS = 20_000  # ~1 ms per step to write and to load here (pure-Python CRC): 100k would not fit the budget


def write_tb_events(log_dir: str | Path, steps: int) -> None:
    """The same scalars as a TensorBoard event file (one event per step holding every key)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    rnd = random.Random(0)
    writer = EventFileWriter(str(log_dir))
    for step in range(steps):
        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics_at(step, rnd).items()]
        writer.add_event(Event(step=step, wall_time=float(step), summary=Summary(value=values)))
    writer.close()


def tensorboard_load_s(log_dir: str | Path) -> tuple[float, int]:
    """Seconds for ``EventAccumulator.Reload()`` keeping every scalar, and the points it loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t0 = time.perf_counter()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])


def _all_drawn(points: dict[str, Any]) -> bool:
    return all(v and all(n > 0 for n in v) for v in points.values())


# The charts the page shows: panels of other kinds of run (preference rewards) stay hidden for this run.
SHOWN_JS = "return arguments[0].filter(id => { const e = document.getElementById(id); return e && e.offsetParent; })"
KEYS_JS = "const e = document.getElementById('key-browser'); return e ? e.innerText : ''"


def render_s(driver: Any, url: str) -> float:
    """Seconds from the page request to every stability chart it shows drawn with data (and the key browser
    listing the run's keys)."""
    from devtools.headless import trace_points, wait_for

    ids = [f"fig-{f}" for f in FIGURE_IDS]
    t0 = time.perf_counter()
    driver.get(url)
    always = len([p for p in PANELS if not p.optional]) + len(HEATMAPS)

    def drawn() -> bool:
        shown = driver.execute_script(SHOWN_JS, ids)  # empty until the page's layout is in
        return len(shown) >= always and _all_drawn(trace_points(driver, shown)) and "kl (" in driver.execute_script(
            KEYS_JS)

    wait_for(drawn, timeout=180, interval=0.02)
    return time.perf_counter() - t0


def wait_detectors(app: Any, run_key: str, timeout: float = 300) -> None:
    """Let the background detectors finish (starting them if needed) so the next measurement does not share
    the CPU with them."""
    data = app.server.config["RLHFKIT_CACHE"].peek(run_key)
    if data is not None:
        data.alerts(start=True)
    deadline = time.monotonic() + timeout
    while data is not None and time.monotonic() < deadline:
        if not data.alerts(start=False)[1] and not (data._detector and data._detector.is_alive()):
            return
        time.sleep(0.2)


@contextmanager
def dashboard_process(root: Path, port: int, render: str) -> Iterator[str]:
    """``python -m dashboard.app`` serving ``root`` on ``port``; yields its URL once it accepts connections."""
    import socket
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "dashboard.app", "--runs", str(root), "--port", str(port),
                             "--render", render], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dashboard process exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dashboard process not serving on port {port} after 120 s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


FIRST_VISITS = 3
COLD_RESTARTS = 5
SCRIPT_BYTES_JS = ("return performance.getEntriesByType('resource').filter(e => /\\.js(\\?|$)/.test(e.name))"
                   ".reduce((n, e) => n + e.decodedBodySize, 0)")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    from benchmarks.common import row, spread, write_result
    from dashboard.app import create_app
    from devtools.headless import ServerThread, chromium
    from rlhf_core.runformat.run_reader import Run

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_dashboard_") as tmp:
        root = Path(tmp) / "runs"
        t0 = time.perf_counter()
        write_big_run(root / "big")
        write_s = time.perf_counter() - t0
        write_tb_events(Path(tmp) / "tb", TB_STEPS)
        size_mb = (root / "big" / "metrics.jsonl").stat().st_size / 1e6
        if hasattr(os, "sync"):
            os.sync()  # the kernel's write-back of ~200 MB just written would otherwise share the first timings

        t0 = time.perf_counter()
        n_records = len(Run(root / "big").metrics())
        parse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_rows = Run(root / "big").metric_columns().rows
        columns_s = time.perf_counter() - t0
        assert n_rows == n_records

        timings: dict[str, dict[str, list[float]]] = {}
        port = free_port()
        (Path(tmp) / "empty").mkdir()
        with chromium() as driver:
            with ServerThread(create_app(Path(tmp) / "empty").server) as server:  # the browser's own start-up
                driver.get(server.url)
                driver.execute_script("return document.title")
            renderer = None
            script_bytes = 0
            startup: dict[str, list[float]] = {"listening": [], "from_start": []}

            def cold(render: str, server_port: int, record: bool = False) -> float:
                """``rlhfkit dashboard`` started afresh in its own process on ``server_port`` (the clock starts at
                the page request; with ``record`` the start-up and the render timed from the spawn are kept)."""
                nonlocal renderer, script_bytes
                spawned = time.perf_counter()
                with dashboard_process(root, server_port, render) as url:
                    listening = time.perf_counter() - spawned
                    took = render_s(driver, f"{url}/?run=big")
                    if record:
                        startup["listening"].append(listening)
                        startup["from_start"].append(listening + took)
                    renderer = renderer or driver.execute_script(
                        "return document.querySelector('#fig-kl .js-plotly-plot').data[0].type")
                    script_bytes = max(script_bytes, driver.execute_script(SCRIPT_BYTES_JS))
                return took

            def preread_first_visit() -> float:
                """A never-seen address whose server has already read the run: the browser's share."""
                app = create_app(root)
                app.server.config["RLHFKIT_CACHE"].get("big")
                wait_detectors(app, "big")
                with ServerThread(app.server) as server:
                    took = render_s(driver, f"{server.url}/?run=big")
                del app
                gc.collect()
                return took

            for render, colds, warms in (("auto", FIRST_VISITS, 3), ("webgl", 1, 2)):
                got = timings[render] = {"first_visit": [], "cold": [], "warm": [], "first_visit_preread": []}
                for _ in range(colds):  # a port never used before: the browser has nothing cached for it
                    got["first_visit"].append(cold(render, free_port()))
                if render == "auto":
                    got["first_visit_preread"] = [preread_first_visit() for _ in range(FIRST_VISITS)]
                cold(render, port)  # the browser now has this address's scripts, as after any earlier visit
                for _ in range(COLD_RESTARTS if render == "auto" else 1):
                    got["cold"].append(cold(render, port, record=render == "auto"))
                app = create_app(root, render=render)
                app.server.config["RLHFKIT_CACHE"].get("big")
                wait_detectors(app, "big")
                with ServerThread(app.server, port=port) as server:
                    got["warm"] += [render_s(driver, f"{server.url}/?run=big") for _ in range(warms)]
        tb = [tensorboard_load_s(Path(tmp) / "tb") for _ in range(2)]
        tb_s = [t for t, _ in tb]

    auto_cold, auto_warm = spread(timings["auto"]["cold"]), spread(timings["auto"]["warm"])
    first, first_pre = spread(timings["auto"]["first_visit"]), spread(timings["auto"]["first_visit_preread"])
    gl_cold, gl_warm = spread(timings["webgl"]["cold"]), spread(timings["webgl"]["warm"])
    tb_sp = spread(tb_s)
    listen, from_start = spread(startup["listening"]), spread(startup["from_start"])
    cold_s = auto_cold
    tb_per_step = tb_sp["median"] / TB_STEPS
    tb_100k_lower_bound = tb_per_step * STEPS
    def note(sp: dict[str, float]) -> str:
        return f"min {sp['min']:.2f}, max {sp['max']:.2f}, n={sp['n']}"

    rows = [
        row("first render, cold server (100k steps x 50 keys, default --render auto)", round(auto_cold["median"], 2),
            "s", "< 2 s", auto_cold["median"] < 2, f"{note(auto_cold)}; load average {load_start[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (2 cores); a fresh server process on the address the "
            f"browser used before (its scripts cached); drew '{renderer}' traces (headless Chromium has software WebGL "
            f"only); the server starts reading the run as it starts up, {listen['median']:.2f} s (median) before it "
            f"accepts connections, and the page waits for the rest of that read (a columnar parse, "
            f"{columns_s:.2f} s alone; a dict per line, Run.metrics(): {parse_s:.2f} s)"),
        row("first render, cold server, timed from the server process's start", round(from_start["median"], 2), "s",
            "", None, f"{note(from_start)}; the renders of the first row with the server's start-up before them: "
            f"spawn to accepting connections {listen['median']:.2f} s (min {listen['min']:.2f}, max "
            f"{listen['max']:.2f}: Python, imports, the page's layout and callbacks, the run's read begun)"),
        row("first render, first visit (cold server, cold browser cache)", round(first["median"], 2), "s", "< 2 s",
            first["median"] < 2, f"{note(first)}; an address the browser never saw: it also downloads and compiles "
            f"{script_bytes / 1e6:.1f} MB of scripts"),
        row("first visit with the run already read on the server", round(first_pre["median"], 2), "s", "", None,
            f"{note(first_pre)}; the browser's share of a first visit (scripts, Dash, drawing)"),
        row("first render, warm server cache (--render auto)", round(auto_warm["median"], 2), "s", "< 2 s",
            auto_warm["median"] < 2, note(auto_warm)),
        row("first render, cold server (--render webgl, forced Scattergl)", round(gl_cold["median"], 2), "s", "",
            None, f"{note(gl_cold)}; WebGL drawn in software (SwiftShader)"),
        row("first render, warm server cache (--render webgl)", round(gl_warm["median"], 2), "s", "", None,
            note(gl_warm)),
        row(f"TensorBoard EventAccumulator load, {TB_STEPS // 1000}k steps x 50 keys", round(tb_sp["median"], 2), "s",
            "", None, f"min {tb_sp['min']:.2f}, max {tb_sp['max']:.2f}, n={tb_sp['n']}; the 100k file was not "
            f"loaded (would take ~{tb_100k_lower_bound:.0f} s at the measured rate)"),
        row("TensorBoard 20k-step load / dashboard 100k-step cold render", round(tb_sp["median"] / cold_s["median"], 2),
            "x", "> 1 (faster than TensorBoard)", tb_sp["median"] > cold_s["median"],
            "raw ratio of the two measured times, TensorBoard given 1/5 of the data"),
        row("steps per second: dashboard cold render / TensorBoard load", round(
            (STEPS / cold_s["median"]) / (TB_STEPS / tb_sp["median"]), 2), "x", "> 1 (faster than TensorBoard)",
            STEPS / cold_s["median"] > TB_STEPS / tb_sp["median"],
            f"{STEPS / cold_s['median']:.0f} vs {TB_STEPS / tb_sp['median']:.0f} steps/s; assumes TensorBoard's "
            "load is linear in steps (it reads every event)"),
    ]
    details = {"steps": STEPS, "keys": len(RUN_KEYS) + 2 * BLOCKS, "metrics_mb": round(size_mb, 1),
               "write_run_s": round(write_s, 1), "run_metrics_parse_s": round(parse_s, 2),
               "run_metric_columns_s": round(columns_s, 2), "records": n_records,
               "timings_s": timings, "auto_trace_type": renderer, "tensorboard_s": tb_s,
               "tensorboard_points": tb[0][1], "tensorboard_steps": TB_STEPS,
               "page_script_mb": round(script_bytes / 1e6, 2),
               "cold_server_startup_s": startup["listening"], "cold_from_start_s": startup["from_start"],
               "load_average_start": load_start, "load_average": os.getloadavg(),
               "note": "CPU shared with other jobs while measured"}
    write_result("dashboard", rows, details)
    for r in rows:
        print(f"{r['metric']}: {r['value']} {r['unit']} ({r['notes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
