"""Figure builders: full figures for a first render and ``Patch`` updates that append only new points.

Line panels use WebGL (``Scattergl``) and are downsampled server-side with MinMaxLTTB, so a 100k-step run
draws a few thousand points per trace and keeps every spike. Every (run, line) pair always gets a trace,
empty if the key is not logged yet, so a live page can extend trace ``i`` without rebuilding the figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
from dash import Patch
from plotly.subplots import make_subplots

from rlhf_core.keys import PHASES

from .data import ALL, Alert, View, bucket_edges, bucket_reduce, downsample

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
SEVERITY_COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
PANEL_HEIGHT = 270
MAX_ALERT_LINES = 40


@dataclass(frozen=True)
class Line:
    """One plotted quantity: a key, or ``mean ± std`` / ``std²`` derived from two keys."""

    key: str
    label: str
    row: int = 1
    dash: str = "solid"
    derive: str = "value"  # value | upper (key + other) | lower (key - other) | square (key²)
    other: str = ""

    def values(self, view: View, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        x = view.steps(start)
        y = view.column(self.key, start)
        if self.derive == "upper":
            y = y + view.column(self.other, start)
        elif self.derive == "lower":
            y = y - view.column(self.other, start)
        elif self.derive == "square":
            y = y * y
        return x, y


@dataclass(frozen=True)
class Panel:
    id: str
    title: str
    lines: tuple[Line, ...]
    rows: int = 1
    row_titles: tuple[str, ...] = ()
    log_y: bool = False
    threshold: str = ""  # "kl_budget" | "max_grad_norm"


PANELS: tuple[Panel, ...] = (
    Panel("kl", "KL to reference (nats/token): k3 solid, k1 dotted", (
        Line("kl/ref_k3", "k3"), Line("kl/ref_k1", "k1", dash="dot")), threshold="kl_budget"),
    Panel("reward", "Reward mean ± std (top) and variance (bottom)", (
        Line("reward/mean", "mean+std", derive="upper", other="reward/std"),
        Line("reward/mean", "mean-std", derive="lower", other="reward/std"),
        Line("reward/mean", "mean"),
        Line("reward/std", "variance", row=2, derive="square")), rows=2),
    Panel("entropy", "Policy entropy (nats/token)", (Line("policy/entropy", "entropy"),)),
    Panel("ppo", "PPO clip fraction (top) and ratio (bottom)", (
        Line("policy/clipfrac", "clipfrac"),
        Line("policy/ratio_mean", "ratio mean", row=2),
        Line("policy/ratio_max", "ratio max", row=2, dash="dot"),
        Line("policy/ratio_min", "ratio min", row=2, dash="dash")), rows=2),
    Panel("value", "Value explained variance", (Line("value/explained_var", "explained var"),)),
    Panel("length", "Response length (tokens)", (Line("response/length_mean", "length"),)),
    Panel("grad", "Total gradient norm, pre-clip (log)", (Line("grad/norm", "grad norm"),), log_y=True,
          threshold="max_grad_norm"),
    Panel("drift", "Drift from the reference ||θ-θref||/||θref||", (Line("drift/rel", "drift"),)),
)


@dataclass(frozen=True)
class Heatmap:
    id: str
    title: str
    prefix: str
    log: bool


HEATMAPS: tuple[Heatmap, ...] = (
    Heatmap("grad_layers", "Per-layer gradient norm (log10)", "grad/layer/", True),
    Heatmap("drift_layers", "Per-layer drift", "drift/layer/", False),
)

def needed_keys(view: View) -> set[str]:
    """Every key the stability panels read from a view (to fill those columns in one pass)."""
    keys = {"step", "grad/max_norm"} | {k for p in PANELS for line in p.lines for k in (line.key, line.other) if k}
    return keys | {k for k in view.keys if k.startswith(tuple(h.prefix for h in HEATMAPS))}


FIGURE_IDS: tuple[str, ...] = tuple(p.id for p in PANELS) + tuple(h.id for h in HEATMAPS)


@dataclass
class Series:
    """What a figure needs of one selected run: its id, label, colour, view and config."""

    key: str
    label: str
    colour: str
    view: View
    config: dict[str, Any]


def _is_band(line: Line) -> bool:
    return line.derive in ("upper", "lower")


def _clean(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    finite = np.isfinite(y)
    return x[finite].tolist(), y[finite].tolist()


def _axis(**extra: Any) -> dict[str, Any]:
    return {"gridcolor": "#ececec", "zeroline": False, "showline": True, "linecolor": "#bbb", **extra}


def _layout(title: str, uirevision: str, rows: int = 1, height: int = PANEL_HEIGHT) -> dict[str, Any]:
    """A plain-dict layout (plotly.py's validating objects cost ~0.1 s per figure; dicts cost nothing)."""
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}, "x": 0.01}, "height": height,
        "margin": {"l": 50, "r": 10, "t": 36, "b": 28}, "paper_bgcolor": "white", "plot_bgcolor": "white",
        "legend": {"orientation": "h", "y": -0.18, "font": {"size": 10}}, "uirevision": uirevision,
        "hovermode": "x unified", "font": {"size": 11},
    }
    if rows == 1:
        layout["xaxis"], layout["yaxis"] = _axis(), _axis()
        return layout
    gap = 0.08
    span = (1 - gap * (rows - 1)) / rows
    for r in range(1, rows + 1):
        suffix = "" if r == 1 else str(r)
        top = 1 - (r - 1) * (span + gap)
        layout[f"yaxis{suffix}"] = _axis(domain=[top - span, top], anchor=f"x{suffix}")
        layout[f"xaxis{suffix}"] = _axis(anchor=f"y{suffix}", showticklabels=r == rows,
                                          **({"matches": "x"} if r > 1 else {}))
    return layout


