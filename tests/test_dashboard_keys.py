"""Every scalar, findable (key browser, pinned key charts, panels that follow the run), the chart controls
(smoothing, log, x axis) and the config diff, at the data level."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_dashboard_data import metrics, write_run
from test_dashboard_live import apply_patch

from dashboard import figures as F
from dashboard.callbacks import Builder, filter_keys, key_group, key_groups
from dashboard.data import ALL, RunCache, config_rows, flatten
from rlhf_core.runformat.run_writer import RunWriter


def tensorboard_ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing, as its scalar dashboard computes it (a loop, skipping non-finite values)."""
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight ** n))
    return out


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.6, 0.9, 0.99, 0.999])
def test_ema_is_tensorboards_debiased_smoothing(weight):
    rng = np.random.default_rng(0)
    values = rng.normal(size=20_000) * 3 + np.linspace(0, 10, 20_000)
    values[[5, 500, 9000]] = [np.nan, np.inf, -np.inf]
    got = F.ema(values, weight)
    want = np.array(tensorboard_ema(values.tolist(), weight))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert np.isnan(got[[5, 500, 9000]]).all()  # non-finite values stay out (and leave the average alone)


def test_key_filter_is_a_regex_or_else_text_and_groups_by_prefix():
    keys = ["kl/ref_k1", "kl/ref_k3", "loss/total", "lr", "reward/chosen", "src/custom(x)"]
    assert filter_keys(keys, "^kl/")[0] == ["kl/ref_k1", "kl/ref_k3"]
    assert filter_keys(keys, "K3|LOSS")[0] == ["kl/ref_k3", "loss/total"]  # case-insensitive
    matched, note = filter_keys(keys, "custom(")  # not a regex: matched as text, and said so
    assert matched == ["src/custom(x)"] and "not a regex" in note
    assert filter_keys(keys, "")[0] == keys
    assert [key_group(k) for k in keys] == ["kl", "kl", "loss", "(top level)", "reward", "src"]
    groups = key_groups(keys, {"lr"}, open_all=False)
    assert [g.children[0].children for g in groups] == ["kl (2)", "loss (1)", "(top level) (1)", "reward (1)",
                                                        "src (1)"]
    assert [g.open for g in groups] == [False, False, True, False, False]  # a pinned key's group is open
    assert groups[2].children[1].value == ["lr"]


def test_every_logged_key_is_listed_and_any_key_charts_and_follows_live(tmp_path):
    w = write_run(tmp_path / "r", 10, status=None)
    builder = Builder(RunCache(tmp_path))
    keys = builder.logged_keys(["r"], ALL)
    assert set(keys) == set(metrics(0)) and "step" not in keys and "time" not in keys
    _, cursor, _ = builder.full(["r"], ALL, "scatter")
    figs, pin_cursor = builder.key_charts(cursor, ["time/update", "grad/layer/h.1"], "scatter")
    assert [f["layout"]["title"]["text"] for f in figs] == ["time/update", "grad/layer/h.1"]
    assert figs[0]["data"][0]["x"] == list(range(10)) and pin_cursor["runs"] == {"r": 10}
    for s in range(10, 14):
        w.log(s, metrics(s))
    assert builder.key_patches(cursor, pin_cursor) is None  # the panels have not drawn those rows yet
    outputs, cursor = builder.live(cursor)
    patches, pin_cursor = builder.key_patches(cursor, pin_cursor)
    for fig, patch in zip(figs, patches):
        apply_patch(fig, patch)
    assert figs[0]["data"][0]["x"] == list(range(14)) and pin_cursor["runs"] == {"r": 14}
    assert builder.key_patches(cursor, pin_cursor) is None  # nothing twice
    w.close()


def _dpo(path, status: str | None = "finished") -> RunWriter:
    w = RunWriter(path, source="trl", tensorboard=False)
    for s in range(5):
        w.log(s, {"reward/chosen": 0.1 * s, "reward/rejected": -0.1 * s, "reward/margin": 0.2 * s,
                  "reward/accuracy": 0.6, "loss/total": 0.6, "lr": 1e-6})
    if status:
        w.close(status)
    return w


def test_panels_follow_what_the_run_logs_and_a_finished_run_says_not_logged(tmp_path):
    _dpo(tmp_path / "dpo")
    write_run(tmp_path / "ppo", 5)
    live = _dpo(tmp_path / "running", status=None)
    builder = Builder(RunCache(tmp_path))
    figs, cursor, _ = builder.full(["dpo"], ALL)
    assert {"preference", "loss", "lr"} <= set(cursor["shown"]) and "kl" in cursor["shown"]
    pref = figs[F.FIGURE_IDS.index("preference")]
    assert [t["name"] for t in pref["data"]] == ["dpo chosen", "dpo rejected", "dpo margin", "dpo accuracy"]
    kl_text = figs[F.FIGURE_IDS.index("kl")]["layout"]["annotations"][0]["text"]
    assert kl_text.startswith("not logged by this run")
    _, cursor, _ = builder.full(["ppo"], ALL)
    assert "preference" not in cursor["shown"] and "lr" not in cursor["shown"]
    figs, _, _ = builder.full(["running"], ALL)  # still being written: the key may come
    assert figs[F.FIGURE_IDS.index("kl")]["layout"]["annotations"][0]["text"].startswith("no data yet")
    live.close()


