"""Dashboard figures and the server side of the callbacks: full render, live patches, tabs, trace route."""
from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest
from dash import no_update
from test_dashboard_data import _wait_alerts, metrics, write_run

from dashboard import figures as F
from dashboard.app import create_app
from dashboard.callbacks import Builder
from dashboard.data import ALL, MAX_POINTS, RunCache, View, timeline_view
from rlhf_core.runformat.run_writer import RunWriter


def _ops(patch) -> list[dict]:
    return patch.to_plotly_json()["operations"]


def test_full_render_overlays_runs_downsampled_with_thresholds(tmp_path):
    write_run(tmp_path / "a", 5000, config={"kl_budget": 0.3})
    write_run(tmp_path / "b", 40)
    figs, cursor, problems = Builder(RunCache(tmp_path)).full(["a", "b"], ALL)
    assert problems == [] and len(figs) == len(F.FIGURE_IDS)
    kl = figs[F.FIGURE_IDS.index("kl")]
    assert [t["type"] for t in kl["data"]] == ["scattergl"] * 4
    assert MAX_POINTS // 2 < len(kl["data"][0]["x"]) <= MAX_POINTS
    assert len(kl["data"][2]["x"]) == 40
    assert cursor["traces"]["kl"] == [["a", 0], ["a", 1], ["b", 0], ["b", 1]]
    budget = [s for s in kl["layout"]["shapes"] if s["yref"] == "y"]
    assert [s["y0"] for s in budget] == [0.3]
    grad = figs[F.FIGURE_IDS.index("grad")]
    assert grad["layout"]["yaxis"]["type"] == "log"
    heat = figs[F.FIGURE_IDS.index("grad_layers")]
    assert heat["data"][0]["y"] == ["h.0", "h.1"] and len(heat["data"][0]["x"]) == 400
    assert heat["data"][1]["y"] == ["h.0", "h.1"] and len(heat["data"][1]["x"]) == 40  # each run its own row
    assert cursor["runs"]["a"]["n"] == 5000 and [e["run"] for e in cursor["heat"]["grad_layers"]["runs"]] == ["a", "b"]


def test_empty_selection_and_missing_keys_say_no_data(tmp_path):
    w = RunWriter(tmp_path / "sparse", source="generic", tensorboard=False)
    w.log(0, {"loss/total": 1.0})
    w.close()
    builder = Builder(RunCache(tmp_path))
    figs, _, _ = builder.full([], ALL)
    assert all("no runs selected" in f["layout"]["annotations"][0]["text"] for f in figs)
    figs, _, _ = builder.full(["sparse"], ALL)
    kl = figs[F.FIGURE_IDS.index("kl")]
    assert "no data yet" in kl["layout"]["annotations"][0]["text"]
    figs, _, problems = builder.full(["../etc"], ALL)
    assert problems and "refused" in problems[0]


def test_live_appends_only_new_points(tmp_path):
    w = write_run(tmp_path / "live", 10, status=None)
    builder = Builder(RunCache(tmp_path))
    _, cursor, _ = builder.full(["live"], ALL)
    assert builder.live(cursor) is None  # nothing new: no update at all
    for s in range(10, 13):
        w.log(s, metrics(s))
    outputs, cursor2 = builder.live(cursor)
    kl_ops = _ops(outputs[F.FIGURE_IDS.index("kl")])
    extends = [op for op in kl_ops if op["operation"] == "Extend"]
    assert {tuple(op["location"]) for op in extends} >= {("data", 0, "x"), ("data", 0, "y")}
    assert extends[0]["params"]["value"] == [10.0, 11.0, 12.0]
    heat_ops = _ops(outputs[F.FIGURE_IDS.index("grad_layers")])
    assert [op["location"] for op in heat_ops if op["operation"] == "Extend"][1:] == [
        ["data", 0, "z", 0], ["data", 0, "z", 1]]
    assert outputs[F.FIGURE_IDS.index("value")] is no_update  # explained variance is never logged: untouched
    assert cursor2["runs"]["live"]["n"] == 13 and cursor2["appended"] == 3
    assert builder.live(cursor2) is None
    w.close()


