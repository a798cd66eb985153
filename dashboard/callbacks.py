"""Callbacks: run list, full render on selection, live tailing with ``Patch``, alerts, zoom, profiler, memory.

The client keeps a ``cursor`` (rows already drawn per run, the run's generation and the trace order), so a
poll sends only new points. Every callback is guarded: a bad file or a failing builder becomes a one-line
message in the page, never a traceback or a dead page.
"""
from __future__ import annotations

import functools
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, quote

from dash import ALL as ALL_IDS
from dash import Dash, Input, Output, Patch, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from rlhf_core.run_reader import RunError

from . import figures as F
from .data import ALL, Alert, RunCache, RunData, join_problems

log = logging.getLogger("rlhfkit.dashboard")

REBUILD_ROWS = 5000  # after this many live-appended rows a panel is redrawn (re-downsampled) in full
FIG_OUTPUTS = [f"fig-{fid}" for fid in F.FIGURE_IDS]


def guarded(name: str, n_outputs: int) -> Callable:
    """Turn any failure of a callback into a message in ``err-<name>`` (its last output)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except PreventUpdate:
                raise
            except RunError as err:
                message = str(err)
            except Exception as err:  # noqa: BLE001 - the page must survive any bad input
                log.exception("dashboard callback %s failed", name)
                message = f"{name} view failed: {type(err).__name__}: {err}"
            return [no_update] * (n_outputs - 1) + [html.Div(f"error: {message}", className="error")]

        return wrapper

    return deco


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
            config = data.meta.get("config") if isinstance(data.meta.get("config"), dict) else {}
            out.append(F.Series(data.key, label, F.colour_of(i), view, config))
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

    def full(self, selection: Sequence[str], rank: Any, trace_type: str = "scattergl"
             ) -> tuple[list[Any], dict[str, Any], list[str]]:
        """Every stability figure, the new cursor and the problems of the selected runs."""
        runs, problems = self.load(selection)
        series = self.series(runs, rank)
        for data in runs:
            self.prepare(data, rank)
        alerts, _ = self.alerts_of(runs, start=False)  # the detectors start after the charts are drawn
        uirev = "|".join(selection) + f"|{rank}"
        figs, traces = [], {}
        for panel in F.PANELS:
            fig, trace_map = F.line_figure(panel, series, alerts, uirev, trace_type)
            figs.append(fig)
            traces[panel.id] = trace_map
        heat_maps = {}
        for heat in F.HEATMAPS:
            fig, heat_map = F.heatmap_figure(heat, series[0] if series else None, alerts, uirev)
            figs.append(fig)
            heat_maps[heat.id] = heat_map
        cursor = {
            "sel": list(selection), "rank": rank, "render": uuid.uuid4().hex[:8], "appended": 0, "trace": trace_type,
            "runs": {s.key: {"n": len(s.view), "gen": d.start_time} for s, d in zip(series, runs)},
            "traces": traces, "heat": heat_maps,
            "marks": [list(m) for m in sorted({(k, a.rule, a.step) for k, items in alerts.items() for a in items
                                               if a.step is not None})],
        }
        for d in runs:
            problems += d.problems()
        return figs, cursor, problems

    def live(self, cursor: dict[str, Any]) -> tuple[list[Any], dict[str, Any]] | None:
        """Patches with the rows written since the cursor, a full rebuild when needed, None when idle."""
        selection, rank = cursor["sel"], cursor["rank"]
        runs, _ = self.load(selection)
        series = {s.key: s for s in self.series(runs, rank)}
        gens = {d.key: d.start_time for d in runs}
        starts = {}
        new_rows = 0
        for key, seen in cursor["runs"].items():
            s = series.get(key)
            if s is None:
                continue
            if gens.get(key) != seen["gen"] or len(s.view) < seen["n"]:
                return self._rebuild(cursor)
            starts[key] = seen["n"]
            new_rows += len(s.view) - seen["n"]
        if not new_rows:
            return None
        if cursor.get("appended", 0) + new_rows > REBUILD_ROWS:
            return self._rebuild(cursor)
        views = {k: s.view for k, s in series.items()}
        outputs: list[Any] = []
        for panel in F.PANELS:
            patch, _ = F.line_patch(panel, cursor["traces"][panel.id], views, starts)
            outputs.append(patch if patch is not None else no_update)
        for heat in F.HEATMAPS:
            heat_map = cursor["heat"][heat.id]
            run_key = heat_map.get("run")
            view = views.get(run_key) if run_key else None
            patch, added = F.heatmap_patch(heat, heat_map, view, starts.get(run_key, 0))
            if added < 0:
                return self._rebuild(cursor)
            outputs.append(patch if patch is not None else no_update)
        new_cursor = dict(cursor)
        new_cursor["runs"] = {k: {"n": len(series[k].view), "gen": gens[k]} for k in cursor["runs"] if k in series}
        new_cursor["appended"] = cursor.get("appended", 0) + new_rows
        return outputs, new_cursor

    def _rebuild(self, cursor: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        figs, new_cursor, _ = self.full(cursor["sel"], cursor["rank"], cursor.get("trace", "scattergl"))
        return figs, new_cursor


def _alert_item(i: int, run_key: str, a: Alert, multi: bool) -> html.Button:
    colour = F.SEVERITY_COLOURS.get(a.severity, "#7f7f7f")
    where = f"step {a.step}" if a.step is not None else "no step"
    head = [html.B(a.rule, style={"color": colour}), f" {a.severity} · {where}"]
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


def _zoom_patch(fig_id: str, lo: float | None, hi: float | None) -> Patch:
    patch = Patch()
    panel = next((p for p in F.PANELS if p.id == fig_id), None)
    axes = ["xaxis"] + [f"xaxis{r}" for r in range(2, (panel.rows if panel else 1) + 1)]
    for axis in axes:
        if lo is None:
            patch["layout"][axis]["autorange"] = True
        else:
            patch["layout"][axis]["range"] = [lo, hi]
            patch["layout"][axis]["autorange"] = False
    return patch


# Runs in the browser: WebGL where it has a GPU, SVG where WebGL is software-rendered (SwiftShader, llvmpipe)
# or missing; there Scattergl costs seconds per page while downsampled SVG traces draw in a fraction of that.
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
        Output("err-list", "children"),
        Input("url", "search"), Input("list-interval", "n_intervals"),
        State("selection", "data"), State("run-table", "data"), State("run-table", "selected_rows"),
    )
    @guarded("list", 4)
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
        if selection is None:  # first call of this page
            selection = [w for w in wanted if w in ids] if wanted else ids[:1]
            cache.warm(selection, builder.prepare)
        selected = [ids.index(k) for k in selection if k in ids]
        data_out = rows if rows != old_rows else no_update
        sel_out = selected if selected != (old_selected or []) or data_out is not no_update else no_update
        if not rows:
            problems.append(f"no runs under {cache.root} yet (a run is a folder with meta.json)")
        return data_out, sel_out, _problem_list(problems), ""

    @app.callback(
        Output("selection", "data"),
        Input("run-table", "selected_rows"), State("run-table", "data"), State("selection", "data"),
        prevent_initial_call=True,
    )
    def select(selected_rows, rows, current):
        if rows is None or selected_rows is None:
            raise PreventUpdate
        ordered = [rows[i]["id"] for i in selected_rows if 0 <= i < len(rows)]
        previous = [k for k in (current or []) if k in ordered]
        ordered = previous + [k for k in ordered if k not in previous]  # keep the first-selected run primary
        if current is not None and ordered == current:
            raise PreventUpdate
        return ordered

    @app.callback(
        *[Output(f, "figure") for f in FIG_OUTPUTS],
        Output("cursor", "data"), Output("run-messages", "children"), Output("rank", "options"),
        Output("err-render", "children"),
        Input("selection", "data"), Input("rank", "value"), Input("trace-type", "data"),
        prevent_initial_call=True,
    )
    @guarded("render", len(FIG_OUTPUTS) + 4)
    def render_all(selection, rank, detected):
        trace_type = detected if render == "auto" else render
        if selection is None or trace_type not in ("scatter", "scattergl"):
            raise PreventUpdate
        rank = _rank_value(rank)
        figs, cursor, problems = builder.full(selection, rank, trace_type)
        options = [{"label": "all ranks (mean)", "value": "all"}]
        primary = cache.peek(selection[0]) if selection else None
        if primary is not None:
            options += [{"label": f"rank {r}", "value": str(r)} for r in primary.rank_ids]
        return (*figs, cursor, _problem_list(problems), options, "")

    @app.callback(
        *fig_out, Output("cursor", "data", allow_duplicate=True), Output("live-status", "children"),
        Output("err-live", "children"),
        Input("live-interval", "n_intervals"),
        State("cursor", "data"), State("selection", "data"), State("rank", "value"), State("follow", "value"),
        prevent_initial_call=True,
    )
    @guarded("live", len(FIG_OUTPUTS) + 3)
    def live(_n, cursor, selection, rank, follow):
        if not cursor or "on" not in (follow or []) or cursor.get("sel") != selection \
                or cursor.get("rank") != _rank_value(rank):
            raise PreventUpdate
        result = builder.live(cursor)
        if result is None:
            raise PreventUpdate
        outputs, new_cursor = result
        rows = sum(r["n"] for r in new_cursor["runs"].values())
        status = f"live: {rows} rows drawn, last update {time.strftime('%H:%M:%S')}"
        return (*outputs, new_cursor, status, "")

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
        by_run, notes = Builder.alerts_of(runs, start=True)
        flat = [{"run": k, **a.as_dict()} for k, items in by_run.items() for a in items]
        state = {"alerts": flat, "render": cursor.get("render"), "notes": notes, "drawn": (store or {}).get("drawn")}
        if store == state:
            raise PreventUpdate
        multi = len(runs) > 1
        items = [_alert_item(i, a["run"], Alert(**{k: v for k, v in a.items() if k != "run"}), multi)
                 for i, a in enumerate(flat)]
        panel = [html.Div(n, className="alert-progress", style={"color": "#666"}) for n in notes]
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
        series = Builder.series(runs, cursor["rank"])
        patches = []
        for panel_spec in F.PANELS:
            p = Patch()
            p["layout"]["shapes"] = F.panel_shapes(panel_spec, series, by_run)
            patches.append(p)
        for heat in F.HEATMAPS:
            p = Patch()
            p["layout"]["shapes"] = F.alert_shapes(series[:1], by_run)
            patches.append(p)
        return (panel, state, *patches, "")

    @app.callback(
        *fig_out, Output("err-zoom", "children"),
        Input({"type": "alert", "index": ALL_IDS}, "n_clicks"), Input("reset-zoom", "n_clicks"),
        State("alert-store", "data"), State("cursor", "data"),
        prevent_initial_call=True,
    )
    @guarded("zoom", len(FIG_OUTPUTS) + 1)
    def zoom(_clicks, _reset, store, cursor):
        trigger = ctx.triggered_id
        if trigger is None or not ctx.triggered or not ctx.triggered[0].get("value"):
            raise PreventUpdate
        if trigger == "reset-zoom":
            return (*[_zoom_patch(fid, None, None) for fid in F.FIGURE_IDS], "")
        alerts = (store or {}).get("alerts", [])
        index = trigger["index"]
        if index >= len(alerts) or alerts[index].get("step") is None:
            raise PreventUpdate
        step = alerts[index]["step"]
        n = max((r["n"] for r in (cursor or {}).get("runs", {}).values()), default=100)
        half = max(10, n // 20)
        return (*[_zoom_patch(fid, step - half, step + half) for fid in F.FIGURE_IDS], "")

    @app.callback(
        Output("fig-phases", "figure"), Output("fig-rank_phases", "figure"), Output("fig-system", "figure"),
        Output("fig-flame", "figure"), Output("trace-links", "children"), Output("err-profiler", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("rank", "value"),
        Input("list-interval", "n_intervals"),
    )
    @guarded("profiler", 6)
    def profiler(tab, selection, rank, _n):
        if tab != "profiler":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        if not runs:
            msg = "; ".join(problems) or "no runs selected"
            return (*[F.empty_figure(t, msg) for t in ("Time per step by phase", "Per-rank phase time",
                                                        "System", "Flame graph")], "", "")
        primary = runs[0]
        series = Builder.series([primary], _rank_value(rank))[0]
        folded = primary.folded_files()
        return (F.phase_time_figure(series), F.rank_phase_figure(primary.views), F.system_figure(primary.system),
                _cached_flame(folded[-1] if folded else None), _trace_links(primary), "")

    @app.callback(
        Output("fig-memory", "figure"), Output("err-memory", "children"),
        Input("tabs", "value"), Input("selection", "data"), Input("list-interval", "n_intervals"),
    )
    @guarded("memory", 2)
    def memory(tab, selection, _n):
        if tab != "memory":
            raise PreventUpdate
        runs, problems = builder.load(selection or [])
        if not runs:
            return F.empty_figure("Memory", "; ".join(problems) or "no runs selected"), ""
        try:
            report = runs[0].memory()
        except RunError as err:
            return F.empty_figure("Memory", str(err)), ""
        fig = F.memory_figure(report)
        fig.update_layout(title_text=f"{fig.layout.title.text}: {runs[0].key}")
        return fig, ""

    return builder


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
    from pathlib import Path

    return F.flame_or_message(Path(path))


def _cached_flame(folded: Any) -> Any:
    if folded is None:
        return F.flame_or_message(None)
    return _flame_at(str(folded), folded.stat().st_mtime)