def test_chart_controls_smoothing_log_and_x_axis(tmp_path):
    write_run(tmp_path / "r", 50)
    builder = Builder(RunCache(tmp_path))
    opts = F.ChartOptions(smooth=0.9, x="step", log=frozenset({"kl"}))
    figs, cursor, _ = builder.full(["r"], ALL, "scatter", opts)
    kl = figs[F.FIGURE_IDS.index("kl")]
    assert cursor["traces"]["kl"] == [["r", 0, "raw"], ["r", 0, "ema"], ["r", 1, "raw"], ["r", 1, "ema"]]
    raw, smooth = kl["data"][0], kl["data"][1]
    assert raw["opacity"] == 0.25 and raw["showlegend"] is False and "opacity" not in smooth
    np.testing.assert_allclose(smooth["y"], tensorboard_ema(raw["y"], 0.9))
    assert kl["layout"]["yaxis"]["type"] == "log" and figs[F.FIGURE_IDS.index("grad")]["layout"]["yaxis"].get(
        "type") != "log"  # log is per chart: grad toggled back to linear
    x = kl["layout"]["xaxis"]
    assert x["title"]["text"] == "step" and x["tickformat"] == "d" and x["unifiedhovertitle"]["text"] == "step %{x}"
    assert kl["layout"]["yaxis"]["title"]["text"] == "KL (nats/token)"
    for mode, kind in (("wall", "date"), ("relative", None)):
        figs, _, _ = builder.full(["r"], ALL, "scatter", F.ChartOptions(x=mode))
        kl = figs[F.FIGURE_IDS.index("kl")]
        assert kl["layout"]["xaxis"].get("type") == kind and kl["layout"]["xaxis"]["title"]["text"] == F.X_TITLES[mode]
        xs = np.array(kl["data"][0]["x"])
        assert np.all(np.diff(xs) >= 0)
        if mode == "relative":
            assert xs[0] == 0.0 and xs[-1] < 60
        else:
            assert xs[0] > 1.5e12  # ms since the epoch
    assert F.ChartOptions.of({"smooth": 2, "x": "bogus", "log": "x"}) == F.ChartOptions()


def test_smoothed_traces_follow_live_with_the_ema_of_every_row(tmp_path):
    w = write_run(tmp_path / "r", 10, status=None)
    builder = Builder(RunCache(tmp_path))
    figs, cursor, _ = builder.full(["r"], ALL, "scatter", F.ChartOptions(smooth=0.6))
    kl = figs[F.FIGURE_IDS.index("kl")]
    for s in range(10, 20):
        w.log(s, metrics(s))
    outputs, cursor = builder.live(cursor)
    apply_patch(kl, outputs[F.FIGURE_IDS.index("kl")])
    want = tensorboard_ema([metrics(s)["kl/ref_k3"] for s in range(20)], 0.6)
    np.testing.assert_allclose(kl["data"][1]["y"], want)
    assert kl["data"][0]["x"] == kl["data"][1]["x"] == list(range(20))
    w.close()


def test_colours_never_repeat_for_many_runs():
    colours = [F.colour_of(i) for i in range(40)]
    assert len(set(colours)) == 40 and colours[:8] == list(F.PALETTE)
    rgb = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colours], dtype=float)
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(40) * 1e9
    assert dist.min() > 20  # no two indistinguishable


def test_config_diff_of_two_runs_highlights_what_changed():
    a = {"source": "rlhf_core", "world_size": 1, "config": {"lr": 1e-5, "ppo": {"clip": 0.2, "epochs": 4}},
         "env": {"torch": "2.5.0", "device": "cpu", "git_commit": "abc"}}
    b = {"source": "rlhf_core", "world_size": 1, "config": {"lr": 3e-5, "ppo": {"clip": 0.2}, "seed": 1},
         "env": {"torch": "2.5.0", "device": "cuda", "git_commit": "abc"}}
    rows = {(r["section"], r["setting"]): r for r in config_rows({"a": a, "b": b})}
    assert rows[("config", "lr")]["differs"] == "yes" and rows[("config", "lr")]["b"] == "3e-05"
    assert rows[("config", "ppo.clip")]["differs"] == ""
    assert rows[("config", "ppo.epochs")]["b"] == "(not set)" and rows[("config", "ppo.epochs")]["differs"] == "yes"
    assert rows[("env", "device")]["differs"] == "yes" and rows[("env", "git_commit")]["differs"] == ""
    assert rows[("run", "source")]["a"] == "rlhf_core"
    assert flatten({"a": {"b": {"c": 1}}, "d": []}) == {"a.b.c": 1, "d": []}


def test_csv_of_a_chart_and_of_a_runs_metrics_stays_under_the_root(tmp_path):
    import csv
    import io

    from dashboard.app import create_app

    write_run(tmp_path / "runs" / "a", 5)
    write_run(tmp_path / "runs" / "b", 3)
    client = create_app(tmp_path / "runs").server.test_client()
    resp = client.get("/download/chart.csv?chart=kl&rank=all&run=a&run=b")
    assert resp.status_code == 200 and "attachment" in resp.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(resp.data.decode())))
    assert rows[0] == ["run", "step", "time", "kl/ref_k3", "kl/ref_k1"]
    assert [r[:2] for r in rows[1:]] == [["a", str(s)] for s in range(5)] + [["b", str(s)] for s in range(3)]
    assert float(rows[1][3]) == metrics(0)["kl/ref_k3"]
    key = list(csv.reader(io.StringIO(client.get("/download/chart.csv?chart=key:time/update&run=a").data.decode())))
    assert key[0][-1] == "time/update" and len(key) == 6
    full = list(csv.reader(io.StringIO(client.get("/download/metrics.csv?run=b").data.decode())))
    assert set(full[0][3:]) == set(metrics(0)) and len(full) == 4
    for bad in ("/download/metrics.csv?run=../x", "/download/metrics.csv", "/download/chart.csv?chart=nope&run=a",
                "/download/other.csv?run=a"):
        assert client.get(bad).status_code == 404, bad
