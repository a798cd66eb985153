"""The page: run list, rank selector, and three tabs (stability, profiler, memory). Holds no run data.

Figures start as light placeholders and are filled by callbacks, so opening the page never reads a run that
is not selected.
"""
from __future__ import annotations

from typing import Any

from dash import dcc, html
from dash.dash_table.DataTable import DataTable  # the class itself: dash.dash_table's __init__ is untyped

from .figures import FIGURE_TITLES, HEATMAPS, PANELS, placeholder_figure

LIVE_INTERVAL_MS = 1000
LIST_INTERVAL_MS = 5000
CALLBACK_NAMES = ("list", "render", "live", "alerts", "zoom", "profiler", "memory", "keys", "pins", "log", "config",
                  "samples", "timeline")

# Nothing may leave the machine: no "Edit in Chart Studio"/"Share chart" (upload to Plotly's cloud), no
# plotly.com link or logo, no server URL for plotly.js to send to. PNG download stays (it is local).
GRAPH_CONFIG: dcc.Graph.Config = {
    "displaylogo": False, "showSendToCloud": False, "showEditInChartStudio": False, "showLink": False,
    "plotlyServerURL": "", "linkText": "", "modeBarButtonsToRemove": ["sendDataToCloud", "editInChartStudio"]}
CARD = {"border": "1px solid #e3e3e3", "borderRadius": "6px", "padding": "4px", "background": "white"}


def graph(fig_id: str, title: str = "", card: bool = True) -> dcc.Graph:
    """A chart; its placeholder carries the chart's real title (never its internal id) until it is drawn."""
    return dcc.Graph(id=f"fig-{fig_id}", figure=placeholder_figure(title or FIGURE_TITLES.get(fig_id, ""),
                                                                      "loading..."),
                     config=GRAPH_CONFIG, style=CARD if card else {})


def _run_table() -> DataTable:
    columns: list[DataTable.Columns] = [
        {"name": "run", "id": "id"}, {"name": "source", "id": "source"}, {"name": "status", "id": "status"},
        {"name": "steps", "id": "steps"}, {"name": "started (UTC)", "id": "started"},
        {"name": "alerts", "id": "alerts"},
    ]
    return DataTable(
        id="run-table", columns=columns, data=[], row_selectable="multi", selected_rows=[], page_size=12,
        sort_action="native", style_as_list_view=True,
        style_cell={"fontFamily": "monospace", "fontSize": "13px", "padding": "3px 8px", "textAlign": "left"},
        style_header={"fontWeight": "bold"},
        style_data_conditional=[
            {"if": {"filter_query": '{status} = "running"', "column_id": "status"}, "color": "#1f77b4"},
            {"if": {"filter_query": '{status} = "failed"', "column_id": "status"}, "color": "#d62728"},
        ],
    )


def _errors() -> html.Div:
    return html.Div([html.Div(id=f"err-{name}", className="cb-error") for name in CALLBACK_NAMES],
                    style={"color": "#b00020"})


SMALL = {"fontSize": "12px", "color": "#444"}
HIDDEN = {"display": "none"}


def log_toggle(chart_id: str, on: bool) -> dcc.Checklist:
    """The per-chart log/linear switch (``chart_id``: a panel id or ``key:<key>``)."""
    return dcc.Checklist(id={"type": "logy", "chart": chart_id}, options=[{"label": " log y", "value": "log"}],
                         value=["log"] if on else [], inputStyle={"marginRight": "2px", "verticalAlign": "middle"},
                         labelStyle={"display": "inline-flex", "alignItems": "center"}, style=SMALL)


def csv_link(chart_id: str) -> html.A:
    """Download of the chart's data as CSV (its href follows the selection)."""
    return html.A("CSV", id={"type": "csv", "chart": chart_id}, href="", download="", title="this chart's data as CSV",
                  style=SMALL)


def chart_tools(*tools: Any) -> html.Div:
    """The small controls above a chart (log toggle, CSV link), right-aligned, clear of plotly's mode bar."""
    return html.Div(list(tools), className="chart-tools",
                    style={"display": "flex", "justifyContent": "flex-end", "gap": "12px", "padding": "0 8px",
                           "height": "20px", "alignItems": "center"})


def chart_card(fig_id: str, log_on: bool = False, visible: bool = True) -> html.Div:
    """A line chart with its log toggle and CSV link; optional panels start hidden until a selected run logs
    their keys."""
    return html.Div([chart_tools(log_toggle(fig_id, log_on), csv_link(fig_id)), graph(fig_id, card=False)],
                    id=f"card-{fig_id}",
                    style=CARD if visible else {**CARD, **HIDDEN})


