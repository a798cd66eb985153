"""Callbacks: run list, full render on selection, live tailing with ``Patch``, alerts, zoom, profiler, memory.

The client keeps a ``cursor`` (rows already drawn per run, the run's generation and the trace order), so a
poll sends only new points. Every callback is guarded: a bad file or a failing builder becomes a one-line
message in the page, never a traceback or a dead page.
"""
from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import numpy as np
from dash import ALL as ALL_IDS
from dash import Dash, Input, Output, Patch, State, ctx, dcc, html, no_update
from dash.exceptions import MissingCallbackContextException, PreventUpdate

from rlhf_core.runformat.run_reader import RunError
from rlhf_core.runformat.timeline import parse_steps

from . import figures as F
from .data import ALL, Alert, RunCache, RunData, config_rows, join_problems, sample_rows, serving
from .layout import CARD, GRAPH_CONFIG, chart_tools, log_toggle
from .whatif import NO_DEPLOYMENT, what_if, whatif_figure
from .whatif import summary as whatif_summary

log = logging.getLogger("rlhfkit.dashboard")

RECORD_KEYS = {"step", "time", "rank", "nonfinite"}  # fields of every record, not metrics
MAX_BROWSER_KEYS = 2000  # keys listed in the key browser at once (a filter narrows them)
REBUILD_ROWS = 5000  # after this many live-appended rows a panel is redrawn (re-downsampled) in full
FIG_OUTPUTS = [f"fig-{fid}" for fid in F.FIGURE_IDS]