def _no_data(layout: dict[str, Any], text: str) -> None:
    layout["annotations"] = [{"text": text, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5,
                              "y": 0.5, "font": {"size": 12, "color": "#888"}}]


def threshold_of(series: Series, name: str) -> float | None:
    """The KL budget or clipping threshold of a run (its logged ``grad/max_norm`` first, then its config)."""
    if name == "max_grad_norm":
        col = series.view.column("grad/max_norm")
        finite = col[np.isfinite(col)]
        if len(finite):
            return float(finite[-1])
    value = series.config.get(name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def panel_shapes(panel: Panel, series: Sequence[Series], alerts: dict[str, list[Alert]]) -> list[dict[str, Any]]:
    """Threshold lines of each run plus a vertical line at each alert's step (capped, critical first)."""
    shapes: list[dict[str, Any]] = []
    if panel.threshold:
        for s in series:
            value = threshold_of(s, panel.threshold)
            if value is None:
                continue
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": value, "y1": value,
                           "line": {"color": s.colour, "width": 1, "dash": "dash"},
                           "label": {"text": f"{panel.threshold} {value:g}", "textposition": "end",
                                     "font": {"size": 9, "color": s.colour}}})
    return shapes + alert_shapes(series, alerts)


def alert_shapes(series: Sequence[Series], alerts: dict[str, list[Alert]]) -> list[dict[str, Any]]:
    marks = [a for s in series for a in alerts.get(s.key, []) if a.step is not None]
    marks.sort(key=lambda a: (a.severity != "critical", a.step))
    return [{"type": "line", "xref": "x", "x0": a.step, "x1": a.step, "yref": "paper", "y0": 0, "y1": 1,
             "line": {"color": SEVERITY_COLOURS.get(a.severity, "#7f7f7f"), "width": 1.5, "dash": "dot"},
             "label": {"text": a.rule, "textangle": -90, "textposition": "end", "font": {"size": 9}}}
            for a in marks[:MAX_ALERT_LINES]]