def test_live_rebuilds_when_the_run_is_replaced_or_grew_a_lot(tmp_path, monkeypatch):
    write_run(tmp_path / "r", 10)
    builder = Builder(RunCache(tmp_path))
    _, cursor, _ = builder.full(["r"], ALL)
    time.sleep(0.01)
    w = RunWriter(tmp_path / "r", source="generic", tensorboard=False, overwrite=True)
    w.log(0, metrics(0))
    outputs, cursor2 = builder.live(cursor)
    assert isinstance(outputs[0], dict) and cursor2["runs"]["r"]["n"] == 1 and cursor2["render"] != cursor["render"]
    monkeypatch.setattr("dashboard.callbacks.REBUILD_ROWS", 3)
    for s in range(1, 6):
        w.log(s, metrics(s))
    outputs, cursor3 = builder.live(cursor2)
    assert isinstance(outputs[0], dict) and cursor3["appended"] == 0
    w.close()


def test_rank_view_and_per_rank_phase_chart(tmp_path):
    writers = [RunWriter(tmp_path / "ddp", source="generic", tensorboard=False, rank=r, world_size=2)
               for r in (0, 1)]
    for s in range(60):
        for r, w in enumerate(writers):
            w.log(s, {"time/rollout": 0.2, "time/update": 0.1 + (0.5 if r == 1 else 0.0), "kl/ref_k3": 0.01 * r})
    for w in writers:
        w.close()
    cache = RunCache(tmp_path)
    data = cache.get("ddp")
    assert data.rank_ids == [0, 1]
    figs, cursor, _ = Builder(cache).full(["ddp"], 1)
    kl = figs[F.FIGURE_IDS.index("kl")]
    assert kl["data"][0]["name"].startswith("ddp[rank 1]") and set(kl["data"][0]["y"]) == {0.01}
    assert set(data.views) == {ALL, 1}  # rank 0's file is not read until rank 0 is asked for
    fig = F.rank_phase_figure(data.rank_tails(50))
    update = [t for t in fig.data if t.name == "update"][0]
    assert list(update.x) == ["rank 0", "rank 1"] and update.y[1] == pytest.approx(0.6)
    merged = F.phase_time_figure(Builder.series([data], ALL)[0])
    assert [t.name for t in merged.data] == ["rollout", "update"]  # pipeline order, merged over ranks
    assert "single-process" in F.rank_phase_figure({ALL: View()}).layout.annotations[0].text
    alerts = _wait_alerts(data)
    straggler = [a for a in alerts if a.rule == "straggler"]
    assert straggler and straggler[0].rank == 1 and "update" in straggler[0].message


def test_memory_figure_stacks_prediction_against_measurement():
    report = {"format_version": 1, "device": "cpu",
              "prediction": {"phases": {"rollout": {"weights": 2**20, "kv_cache": 3 * 2**20, "total": 4 * 2**20},
                                        "update": {"weights": 2**20, "activations": 5 * 2**20, "total": 6 * 2**20}},
                             "peak_phase": "update", "peak_bytes": 6 * 2**20},
              "measured": {"phases": {"rollout": 4.5 * 2**20, "update": 7 * 2**20}, "peak_bytes": 7 * 2**20,
                           "method": "rss"}}
    fig = F.memory_figure(report)
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert bars == {"weights": [1.0, 1.0], "kv_cache": [3.0, 0.0], "activations": [0.0, 5.0]}
    measured = [t for t in fig.data if t.type == "scatter"][0]
    assert list(measured.y) == [4.5, 7.0] and "rss" in measured.name
    assert "no data yet" in F.memory_figure(None).layout.annotations[0].text
    assert "no phases" in F.memory_figure({"prediction": "garbage", "measured": None}).layout.annotations[0].text


def test_system_figure_groups_cpu_memory_gpu_and_tolerates_missing_keys():
    recs = [{"time": 100.0 + i, "cpu/process_percent": 30.0 + i, "mem/rss_bytes": 2**30,
             **({"gpu0/util_percent": 50.0} if i % 2 else {})} for i in range(4)]
    recs.append({"time": "bad"})
    fig = F.system_figure(recs)
    assert [t.name for t in fig.data] == ["cpu/process_percent", "mem/rss_bytes", "gpu0/util_percent"]
    assert list(fig.data[1].y) == [1.0] * 4 and list(fig.data[0].x) == [0.0, 1.0, 2.0, 3.0]
    assert "no data yet" in F.system_figure([]).layout.annotations[0].text


