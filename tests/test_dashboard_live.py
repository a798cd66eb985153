"""Live follow under concurrency: the live poll, the alert and run-list refreshes of the same run run on
different server threads; every step a writer logs must reach the page's traces exactly once."""
from __future__ import annotations

import copy
import threading
import time
from typing import Any

from dash import no_update
from test_dashboard_data import metrics, write_run

from dashboard import figures as F
from dashboard.callbacks import Builder
from dashboard.data import ALL, RunCache


def apply_patch(fig: dict[str, Any], patch: Any) -> None:
    """Apply a Dash ``Patch`` to a figure dict as dash-renderer does (the operations the dashboard sends)."""
    for op in patch.to_plotly_json()["operations"]:
        *path, last = op["location"]
        target = fig
        for part in path:
            target = target[part]
        value = op["params"].get("value")
        if op["operation"] == "Extend":
            target[last].extend(value)
        elif op["operation"] == "Assign":
            target[last] = value
        else:
            raise AssertionError(f"unexpected patch operation {op['operation']}")


def follow(builder: Builder, selection: list[str], done: threading.Event, poll_s: float) -> list[dict[str, Any]]:
    """A page following ``selection``: the first render, then live patches (or rebuilds) until ``done``."""
    figs, cursor, _ = builder.full(selection, ALL, "scatter")
    figs = copy.deepcopy(figs)
    while True:
        finished = done.is_set()
        result = builder.live(cursor)
        if result is not None:
            outputs, cursor = result
            for i, out in enumerate(outputs):
                if isinstance(out, dict):
                    figs[i] = copy.deepcopy(out)
                elif out is not no_update:
                    apply_patch(figs[i], out)
        if finished:
            return figs
        time.sleep(poll_s)


def test_live_follow_draws_every_step_exactly_once_while_other_threads_refresh(tmp_path):
    """2,000 steps written at 100 steps/s while two threads refresh the run and run its detectors, as the
    alerts and run-list callbacks do: the KL trace and the heatmap get each step once, in order."""
    steps, rate = 2000, 100.0
    writer = write_run(tmp_path / "live", 5, status=None)
    cache = RunCache(tmp_path)
    builder = Builder(cache)
    done = threading.Event()

    def write() -> None:
        t0 = time.monotonic()
        for s in range(5, steps):
            writer.log(s, metrics(s))
            delay = t0 + (s - 4) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        writer.close()
        done.set()

    def hammer() -> None:
        while not done.is_set():
            data = cache.get("live")
            data.alerts()
            cache.listing()

    threads = [threading.Thread(target=write), threading.Thread(target=hammer), threading.Thread(target=hammer)]
    for t in threads:
        t.start()
    try:
        figs = follow(builder, ["live"], done, poll_s=0.02)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    kl = figs[F.FIGURE_IDS.index("kl")]
    for trace in kl["data"]:
        assert trace["x"] == list(range(steps)), (len(trace["x"]), len(set(trace["x"])))
        assert len(trace["y"]) == steps
    heat = figs[F.FIGURE_IDS.index("grad_layers")]["data"][0]
    assert heat["x"] == list(range(steps)) and all(len(row) == steps for row in heat["z"])