def line_figure(panel: Panel, series: Sequence[Series], alerts: dict[str, list[Alert]],
                uirevision: str = "", trace_type: str = "scattergl") -> tuple[dict[str, Any], list[list[Any]]]:
    """The full panel (a plain plotly figure dict) and its trace map ``[[run_key, line_index], ...]``."""
    data: list[dict[str, Any]] = []
    trace_map: list[list[Any]] = []
    has_data = False
    for s in series:
        for li, line in enumerate(panel.lines):
            x, y = (a.tolist() for a in downsample(*line.values(s.view)))  # lists: Patch.extend needs arrays
            has_data = has_data or len(y) > 0
            band = _is_band(line)
            trace: dict[str, Any] = {
                "type": trace_type, "x": x, "y": y, "mode": "lines", "name": f"{s.label} {line.label}",
                "legendgroup": s.key, "showlegend": not band,
                "line": {"color": s.colour, "dash": line.dash, "width": 0 if band else 1.5},
            }
            if line.row > 1:
                trace["xaxis"], trace["yaxis"] = f"x{line.row}", f"y{line.row}"
            if band:
                trace["hoverinfo"] = "skip"
            if line.derive == "lower":
                trace["fill"], trace["fillcolor"] = "tonexty", _transparent(s.colour)
            data.append(trace)
            trace_map.append([s.key, li])
    layout = _layout(panel.title, uirevision, panel.rows)
    if panel.log_y:
        layout["yaxis"]["type"] = "log"
    layout["shapes"] = panel_shapes(panel, series, alerts)
    if not has_data:
        _no_data(layout, _no_data_text(panel, series))
    return {"data": data, "layout": layout}, trace_map


def _no_data_text(panel: Panel, series: Sequence[Series]) -> str:
    keys = sorted({line.key for line in panel.lines})
    return "no runs selected" if not series else f"no data yet ({', '.join(keys)} not logged)"


def _transparent(colour: str, alpha: float = 0.2) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def line_patch(panel: Panel, trace_map: Sequence[Sequence[Any]], views: dict[str, View],
               starts: dict[str, int]) -> tuple[Patch | None, int]:
    """Append rows ``starts[run]:`` of each run to its traces; (None, 0) when nothing is new."""
    patch = Patch()
    added = 0
    for i, (run_key, li) in enumerate(trace_map):
        view = views.get(run_key)
        if view is None or li >= len(panel.lines):
            continue
        x, y = _clean(*panel.lines[li].values(view, starts.get(run_key, len(view))))
        if not x:
            continue
        patch["data"][i]["x"].extend(x)
        patch["data"][i]["y"].extend(y)
        added += len(x)
    if not added:
        return None, 0
    patch["layout"]["annotations"] = []
    return patch, added


def _heat_values(heat: Heatmap, values: np.ndarray) -> np.ndarray:
    if not heat.log:
        return values
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _nulls(values: np.ndarray) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values.tolist()]


