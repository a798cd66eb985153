"""Dashboard data layer: safe run ids, incremental columns, spike-keeping downsampling, tailing, alerts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dashboard import data as D
from rlhf_core.runformat.run_reader import RunError
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.rules.base import is_alerting


def write_run(path: Path, steps: int, *, kl_jump_at: int | None = None, status: str | None = "finished",
              config: dict | None = None) -> RunWriter:
    """A synthetic run; ``kl_jump_at`` plants a KL explosion. Returns the open writer when ``status`` is None."""
    w = RunWriter(path, source="generic", tensorboard=False, config=config or {})
    for s in range(steps):
        w.log(s, metrics(s, kl_jump_at))
    if status is None:
        return w
    w.close(status)
    return w


def metrics(step: int, kl_jump_at: int | None = None) -> dict:
    k3 = 0.01 + 1e-4 * step + 1e-3 * math.sin(step)
    if kl_jump_at is not None and step >= kl_jump_at:
        k3 *= 50
    return {"kl/ref_k3": k3, "kl/ref_k1": 0.9 * k3, "reward/mean": 0.1 * math.sin(step / 5),
            "reward/std": 0.3, "policy/entropy": 2.0, "grad/norm": 0.5 + 0.1 * math.cos(step),
            "grad/layer/h.0": 0.2, "grad/layer/h.1": 0.3, "drift/layer/h.0": 1e-3 * step, "drift/rel": 1e-3 * step,
            "time/rollout": 0.2, "time/update": 0.1}


def test_run_ids_that_leave_the_root_are_refused(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "ok", 3)
    outside = tmp_path / "outside"
    write_run(outside, 3)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    cache = D.RunCache(root)
    assert len(cache.get("ok").view()) == 3
    for bad in ("../outside", str(outside), "escape", "ok/../../outside", ""):
        with pytest.raises(RunError, match="refused"):
            cache.get(bad)
    with pytest.raises(RunError, match="no such run"):
        cache.get("missing")


def test_columns_turn_bad_values_into_nan_and_grow_incrementally():
    view = D.View()
    view.extend([{"step": 0, "a": 1.0, "b": None}, {"step": 1, "a": "text", "b": True}, {"step": 2, "b": [1]}])
    np.testing.assert_array_equal(view.column("a"), [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(view.column("b"), [np.nan, 1.0, np.nan])
    view.extend([{"step": 3, "a": 4.0, "b": 5.0}])
    np.testing.assert_array_equal(view.column("a", start=2), [np.nan, 4.0])
    np.testing.assert_array_equal(view.steps(), [0, 1, 2, 3])


def test_prefetch_matches_column_by_column():
    recs = [{"step": i, "x": float(i), "y": i * 2.0, "z": None if i % 3 else 1.0} for i in range(5000)]
    fast, slow = D.View(), D.View()
    fast.extend(recs[:3000])
    fast.column("x")  # one column already partly filled
    fast.extend(recs[3000:])
    slow.extend(recs)
    fast.prefetch(["step", "x", "y", "z", "absent"])
    for key in ("step", "x", "y", "z"):
        np.testing.assert_array_equal(fast.column(key), slow.column(key))
    uneven = D.View()
    uneven.extend([{"step": 0, "x": 1.0}, {"step": 1}])  # a missing key: prefetch leaves it to column()
    uneven.prefetch(["step", "x"])
    np.testing.assert_array_equal(uneven.column("x"), [1.0, np.nan])


def test_downsampling_keeps_the_spike_and_bounds_the_points():
    n = 100_000
    x = np.arange(n, dtype=float)
    y = np.sin(x / 500) + np.random.default_rng(0).normal(0, 0.01, n)
    y[73_123] = 50.0
    y[10] = np.nan
    xs, ys = D.downsample(x, y, 2000)
    assert len(xs) <= 2000 and ys.max() == 50.0 and xs[np.argmax(ys)] == 73_123
    assert np.isfinite(ys).all()
    small_x, small_y = D.downsample(x[:50], y[:50])
    assert len(small_x) == 49  # only the NaN is dropped


def test_bucket_max_keeps_spikes_and_mean_ignores_nan():
    values = np.ones(10_000)
    values[4321] = 99.0
    values[:30] = np.nan  # the whole first bucket (25 rows)
    edges = D.bucket_edges(len(values), 400)
    assert len(edges) == 401
    maxes = D.bucket_reduce(values, edges, "max")
    assert np.nanmax(maxes) == 99.0 and np.isnan(maxes[0])
    means = D.bucket_reduce(np.array([1.0, np.nan, 3.0, 5.0]), np.array([0, 2, 4]), "mean")
    np.testing.assert_array_equal(means, [1.0, 4.0])
    assert len(D.bucket_reduce(np.array([]), D.bucket_edges(0), "max")) == 0


def test_refresh_follows_appends_and_waits_for_a_half_written_line(tmp_path):
    w = write_run(tmp_path / "live", 5, status=None)
    cache = D.RunCache(tmp_path)
    data = cache.get("live")
    assert len(data.view()) == 5
    with open(w.metrics_path, "a") as fh:
        fh.write('{"step": 5, "time": 1, "kl/ref_k3"')  # a record being written
        fh.flush()
        data.refresh()
        assert len(data.view()) == 5 and not data.problems()
        fh.write(': 0.5}\n{"step": 6, "time": 1, "kl/ref_k3": 0.6}\n')
    data.refresh()
    assert data.view().column("kl/ref_k3")[-2:].tolist() == [0.5, 0.6]
    w.close()


def test_malformed_lines_become_messages_and_lose_no_good_rows(tmp_path):
    write_run(tmp_path / "bad", 4)
    path = tmp_path / "bad" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, "{this is not json")
    path.write_text("\n".join(lines) + '\n{"step": 9, "ti')  # and a torn last line of a finished run
    data = D.RunCache(tmp_path).get("bad")
    assert len(data.view()) == 4
    problems = " | ".join(data.problems())
    assert "metrics.jsonl:3: malformed JSON" in problems and "torn last line" in problems


def test_a_replaced_run_starts_over(tmp_path):
    write_run(tmp_path / "r", 6)
    cache = D.RunCache(tmp_path)
    assert len(cache.get("r").view()) == 6
    time.sleep(0.01)
    RunWriter(tmp_path / "r", source="generic", tensorboard=False, overwrite=True).log(0, {"kl/ref_k3": 1.0})
    assert len(cache.get("r").view()) == 1


def _wait_alerts(data: D.RunData, timeout: float = 30.0) -> list[D.Alert]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alerts, progress = data.alerts()
        if not progress and not (data._detector and data._detector.is_alive()):
            return alerts
        time.sleep(0.05)
    raise TimeoutError("detectors did not finish")


def test_alerts_merge_detectors_and_events_without_duplicates(tmp_path):
    w = write_run(tmp_path / "boom", 120, kl_jump_at=90, status=None)
    w.event(90, "alert", rule="kl_explosion", severity="warning", message="from the runner")
    w.event(7, "alert", rule="custom_rule", severity="info", message="written by a producer",
            data={"suggestion": "look at it"})
    w.event(8, "note", message="not an alert")
    w.close()
    data = D.RunCache(tmp_path).get("boom")
    alerts = _wait_alerts(data)
    kl = [a for a in alerts if a.rule == "kl_explosion"]
    assert len(kl) == 1 and kl[0].step == 90 and kl[0].origin == "detector"
    custom = [a for a in alerts if a.rule == "custom_rule"]
    assert custom and custom[0].suggestion == "look at it" and custom[0].origin == "events.jsonl"
    assert all(a.rule != "note" for a in alerts)
    # the run list counts trouble: warnings and criticals, not info notes such as custom_rule's
    count = data.summary()["alerts"]
    assert count == sum(is_alerting(a.severity) for a in alerts) and 0 < count < len(alerts)


def test_run_list_reads_small_runs_and_leaves_big_ones_for_later(tmp_path, monkeypatch):
    write_run(tmp_path / "a", 3)
    write_run(tmp_path / "group" / "b", 7)
    (tmp_path / "not_a_run").mkdir()
    rows = {r["id"]: r for r in D.RunCache(tmp_path).listing()}
    assert set(rows) == {"a", "group/b"} and rows["group/b"]["steps"] == 7
    w = write_run(tmp_path / "quiet", 2, status=None)
    monkeypatch.setattr(D, "STALE_S", -1)
    rows = {r["id"]: r for r in D.RunCache(tmp_path).listing()}
    assert rows["quiet"]["status"].startswith("running? (silent")
    w.close()
    monkeypatch.setattr(D, "SMALL_METRICS_BYTES", 0)
    rows = {r["id"]: r for r in D.RunCache(tmp_path).listing()}
    assert rows["a"]["steps"] is None and rows["a"]["status"] == "finished"


def test_cache_evicts_least_recently_used(tmp_path):
    for name in "abc":
        write_run(tmp_path / name, 2)
    cache = D.RunCache(tmp_path, capacity=2)
    for name in "abc":
        cache.get(name)
    assert cache.peek("a") is None and cache.peek("c") is not None
    by_rows = D.RunCache(tmp_path, max_rows=3)  # two rows each: only the last one used fits
    for name in "abc":
        by_rows.get(name)
    assert [by_rows.peek(n) is not None for n in "abc"] == [False, False, True]


def test_dashboard_does_not_import_torch():
    code = ("import sys, dashboard.app, devtools.headless, rlhf_core.stability.detectors, profiler.flamegraph; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_rejects_bad_arguments_in_one_line(tmp_path, capsys):
    from dashboard.app import main

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["--runs", str(not_a_dir)]) == 2
    assert main(["--runs", str(tmp_path), "--port", "0"]) == 2
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["--runs", str(tmp_path), "--port", str(busy.getsockname()[1])]) == 1
    assert main(["--runs", str(tmp_path), "--host", "no-such-host.invalid"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("rlhfkit dashboard:") for line in err), err
    assert "in use" in err[2]
    with pytest.raises(SystemExit) as exc:
        main(["--render", "canvas"])
    assert exc.value.code == 2


def test_json_of_events_with_odd_types_is_tolerated(tmp_path):
    write_run(tmp_path / "odd", 2)
    with open(tmp_path / "odd" / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "alert", "rule": None, "step": "x", "data": "not a dict"}) + "\n")
    alerts = _wait_alerts(D.RunCache(tmp_path).get("odd"))
    assert [a.rule for a in alerts if a.origin == "events.jsonl"] == ["event"]


def test_run_list_does_not_wait_for_a_run_being_read(tmp_path):
    """A big first read holds the run; the list shows it from its meta meanwhile instead of blocking."""
    import threading

    write_run(tmp_path / "a", 5)
    cache = D.RunCache(tmp_path)
    data = cache.get("a")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with data.lock:
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(10)
    try:
        t0 = time.monotonic()
        rows = {r["id"]: r for r in cache.listing()}
        assert time.monotonic() - t0 < 5
        assert rows["a"]["steps"] is None and rows["a"]["status"] == "finished"
    finally:
        release.set()
        t.join()
    assert {r["id"]: r for r in cache.listing()}["a"]["steps"] == 5


def test_warm_reads_in_the_background_at_the_pages_priority_then_prepares(tmp_path):
    """The page waits for a warmed run, so its read keeps normal priority (the detectors and the records read
    behind a columnar read are the ones at lower priority)."""
    import threading

    write_run(tmp_path / "a", 5)
    cache = D.RunCache(tmp_path)
    seen = {}
    done = threading.Event()

    def prepare(data: D.RunData) -> None:
        seen["rows"] = len(data.view())
        seen["thread"] = threading.current_thread().name
        if hasattr(os, "getpriority"):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        done.set()

    cache.warm(["a", "missing"], prepare)
    assert done.wait(10)
    assert seen["rows"] == 5 and seen["thread"] == "warm-runs"
    if "nice" in seen:
        assert seen["nice"] == os.getpriority(os.PRIO_PROCESS, 0)


def _columns_of(view: D.View) -> dict:
    return {k: view.column(k) for k in view.keys}


def _wait_records(data: D.RunData, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while data._catch_up is not None and data._catch_up.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_big_first_read_draws_from_columns_and_reads_the_records_behind_them(tmp_path, monkeypatch):
    """Above COLUMNAR_MIN_BYTES the first read is columnar: the charts' columns and the run list's counts
    are there at once, the records follow (with the detectors, in pieces), the alerts are those of a line
    read, and the run is followed live afterwards."""
    writer = write_run(tmp_path / "big", 300, kl_jump_at=200, status=None)
    writer.event(3, "alert", rule="custom_rule", severity="info", message="from the producer")
    reference = D.RunCache(tmp_path).get("big")  # the line read (the file is below the default threshold)
    assert not reference.views[D.ALL].bulk_rows
    expected_alerts = [(a.rule, a.step) for a in _wait_alerts(reference)]
    expected_columns = _columns_of(reference.view())

    monkeypatch.setattr(D, "COLUMNAR_MIN_BYTES", 0)
    monkeypatch.setattr(D, "CATCH_UP_BYTES", 4096)  # several pieces
    data = D.RunCache(tmp_path).get("big")
    view = data.view()
    assert view.lagging and len(view) == 300 and view.bulk_rows == 300 and not view.records
    assert data._catch_up is None  # the records wait for the detectors: the first render comes first
    got = _columns_of(view)
    assert list(got) == list(expected_columns)
    for key, values in expected_columns.items():
        np.testing.assert_array_equal(got[key], values, err_msg=key)
    summary = data.summary()
    assert summary["steps"] == 300 and summary["last_step"] == 299 and summary["status"] == "running"

    assert [(a.rule, a.step) for a in _wait_alerts(data)] == expected_alerts
    assert ("kl_explosion", 200) in expected_alerts
    _wait_records(data)
    assert not view.lagging and len(view.records) == 300 and view.bulk_rows == 300
    assert view.records == reference.view().records

    for step in range(300, 310):
        writer.log(step, metrics(step))
    writer.close()
    data.refresh()
    assert len(view) == 310 and view.steps()[-1] == 309 and data.summary()["last_step"] == 309
    np.testing.assert_array_equal(view.column("grad/norm")[300:], [metrics(s)["grad/norm"] for s in range(300, 310)])


def test_a_value_logged_nonfinite_is_a_gap_and_a_key_not_logged_is_not(tmp_path, monkeypatch):
    """Both are NaN in a column; only the first is a gap row, whether the rows came from the line reader, a
    columnar parse, the records read behind it, or a rebuild from the records."""
    w = write_run(tmp_path / "gaps", 4, status=None)
    w.log(4, {**metrics(4), "kl/ref_k3": math.nan, "grad/norm": math.inf})
    w.log(5, {k: v for k, v in metrics(5).items() if k != "kl/ref_k3"})
    w.log(6, {**metrics(6), "kl/ref_k3": -math.inf})
    w.close()
    line = D.RunCache(tmp_path).get("gaps").view()
    assert not line.bulk_rows and np.isnan(line.column("kl/ref_k3")[[4, 5, 6]]).all()
    assert line.gap_rows("kl/ref_k3").tolist() == [4, 6] and line.gap_rows("grad/norm").tolist() == [4]
    assert line.gap_rows("kl/ref_k3", 5).tolist() == [6] and line.gap_rows("kl/ref_k3", 0, 4).size == 0
    assert line.gap_rows("reward/mean").size == 0 and line.gap_rows("never/logged").size == 0

    monkeypatch.setattr(D, "COLUMNAR_MIN_BYTES", 0)
    data = D.RunCache(tmp_path).get("gaps")
    columnar = data.view()
    assert columnar.lagging and not columnar.records
    assert columnar.gap_rows("kl/ref_k3").tolist() == [4, 6] and columnar.gap_rows("grad/norm").tolist() == [4]
    _wait_alerts(data)
    _wait_records(data)
    assert not columnar.lagging and columnar.gap_rows("kl/ref_k3").tolist() == [4, 6]  # not noted twice
    columnar.drop_columns()
    assert columnar.gap_rows("kl/ref_k3").tolist() == [4, 6] and columnar.gap_rows("grad/norm").tolist() == [4]


def test_columns_that_disagree_with_the_line_read_give_way_to_it(tmp_path, monkeypatch):
    """Two objects on one line and a blank line keep pyarrow's row count equal to the line count, yet the
    line reader (which skips both) sees two rows fewer: once the records are read the columns are dropped,
    the records win and the bad line is reported."""
    write_run(tmp_path / "odd", 10)
    with open(tmp_path / "odd" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 10, "grad/norm": 1.0} {"step": 11, "grad/norm": 2.0}\n\n{"step": 12, "grad/norm": 3.0}\n')
    monkeypatch.setattr(D, "COLUMNAR_MIN_BYTES", 0)
    data = D.RunCache(tmp_path).get("odd")
    assert data.view().bulk_rows == 13
    _wait_alerts(data)
    _wait_records(data)
    view = data.view()
    assert view.bulk_rows == 0 and len(view) == 11
    np.testing.assert_array_equal(view.steps(), list(range(10)) + [12])
    assert any("malformed JSON" in p for p in data.problems())


def test_a_page_linked_to_a_run_starts_reading_it_before_its_callbacks(tmp_path):
    from dashboard.app import create_app

    write_run(tmp_path / "a", 5)
    app = create_app(tmp_path)
    cache = app.server.config["RLHFKIT_CACHE"]
    assert cache.peek("a") is None
    assert app.server.test_client().get("/?run=a").status_code == 200
    deadline = time.monotonic() + 10
    while (cache.peek("a") is None or len(cache.peek("a").view()) < 5) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cache.peek("a").view()) == 5
    app.server.test_client().get("/?run=../outside")  # refused ids are reported by the page, not read
    assert cache.peek("../outside") is None


def test_the_server_starts_reading_the_newest_run_as_it_starts(tmp_path):
    """``rlhfkit dashboard`` (``create_app(preload=True)``) starts reading the run a page without a selection
    shows, the newest, before any page asks for it; a plain ``create_app`` reads nothing."""
    from dashboard.app import create_app

    write_run(tmp_path / "old", 3)
    time.sleep(0.05)
    write_run(tmp_path / "new", 5)
    assert D.RunCache(tmp_path).newest() == ["new"]
    assert D.RunCache(tmp_path / "missing").newest() == []
    assert create_app(tmp_path).server.config["RLHFKIT_CACHE"].peek("new") is None
    cache = create_app(tmp_path, preload=True).server.config["RLHFKIT_CACHE"]
    assert cache.peek("old") is None and cache.peek("new") is not None
    deadline = time.monotonic() + 10
    while len(cache.peek("new").view()) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cache.peek("new").view()) == 5


def test_the_charts_render_on_a_selection_not_on_the_renderer_detection(tmp_path):
    """The browser's WebGL check is read by the render as a State: as an Input it fired the render before any
    run was selected, a request that only declined and held the run list's request back by its round trip."""
    from dashboard.app import create_app

    app = create_app(tmp_path)
    render = next(v for k, v in app.callback_map.items() if "cursor.data" in k and k.startswith("..fig-kl.figure..."))
    assert {"id": "trace-type", "property": "data"} in render["state"]
    assert {"id": "selection", "property": "data"} in render["inputs"]
    assert all(i["id"] != "trace-type" for i in render["inputs"])