def _key_browser() -> html.Div:
    return html.Div([
        html.B("Scalars"),
        html.Div("every key the selected runs logged; tick one to chart it below the panels", style=SMALL),
        dcc.Input(id="key-filter", type="text", debounce=True, placeholder="filter: substring or regex",
                  style={"width": "100%", "fontSize": "12px", "margin": "4px 0"}),
        html.Div(id="key-filter-note", style={**SMALL, "color": "#8a6d00"}),
        html.Div("select a run", id="key-browser", style={"fontSize": "12px"}),
        html.Div(id="metric-downloads", style={**SMALL, "marginTop": "6px"}),
    ], style={**CARD, "padding": "8px", "marginTop": "8px"})


def _stability_tab() -> dcc.Tab:
    cards = [chart_card(p.id, p.log_y, not p.optional) for p in PANELS] + [graph(h.id) for h in HEATMAPS]
    grid_style = {"display": "grid", "gridTemplateColumns": "repeat(auto-fill, minmax(460px, 1fr))", "gap": "8px"}
    grid = html.Div([
        html.Div(cards, id="stability-grid", style=grid_style),
        html.Div(id="pinned-grid", style={**grid_style, "marginTop": "8px"}),
    ], style={"flex": "1", "minWidth": "0"})
    alerts = html.Div([
        html.Div([html.Div([html.B("Alerts"), html.Button("reset zoom", id="reset-zoom", n_clicks=0,
                                                          style={"float": "right", "fontSize": "12px"})]),
                  html.Div("select a run", id="alerts-panel", style={"fontSize": "13px"})],
                 style={**CARD, "padding": "8px", "maxHeight": "700px", "overflowY": "auto"}),
        _key_browser(),
    ], style={"width": "330px", "flex": "none"})
    return dcc.Tab(label="Stability", value="stability", children=[
        html.Div([alerts, grid], style={"display": "flex", "gap": "8px", "alignItems": "flex-start",
                                        "marginTop": "8px"})])


def _profiler_tab() -> dcc.Tab:
    """The first selected run's charts, then a section per other selected run (each titled with its run)."""
    return dcc.Tab(label="Profiler", value="profiler", children=[html.Div([
        html.Div(id="profiler-title"),
        graph("phases"), graph("rank_phases"), graph("system"),
        html.Div(id="trace-links", style={**CARD, "padding": "8px", "fontSize": "13px"}),
        graph("flame"),
        html.Div(id="profiler-more"),
    ], style={"display": "grid", "gap": "8px", "marginTop": "8px"})])


def _memory_tab() -> dcc.Tab:
    """The first selected run's memory.json, what-if controls that re-plan its deployment (empty: as the
    run), then a section per other selected run."""
    def knob(label: str, knob_id: str, **kw: Any) -> html.Label:
        return html.Label([label, dcc.Input(id=f"whatif-{knob_id}", type="number", debounce=True,
                                            placeholder="as run", style={"width": "80px", "marginLeft": "4px"},
                                            **kw)], style={"marginRight": "14px"})

    whatif = html.Div([
        html.Div([html.B("What-if", style={"marginRight": "12px"}), knob("GPUs", "gpus", min=1, step=1),
                  html.Label(["ZeRO stage", dcc.Dropdown(id="whatif-zero", options=[0, 1, 2, 3], value=None,
                                                         placeholder="as run", style={"width": "100px"})],
                             style={"display": "flex", "alignItems": "center", "gap": "4px",
                                    "marginRight": "14px"}),
                  knob("micro-batch", "micro", min=1, step=1), knob("engine utilisation", "util", min=0.05,
                                                                     max=1, step=0.05)],
                 style={"display": "flex", "alignItems": "center", "flexWrap": "wrap", "fontSize": "13px"}),
        html.Div(id="whatif-summary", style={"fontSize": "13px", "margin": "4px 0"}),
        html.Div(id="err-whatif", className="cb-error", style={"color": "#b00020"}),
        graph("whatif", "What-if: per-GPU memory per phase (GiB)", card=False),
    ], style={**CARD, "padding": "8px"})
    return dcc.Tab(label="Memory", value="memory", children=[html.Div([html.Div(id="memory-title"), graph("memory"),
                                                                       whatif, html.Div(id="memory-more")],
                                                                       style={"marginTop": "8px", "display": "grid",
                                                                              "gap": "8px"})])