def heatmap_figure(heat: Heatmap, series: Series | None, alerts: dict[str, list[Alert]],
                   uirevision: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer × step heatmap of one run (step buckets keep each bucket's max) and its map for live updates."""
    blocks = series.view.prefixed(heat.prefix) if series else []
    layout = _layout(heat.title + (f": {series.label}" if series else ""), uirevision)
    layout["hovermode"] = "closest"
    layout["yaxis"]["autorange"] = "reversed"  # first logged block (embeddings) on top
    heat_map = {"run": series.key if series else None, "blocks": blocks}
    if not series or not blocks:
        _no_data(layout, "no runs selected" if not series else f"no data yet ({heat.prefix}<block> not logged)")
        return {"data": [], "layout": layout}, heat_map
    view = series.view
    edges = bucket_edges(len(view))
    x = view.steps()[edges[:-1]].tolist()
    z = [_nulls(_heat_values(heat, bucket_reduce(view.column(heat.prefix + b), edges, "max"))) for b in blocks]
    layout["shapes"] = alert_shapes([series], alerts)
    trace = {"type": "heatmap", "x": x, "y": blocks, "z": z, "colorscale": "Viridis",
             "colorbar": {"thickness": 10}, "hovertemplate": "step %{x}<br>%{y}: %{z:.4g}<extra></extra>"}
    return {"data": [trace], "layout": layout}, heat_map


def heatmap_patch(heat: Heatmap, heat_map: dict[str, Any], view: View | None, start: int) -> tuple[Patch | None, int]:
    """Append the new steps as columns; (None, 0) when nothing is new, (None, -1) when blocks changed."""
    if view is None or start >= len(view):
        return None, 0
    blocks = view.prefixed(heat.prefix)
    if blocks != heat_map.get("blocks"):
        return None, -1
    if not blocks:
        return None, 0
    patch = Patch()
    patch["data"][0]["x"].extend(view.steps(start).tolist())
    for r, block in enumerate(blocks):
        patch["data"][0]["z"][r].extend(_nulls(_heat_values(heat, view.column(heat.prefix + block, start))))
    return patch, len(view) - start


# ---- profiler and memory tabs (small, rarely redrawn: plotly objects are fine here)
def _base_layout(fig: go.Figure, title: str, uirevision: str) -> None:
    fig.update_layout(
        title=dict(text=title, font=dict(size=14), x=0.01), template="plotly_white", height=PANEL_HEIGHT,
        margin=dict(l=50, r=10, t=36, b=28), legend=dict(orientation="h", y=-0.18, font=dict(size=10)),
        uirevision=uirevision, hovermode="x unified",
    )


def placeholder_figure(title: str, message: str) -> dict[str, Any]:
    """The page's first state of a panel: a plain dict without a template (the ``plotly_white`` template
    of :func:`empty_figure` is ~7 KB of JSON per panel for plotly.js to apply before any data arrives)."""
    layout = _layout(title, "")
    layout["xaxis"]["visible"] = layout["yaxis"]["visible"] = False
    _no_data(layout, message)
    return {"data": [], "layout": layout}


def empty_figure(title: str, message: str, height: int = PANEL_HEIGHT) -> go.Figure:
    fig = go.Figure()
    _base_layout(fig, title, "")
    fig.update_layout(height=height, xaxis=dict(visible=False), yaxis=dict(visible=False))
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(size=13, color="#888"))
    return fig


def phase_keys(view: View) -> list[str]:
    """``time/<phase>`` keys present, in pipeline order, then any other phases (``time/step`` excluded)."""
    present = {k for k in view.keys if k.startswith("time/") and k != "time/step"}
    ordered = [f"time/{p}" for p in PHASES if f"time/{p}" in present]
    return ordered + sorted(present - set(ordered))


def phase_time_figure(series: Series | None) -> go.Figure:
    """Per-phase time per step, stacked (bucket means above ~1000 steps)."""
    title = "Time per step by phase (s)" + (f": {series.label}" if series else "")
    if series is None:
        return empty_figure(title, "no runs selected")
    keys = phase_keys(series.view)
    if not keys:
        return empty_figure(title, "no data yet: this run logs no time/<phase> keys")
    view = series.view
    edges = bucket_edges(len(view), 1000)
    x = view.steps()[edges[:-1]]
    fig = go.Figure()
    for key in keys:
        y = bucket_reduce(view.column(key), edges, "mean")
        fig.add_trace(go.Scatter(x=x, y=np.nan_to_num(y), name=key[5:], stackgroup="phases", mode="lines",
                                 line=dict(width=0.5)))
    _base_layout(fig, title, "phases")
    fig.update_layout(height=320, hovermode="x unified")
    return fig


def rank_phase_figure(views: dict[Any, View], last: int = 50) -> go.Figure:
    """Mean time per phase over each rank's last ``last`` steps, stacked per rank: stragglers stand out."""
    title = f"Per-rank phase time, mean of the last {last} steps (s)"
    ranks = [r for r in views if r != ALL]
    if not ranks:
        return empty_figure(title, "single-process run: no per-rank records", height=300)
    keys: list[str] = []
    for r in ranks:
        keys += [k for k in phase_keys(views[r]) if k not in keys]
    if not keys:
        return empty_figure(title, "no data yet: the rank files hold no time/<phase> keys", height=300)
    fig = go.Figure()
    labels = [f"rank {r}" for r in ranks]
    for key in keys:
        means = []
        for r in ranks:
            col = views[r].column(key, max(0, len(views[r]) - last))
            col = col[np.isfinite(col)]
            means.append(float(col.mean()) if len(col) else 0.0)
        fig.add_trace(go.Bar(x=labels, y=means, name=key[5:]))
    _base_layout(fig, title, "ranks")
    fig.update_layout(barmode="stack", height=300, hovermode="closest")
    return fig


def system_figure(records: Sequence[dict[str, Any]]) -> go.Figure:
    """CPU %, RSS (GiB) and whatever GPU keys the sampler wrote, against time since the first sample."""
    title = "System: CPU, RSS and GPU"
    numeric = [r for r in records if isinstance(r.get("time"), (int, float))]
    if not numeric:
        return empty_figure(title, "no data yet: system.jsonl is empty or missing", height=300)
    t0 = numeric[0]["time"]
    keys = sorted({k for r in numeric for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "rank", "step")})
    groups = [("CPU %", [k for k in keys if "cpu" in k.lower()]),
              ("memory (GiB)", [k for k in keys if k.endswith("bytes") and "gpu" not in k.lower()]),
              ("GPU", [k for k in keys if "gpu" in k.lower()])]
    groups = [(name, ks) for name, ks in groups if ks]
    if not groups:
        return empty_figure(title, "no data yet: system.jsonl holds no CPU/RSS/GPU keys", height=300)
    fig = make_subplots(rows=len(groups), cols=1, shared_xaxes=True, subplot_titles=[g for g, _ in groups],
                        vertical_spacing=0.12)
    x = [r["time"] - t0 for r in numeric]
    for row, (_, ks) in enumerate(groups, 1):
        for k in ks:
            scale = 2.0**-30 if k.endswith("bytes") else 1.0
            y = [r[k] * scale if isinstance(r.get(k), (int, float)) else None for r in numeric]
            fig.add_trace(go.Scattergl(x=x, y=y, mode="lines", name=k), row=row, col=1)
    _base_layout(fig, title, "system")
    fig.update_layout(height=160 + 140 * len(groups), hovermode="x unified")
    fig.update_xaxes(title_text="seconds since the first sample", row=len(groups), col=1)
    return fig