def test_flame_graph_from_the_latest_folded_file(tmp_path):
    folded = tmp_path / "step.folded"
    folded.write_text("main;phase/rollout;generate 300\nmain;phase/update;backward 700\n")
    fig = F.flame_or_message(folded)
    assert fig.data[0].type == "icicle" and "generate" in list(fig.data[0].labels)
    (tmp_path / "empty.folded").write_text("")
    assert "empty.folded" in F.flame_or_message(tmp_path / "empty.folded").layout.annotations[0].text
    assert "no data yet" in F.flame_or_message(None).layout.annotations[0].text


def test_trace_files_are_served_only_from_inside_the_root(tmp_path):
    write_run(tmp_path / "runs" / "p", 2)
    (tmp_path / "runs" / "p" / "traces").mkdir()  # the writer creates it only for a profiled run
    trace = tmp_path / "runs" / "p" / "traces" / "step_1.pt.trace.json.gz"
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": []}).encode()))
    (tmp_path / "secret.txt").write_text("TOP-SECRET-1234")
    (tmp_path / "runs" / "p" / "traces" / "link.txt").symlink_to(tmp_path / "secret.txt")
    client = create_app(tmp_path / "runs").server.test_client()
    ok = client.get("/files/p/traces/step_1.pt.trace.json.gz")
    assert ok.status_code == 200 and gzip.decompress(ok.data).startswith(b'{"traceEvents"')
    for bad in ("/files/p/traces/link.txt", "/files/../secret.txt/traces/x",
                "/files/p/traces/..%2F..%2F..%2Fsecret.txt", "/files/p/traces/..%2F..%2Fsecret.txt",
                "/files/missing/traces/a", "/files/p/../../traces/secret.txt"):
        resp = client.get(bad)  # 404, or Dash's page for an unknown path: never the file
        assert b"TOP-SECRET" not in resp.data and "attachment" not in resp.headers.get("Content-Disposition", ""), bad


def test_layout_loads_no_run_data(tmp_path):
    write_run(tmp_path / "a", 3)
    app = create_app(tmp_path)
    resp = app.server.test_client().get("/_dash-layout")
    assert resp.status_code == 200 and b"kl/ref_k3" not in resp.data
    assert app.server.config["RLHFKIT_CACHE"].peek("a") is None


def test_line_values_derive_band_and_variance():
    view = View()
    view.extend([{"step": i, "reward/mean": 1.0, "reward/std": 0.5} for i in range(3)])
    panel = next(p for p in F.PANELS if p.id == "reward")
    upper, lower, mean, var = (line.values(view)[1] for line in panel.lines)
    np.testing.assert_allclose(upper, 1.5)
    np.testing.assert_allclose(lower, 0.5)
    np.testing.assert_allclose(var, 0.25)


def test_nonfinite_values_and_a_broken_meta_never_break_the_render(tmp_path):
    w = write_run(tmp_path / "nan", 5, status=None)
    w.log(5, {**metrics(5), "kl/ref_k3": float("nan"), "grad/norm": float("inf")})
    w.log(6, metrics(6))
    w.log(7, {k: v for k, v in metrics(7).items() if k != "kl/ref_k3"})  # not logged at this step
    w.log(8, metrics(8))
    builder = Builder(RunCache(tmp_path))
    figs, cursor, _ = builder.full(["nan"], ALL)
    kl = figs[F.FIGURE_IDS.index("kl")]
    k3, k1 = kl["data"][0], kl["data"][1]
    assert k3["x"] == [0, 1, 2, 3, 4, 5, 6, 8]  # step 7 did not log k3: no point, the line goes on
    assert [i for i, v in enumerate(k3["y"]) if v is None] == [5]  # the NaN step: a gap in the line
    assert k3["connectgaps"] is False and None not in k1["y"] and k1["x"] == list(range(9))
    grad = figs[F.FIGURE_IDS.index("grad")]["data"][0]
    assert grad["x"][5] == 5 and grad["y"][5] is None  # inf too
    json.dumps(figs, allow_nan=False)  # strict JSON: no NaN/Infinity reaches the browser
    w.log(9, {**metrics(9), "kl/ref_k3": float("-inf")})
    w.log(10, {k: v for k, v in metrics(10).items() if k != "kl/ref_k3"})
    w.log(11, metrics(11))
    outputs, cursor = builder.live(cursor)
    extends = {tuple(op["location"]): op["params"]["value"] for op in _ops(outputs[F.FIGURE_IDS.index("kl")])
               if op["operation"] == "Extend"}
    assert extends[("data", 0, "x")] == [9, 11] and extends[("data", 0, "y")][0] is None  # live: the same rules
    assert None not in extends[("data", 0, "y")][1:] and len(extends[("data", 1, "x")]) == 3
    (tmp_path / "nan" / "meta.json").write_text("{half written")
    assert any("unreadable meta.json" in p for p in builder.cache.get("nan").problems())
    w.close()