def _timeline_tab() -> dcc.Tab:
    """Phases per rank on one clock for a step range, waits in red, and the busy/wait table beside it."""
    controls = html.Div([
        html.Label("steps ", htmlFor="timeline-steps"),
        dcc.Input(id="timeline-steps", type="text", debounce=True, placeholder="A:B (default: the last 10)",
                  style={"width": "240px"}),
        html.Span(id="timeline-summary", style={**SMALL, "marginLeft": "12px"}),
    ], style={"display": "flex", "alignItems": "center", "gap": "4px"})
    table = DataTable(
        id="timeline-table", columns=[{"name": n, "id": i} for n, i in (
            ("rank", "rank"), ("role", "role"), ("busy %", "busy"), ("wait %", "wait"), ("idle %", "idle"),
            ("wait s", "wait_s"))],
        data=[], sort_action="native", page_size=32, style_as_list_view=True,
        style_cell={"fontFamily": "monospace", "fontSize": "12px", "padding": "2px 6px", "textAlign": "right"},
        style_header={"fontWeight": "bold"},
        style_data_conditional=[{"if": {"filter_query": "{wait} >= 20", "column_id": "wait"},
                                 "color": "#d62728", "fontWeight": "bold"}],
    )
    return dcc.Tab(label="Timeline", value="timeline", children=[html.Div([
        controls,
        html.Div([html.Div(graph("timeline", "Timeline"), style={"flex": "1", "minWidth": "0"}),
                  html.Div([html.B("Busy / waiting per rank"),
                            html.Div("share of the summed step windows; waiting: in a collective-bound phase "
                                     "before the last rank entered it, or blocked on other processes' results "
                                     "(docs/timeline.md)", style=SMALL),
                            table], style={**CARD, "padding": "8px", "width": "380px", "flex": "none"})],
                 style={"display": "flex", "gap": "8px", "alignItems": "flex-start", "marginTop": "6px"}),
    ], style={"marginTop": "8px"})])


def _samples_table(side: str) -> html.Div:
    return html.Div([
        html.Div([html.Label(f"step ({side}) "), dcc.Dropdown(id=f"samples-step-{side}", options=[], value=None,
                                                              clearable=side == "right", style={"width": "160px"},
                                                              placeholder="step" if side == "left" else "compare...")],
                 style={"display": "flex", "alignItems": "center", "gap": "6px"}),
        DataTable(
            id=f"samples-table-{side}", columns=[], data=[], sort_action="native", page_size=20,
            style_as_list_view=True,
            style_cell={"fontFamily": "monospace", "fontSize": "12px", "padding": "3px 6px", "textAlign": "left",
                        "whiteSpace": "pre-wrap", "height": "auto", "verticalAlign": "top", "maxWidth": "520px"},
            style_header={"fontWeight": "bold"},
            style_cell_conditional=[{"if": {"column_id": c}, "minWidth": "220px"} for c in ("prompt", "completion")],
        ),
    ], style={"flex": "1", "minWidth": "0"})


def _samples_tab() -> dcc.Tab:
    controls = html.Div([
        html.Label("run "), dcc.Dropdown(id="samples-run", options=[], value=None, clearable=False,
                                         style={"width": "220px"}),
        html.Label("sort by ", style={"marginLeft": "12px"}),
        dcc.Dropdown(id="samples-sort", value="reward", clearable=False, style={"width": "150px"},
                     options=[{"label": f"{k} (high first)", "value": k} for k in ("reward", "kl", "length")]
                     + [{"label": f"{k} (low first)", "value": f"-{k}"} for k in ("reward", "kl", "length")]),
        dcc.Input(id="samples-filter", type="text", debounce=True, placeholder="filter: text in prompt or completion",
                  style={"width": "280px", "marginLeft": "12px"}),
    ], style={"display": "flex", "alignItems": "center", "gap": "4px", "flexWrap": "wrap"})
    return dcc.Tab(label="Samples", value="samples", children=[html.Div([
        controls,
        html.Div(id="samples-summary", style={"fontSize": "13px", "margin": "6px 0", "color": "#444"}),
        html.Div([_samples_table("left"), _samples_table("right")], style={"display": "flex", "gap": "12px"}),
    ], style={**CARD, "padding": "8px", "marginTop": "8px"})])