def flame_or_message(folded: Path | None) -> go.Figure:
    """The profiler's flame graph of the latest folded-stacks file, or a 'no data yet' figure."""
    title = "Flame graph (latest profiled window)"
    if folded is None:
        return empty_figure(title, "no data yet: no traces/*.folded (run with the profiler on)", height=300)
    from profiler.flamegraph import FoldedError, flame_figure

    try:
        fig = flame_figure(folded)
    except (FoldedError, OSError, ValueError) as err:
        return empty_figure(title, f"{folded.name}: {err}", height=300)
    fig.update_layout(height=520)
    return fig


def memory_figure(report: dict[str, Any] | None) -> go.Figure:
    """Predicted bytes per phase (stacked components) against the measured peak of each phase."""
    title = "Memory per phase: prediction (stacked) vs measurement (diamonds), MiB"
    if report is None:
        return empty_figure(title, "no data yet: this run has no memory.json (rlhfkit memory ...)", height=380)
    prediction = report.get("prediction") if isinstance(report.get("prediction"), dict) else {}
    phases = prediction.get("phases") if isinstance(prediction.get("phases"), dict) else {}
    measured_block = report.get("measured") if isinstance(report.get("measured"), dict) else {}
    measured = measured_block.get("phases") if isinstance(measured_block.get("phases"), dict) else {}
    names = list(phases) + [p for p in measured if p not in phases]
    if not names:
        return empty_figure(title, "memory.json holds no phases yet", height=380)
    components: list[str] = []
    for comps in phases.values():
        if isinstance(comps, dict):
            components += [c for c in comps if c != "total" and c not in components]
    mib = 2.0**-20
    fig = go.Figure()
    for comp in components:
        y = [_num(phases.get(p, {}).get(comp)) * mib if isinstance(phases.get(p), dict) else 0.0 for p in names]
        fig.add_trace(go.Bar(x=names, y=y, name=comp))
    meas = [(p, _num(measured.get(p))) for p in names if isinstance(measured.get(p), (int, float))]
    if meas:
        fig.add_trace(go.Scatter(x=[p for p, _ in meas], y=[v * mib for _, v in meas], mode="markers",
                                 name=f"measured ({measured_block.get('method', '?')})",
                                 marker=dict(symbol="diamond", size=14, color="black")))
    _base_layout(fig, title, "memory")
    fig.update_layout(barmode="stack", height=380, hovermode="closest")
    peak = prediction.get("peak_phase")
    if peak:
        fig.add_annotation(text=f"predicted peak: {peak} ({_num(prediction.get('peak_bytes')) * mib:.1f} MiB)",
                           showarrow=False, xref="paper", yref="paper", x=1, y=1.08, xanchor="right")
    return fig


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def colour_of(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def alert_counts(alerts: Iterable[Alert]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in alerts:
        out[a.severity] = out.get(a.severity, 0) + 1
    return out