def test_a_server_restarted_on_the_same_port_serves_the_new_app():
    """The benchmark restarts the dashboard on one address: the old server must free its port (and werkzeug
    closes every connection after its response, so no kept-alive socket can reach the old app)."""
    import http.client

    from devtools.headless import ServerThread

    def app_saying(word: bytes):
        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(word)))])
            return [word]
        return app

    with ServerThread(app_saying(b"one")) as first:
        port = first.server.server_port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.read() == b"one" and response.getheader("Connection") == "close"
    with ServerThread(app_saying(b"two"), port=port):
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"two"


def test_the_columnar_read_is_tried_once_per_run(tmp_path, monkeypatch):
    """A file pyarrow cannot take (here: malformed lines only) is not re-parsed on every poll."""
    import rlhf_core.runformat.metric_columns as MC

    write_run(tmp_path / "bad", 0)
    (tmp_path / "bad" / "metrics.jsonl").write_text("{not json\n" * 50)
    calls = []
    real = MC.read_columns
    monkeypatch.setattr(MC, "read_columns", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(D, "COLUMNAR_MIN_BYTES", 0)
    data = D.RunCache(tmp_path).get("bad")
    for _ in range(3):
        data.refresh()
    assert len(calls) == 1 and len(data.view()) == 0
    assert any("malformed JSON" in p for p in data.problems())