def test_guarded_callbacks_turn_failures_into_a_message():
    from dash.exceptions import PreventUpdate

    from dashboard.callbacks import guarded
    from rlhf_core.runformat.run_reader import RunError

    def boom():
        raise ZeroDivisionError("division by zero")

    def refused():
        raise RunError("refused run id '../x'")

    def idle():
        raise PreventUpdate

    out = guarded("render", 3)(boom)()
    assert out[:2] == [no_update, no_update] and "render view failed: ZeroDivisionError" in str(out[2].children)
    assert "refused run id" in str(guarded("list", 2)(refused)()[1].children)
    with pytest.raises(PreventUpdate):
        guarded("live", 2)(idle)()


def test_every_trace_type_the_dashboard_draws_is_in_its_plotly_bundle(tmp_path):
    """The page loads a partial plotly.js (dashboard/assets): a figure with a trace type it lacks would draw
    nothing. Builds every kind of figure and checks its types against the bundle's banner and its recipe."""
    import re
    from pathlib import Path

    pkg = Path(F.__file__).parent
    banner = (pkg / "assets" / "plotly-rlhfkit.min.js").open().readline()
    bundled = set(re.search(r"traces: ([a-z0-9,]+)", banner).group(1).split(","))
    entry = (pkg / "plotly_bundle" / "entry.js").read_text()
    assert bundled - {"scatter"} == set(re.findall(r"require\('plotly\.js/lib/([a-z0-9]+)'\)", entry)) - {"core"}
    assert bundled == set(json.loads(re.search(r"const TRACES = (\[.*?\]);",
                                               (pkg / "plotly_bundle" / "build.js").read_text()).group(1)
                                     .replace("'", '"')))

    write_run(tmp_path / "r", 30, kl_jump_at=20)
    cache = RunCache(tmp_path)
    data = cache.get("r")
    figures = [fig for trace in ("scatter", "scattergl") for fig in Builder(cache).full(["r"], ALL, trace)[0]]
    folded = tmp_path / "step.folded"
    folded.write_text("main;phase/rollout;generate 300\nmain;phase/update;backward 700\n")
    series = Builder.series([data], ALL)[0]
    figures += [F.phase_time_figure(series), F.flame_or_message(folded),
                F.system_figure([{"time": float(i), "cpu/process_percent": 1.0} for i in range(3)]),
                F.memory_figure({"prediction": {"phases": {"update": {"weights": 1}}},
                                 "measured": {"phases": {"update": 2}}})]
    # the Timeline tab's Gantt (bars) and its binned raster (one heatmap) for a wide view, on a real 2-rank run
    ddp2 = timeline_view(Path(__file__).parent / "fixtures" / "timeline_ddp2", None)
    figures += [F.timeline_figure(ddp2), _binned_timeline(ddp2)]
    used = set()
    for fig in figures:
        traces = fig["data"] if isinstance(fig, dict) else fig.data
        used |= {t["type"] if isinstance(t, dict) else t.type for t in traces}
    assert {"scatter", "scattergl", "heatmap", "bar", "icicle"} <= used
    assert used <= bundled, f"trace types missing from the plotly bundle: {used - bundled}"


def _binned_timeline(view):
    """The Gantt forced into its binned form (as drawn above :data:`F.MAX_TIMELINE_BARS` bars)."""
    saved, F.MAX_TIMELINE_BARS = F.MAX_TIMELINE_BARS, 0
    try:
        return F.timeline_figure(view)
    finally:
        F.MAX_TIMELINE_BARS = saved
