"""The page: run list, rank selector, and three tabs (stability, profiler, memory). Holds no run data.

Figures start as light placeholders and are filled by callbacks, so opening the page never reads a run that
is not selected.
"""
from __future__ import annotations

from dash import dash_table, dcc, html

from .figures import FIGURE_IDS, placeholder_figure

LIVE_INTERVAL_MS = 1000
LIST_INTERVAL_MS = 5000
CALLBACK_NAMES = ("list", "render", "live", "alerts", "zoom", "profiler", "memory")

GRAPH_CONFIG = {"displaylogo": False}
CARD = {"border": "1px solid #e3e3e3", "borderRadius": "6px", "padding": "4px", "background": "white"}


def graph(fig_id: str, title: str = "") -> dcc.Graph:
    return dcc.Graph(id=f"fig-{fig_id}", figure=placeholder_figure(title or fig_id, "loading..."),
                     config=GRAPH_CONFIG, style=CARD)


def _run_table() -> dash_table.DataTable:
    columns = [
        {"name": "run", "id": "id"}, {"name": "source", "id": "source"}, {"name": "status", "id": "status"},
        {"name": "steps", "id": "steps"}, {"name": "started (UTC)", "id": "started"},
        {"name": "alerts", "id": "alerts"},
    ]
    return dash_table.DataTable(
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


def _stability_tab() -> dcc.Tab:
    grid = html.Div([graph(fid) for fid in FIGURE_IDS], id="stability-grid",
                    style={"display": "grid", "gridTemplateColumns": "repeat(auto-fill, minmax(460px, 1fr))",
                           "gap": "8px", "flex": "1"})
    alerts = html.Div([
        html.Div([html.B("Alerts"), html.Button("reset zoom", id="reset-zoom", n_clicks=0,
                                                style={"float": "right", "fontSize": "12px"})]),
        html.Div("select a run", id="alerts-panel", style={"fontSize": "13px"}),
    ], style={**CARD, "width": "330px", "flex": "none", "maxHeight": "1400px", "overflowY": "auto",
              "padding": "8px"})
    return dcc.Tab(label="Stability", value="stability", children=[
        html.Div([alerts, grid], style={"display": "flex", "gap": "8px", "alignItems": "flex-start",
                                        "marginTop": "8px"})])


def _profiler_tab() -> dcc.Tab:
    return dcc.Tab(label="Profiler", value="profiler", children=[html.Div([
        graph("phases"), graph("rank_phases"), graph("system"),
        html.Div(id="trace-links", style={**CARD, "padding": "8px", "fontSize": "13px"}),
        graph("flame"),
    ], style={"display": "grid", "gap": "8px", "marginTop": "8px"})])


def _memory_tab() -> dcc.Tab:
    return dcc.Tab(label="Memory", value="memory", children=[html.Div([graph("memory")],
                                                                       style={"marginTop": "8px"})])


def build_layout(runs_root: str) -> html.Div:
    """The whole page; ``runs_root`` is only displayed."""
    controls = html.Div([
        html.Label("rank ", htmlFor="rank"),
        dcc.Dropdown(id="rank", options=[{"label": "all ranks (mean)", "value": "all"}], value="all",
                     clearable=False, style={"width": "200px"}),
        dcc.Checklist(id="follow", options=[{"label": " follow live", "value": "on"}], value=["on"],
                      style={"marginLeft": "16px"}),
        html.Span(id="live-status", style={"marginLeft": "16px", "color": "#666", "fontSize": "13px"}),
    ], style={"display": "flex", "alignItems": "center", "margin": "8px 0"})
    return html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Store(id="selection", data=None),
        dcc.Store(id="cursor", data={}),
        dcc.Store(id="trace-type", data=None),  # scattergl or scatter, chosen in the browser
        dcc.Store(id="alert-store", data={"alerts": [], "render": None}),
        dcc.Interval(id="live-interval", interval=LIVE_INTERVAL_MS),
        dcc.Interval(id="list-interval", interval=LIST_INTERVAL_MS),
        html.H3("RLHF Systems Kit: training dashboard", style={"margin": "4px 0"}),
        html.Div(f"runs root: {runs_root}", style={"color": "#666", "fontSize": "12px"}),
        _errors(),
        html.Div(id="list-messages", style={"color": "#8a6d00", "fontSize": "13px"}),
        _run_table(),
        controls,
        html.Div(id="run-messages", style={"color": "#8a6d00", "fontSize": "13px"}),
        dcc.Tabs(id="tabs", value="stability", children=[_stability_tab(), _profiler_tab(), _memory_tab()]),
    ], style={"fontFamily": "system-ui, sans-serif", "padding": "8px 14px", "background": "#fafafa"})