def guarded(name: str, n_outputs: int) -> Callable:
    """Turn any failure of a callback into a message in ``err-<name>`` (its last output); the detectors wait
    while it runs (:func:`dashboard.data.serving`)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            try:
                with serving():
                    return fn(*args)
            except PreventUpdate:
                raise
            except RunError as err:
                message = str(err)
            except Exception as err:  # the page must survive any bad input (logged with its traceback)
                log.exception("dashboard callback %s failed", name)
                message = f"{name} view failed: {type(err).__name__}: {err}"
            return [*_unchanged(n_outputs - 1), html.Div(f"error: {message}", className="error")]

        return wrapper

    return deco


def _unchanged(n: int) -> list[Any]:
    """``no_update`` for the first ``n`` outputs of the running callback; a list of them for a wildcard
    output (Dash refuses a bare ``no_update`` there)."""
    try:
        specs = list(ctx.outputs_list)[:n]
    except MissingCallbackContextException:  # called outside a callback (tests): plain outputs
        specs = []
    if len(specs) != n:
        return [no_update] * n
    return [[no_update] * len(s) if isinstance(s, list) else no_update for s in specs]


def _started(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    steps = row["steps"] if row["steps"] is not None else "(open to count)"
    alerts = row["alerts"] if row["alerts"] is not None else ""
    return {"id": row["id"], "source": row["source"], "status": row["status"], "steps": steps,
            "started": _started(row["start_time"]), "alerts": alerts}


def _url_runs(search: str | None) -> list[str]:
    return [r for r in parse_qs((search or "").lstrip("?")).get("run", []) if r]


def _problem_list(items: Sequence[str]) -> Any:
    return html.Ul([html.Li(p, className="problem") for p in join_problems(items)]) if items else ""


@contextmanager
def holding(runs: Sequence[RunData]) -> Iterator[None]:
    """Hold the locks of ``runs`` (in key order, so two callbacks never wait on each other) while their views
    are read: the alerts and run-list callbacks refresh the same runs from other threads, and a view read
    across one of their appends gave x and y of different lengths and lost the rows in between."""
    with ExitStack() as stack:
        for data in sorted(runs, key=lambda d: d.key):
            stack.enter_context(data.lock)
        yield


class Builder:
    """Builds full figures and patches for a selection; shared by the render and live callbacks."""

    def __init__(self, cache: RunCache):
        self.cache = cache

    def load(self, selection: Sequence[str]) -> tuple[list[RunData], list[str]]:
        runs, problems = [], []
        for key in selection:
            try:
                runs.append(self.cache.get(key))
            except RunError as err:
                problems.append(str(err))
        return runs, problems

    @staticmethod
    def series(runs: Sequence[RunData], rank: Any) -> list[F.Series]:
        out = []
        for i, data in enumerate(runs):
            view = data.view(rank)
            label = data.key if rank == ALL or rank not in data.views else f"{data.key}[rank {rank}]"
            config = data.meta.get("config")
            config = config if isinstance(config, dict) else {}
            # the layer order of a rank's records (rank 0's file is read for it only where layers are logged)
            layered = view is data.views[ALL] and data.rank_ids and any(view.prefixed(h.prefix) for h in F.HEATMAPS)
            order = data.view(data.rank_ids[0]) if layered else None
            out.append(F.Series(data.key, label, F.colour_of(i), view, config, order=order,
                                running=data.meta.get("status", "running") == "running"))
        return out

    @staticmethod
    def alerts_of(runs: Sequence[RunData], start: bool) -> tuple[dict[str, list[Alert]], list[str]]:
        """Alerts per run and progress notes; ``start`` launches the detectors on rows not checked yet."""
        out, notes = {}, []
        for d in runs:
            out[d.key], progress = d.alerts(start=start)
            if progress:
                notes.append(f"{d.key}: {progress}")
        return out, notes

    @staticmethod
    def prepare(data: RunData, rank: Any = ALL) -> None:
        """Fill the columns the figures read, in one pass (under the run's lock: once, whoever asks first)."""
        with data.lock:
            view = data.view(rank)
            view.prefetch(F.needed_keys(view))

    def full(self, selection: Sequence[str], rank: Any, trace_type: str = "scattergl",
             opts: F.ChartOptions | None = None) -> tuple[list[Any], dict[str, Any], list[str]]:
        """Every stability figure, the new cursor and the problems of the selected runs."""
        runs, problems = self.load(selection)
        with holding(runs):
            figs, cursor = self._full_figures(selection, runs, rank, trace_type, opts or F.ChartOptions())
        for d in runs:
            problems += d.problems()
        return figs, cursor, problems

    def _full_figures(self, selection: Sequence[str], runs: list[RunData], rank: Any, trace_type: str,
                      opts: F.ChartOptions) -> tuple[list[Any], dict[str, Any]]:
        """The figures and cursor of :meth:`full`, built while the runs' locks are held."""
        series = self.series(runs, rank)
        for data in runs:
            self.prepare(data, rank)
        alerts, _ = self.alerts_of(runs, start=False)  # the detectors start after the charts are drawn
        uirev = "|".join(selection) + f"|{rank}|{opts.x}"
        figs, traces = [], {}
        for panel in F.PANELS:
            fig, trace_map = F.line_figure(panel, series, alerts, uirev, trace_type, opts)
            figs.append(fig)
            traces[panel.id] = trace_map
        heat_maps = {}
        for heat in F.HEATMAPS:
            fig, heat_map = F.heatmap_figure(heat, series, alerts, uirev)
            figs.append(fig)
            heat_maps[heat.id] = heat_map
        cursor = {
            "sel": list(selection), "rank": rank, "render": uuid.uuid4().hex[:8], "appended": 0, "trace": trace_type,
            "opts": opts.as_dict(), "shown": [p.id for p in F.PANELS if not p.optional or any(
                k in s.view.keys for s in series for k in p.keys)],
            "runs": {s.key: {"n": s.n, "gen": d.start_time} for s, d in zip(series, runs)},
            "traces": traces, "heat": heat_maps,
            "marks": [list(m) for m in sorted({(k, a.rule, a.step) for k, items in alerts.items() for a in items
                                               if a.step is not None})],
        }
        return figs, cursor

    def live(self, cursor: dict[str, Any]) -> tuple[list[Any], dict[str, Any]] | None:
        """Patches with the rows written since the cursor, a full rebuild when needed, None when idle."""
        runs, _ = self.load(cursor["sel"])
        with holding(runs):
            return self._live_outputs(cursor, runs)

    def _live_outputs(self, cursor: dict[str, Any], runs: list[RunData]
                      ) -> tuple[list[Any], dict[str, Any]] | None:
        """:meth:`live` with the runs' locks held: every patch covers rows ``cursor n:s.n``, and the new
        cursor says ``s.n``, so no row is skipped or sent twice whatever other threads append meanwhile."""
        series = {s.key: s for s in self.series(runs, cursor["rank"])}
        gens = {d.key: d.start_time for d in runs}
        starts = {}
        new_rows = 0
        for key, seen in cursor["runs"].items():
            s = series.get(key)
            if s is None:
                continue
            if gens.get(key) != seen["gen"] or s.n < seen["n"]:
                return self._rebuild(cursor)
            starts[key] = seen["n"]
            new_rows += s.n - seen["n"]
        if not new_rows:
            return None
        if cursor.get("appended", 0) + new_rows > REBUILD_ROWS:
            return self._rebuild(cursor)
        views = {k: s.view for k, s in series.items()}
        stops = {k: s.n for k, s in series.items()}
        opts = F.ChartOptions.of(cursor.get("opts"))
        outputs: list[Any] = []
        for panel in F.PANELS:
            patch, _ = F.line_patch(panel, cursor["traces"][panel.id], views, starts, stops, opts)
            outputs.append(patch if patch is not None else no_update)
        orders = {k: s.order for k, s in series.items()}
        for heat in F.HEATMAPS:
            patch, added = F.heatmap_patch(heat, cursor["heat"][heat.id], views, starts, stops, orders)
            if added < 0:
                return self._rebuild(cursor)
            outputs.append(patch if patch is not None else no_update)
        new_cursor = dict(cursor)
        new_cursor["runs"] = {k: {"n": series[k].n, "gen": gens[k]} for k in cursor["runs"] if k in series}
        new_cursor["appended"] = cursor.get("appended", 0) + new_rows
        return outputs, new_cursor

    def logged_keys(self, selection: Sequence[str], rank: Any) -> list[str]:
        """Every metric key the selected runs logged (in the chosen rank's view), sorted."""
        runs, _ = self.load(selection)
        keys: set[str] = set()
        with holding(runs):
            for s in self.series(runs, rank):
                keys.update(s.view.keys)
        return sorted(keys - RECORD_KEYS)

    def key_charts(self, cursor: dict[str, Any], keys: Sequence[str], trace_type: str
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Full figures of the pinned ``keys`` over the cursor's runs, at the cursor's rows (so the live
        patches continue exactly where the panels are), and their own cursor."""
        opts = F.ChartOptions.of(cursor.get("opts"))
        runs, _ = self.load(cursor["sel"])
        figs, traces = [], {}
        with holding(runs):
            series = self.series(runs, cursor["rank"])
            for s in series:
                s.n = min(s.n, cursor["runs"].get(s.key, {}).get("n", s.n))
            alerts, _ = self.alerts_of(runs, start=False)
            for key in keys:
                fig, trace_map = F.line_figure(F.key_panel(key), series, alerts, f"{cursor['render']}|{key}",
                                               trace_type, opts)
                figs.append(fig)
                traces[key] = trace_map
        pin_cursor = {"render": cursor["render"], "keys": list(keys), "traces": traces,
                      "runs": {s.key: s.n for s in series}}
        return figs, pin_cursor

    def key_patches(self, cursor: dict[str, Any], pin_cursor: dict[str, Any]
                    ) -> tuple[list[Any], dict[str, Any]] | None:
        """Patches of the pinned charts up to the rows the panels have drawn (``cursor``); None if idle."""
        runs, _ = self.load(cursor["sel"])
        opts = F.ChartOptions.of(cursor.get("opts"))
        stops = {k: v["n"] for k, v in cursor["runs"].items()}
        starts = dict(pin_cursor["runs"])
        if all(starts.get(k, 0) >= n for k, n in stops.items()):
            return None
        with holding(runs):
            views = {s.key: s.view for s in self.series(runs, cursor["rank"])}
            outputs = []
            for key in pin_cursor["keys"]:
                patch, _ = F.line_patch(F.key_panel(key), pin_cursor["traces"][key], views, starts, stops, opts)
                outputs.append(patch if patch is not None else no_update)
        return outputs, {**pin_cursor, "runs": {k: max(starts.get(k, 0), n) for k, n in stops.items()}}

    def zoom(self, cursor: dict[str, Any], run_key: str, step: int) -> list[Any]:
        """Patches zooming to ``step`` of ``run_key``'s alert: the window is a 20th of that run (not of the
        longest selected run); line charts rescale y to the data inside the window; in a heatmap only that
        run's row zooms (another, shorter run's heatmap went blank)."""
        n = (cursor.get("runs") or {}).get(run_key, {}).get("n", 100)
        half = max(ZOOM_MIN_HALF, n // ZOOM_FRACTION)
        lo, hi = step - half, step + half
        opts = F.ChartOptions.of(cursor.get("opts"))
        runs, _ = self.load(cursor["sel"])
        out: list[Any] = []
        with holding(runs):
            series = self.series(runs, cursor["rank"])
            owner = next((s for s in series if s.key == run_key), None)
            x_lo = F.x_at_step(owner.view, lo, opts.x, owner.n) if owner else None
            x_hi = F.x_at_step(owner.view, hi, opts.x, owner.n) if owner else None
            for panel in F.PANELS:
                ranges = {}
                for r in range(1, panel.rows + 1):
                    values = []
                    for s in series:
                        for line in panel.lines:
                            if line.row == r:
                                x, y = line.values(s.view, 0, s.n)
                                if opts.smooth:
                                    y = F.ema(y, opts.smooth)
                                values.append(y[(x >= lo) & (x <= hi)])
                    ranges["yaxis" if r == 1 else f"yaxis{r}"] = y_range(values, log=panel.id in opts.log and r == 1)
                out.append(_zoom_patch(panel.id, x_lo, x_hi, ranges) if x_lo is not None else no_update)
        for heat in F.HEATMAPS:
            shown = [e.get("run") for e in ((cursor.get("heat") or {}).get(heat.id) or {}).get("runs", [])]
            out.append(_heat_zoom_patch({shown.index(run_key): (lo, hi)}) if run_key in shown else no_update)
        return out

    def _rebuild(self, cursor: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        figs, new_cursor, _ = self.full(cursor["sel"], cursor["rank"], cursor.get("trace", "scattergl"),
                                        F.ChartOptions.of(cursor.get("opts")))
        return figs, new_cursor


def _alert_item(i: int, run_key: str, a: Alert, multi: bool) -> html.Button:
    colour = F.SEVERITY_COLOURS.get(a.severity, "#7f7f7f")
    where = f"step {a.step}" if a.step is not None else "no step"
    head: list[Any] = [html.B(a.rule, style={"color": colour}), f" {a.severity} · {where}"]
    if a.rank is not None:
        head.append(f" · rank {a.rank}")
    if multi:
        head.append(f" · {run_key}")
    body = [html.Div(head), html.Div(a.message)]
    if a.suggestion:
        body.append(html.Div(f"→ {a.suggestion}", style={"color": "#555"}))
    return html.Button(body, id={"type": "alert", "index": i}, n_clicks=0, className="alert-item",
                       title="zoom the charts to this step",
                       style={"display": "block", "width": "100%", "textAlign": "left", "margin": "4px 0",
                              "padding": "4px 6px", "border": f"1px solid {colour}", "borderLeft":
                              f"5px solid {colour}", "background": "white", "cursor": "pointer",
                              "fontSize": "12px"})


ZOOM_MIN_HALF = 10  # steps either side of an alert, at least
ZOOM_FRACTION = 20  # ... or a 20th of the alert's run


def _zoom_patch(fig_id: str, lo: float | None, hi: float | None,
                y_ranges: dict[str, list[float] | None] | None = None) -> Patch:
    """x range ``[lo, hi]`` (None: autorange) on every x axis of a chart, and each y axis either at its
    range in ``y_ranges`` (the data inside the window) or autoranged; a heatmap's y axis (its layers,
    reversed) is left alone."""
    patch = Patch()
    panel = next((p for p in F.PANELS if p.id == fig_id), None)
    rows = panel.rows if panel else 1
    for r in range(1, rows + 1):
        suffix = "" if r == 1 else str(r)
        if lo is None:
            patch["layout"][f"xaxis{suffix}"]["autorange"] = True
        else:
            patch["layout"][f"xaxis{suffix}"]["range"] = [lo, hi]
            patch["layout"][f"xaxis{suffix}"]["autorange"] = False
        if panel is None:
            continue
        wanted = (y_ranges or {}).get(f"yaxis{suffix}")
        if wanted is None:
            patch["layout"][f"yaxis{suffix}"]["autorange"] = True
        else:
            patch["layout"][f"yaxis{suffix}"]["range"] = wanted
            patch["layout"][f"yaxis{suffix}"]["autorange"] = False
    return patch


def _heat_zoom_patch(ranges: dict[int, tuple[float, float] | None]) -> Patch:
    """Heatmap rows (by run index) to an x range (None: autorange); the layer axes stay as they are."""
    patch = Patch()
    for index, window in ranges.items():
        axis = patch["layout"][f"xaxis{F.heat_axes(index)}"]
        if window is None:
            axis["autorange"] = True
        else:
            axis["range"] = list(window)
            axis["autorange"] = False
    return patch


def y_range(values: Sequence[np.ndarray], log: bool = False, pad: float = 0.06) -> list[float] | None:
    """A y range around the finite values (positive ones on a log axis, in log10 as plotly wants), padded;
    None when there are none."""
    finite = [v[np.isfinite(v) & ((v > 0) if log else True)] for v in values]
    finite = [v for v in finite if len(v)]
    if not finite:
        return None
    lo, hi = min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)
    if log:
        lo, hi = np.log10(lo), np.log10(hi)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    return [float(lo - pad * span), float(hi + pad * span)]


# Runs in the browser: WebGL where it has a GPU, SVG where WebGL is software-rendered (SwiftShader, llvmpipe)
# or missing; there Scattergl costs seconds per page while downsampled SVG traces draw in a fraction of that.
# Detected once, as the page loads (~0.1 s to create a software WebGL context here), and read by the render as a
# State: as an Input it fired the render before any run was selected, a request that only declined and held
# the run list's request (so the selection, so the charts) back by its round trip.
DETECT_RENDER_JS = """
function(_) {
  try {
    const gl = document.createElement('canvas').getContext('webgl');
    if (!gl) { return 'scatter'; }
    const info = gl.getExtension('WEBGL_debug_renderer_info');
    const name = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
    const lose = gl.getExtension('WEBGL_lose_context');
    if (lose) { lose.loseContext(); }
    return /swiftshader|llvmpipe|softpipe|software|basic render/i.test(name) ? 'scatter' : 'scattergl';
  } catch (e) {
    return 'scatter';
  }
}
"""


def register(app: Dash, cache: RunCache, render: str = "auto") -> Builder:
    """Attach every callback of the page to ``app``; ``render`` is auto, scattergl or scatter."""
    builder = Builder(cache)
    app.clientside_callback(DETECT_RENDER_JS, Output("trace-type", "data"), Input("url", "pathname"))
    fig_out = [Output(f, "figure", allow_duplicate=True) for f in FIG_OUTPUTS]

    @app.callback(
        Output("run-table", "data"), Output("run-table", "selected_rows"), Output("list-messages", "children"),
        Output("selection", "data", allow_duplicate=True), Output("err-list", "children"),
        Input("url", "search"), Input("list-interval", "n_intervals"),
        State("selection", "data"), State("run-table", "data"), State("run-table", "selected_rows"),
        prevent_initial_call="initial_duplicate",
    )
    @guarded("list", 5)
    def list_runs(search, _n, selection, old_rows, old_selected):
        rows = [_table_row(r) for r in cache.listing()]
        ids = [r["id"] for r in rows]
        wanted = _url_runs(search)
        problems = []
        for w in wanted:
            if w not in ids:
                try:
                    cache.get(w)
                    problems.append(f"run {w!r} is not in the run list of {cache.root}")
                except RunError as err:
                    problems.append(str(err))
        chosen = not isinstance(selection, list) or (not selection and not old_rows and rows and not wanted)
        if chosen:
            selection = [w for w in wanted if w in ids] if wanted else ids[:1]
            cache.warm(selection, builder.prepare)
        selected = [ids.index(k) for k in selection if k in ids]
        data_out = rows if rows != old_rows else no_update
        sel_out = selected if selected != (old_selected or []) or data_out is not no_update else no_update
        # A chosen selection goes to the store at once (the table's select callback then finds it there): the
        # charts start one round trip earlier. An empty one must be set here too: it never changes the table's
        # selected rows, so nothing would render and the panels would stay "loading...".
        store_out: Any = selection if chosen else no_update
        if not rows:
            problems.append(f"no runs under {cache.root} yet (a run is a folder with meta.json)")
        return data_out, sel_out, _problem_list(problems), store_out, ""

    # The table's ticked rows as the selection, in the browser (no round trip per click); runs stay in the
    # order they were selected, so the first-selected run stays primary. Until the run list has chosen
    # (``current`` not a list yet) an empty table changes nothing.
    app.clientside_callback(
        """
        function(selected, rows, current) {
            const nothing = window.dash_clientside.no_update;
            if (!Array.isArray(rows) || !Array.isArray(selected)) { return nothing; }
            const ticked = selected.filter(i => i >= 0 && i < rows.length).map(i => rows[i].id);
            if (!Array.isArray(current) && !ticked.length) { return nothing; }
            const previous = Array.isArray(current) ? current.filter(k => ticked.includes(k)) : [];
            const ordered = previous.concat(ticked.filter(k => !previous.includes(k)));
            if (Array.isArray(current) && ordered.length === current.length
                    && ordered.every((k, i) => k === current[i])) { return nothing; }
            return ordered;
        }
        """,
        Output("selection", "data"),
        Input("run-table", "selected_rows"), State("run-table", "data"), State("selection", "data"),
        prevent_initial_call=True,
    )

    optional = [p.id for p in F.PANELS if p.optional]

    @app.callback(
        *[Output(f, "figure") for f in FIG_OUTPUTS],
        *[Output(f"card-{pid}", "style") for pid in optional],
        Output("cursor", "data"), Output("run-messages", "children"), Output("rank", "options"),
        Output("err-render", "children"),
        Input("selection", "data"), Input("rank", "value"), Input("smoothing", "value"), Input("x-mode", "value"),
        State("trace-type", "data"), State("log-charts", "data"),
        prevent_initial_call=True,
    )
    @guarded("render", len(FIG_OUTPUTS) + len(optional) + 4)
    def render_all(selection, rank, smoothing, x_mode, detected, log_charts):
        if not isinstance(selection, list):
            raise PreventUpdate
        trace_type = render if render != "auto" else detected if detected in ("scatter", "scattergl") else "scatter"
        rank = _rank_value(rank)
        opts = chart_options(smoothing, x_mode, log_charts)
        figs, cursor, problems = builder.full(selection, rank, trace_type, opts)
        styles = [CARD if pid in cursor["shown"] else {**CARD, "display": "none"} for pid in optional]
        options = [{"label": "all ranks (mean)", "value": "all"}]
        primary = cache.peek(selection[0]) if selection else None
        if primary is not None:
            options += [{"label": f"rank {r}", "value": str(r)} for r in primary.rank_ids]
        return (*figs, *styles, cursor, _problem_list(problems), options, "")

    @app.callback(
        *fig_out, Output("cursor", "data", allow_duplicate=True), Output("live-status", "children"),
        Output("err-live", "children"),
        Input("live-interval", "n_intervals"),
        State("cursor", "data"), State("selection", "data"), State("rank", "value"), State("follow", "value"),
        State("smoothing", "value"), State("x-mode", "value"), State("log-charts", "data"),
        prevent_initial_call=True,
    )
    @guarded("live", len(FIG_OUTPUTS) + 3)
    def live(_n, cursor, selection, rank, follow, smoothing, x_mode, log_charts):
        if not cursor or "on" not in (follow or []) or cursor.get("sel") != selection \
                or cursor.get("rank") != _rank_value(rank):
            raise PreventUpdate
        opts = chart_options(smoothing, x_mode, log_charts)
        drawn = F.ChartOptions.of(cursor.get("opts"))
        if (drawn.smooth, drawn.x) != (opts.smooth, opts.x):
            raise PreventUpdate  # the render of the new options is on its way
        cursor = {**cursor, "opts": opts.as_dict()}  # a rebuild keeps the log toggles
        result = builder.live(cursor)
        if result is None:
            raise PreventUpdate
        outputs, new_cursor = result
        rows = sum(r["n"] for r in new_cursor["runs"].values())
        status = f"live: {rows} rows drawn, last update {time.strftime('%H:%M:%S')}"
        return (*outputs, new_cursor, status, "")

    @app.callback(
        Output("log-charts", "data"), *fig_out,
        Output({"type": "keyfig", "key": ALL_IDS}, "figure", allow_duplicate=True), Output("err-log", "children"),
        Input({"type": "logy", "chart": ALL_IDS}, "value"), State("log-charts", "data"),
        prevent_initial_call=True,
    )
    @guarded("log", len(FIG_OUTPUTS) + 3)
    def toggle_log(_values, current):
        """One chart's y axis between log and linear (a Patch of that chart only: no redraw of the data)."""
        logs = {i["id"]["chart"] for i in ctx.inputs_list[0] if "log" in (i.get("value") or [])}
        if set(current or []) == logs:
            raise PreventUpdate
        changed = logs ^ set(current or [])
        fig_patches = [_log_patch(fid in logs) if fid in changed else no_update for fid in F.FIGURE_IDS]
        key_ids = [o["id"]["key"] for o in ctx.outputs_list[-2]]
        key_patches = [_log_patch(f"key:{k}" in logs) if f"key:{k}" in changed else no_update for k in key_ids]
        return sorted(logs), *fig_patches, key_patches, ""

    @app.callback(
        Output("alerts-panel", "children"), Output("alert-store", "data"), *fig_out,
        Output("err-alerts", "children"),
        Input("cursor", "data"), Input("live-interval", "n_intervals"), State("alert-store", "data"),
        prevent_initial_call=True,
    )
    @guarded("alerts", len(FIG_OUTPUTS) + 3)
    def alerts(cursor, _n, store):
        if not cursor:
            raise PreventUpdate
        runs, _ = builder.load(cursor["sel"])
        if not runs:  # nothing selected is not "no alerts"
            empty = {"alerts": [], "render": cursor.get("render"), "notes": [], "drawn": None}
            if store == empty:
                raise PreventUpdate
            return (html.Div("select a run to see its alerts", style={"color": "#666"}), empty,
                    *[no_update] * len(FIG_OUTPUTS), "")
        by_run, notes = Builder.alerts_of(runs, start=True)
        flat = [{"run": k, **a.as_dict()} for k, items in by_run.items() for a in items]
        state = {"alerts": flat, "render": cursor.get("render"), "notes": notes, "drawn": (store or {}).get("drawn")}
        if store == state:
            raise PreventUpdate
        multi = len(runs) > 1
        items = [_alert_item(i, a["run"], Alert(**{k: v for k, v in a.items() if k != "run"}), multi)
                 for i, a in enumerate(flat)]
        panel: list[html.Div | html.Button] = [html.Div(n, className="alert-progress", style={"color": "#666"})
                                               for n in notes]
        panel += items or [html.Div("no alerts" + (" so far" if notes else ""), style={"color": "#2ca02c"})]
        # Redraw the alert lines once the detectors have caught up (every patch redraws every chart).
        drawn = (store or {}).get("drawn")
        if not drawn or drawn[0] != cursor.get("render"):
            drawn = [cursor.get("render"), cursor.get("marks", [])]
        marks = sorted({(a["run"], a["rule"], a["step"]) for a in flat if a["step"] is not None})
        key = [cursor.get("render"), [list(m) for m in marks]]
        state["drawn"] = drawn
        if notes or key == drawn:
            return (panel, state, *[no_update] * len(FIG_OUTPUTS), "")
        state["drawn"] = key
        patches = []
        with holding(runs):
            series = Builder.series(runs, cursor["rank"])
            opts = F.ChartOptions.of(cursor.get("opts"))
            for panel_spec in F.PANELS:
                p = Patch()
                logged = any(k in s.view.keys for s in series for k in panel_spec.keys)
                p["layout"]["shapes"] = F.panel_shapes(panel_spec, series, by_run, opts.x) if logged else []
                patches.append(p)
        for heat in F.HEATMAPS:
            p = Patch()
            p["layout"]["shapes"] = F.heatmap_shapes((cursor.get("heat") or {}).get(heat.id) or {}, series, by_run)
            patches.append(p)
        return (panel, state, *patches, "")

    @app.callback(
        *fig_out, Output("err-zoom", "children"),
        Input({"type": "alert", "index": ALL_IDS}, "n_clicks"), Input("reset-zoom", "n_clicks"),
        State("alert-store", "data"), State("cursor", "data"), State("log-charts", "data"),
        prevent_initial_call=True,
    )
    @guarded("zoom", len(FIG_OUTPUTS) + 1)
    def zoom(_clicks, _reset, store, cursor, log_charts):
        trigger = ctx.triggered_id
        if trigger is None or not ctx.triggered or not ctx.triggered[0].get("value"):
            raise PreventUpdate
        if trigger == "reset-zoom":
            heat = (cursor or {}).get("heat") or {}
            return (*[_zoom_patch(p.id, None, None) for p in F.PANELS],
                    *[_heat_zoom_patch(dict.fromkeys(range(max(1, len((heat.get(h.id) or {}).get("runs") or []))),
                                                     None)) for h in F.HEATMAPS], "")
        alerts = (store or {}).get("alerts", [])
        index = trigger["index"]
        if index >= len(alerts) or alerts[index].get("step") is None or not cursor:
            raise PreventUpdate
        opts = {**F.ChartOptions.of(cursor.get("opts")).as_dict(), "log": list(log_charts or [])}
        return (*builder.zoom({**cursor, "opts": opts}, alerts[index]["run"], alerts[index]["step"]), "")

    @app.callback(
        Output({"type": "csv", "chart": ALL_IDS}, "href"), Output("metric-downloads", "children"),
        Input("cursor", "data"), State({"type": "csv", "chart": ALL_IDS}, "href"),
        prevent_initial_call=True,
    )
    def downloads(cursor, shown):
        """CSV links of every chart and of each selected run's metrics, for the drawn selection and rank
        (unchanged by live polls: only a new selection or rank rewrites them)."""
        ids = [o["id"]["chart"] for o in ctx.outputs_list[0]]
        if not cursor or not cursor.get("sel"):
            return [""] * len(ids), ""
        links = [csv_href("chart", cursor["sel"], cursor["rank"], chart) for chart in ids]
        if links == shown:
            raise PreventUpdate
        runs = [html.A(f"{run} metrics (CSV)", href=csv_href("metrics", [run], cursor["rank"]), download="",
                       style={"marginRight": "10px"}) for run in cursor["sel"]]
        return links, [html.Span("download: "), *runs]

    # The URL says what is selected (copy it to share the view; reload keeps it).
    app.clientside_callback(
        """
        function(sel, search) {
            const nothing = window.dash_clientside.no_update;
            if (!Array.isArray(sel)) { return nothing; }
            // a linked run that is not in the list (refused, missing) stays in the URL, with its message
            const linked = new URLSearchParams(search || '').getAll('run').filter(r => sel.includes(r));
            if (linked.join('\n') === sel.join('\n')) { return nothing; }
            return sel.length ? '?' + sel.map(r => 'run=' + encodeURIComponent(r)).join('&') : '';
        }
        """,
        Output("url", "search"), Input("selection", "data"), State("url", "search"),
    )

    @app.callback(
        Output("key-browser", "children"), Output("key-filter-note", "children"), Output("key-sig", "data"),
        Output("err-keys", "children"),
        Input("selection", "data"), Input("rank", "value"), Input("key-filter", "value"),
        Input("list-interval", "n_intervals"), State("pinned", "data"), State("key-sig", "data"),
        prevent_initial_call=True,
    )
    @guarded("keys", 4)
    def key_browser(selection, rank, pattern, _n, pinned, shown):
        """The key browser: every logged key grouped by prefix (as TensorBoard groups its scalars). Redrawn
        only when the keys or the filter change, so a poll does not close the groups the user opened. It
        follows the selection, not the charts' render: the two requests run side by side on a first load
        (after the charts it cost a round trip and the browser's drawing of every chart first)."""
        if not selection:
            if shown == []:
                raise PreventUpdate
            return html.Div("select a run", style={"color": "#666"}), "", [], ""
        keys = builder.logged_keys(selection, _rank_value(rank))
        matched, note = filter_keys(keys, pattern)
        sig = [matched, pattern or ""]
        if sig == shown:
            raise PreventUpdate
        children: Any = key_groups(matched[:MAX_BROWSER_KEYS], set(pinned or []), bool(pattern))
        if len(matched) > MAX_BROWSER_KEYS:
            note = ((note + " " if note else "")
                    + f"showing {MAX_BROWSER_KEYS} of {len(matched)} keys: filter to narrow")
        if not matched:
            children = html.Div(f"no key matches {pattern!r}" if pattern else "no keys logged yet",
                                style={"color": "#666"})
        return children, note, sig, ""

    # Ticked keys are charted, in the order they were ticked; keys hidden by the filter stay pinned. In the
    # browser: every redraw of the key browser fired it, a round trip each (on a first load too).
    app.clientside_callback(
        """
        function(values, options, pinned) {
            const current = Array.isArray(pinned) ? pinned : [];
            const visible = new Set((options || []).flatMap(opts => (opts || []).map(o => o.value)));
            const ticked = (values || []).flatMap(v => v || []);
            const kept = current.filter(k => !visible.has(k) || ticked.includes(k));
            const pins = kept.concat(ticked.filter(k => !kept.includes(k)));
            if (pins.length === current.length && pins.every((k, i) => k === current[i])) {
                return window.dash_clientside.no_update;
            }
            return pins;
        }
        """,
        Output("pinned", "data"),
        Input({"type": "keys", "group": ALL_IDS}, "value"), State({"type": "keys", "group": ALL_IDS}, "options"),
        State("pinned", "data"),
        prevent_initial_call=True,
    )

    @app.callback(
        Output("pinned-grid", "children"), Output("pin-cursor", "data"), Output("err-pins", "children"),
        Input("pinned", "data"), Input("cursor", "data"), State("pin-cursor", "data"), State("log-charts", "data"),
        prevent_initial_call=True,
    )
    @guarded("pins", 3)
    def pinned_charts(pinned, cursor, pin_cursor, log_charts):
        """The pinned key charts, redrawn when the keys or the panels' render change (else patched live)."""
        pinned = list(pinned or [])
        if not cursor or not pinned:
            if not (pin_cursor or {}).get("keys"):
                raise PreventUpdate
            return [], {}, ""
        if (pin_cursor or {}).get("render") == cursor.get("render") and pin_cursor.get("keys") == pinned:
            raise PreventUpdate
        opts = {**(cursor.get("opts") or {}), "log": list(log_charts or [])}
        figs, new_cursor = builder.key_charts({**cursor, "opts": opts}, pinned, cursor.get("trace", "scattergl"))
        cards = [html.Div([chart_tools(log_toggle(f"key:{k}", f"key:{k}" in (log_charts or [])),
                                       html.A("CSV", href=csv_href("chart", cursor["sel"], cursor["rank"], f"key:{k}"),
                                              download="", style={"fontSize": "12px"})),
                           dcc.Graph(id={"type": "keyfig", "key": k}, figure=fig, config=GRAPH_CONFIG)],
                          style=CARD, className="pinned-card")
                 for k, fig in zip(pinned, figs)]
        return cards, new_cursor, ""

    @app.callback(
        Output({"type": "keyfig", "key": ALL_IDS}, "figure"), Output("pin-cursor", "data", allow_duplicate=True),
        Input("cursor", "data"), State("pin-cursor", "data"),
        prevent_initial_call=True,
    )
    def pinned_live(cursor, pin_cursor):
        """New rows of the pinned charts: exactly the rows the panels' live patch just drew."""
        if not cursor or not pin_cursor or pin_cursor.get("render") != cursor.get("render"):
            raise PreventUpdate
        if len(ctx.outputs_list[0]) != len(pin_cursor.get("keys", [])):
            raise PreventUpdate
        result = builder.key_patches(cursor, pin_cursor)
        if result is None:
            raise PreventUpdate
        return result

    @app.callback(
        Output("fig-phases", "figure"), Output("fig-rank_phases", "figure"), Output("fig-system", "figure"),
        Output("fig-flame", "figure"), Output("trace-links", "children"), Output("profiler-title", "children"),
        Output("profiler-more", "children"), Output(run_figure_id("profiler", ALL_IDS, ALL_IDS), "figure"),
        Output({"type": "run-links", "run": ALL_IDS}, "children"), Output("err-profiler", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("rank", "value"),
        Input("list-interval", "n_intervals"),
        prevent_initial_call=True,
    )
    @guarded("profiler", 10)
    def profiler(tab, selection, rank, _n):
        """One section per selected run (the first in the fixed charts, the others below it): the other
        sections are built when the selection changes and refreshed in place on a poll (zoom kept)."""
        if tab != "profiler":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        drawn, links = ctx.outputs_list[7], ctx.outputs_list[8]
        if not runs:
            msg = "; ".join(problems) or "no runs selected"
            return (*[F.empty_figure(t, msg) for t in ("Time per step by phase", "Per-rank phase time",
                                                        "System", "Flame graph")], "", "", [],
                    [no_update] * len(drawn), [no_update] * len(links), "")
        rank = _rank_value(rank)
        charts = {d.key: profiler_charts(d, rank) for d in runs}
        first = charts[runs[0].key]
        others = [d.key for d in runs[1:]]
        if _section_runs(drawn) == others:
            return (*first, run_title(runs[0].key), no_update,
                    [charts[o["id"]["run"]][PROFILER_CHARTS.index(o["id"]["chart"])] for o in drawn],
                    [charts[o["id"]["run"]][-1] for o in links], "")
        sections = [run_section(k, [dcc.Graph(id=run_figure_id("profiler", k, c), figure=fig, config=GRAPH_CONFIG,
                                              style=CARD) for c, fig in zip(PROFILER_CHARTS, charts[k][:4])]
                                + [html.Div(charts[k][4], id={"type": "run-links", "run": k}, style=LINKS_STYLE)])
                    for k in others]
        return (*first, run_title(runs[0].key), sections, [no_update] * len(drawn), [no_update] * len(links), "")

    @app.callback(
        Output("samples-run", "options"), Output("samples-run", "value"),
        Output("samples-step-left", "options"), Output("samples-step-left", "value"),
        Output("samples-step-right", "options"), Output("samples-step-right", "value"),
        Output("samples-table-left", "columns"), Output("samples-table-left", "data"),
        Output("samples-table-right", "columns"), Output("samples-table-right", "data"),
        Output("samples-summary", "children"), Output("err-samples", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("samples-run", "value"),
        Input("samples-step-left", "value"), Input("samples-step-right", "value"), Input("samples-filter", "value"),
        Input("samples-sort", "value"), Input("list-interval", "n_intervals"),
        prevent_initial_call=True,  # a hidden tab's first call only declined
    )
    @guarded("samples", 12)
    def samples(tab, selection, run_key, left, right, text, sort, _n):
        """The completions a run kept, by step: a table sortable by reward/KL/length, a text filter, and a
        second step beside the first to compare."""
        if tab != "samples":
            raise PreventUpdate
        selection = selection or []
        empty: tuple[list[Any], ...] = ([], [], [], [])
        if not selection:
            return [], None, [], None, [], None, *empty, "select a run to read its samples", ""
        run_key = run_key if run_key in selection else selection[0]
        runs, problems = builder.load([run_key])
        records = runs[0].samples() if runs else []
        run_options = [{"label": k, "value": k} for k in selection]
        steps = sorted({r["step"] for r in records if isinstance(r.get("step"), int)}, reverse=True)
        if not steps:
            note = "; ".join(problems) or (f"{run_key} kept no samples (no samples.jsonl: the producer writes one "
                                            "since this version; runs written before have none)")
            return run_options, run_key, [], None, [], None, *empty, note, ""
        step_options = [{"label": f"step {s}", "value": s} for s in steps]
        left = left if left in steps else steps[0]
        right = right if right in steps else None
        descending = not str(sort or "").startswith("-")
        key = str(sort or "reward").lstrip("-")
        out: list[Any] = []
        for step in (left, right):
            rows = sample_rows(records, step, text or "", key, descending) if step is not None else []
            out += [sample_columns(rows), rows]
        shown = sum(1 for r in records if r.get("step") == left)
        summary = (f"{run_key}: {len(steps)} steps with samples; step {left}: {len(out[1])} of {shown} shown"
                   + (f" (filter {text!r})" if text else "")
                   + (f"; step {right} beside it" if right is not None else ""))
        return run_options, run_key, step_options, left, step_options, right, *out, summary, ""

    @app.callback(
        Output("config-table", "columns"), Output("config-table", "data"), Output("config-summary", "children"),
        Output("err-config", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("config-only-diff", "value"),
        prevent_initial_call=True,  # a hidden tab's first call only declined
    )
    @guarded("config", 4)
    def config(tab, selection, only_diff):
        """The selected runs' settings side by side, differences highlighted (what changed between runs)."""
        if tab != "config":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        if not runs:
            return [], [], "; ".join(problems) or "select one or more runs to see their config", ""
        rows = config_rows({d.key: d.meta for d in runs})
        differ, total = sum(1 for r in rows if r["differs"]), len(rows)
        if only_diff:
            rows = [r for r in rows if r["differs"]]
        columns = [{"name": "section", "id": "section"}, {"name": "setting", "id": "setting"}] + [
            {"name": d.key, "id": d.key} for d in runs]
        summary = (f"{differ} of {total} settings differ between {len(runs)} runs" if len(runs) > 1
                   else f"{total} settings of {runs[0].key}")
        return columns, rows, summary, ""

    @app.callback(
        Output("fig-timeline", "figure"), Output("timeline-table", "data"), Output("timeline-summary", "children"),
        Output("timeline-sig", "data"), Output("err-timeline", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("rank", "value"), Input("timeline-steps", "value"),
        Input("list-interval", "n_intervals"), State("timeline-sig", "data"),
        prevent_initial_call=True,  # a hidden tab's first call only declined
    )
    @guarded("timeline", 5)
    def timeline(tab, selection, rank, steps_text, _n, shown):
        if tab != "timeline":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        if not runs:
            return F.empty_figure("Timeline", "; ".join(problems) or "no runs selected"), [], "", None, ""
        rank = _rank_value(rank)
        fig, rows, summary, signature = timeline_outputs(runs[0], steps_text, rank)
        if ctx.triggered_id == "list-interval" and signature and signature == shown:
            raise PreventUpdate  # the periodic refresh found nothing new: keep the drawn Gantt (and its zoom)
        return fig, rows, summary, signature, ""

    @app.callback(
        Output("fig-memory", "figure"), Output("memory-title", "children"), Output("memory-more", "children"),
        Output(run_figure_id("memory", ALL_IDS, ALL_IDS), "figure"), Output("err-memory", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("list-interval", "n_intervals"),
        prevent_initial_call=True,
    )
    @guarded("memory", 5)
    def memory(tab, selection, _n):
        """Each selected run's memory.json, one section per run (the what-if below re-plans the first)."""
        if tab != "memory":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        drawn = ctx.outputs_list[3]
        if not runs:
            return (F.empty_figure("Memory", "; ".join(problems) or "no runs selected"), "", [],
                    [no_update] * len(drawn), "")
        figs = {d.key: memory_chart(d) for d in runs}
        others = [d.key for d in runs[1:]]
        if _section_runs(drawn) == others:
            return figs[runs[0].key], run_title(runs[0].key), no_update, [figs[o["id"]["run"]] for o in drawn], ""
        sections = [run_section(k, [dcc.Graph(id=run_figure_id("memory", k, "memory"), figure=figs[k],
                                              config=GRAPH_CONFIG, style=CARD)]) for k in others]
        return figs[runs[0].key], run_title(runs[0].key), sections, [no_update] * len(drawn), ""

    @app.callback(
        Output("fig-whatif", "figure"), Output("whatif-summary", "children"), Output("err-whatif", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("whatif-gpus", "value"),
        Input("whatif-zero", "value"), Input("whatif-micro", "value"), Input("whatif-util", "value"),
        prevent_initial_call=True,  # a hidden tab's first call only declined
    )
    @guarded("whatif", 3)
    def whatif(tab, selection, gpus, zero, micro, util):
        """Re-plan the selected run's deployment with the what-if knobs (memory.json's ``deployment``)."""
        if tab != "memory":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        title = "What-if: per-GPU memory per phase (GiB)"
        if not runs:
            return F.empty_figure(title, "; ".join(problems) or "no runs selected"), "", ""
        try:
            result = what_if(runs[0].memory(), gpus, zero, micro, util)
        except (RunError, ValueError) as err:
            return F.empty_figure(title, str(err)), "", ""
        if result is None:
            return F.empty_figure(title, NO_DEPLOYMENT), "", ""
        return whatif_figure(result), f"{runs[0].key}: {whatif_summary(result)}", ""

    return builder


PROFILER_CHARTS = ("phases", "rank_phases", "system", "flame")
RANK_PHASE_STEPS = 50  # the per-rank phase chart: mean of each rank's last steps
LINKS_STYLE = {**CARD, "padding": "8px", "fontSize": "13px"}


def run_figure_id(tab: str, run: Any, chart: Any) -> dict[str, Any]:
    """The id of a chart in another selected run's section of the Profiler or Memory tab."""
    return {"type": "run-fig", "tab": tab, "run": run, "chart": chart}


def run_title(run_key: str) -> html.H4:
    return html.H4(f"run: {run_key}", className="run-section-title", style={"margin": "6px 0 0"})


def run_section(run_key: str, children: list[Any]) -> html.Div:
    """One selected run's charts under a title naming the run."""
    return html.Div([run_title(run_key), *children], className="run-section",
                    style={"display": "grid", "gap": "8px", "marginTop": "12px"})


def _section_runs(drawn: Sequence[dict[str, Any]]) -> list[str]:
    """The runs whose sections the page shows, in order (from the ids of their charts)."""
    return list(dict.fromkeys(o["id"]["run"] for o in drawn))


def profiler_charts(data: RunData, rank: Any) -> tuple[Any, ...]:
    """The Profiler tab of one run: phase time, per-rank phase time, system, flame graph, trace links."""
    with holding([data]):
        series = Builder.series([data], rank)[0]
        phases, per_rank = F.phase_time_figure(series), F.rank_phase_figure(data.rank_tails(RANK_PHASE_STEPS),
                                                                           RANK_PHASE_STEPS)
        system = F.system_figure(data.system, rank if rank in data.views else ALL)
    folded = data.folded_files()
    return phases, per_rank, system, _cached_flame(folded[-1] if folded else None), _trace_links(data)


def memory_chart(data: RunData) -> Any:
    """One run's memory.json as a chart titled with the run (its read error as a message)."""
    try:
        report = data.memory()
    except RunError as err:
        return F.empty_figure(f"Memory: {data.key}", str(err))
    fig = F.memory_figure(report)
    fig.update_layout(title_text=f"{fig.layout.title.text}: {data.key}")
    return fig


def timeline_outputs(data: RunData, steps_text: str | None, rank: Any = ALL
                     ) -> tuple[dict[str, Any], list[dict[str, Any]], str, str]:
    """The Timeline tab of one run: the Gantt, the busy/wait rows, a one-line summary and what was drawn
    (run, range, rank, file state). The rank selector narrows the rows drawn; the analysis always spans every
    rank (a wait is defined against the others)."""
    try:
        steps = parse_steps(steps_text)
    except ValueError as err:
        return F.empty_figure("Timeline", str(err)).to_plotly_json(), [], str(err), ""
    view = data.timeline(steps)
    ranks = [rank] if isinstance(rank, int) and rank in view.timeline.steps else None
    title = f"Timeline: {data.key}"
    fig = F.timeline_figure(view, ranks, title)
    signature = f"{view.signature}|{rank}"
    if view.report is None:
        return fig, [], view.message, signature
    rows = [{"rank": r, "role": view.timeline.processes[r].role, "busy": round(100 * v["busy_share"], 1),
             "wait": round(100 * v["wait_share"], 1), "idle": round(100 * v["idle_share"], 1),
             "wait_s": round(v["wait_s"], 3)}
            for r, v in view.report.per_rank().items() if ranks is None or r in ranks]
    crit = view.report.critical_path_share()
    lead = f"; critical path mostly rank {crit[0]['rank']} {crit[0]['phase']} ({crit[0]['share']:.0%})" if crit else ""
    span = f"steps {view.steps[0]}-{view.steps[1]} (last recorded: {view.last_step})" if view.steps else ""
    note = f"; {view.message}" if view.message else ""
    problems = f"; {len(view.timeline.problems)} bad line(s) skipped" if view.timeline.problems else ""
    return fig, rows, f"{span}, {len(view.timeline.steps)} ranks{lead}{note}{problems}", signature


def chart_options(smoothing: Any, x_mode: Any, log_charts: Any) -> F.ChartOptions:
    """The chart controls' values as options (bad values fall back to the defaults)."""
    return F.ChartOptions.of({"smooth": smoothing, "x": x_mode, "log": list(log_charts or [])})


def _log_patch(log: bool) -> Patch:
    patch = Patch()
    patch["layout"]["yaxis"]["type"] = "log" if log else "linear"
    patch["layout"]["yaxis"]["autorange"] = True
    return patch


SAMPLE_COLUMN_ORDER = ("index", "reward", "kl", "length", "advantage", "prompt", "completion", "chosen", "rejected")


def sample_columns(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table columns of sample rows: index and the numbers first (components after the total), texts last."""
    present: list[str] = []
    for r in rows:
        present += [k for k in r if k not in present and k != "step"]
    first = [k for k in SAMPLE_COLUMN_ORDER[:5] if k in present]
    parts = [k for k in present if k.startswith("reward:")]
    texts = [k for k in SAMPLE_COLUMN_ORDER[5:] if k in present]
    rest = [k for k in present if k not in first + parts + texts]
    plain = {"index", "length", "rejected_length"}
    return [{"name": k, "id": k, **({"type": "numeric", "format": {"specifier": ".4~g"}}
                                    if k not in texts and k not in plain else {})}
            for k in first + parts + rest + texts]


def csv_href(kind: str, selection: Sequence[str], rank: Any, chart: str = "") -> str:
    """The download URL of a chart's data or a run's metrics (served by ``dashboard.app``)."""
    query = [("chart", chart)] if chart else []
    query += [("rank", str(rank))] + [("run", r) for r in selection]
    return f"/download/{kind}.csv?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query)


def filter_keys(keys: Sequence[str], pattern: str | None) -> tuple[list[str], str]:
    """Keys matching ``pattern`` as a case-insensitive regex (TensorBoard's filter), or as a substring when
    it is not a valid regex (then a note says so)."""
    if not pattern:
        return list(keys), ""
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        low = pattern.lower()
        return [k for k in keys if low in k.lower()], f"not a regex ({err}): matched as text"
    return [k for k in keys if rx.search(k)], ""


def key_group(key: str) -> str:
    """A key's group: its first path segment (``reward/chosen`` → ``reward``), as TensorBoard groups tags."""
    return key.split("/", 1)[0] if "/" in key else "(top level)"


def key_groups(keys: Sequence[str], pinned: set[str], open_all: bool) -> list[Any]:
    """One collapsible group per prefix, each a checklist of its keys (ticked: charted below the panels)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(key_group(k), []).append(k)
    return [html.Details([
        html.Summary(f"{g} ({len(ks)})", style={"cursor": "pointer"}),
        dcc.Checklist(id={"type": "keys", "group": g}, options=[{"label": f" {k}", "value": k} for k in ks],
                      value=[k for k in ks if k in pinned], labelStyle={"display": "block"},
                      style={"fontFamily": "monospace", "fontSize": "11px", "marginLeft": "10px"}),
    ], open=open_all or any(k in pinned for k in ks), className="key-group") for g, ks in groups.items()]


def _rank_value(rank: Any) -> Any:
    return int(rank) if isinstance(rank, str) and rank.isdigit() else (rank if isinstance(rank, int) else ALL)


def _trace_links(data: RunData) -> Any:
    traces = data.traces()
    if not traces:
        return html.Div("Traces: no data yet (no traces/*.pt.trace.json[.gz]; run with the profiler on).")
    latest = traces[-5:][::-1]
    links = [html.Li([html.A(p.name, href=f"/files/{quote(data.key)}/traces/{quote(p.name)}"),
                      f" ({p.stat().st_size / 2**20:.1f} MiB)"]) for p in latest]
    return html.Div([html.B("Chrome traces"), " (open in https://ui.perfetto.dev or chrome://tracing)",
                     html.Ul(links)])


@functools.lru_cache(maxsize=8)
def _flame_at(path: str, mtime: float) -> Any:

    return F.flame_or_message(Path(path))


def _cached_flame(folded: Any) -> Any:
    if folded is None:
        return F.flame_or_message(None)
    return _flame_at(str(folded), folded.stat().st_mtime)
