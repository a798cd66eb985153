"""The dashboard bugs of the trial (issue 15, item 6) at the data level: DDP system chart per rank, alert zoom,
heatmap layer order, memory axes, nothing sent to Plotly's cloud, quiet request logs, titled placeholders."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from test_dashboard_data import write_run

from dashboard import figures as F
from dashboard.app import _parser, configure_logging, create_app
from dashboard.callbacks import Builder, y_range
from dashboard.data import ALL, RunCache
from dashboard.layout import GRAPH_CONFIG
from rlhf_core.runformat.run_writer import RunWriter

MODEL_ORDER = ["wte", "h.0", "h.1", "h.2", "h.10", "ln_f"]  # not alphabetical: h.10 after h.2, wte first


def _ops(patch) -> dict[tuple, object]:
    return {tuple(op["location"]): op["params"].get("value") for op in patch.to_plotly_json()["operations"]}


def test_ddp_system_chart_draws_one_line_per_rank_and_follows_the_rank_selector():
    records = []
    for i in range(6):  # two ranks appending to one system.jsonl, interleaved
        for rank in (0, 1):
            records.append({"time": 100.0 + i + 0.01 * rank, "rank": rank,
                            "cpu/process_percent": 10.0 if rank == 0 else 90.0})
    fig = F.system_figure(records)
    names = [t.name for t in fig.data]
    assert names == ["cpu/process_percent [rank 0]", "cpu/process_percent [rank 1]"]
    assert set(fig.data[0].y) == {10.0} and set(fig.data[1].y) == {90.0}  # no sawtooth between the ranks
    assert all(np.all(np.diff(t.x) > 0) for t in fig.data)
    one = F.system_figure(records, rank=1)
    assert [t.name for t in one.data] == ["cpu/process_percent"] and set(one.data[0].y) == {90.0}
    assert "rank 1" in one.layout.title.text
    assert "no records of rank 3" in F.system_figure(records, rank=3).layout.annotations[0].text


def _ddp_run(path, steps: int = 30, reduced: bool = True):
    writers = [RunWriter(path, source="generic", tensorboard=False, rank=r, world_size=2) for r in (0, 1)]
    for s in range(steps):
        per_rank = []
        for r, w in enumerate(writers):
            rec = {"kl/ref_k3": 0.01 * (r + 1)}
            rec.update({f"grad/layer/{b}": 0.1 * (i + 1) for i, b in enumerate(MODEL_ORDER)})
            w.log(s, rec)
            per_rank.append(rec)
        if reduced:
            writers[0].log_reduced(s, {k: sum(p[k] for p in per_rank) / 2 for k in per_rank[0]})
    for w in writers:
        w.close()


@pytest.mark.parametrize("reduced", [True, False], ids=["reduced-metrics.jsonl", "rank-files-only"])
def test_heatmap_layers_keep_model_order_in_the_rank_mean_view_and_per_rank(tmp_path, reduced):
    """The rank mean merged by the reader lists keys alphabetically (h.10 before h.2, wte last)."""
    _ddp_run(tmp_path / "ddp", reduced=reduced)
    builder = Builder(RunCache(tmp_path))
    orders = {}
    for rank in (ALL, 0, 1):
        figs, cursor, _ = builder.full(["ddp"], rank)
        orders[rank] = figs[F.FIGURE_IDS.index("grad_layers")]["data"][0]["y"]
    assert orders[ALL] == orders[0] == orders[1] == MODEL_ORDER


def test_alert_zoom_rescales_y_and_leaves_another_runs_heatmap_alone(tmp_path):
    write_run(tmp_path / "long", 1000, kl_jump_at=900)
    write_run(tmp_path / "short", 100)
    builder = Builder(RunCache(tmp_path))
    _, cursor, _ = builder.full(["long", "short"], ALL)
    assert [e["run"] for e in cursor["heat"]["grad_layers"]["runs"]] == ["long", "short"]
    patches = builder.zoom(cursor, "short", 50)  # an alert of the short run
    kl = _ops(patches[F.FIGURE_IDS.index("kl")])
    lo, hi = kl[("layout", "xaxis", "range")]
    assert lo < 50 < hi and hi - lo <= 2 * 10  # a 20th of the short run (at least 10 steps each side)
    y_lo, y_hi = kl[("layout", "yaxis", "range")]
    assert kl[("layout", "yaxis", "autorange")] is False
    assert y_lo > 0.0 and y_hi < 0.03  # the data in the window, not the long run's KL jump (0.5+) after step 900
    heat = _ops(patches[F.FIGURE_IDS.index("grad_layers")])
    assert heat == {("layout", "xaxis2", "range"): [40, 60], ("layout", "xaxis2", "autorange"): False}  # short's row
    grad = _ops(patches[F.FIGURE_IDS.index("grad")])  # log axis: the range is in log10
    g_lo, g_hi = grad[("layout", "yaxis", "range")]
    assert np.log10(0.35) < g_lo < np.log10(0.4) and np.log10(0.6) < g_hi < np.log10(0.65)
    patches = builder.zoom(cursor, "long", 900)
    heat = _ops(patches[F.FIGURE_IDS.index("grad_layers")])
    assert heat[("layout", "xaxis", "range")] == [850, 950]  # a 20th of 1000 steps each side
    assert not any(loc[1].startswith("yaxis") or loc[1] == "xaxis2" for loc in heat)  # the short run's row and
    # the reversed layer axes stay as they are


def test_y_range_pads_finite_values_and_handles_log_and_nothing():
    assert y_range([np.array([1.0, np.nan, 3.0])], pad=0.0) == [1.0, 3.0]
    assert y_range([np.array([0.0, 10.0, 100.0])], log=True, pad=0.0) == [1.0, 2.0]
    assert y_range([np.array([np.nan])]) is None and y_range([]) is None
    lo, hi = y_range([np.array([2.0, 2.0])])
    assert lo < 2.0 < hi


def test_memory_figure_keeps_incomparable_measurement_on_its_own_axis():
    report = {"prediction": {"phases": {"rollout": {"weights": 2**20, "total": 2**20},
                                        "update": {"weights": 2**20, "activations": 2**21, "total": 3 * 2**20}}},
              "measured": {"phases": {"rollout": 900 * 2**20, "update": 950 * 2**20}, "method": "rss"},
              "comparable": False}
    fig = F.memory_figure(report)
    bars = [t for t in fig.data if t.type == "bar"]
    measured = [t for t in fig.data if t.type == "scatter"][0]
    assert {t.yaxis for t in bars} == {"y"} and measured.yaxis == "y2"
    assert "not comparable" in fig.layout.title.text
    report["comparable"] = True
    fig = F.memory_figure(report)
    assert {t.yaxis for t in fig.data} <= {None, "y"}  # comparable: one axis


def test_charts_offer_no_upload_to_plotlys_cloud():
    assert GRAPH_CONFIG["showSendToCloud"] is False and GRAPH_CONFIG["showEditInChartStudio"] is False
    assert GRAPH_CONFIG["displaylogo"] is False and GRAPH_CONFIG["plotlyServerURL"] == ""
    assert {"sendDataToCloud", "editInChartStudio"} <= set(GRAPH_CONFIG["modeBarButtonsToRemove"])


def test_request_logs_are_quiet_unless_verbose():
    werkzeug = logging.getLogger("werkzeug")
    before = werkzeug.level
    try:
        assert _parser().parse_args([]).verbose is False
        configure_logging(_parser().parse_args([]).verbose)
        assert not werkzeug.isEnabledFor(logging.INFO)
        configure_logging(_parser().parse_args(["--verbose"]).verbose)
        assert werkzeug.isEnabledFor(logging.INFO)
    finally:
        werkzeug.setLevel(before)


def test_placeholders_carry_chart_titles_not_internal_ids(tmp_path):
    layout = create_app(tmp_path / "empty").layout
    titles = {}

    def walk(node) -> None:
        if getattr(node, "id", None) and str(node.id).startswith("fig-") and hasattr(node, "figure"):
            titles[node.id[4:]] = node.figure["layout"]["title"]["text"]
        for child in (getattr(node, "children", None) or []) if not isinstance(
                getattr(node, "children", None), (str, int, float)) else []:
            walk(child)

    walk(layout)
    assert set(F.FIGURE_IDS) <= set(titles) and titles["kl"] == F.PANELS[0].title
    assert all(title and title != fid for fid, title in titles.items()), titles


def test_the_server_imports_pandas_before_any_request_can_see_it_half_imported(tmp_path):
    """pyarrow's column conversion imported pandas on a big run's first read, in the warm-up thread, while
    plotly's JSON encoder in a request thread took the half-imported module from ``sys.modules``: a cold
    server answered the layout request with an error ("Error loading layout"). The server imports it first."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("pandas") is None:
        pytest.skip("pandas is not installed: nothing imports it")
    script = ("import sys; from dashboard.app import create_app; before = 'pandas' in sys.modules; "
              f"create_app({str(tmp_path)!r}); print(before, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "True"]