def _config_tab() -> dcc.Tab:
    table = DataTable(
        id="config-table", columns=[], data=[], sort_action="native", filter_action="native", page_size=60,
        style_as_list_view=True,
        style_cell={"fontFamily": "monospace", "fontSize": "12px", "padding": "2px 8px", "textAlign": "left",
                    "maxWidth": "380px", "overflow": "hidden", "textOverflow": "ellipsis"},
        style_header={"fontWeight": "bold"},
        style_data_conditional=[{"if": {"filter_query": '{differs} = "yes"'}, "backgroundColor": "#fff3c4",
                                 "fontWeight": "bold"}],
        tooltip_duration=None,
    )
    return dcc.Tab(label="Config", value="config", children=[html.Div([
        html.Div([dcc.Checklist(id="config-only-diff", options=[{"label": " only settings that differ",
                                                                  "value": "diff"}], value=[]),
                  html.Span("from each run's meta.json: run fields, config.*, and env.* (versions, device, "
                            "host, git commit); rows where the selected runs differ are highlighted",
                            style=SMALL)], style={"display": "flex", "gap": "16px", "alignItems": "center"}),
        html.Div(id="config-summary", style={"fontSize": "13px", "margin": "4px 0"}),
        table,
    ], style={**CARD, "padding": "8px", "marginTop": "8px"})])


def build_layout(runs_root: str) -> html.Div:
    """The whole page; ``runs_root`` is only displayed."""
    controls = html.Div([
        html.Label("rank ", htmlFor="rank"),
        dcc.Dropdown(id="rank", options=[{"label": "all ranks (mean)", "value": "all"}], value="all",
                     clearable=False, style={"width": "200px"}),
        dcc.Checklist(id="follow", options=[{"label": " follow live", "value": "on"}], value=["on"],
                      style={"marginLeft": "16px"}),
        html.Label("smoothing ", htmlFor="smoothing", style={"marginLeft": "16px"}),
        html.Div(dcc.Slider(id="smoothing", min=0, max=0.99, step=0.01, value=0,
                            marks={0: "off", 0.3: "0.3", 0.6: "0.6", 0.9: "0.9"},
                            tooltip={"placement": "bottom"}), style={"width": "220px"}),
        html.Label("x axis ", style={"marginLeft": "16px"}),
        dcc.RadioItems(id="x-mode", value="step", inline=True, inputStyle={"margin": "0 3px 0 8px"},
                       options=[{"label": "step", "value": "step"}, {"label": "wall time", "value": "wall"},
                                {"label": "relative time", "value": "relative"}]),
        html.Span(id="live-status", style={"marginLeft": "16px", "color": "#666", "fontSize": "13px"}),
    ], style={"display": "flex", "alignItems": "center", "margin": "8px 0", "flexWrap": "wrap"})
    return html.Div([
        dcc.Location(id="url", refresh=False),
        # Not null: a Store holding null sets itself (to undefined) when it mounts, which fired every callback
        # of the selection and the render, for nothing, while the page loaded. {}: the run list has not chosen.
        dcc.Store(id="selection", data={}),
        dcc.Store(id="cursor", data={}),
        dcc.Store(id="trace-type", data=""),  # scattergl or scatter, chosen in the browser
        dcc.Store(id="alert-store", data={"alerts": [], "render": None}),
        dcc.Store(id="pinned", data=[]),
        dcc.Store(id="timeline-sig", data=None),  # what the Timeline tab drew (a refresh with nothing new skips)
        dcc.Store(id="key-sig", data=None),  # the keys and filter the key browser shows
        dcc.Store(id="pin-cursor", data={}),  # rows drawn in the pinned charts (as ``cursor`` for the panels)
        dcc.Store(id="log-charts", data=sorted(p.id for p in PANELS if p.log_y)),  # charts with a log y axis
        dcc.Interval(id="live-interval", interval=LIVE_INTERVAL_MS),
        dcc.Interval(id="list-interval", interval=LIST_INTERVAL_MS),
        html.H3("RLHF Systems Kit: training dashboard", style={"margin": "4px 0"}),
        html.Div(f"runs root: {runs_root}", style={"color": "#666", "fontSize": "12px"}),
        _errors(),
        html.Div(id="list-messages", style={"color": "#8a6d00", "fontSize": "13px"}),
        _run_table(),
        controls,
        html.Div(id="run-messages", style={"color": "#8a6d00", "fontSize": "13px"}),
        dcc.Tabs(id="tabs", value="stability", children=[_stability_tab(), _samples_tab(), _profiler_tab(),
                                                          _timeline_tab(), _memory_tab(), _config_tab()]),
    ], style={"fontFamily": "system-ui, sans-serif", "padding": "8px 14px", "background": "#fafafa"})
