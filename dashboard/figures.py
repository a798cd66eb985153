"""Figure builders: full figures for a first render and ``Patch`` updates that append only new points.

Line panels use WebGL (``Scattergl``) and are downsampled server-side with MinMaxLTTB, so a 100k-step run
draws a few thousand points per trace and keeps every spike. Every (run, line) pair always gets a trace,
empty if the key is not logged yet, so a live page can extend trace ``i`` without rebuilding the figure.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import Patch
from plotly.subplots import make_subplots

from profiler.flamegraph import FoldedError, flame_figure
from rlhf_core.runformat.keys import PHASES

from .data import ALL, Alert, TimelineView, View, bucket_edges, bucket_reduce, downsample_rows

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
SEVERITY_COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
PANEL_HEIGHT = 290
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

    def values(self, view: View, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of rows ``start:stop`` (``stop``: the rows snapshotted under the run's lock, so
        x and y have the same rows while a writer appends)."""
        x = view.steps(start, stop)
        y = view.column(self.key, start, stop)
        if self.derive == "upper":
            y = y + view.column(self.other, start, stop)
        elif self.derive == "lower":
            y = y - view.column(self.other, start, stop)
        elif self.derive == "square":
            y = y * y
        return x, y

    def gaps(self, view: View, y: np.ndarray, start: int = 0) -> np.ndarray:
        """Rows (from ``start``, ascending) where a key of this line was logged non-finite and the value of
        ``y`` (rows ``start:``) is not finite: there the line breaks. A key not logged at a row is no gap."""
        stop = start + len(y)
        rows = view.gap_rows(self.key, start, stop)
        if self.other:
            rows = np.union1d(rows, view.gap_rows(self.other, start, stop))
        return rows[~np.isfinite(y[rows - start])] if len(rows) else rows


@dataclass(frozen=True)
class Panel:
    id: str
    title: str
    lines: tuple[Line, ...]
    rows: int = 1
    row_titles: tuple[str, ...] = ()
    log_y: bool = False
    threshold: str = ""  # "kl_budget" | "max_grad_norm"
    y_title: str = ""  # the y axis title with its unit
    optional: bool = False  # shown only when a selected run logs one of its keys (DPO, reward model, SFT...)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for line in self.lines for k in (line.key, line.other) if k))


PANELS: tuple[Panel, ...] = (
    Panel("kl", "KL to reference (nats/token): k3 solid, k1 dotted", (
        Line("kl/ref_k3", "k3"), Line("kl/ref_k1", "k1", dash="dot")), threshold="kl_budget",
        y_title="KL (nats/token)"),
    Panel("reward", "Reward mean ± std (top) and variance (bottom)", (
        Line("reward/mean", "mean+std", derive="upper", other="reward/std"),
        Line("reward/mean", "mean-std", derive="lower", other="reward/std"),
        Line("reward/mean", "mean"),
        Line("reward/std", "variance", row=2, derive="square")), rows=2, y_title="reward"),
    Panel("entropy", "Policy entropy (nats/token)", (Line("policy/entropy", "entropy"),),
          y_title="entropy (nats/token)"),
    Panel("ppo", "PPO clip fraction (top) and ratio (bottom)", (
        Line("policy/clipfrac", "clipfrac"),
        Line("policy/ratio_mean", "ratio mean", row=2),
        Line("policy/ratio_max", "ratio max", row=2, dash="dot"),
        Line("policy/ratio_min", "ratio min", row=2, dash="dash")), rows=2, y_title="fraction"),
    Panel("value", "Value explained variance", (Line("value/explained_var", "explained var"),),
          y_title="explained variance (1 = perfect)"),
    Panel("length", "Response length (tokens)", (Line("response/length_mean", "length"),), y_title="tokens"),
    Panel("grad", "Total gradient norm, pre-clip (log)", (Line("grad/norm", "grad norm"),), log_y=True,
          threshold="max_grad_norm", y_title="L2 norm"),
    Panel("drift", "Drift from the reference ||θ-θref||/||θref||", (Line("drift/rel", "drift"),),
          y_title="relative L2 distance"),
    # Panels of other kinds of run: drawn only when a selected run logs their keys.
    Panel("preference", "Preference rewards: chosen, rejected (top); margin and accuracy (bottom)", (
        Line("reward/chosen", "chosen"), Line("reward/rejected", "rejected", dash="dot"),
        Line("reward/margin", "margin", row=2), Line("reward/accuracy", "accuracy", row=2, dash="dash")),
        rows=2, y_title="implicit reward", optional=True),
    Panel("loss", "Loss: total solid, policy dotted, value dashed", (
        Line("loss/total", "total"), Line("loss/policy", "policy", dash="dot"),
        Line("loss/value", "value", dash="dash")), y_title="loss", optional=True),
    Panel("lr", "Learning rate", (Line("lr", "lr"),), y_title="learning rate", optional=True),
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
FIGURE_TITLES: dict[str, str] = {
    **{p.id: p.title for p in PANELS}, **{h.id: h.title for h in HEATMAPS},
    "phases": "Time per step by phase (s)", "rank_phases": "Per-rank phase time (s)",
    "system": "System: CPU, RSS and GPU", "flame": "Flame graph (latest profiled window)",
    "memory": "Memory per phase (MiB)",
}


X_TITLES = {"step": "step", "wall": "wall time (UTC)", "relative": "time since the run's first record (s)"}


@dataclass(frozen=True)
class ChartOptions:
    """What the chart controls chose: EMA smoothing weight (0: off), the x axis and the log-y charts."""

    smooth: float = 0.0
    x: str = "step"  # step | wall | relative
    log: frozenset[str] = frozenset(p.id for p in PANELS if p.log_y)  # chart ids (panel id or "key:<key>")

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> ChartOptions:
        """From the page's JSON (unknown or bad values fall back to the defaults)."""
        data = data or {}
        smooth = data.get("smooth", 0.0)
        smooth = float(smooth) if isinstance(smooth, (int, float)) and 0 <= smooth < 1 else 0.0
        x = data.get("x")
        x = x if isinstance(x, str) and x in X_TITLES else "step"
        log = data.get("log")
        return cls(smooth, x, frozenset(log) if isinstance(log, list) else cls.log)

    def as_dict(self) -> dict[str, Any]:
        return {"smooth": self.smooth, "x": self.x, "log": sorted(self.log)}


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average over the finite values, debiased (divided by
    ``1 - weight**k`` after ``k`` values, so the start is not pulled towards 0); non-finite values stay NaN.

    Vectorised in blocks: inside a block the recurrence is a cumulative sum scaled by ``weight**-i``, and
    the block length keeps that scale below 1e250.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.full(len(values), np.nan)
    finite = np.isfinite(values)
    v = values[finite]
    if not len(v) or weight <= 0:
        out[finite] = v
        return out
    block = int(max(1, min(4096, 250 / -math.log10(weight))))
    smoothed = np.empty(len(v))
    last = 0.0
    for b0 in range(0, len(v), block):
        seg = v[b0:b0 + block]
        i = np.arange(len(seg))
        acc = np.cumsum(seg * weight ** -i) * (1 - weight) * weight ** i + last * weight ** (i + 1)
        smoothed[b0:b0 + len(seg)] = acc
        last = float(acc[-1])
    out[finite] = smoothed / (1 - weight ** np.arange(1, len(v) + 1))
    return out


def x_values(view: View, mode: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """The x of rows ``start:stop``: the step, the wall time (ms since the epoch, for a date axis) or the
    seconds since the view's first record."""
    if mode == "step":
        return view.steps(start, stop)
    t = view.column("time", start, stop)
    if mode == "wall":
        return t * 1000.0
    first = view.column("time", 0, 1)
    return t - (first[0] if len(first) and np.isfinite(first[0]) else np.nan)


def x_at_step(view: View, step: float, mode: str, n: int | None = None) -> float | None:
    """Where ``step`` is on the chosen x axis (interpolated over the logged steps); None if unknown."""
    if mode == "step":
        return float(step)
    steps, xs = view.steps(0, n), x_values(view, mode, 0, n)
    ok = np.isfinite(steps) & np.isfinite(xs)
    if not ok.any():
        return None
    return float(np.interp(step, steps[ok], xs[ok]))


@dataclass
class Series:
    """What a figure needs of one selected run: its id, label, colour, view, config and ``n``, the rows to
    draw (taken under the run's lock: rows appended while the figures are built wait for the next poll)."""

    key: str
    label: str
    colour: str
    view: View
    config: dict[str, Any]
    n: int = -1
    order: View | None = None  # a rank's view, whose key order is the model's (the rank mean's is alphabetical)
    running: bool = True  # a finished run will not log a missing key later: "not logged", not "no data yet"

    def __post_init__(self) -> None:
        if self.n < 0:
            self.n = len(self.view)


def _is_band(line: Line) -> bool:
    return line.derive in ("upper", "lower")


def _points(x: np.ndarray, y: np.ndarray, rows: np.ndarray, gaps: np.ndarray) -> tuple[list[Any], list[Any]]:
    """JSON-ready x and y of ``rows`` (finite values), with one ``None`` y at the first of the ``gaps`` rows
    between two drawn rows, so plotly (``connectgaps`` off) breaks the line where a value was NaN/inf
    instead of drawing straight across it. Gaps without a finite x are left out."""
    if len(gaps):
        gaps = gaps[np.isfinite(x[gaps])]
    if not len(gaps):
        return x[rows].tolist(), y[rows].tolist()
    at, first = np.unique(np.searchsorted(rows, gaps), return_index=True)
    merged = np.insert(rows, at, gaps[first])
    is_gap = np.zeros(len(merged), dtype=bool)
    is_gap[at + np.arange(len(at))] = True
    ys: list[Any] = y[merged].tolist()
    for i in np.flatnonzero(is_gap).tolist():
        ys[i] = None
    return x[merged].tolist(), ys


def _axis(**extra: Any) -> dict[str, Any]:
    return {"gridcolor": "#ececec", "zeroline": False, "showline": True, "linecolor": "#bbb", **extra}


def _layout(title: str, uirevision: str, rows: int = 1, height: int = PANEL_HEIGHT) -> dict[str, Any]:
    """A plain-dict layout (plotly.py's validating objects cost ~0.1 s per figure; dicts cost nothing)."""
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}, "x": 0.01}, "height": height,
        "margin": {"l": 62, "r": 10, "t": 36, "b": 44}, "paper_bgcolor": "white", "plot_bgcolor": "white",
        "legend": {"orientation": "h", "y": -0.3, "yanchor": "top", "font": {"size": 10}}, "uirevision": uirevision,
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
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def panel_shapes(panel: Panel, series: Sequence[Series], alerts: dict[str, list[Alert]],
                 x_mode: str = "step") -> list[dict[str, Any]]:
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
    return shapes + alert_shapes(series, alerts, x_mode)


def alert_shapes(series: Sequence[Series], alerts: dict[str, list[Alert]], x_mode: str = "step"
                 ) -> list[dict[str, Any]]:
    """A vertical dash-dot line per alert (a style no data line has), labelled with its rule and, when runs
    are overlaid, its run."""
    marks = [(s, a, a.step) for s in series for a in alerts.get(s.key, []) if a.step is not None]
    marks.sort(key=lambda m: (m[1].severity != "critical", m[2]))
    multi = len(series) > 1
    shapes = []
    for s, a, step in marks[:MAX_ALERT_LINES]:
        x = x_at_step(s.view, step, x_mode, s.n)
        if x is None:
            continue
        shapes.append({"type": "line", "xref": "x", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                       "opacity": 0.85,
                       "line": {"color": SEVERITY_COLOURS.get(a.severity, "#7f7f7f"), "width": 1.2, "dash": "dashdot"},
                       "label": {"text": f"{a.rule} · {s.label}" if multi else a.rule, "textangle": -90,
                                 "textposition": "end", "font": {"size": 9}}})
    return shapes


def key_panel(key: str) -> Panel:
    """The chart of any logged key (the key browser's charts): one line per run, titled by the key."""
    return Panel(f"key:{key}", key, (Line(key, key.rsplit("/", 1)[-1]),), y_title=key)


def _x_layout(layout: dict[str, Any], panel: Panel, opts: ChartOptions, max_step: float, growing: bool) -> None:
    """x axis of every row: type, title on the bottom row, integer step ticks, a "step N" hover header."""
    for r in range(1, panel.rows + 1):
        axis = layout["xaxis" if r == 1 else f"xaxis{r}"]
        if opts.x == "wall":
            axis["type"] = "date"
        elif opts.x == "step":
            axis["tickformat"] = "d"
            axis["unifiedhovertitle"] = {"text": "step %{x}"}
            if max_step <= 12 and not growing:  # auto ticks of a few steps fall on halves; a fixed dtick
                axis["dtick"] = 1  # on a growing run would draw thousands of ticks as it grows
        else:
            axis["unifiedhovertitle"] = {"text": "%{x:.1f} s"}
        if r == panel.rows:
            axis["title"] = {"text": X_TITLES[opts.x], "font": {"size": 10}, "standoff": 2}
    for r in range(1, panel.rows + 1):
        axis = layout["yaxis" if r == 1 else f"yaxis{r}"]
        if panel.y_title and r == 1:
            axis["title"] = {"text": panel.y_title, "font": {"size": 10}, "standoff": 2}
    if panel.id in opts.log:
        layout["yaxis"]["type"] = "log"


def line_figure(panel: Panel, series: Sequence[Series], alerts: dict[str, list[Alert]],
                uirevision: str = "", trace_type: str = "scattergl", opts: ChartOptions | None = None
                ) -> tuple[dict[str, Any], list[list[Any]]]:
    """The full panel (a plain plotly figure dict) and its trace map ``[[run_key, line_index(, kind)], ...]``.

    With smoothing each line is two traces: the raw values, faint (``raw``), and their debiased EMA (``ema``);
    a band's edges are smoothed only.
    """
    opts = opts or ChartOptions()
    data: list[dict[str, Any]] = []
    trace_map: list[list[Any]] = []
    has_data = False
    max_step = 0.0
    for s in series:
        for li, line in enumerate(panel.lines):
            steps, y = line.values(s.view, 0, s.n)
            x = steps if opts.x == "step" else x_values(s.view, opts.x, 0, s.n)
            if len(steps):
                max_step = max(max_step, float(np.nanmax(steps)) if np.isfinite(steps).any() else 0.0)
            band = _is_band(line)
            gaps = line.gaps(s.view, y)
            kinds = [None] if not opts.smooth else (["ema"] if band else ["raw", "ema"])
            for kind in kinds:
                yk = ema(y, opts.smooth) if kind == "ema" else y
                rows = downsample_rows(yk)
                has_data = has_data or len(rows) > 0
                xs, ys = _points(x, yk, rows, gaps)  # lists: Patch.extend needs arrays
                faint = kind == "raw"
                trace: dict[str, Any] = {
                    "type": trace_type, "x": xs, "y": ys, "mode": "lines", "name": f"{s.label} {line.label}",
                    "connectgaps": False,
                    "legendgroup": s.key, "showlegend": not band and not faint,
                    "line": {"color": s.colour, "dash": line.dash, "width": 0 if band else (1 if faint else 1.5)},
                }
                if faint:
                    trace["opacity"], trace["hoverinfo"] = 0.25, "skip"
                if line.row > 1:
                    trace["xaxis"], trace["yaxis"] = f"x{line.row}", f"y{line.row}"
                if band:
                    trace["hoverinfo"] = "skip"
                if line.derive == "lower":
                    trace["fill"], trace["fillcolor"] = "tonexty", _transparent(s.colour)
                data.append(trace)
                trace_map.append([s.key, li] if kind is None else [s.key, li, kind])
    layout = _layout(panel.title, uirevision, panel.rows)
    _x_layout(layout, panel, opts, max_step, any(s.running for s in series))
    if has_data:  # on an empty chart the alert lines alone would set a meaningless x range
        layout["shapes"] = panel_shapes(panel, series, alerts, opts.x)
    else:
        _no_data(layout, _no_data_text(panel, series))
    if not series:  # no run: no axes to read (empty ticks looked like data)
        for name, axis in layout.items():
            if name.startswith(("xaxis", "yaxis")):
                axis["visible"] = False
    return {"data": data, "layout": layout}, trace_map


def _no_data_text(panel: Panel, series: Sequence[Series]) -> str:
    """"no runs selected"; "no data yet" while a run is still being written; "not logged by this run" once
    every selected run has finished (nothing more will come)."""
    keys = ", ".join(sorted({line.key for line in panel.lines}))
    if not series:
        return "no runs selected"
    if any(s.running for s in series):
        return f"no data yet<br>({keys} not logged)"
    these = "this run" if len(series) == 1 else "these runs"
    return f"not logged by {these}<br>({keys}; finished, so no data yet means none)"


def _transparent(colour: str, alpha: float = 0.2) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def line_patch(panel: Panel, trace_map: Sequence[Sequence[Any]], views: dict[str, View],
               starts: dict[str, int], stops: dict[str, int] | None = None, opts: ChartOptions | None = None
               ) -> tuple[Patch | None, int]:
    """Append rows ``starts[run]:stops[run]`` of each run to its traces; (None, 0) when nothing is new.
    A smoothed trace is the EMA over rows ``0:stop`` (it depends on every earlier value), sent from ``start``."""
    opts = opts or ChartOptions()
    patch = Patch()
    added = 0
    for i, entry in enumerate(trace_map):
        run_key, li = entry[0], entry[1]
        view = views.get(run_key)
        if view is None or li >= len(panel.lines):
            continue
        stop = (stops or {}).get(run_key, len(view))
        start = starts.get(run_key, stop)
        if start >= stop:
            continue
        line = panel.lines[li]
        if len(entry) > 2 and entry[2] == "ema":
            _, y_all = line.values(view, 0, stop)
            y = ema(y_all, opts.smooth)[start:stop]
        else:
            _, y = line.values(view, start, stop)
        x = view.steps(start, stop) if opts.x == "step" else x_values(view, opts.x, start, stop)
        xs, ys = _points(x, y, np.flatnonzero(np.isfinite(y)), line.gaps(view, y, start) - start)
        if not xs:
            continue
        patch["data"][i]["x"].extend(xs)
        patch["data"][i]["y"].extend(ys)
        added += len(xs)
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


def layer_blocks(view: View, prefix: str, order: View | None = None) -> list[str]:
    """The blocks under ``prefix`` in model order: as ``order`` (a rank's view, written by the model) logged
    them, then any it lacks in ``view``'s order. The rank-mean records list their keys alphabetically
    (h.0, h.1, h.10, h.2, ...), so without ``order`` a DDP run's mean heatmap had another layer order than
    its single-rank heatmaps."""
    names = view.prefixed(prefix)
    if order is None:
        return names
    present = set(names)
    ranked = [b for b in order.prefixed(prefix) if b in present]
    return ranked + [b for b in names if b not in set(ranked)]


HEAT_ROW_PX = 190  # plot height of one run's heatmap when several runs are stacked
HEAT_GAP_PX = 50  # between two runs' heatmaps: the upper one's step ticks and the lower one's run title


def heat_axes(index: int) -> str:
    """The axis suffix of the ``index``-th run's heatmap (``""``, ``"2"``, ...)."""
    return "" if index == 0 else str(index + 1)


def heatmap_figure(heat: Heatmap, series: Sequence[Series], alerts: dict[str, list[Alert]],
                   uirevision: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer × step heatmap of every selected run (step buckets keep each bucket's max) and its map for live
    updates. Several runs are stacked, one row each titled with its run, each on its own step axis (a short
    run is not squeezed into a long run's range) and all on one colour scale, so equal colours are equal
    values. Trace ``i`` is run ``i`` (empty where that run logs no ``prefix`` keys)."""
    runs = [(s, layer_blocks(s.view, heat.prefix, s.order)) for s in series]
    multi = len(runs) > 1
    margin_t, margin_b = (58, 44) if multi else (36, 44)
    height = margin_t + margin_b + HEAT_ROW_PX * len(runs) + HEAT_GAP_PX * (len(runs) - 1) if multi else PANEL_HEIGHT
    layout = _layout(heat.title + (f": {series[0].label}" if len(series) == 1 else ""), uirevision, height=height)
    layout["hovermode"] = "closest"
    layout["yaxis"]["autorange"] = "reversed"  # first logged block (embeddings) on top
    heat_map = {"runs": [{"run": s.key, "blocks": blocks} for s, blocks in runs]}
    if not any(blocks for _, blocks in runs):
        _no_data(layout, "no runs selected" if not series else f"no data yet ({heat.prefix}<block> not logged)")
        return {"data": [], "layout": layout}, heat_map
    layout["margin"] = {**layout["margin"], "t": margin_t}
    plot_px = height - margin_t - margin_b
    gap = HEAT_GAP_PX / plot_px if multi else 0.0
    span = (1 - gap * (len(runs) - 1)) / len(runs)
    data: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    for i, (s, blocks) in enumerate(runs):
        ax = heat_axes(i)
        top = 1 - i * (span + gap)
        layout[f"xaxis{ax}"] = _axis(anchor=f"y{ax}", tickformat="d")
        layout[f"yaxis{ax}"] = _axis(domain=[top - span, top], anchor=f"x{ax}", autorange="reversed")
        if multi:
            notes.append({"text": f"<b>{s.label}</b>", "showarrow": False, "xref": "paper", "yref": "paper",
                          "x": 0, "y": top, "xanchor": "left", "yanchor": "bottom", "font": {"size": 11}})
        trace: dict[str, Any] = {"type": "heatmap", "x": [], "y": blocks, "z": [], "coloraxis": "coloraxis",
                                 "name": s.label, "hovertemplate": f"{s.label}<br>step %{{x}}<br>%{{y}}: %{{z:.4g}}"
                                                                   "<extra></extra>"}
        if i:
            trace["xaxis"], trace["yaxis"] = f"x{ax}", f"y{ax}"
        if blocks:
            edges = bucket_edges(s.n)
            trace["x"] = s.view.steps(0, s.n)[edges[:-1]].tolist()
            trace["z"] = [_nulls(_heat_values(heat, bucket_reduce(s.view.column(heat.prefix + b, 0, s.n), edges,
                                                                   "max"))) for b in blocks]
            shapes += _on_axes(alert_shapes([s], alerts), ax)
        else:
            notes.append({"text": f"no data yet ({heat.prefix}<block> not logged)", "showarrow": False,
                          "xref": "paper", "yref": "paper", "x": 0.5, "y": top - span / 2,
                          "font": {"size": 12, "color": "#888"}})
        data.append(trace)
    bottom = heat_axes(len(runs) - 1)
    layout[f"xaxis{bottom}"]["title"] = {"text": "step", "font": {"size": 10}, "standoff": 2}
    layout["coloraxis"] = {"colorscale": "Viridis", "colorbar": {"thickness": 10}}
    layout["shapes"] = shapes
    if notes:
        layout["annotations"] = notes
    return {"data": data, "layout": layout}, heat_map


def _on_axes(shapes: list[dict[str, Any]], ax: str) -> list[dict[str, Any]]:
    """Alert lines of one run moved onto its heatmap's axes (``ax``: :func:`heat_axes`)."""
    for shape in shapes:
        shape["xref"], shape["yref"] = f"x{ax}", f"y{ax} domain"
    return shapes


def heatmap_shapes(heat_map: dict[str, Any], series: Sequence[Series], alerts: dict[str, list[Alert]]
                   ) -> list[dict[str, Any]]:
    """The alert lines of every run drawn in a heatmap (``heat_map``: its map from :func:`heatmap_figure`)."""
    by_key = {s.key: s for s in series}
    shapes: list[dict[str, Any]] = []
    for i, entry in enumerate(heat_map.get("runs") or []):
        s = by_key.get(entry.get("run"))
        if s is not None and entry.get("blocks"):
            shapes += _on_axes(alert_shapes([s], alerts), heat_axes(i))
    return shapes


def heatmap_patch(heat: Heatmap, heat_map: dict[str, Any], views: dict[str, View], starts: dict[str, int],
                  stops: dict[str, int] | None = None, orders: dict[str, View | None] | None = None
                  ) -> tuple[Patch | None, int]:
    """Append each run's steps ``starts[run]:stops[run]`` as columns of its trace; (None, 0) when nothing is
    new, (None, -1) when a run's blocks changed (the figure must be rebuilt)."""
    patch = Patch()
    added = 0
    for i, entry in enumerate(heat_map.get("runs") or []):
        view = views.get(entry.get("run"))
        if view is None:
            continue
        stop = (stops or {}).get(entry["run"], len(view))
        start = starts.get(entry["run"], stop)
        if start >= stop:
            continue
        blocks = layer_blocks(view, heat.prefix, (orders or {}).get(entry["run"]))
        if blocks != entry.get("blocks"):
            return None, -1
        if not blocks:
            continue
        patch["data"][i]["x"].extend(view.steps(start, stop).tolist())
        for r, block in enumerate(blocks):
            patch["data"][i]["z"][r].extend(_nulls(_heat_values(heat, view.column(heat.prefix + block, start, stop))))
        added += stop - start
    return (patch, added) if added else (None, 0)


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


MANY_RANKS = 32  # above this many ranks the per-rank chart labels some bars (hover names each) and draws no outlines


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
    if len(ranks) > MANY_RANKS:  # 256 ranks: a label per bar and bar outlines took plotly.js ~0.33 s, 16 labels ~0.1 s
        fig.update_xaxes(nticks=16)
        fig.update_traces(marker_line_width=0)
    return fig


def system_figure(records: Sequence[dict[str, Any]], rank: Any = ALL) -> go.Figure:
    """CPU %, RSS (GiB) and whatever GPU keys the sampler wrote, against time since the first sample.

    Every rank of a DDP run appends to the one ``system.jsonl``: each rank is its own line (interleaved
    into one line they drew a sawtooth), and a rank picked in the rank selector shows that rank alone.
    """
    title = "System: CPU, RSS and GPU" + (f" (rank {rank})" if rank != ALL else "")
    numeric = [r for r in records if isinstance(r.get("time"), (int, float))]
    if rank != ALL:
        numeric = [r for r in numeric if r.get("rank", 0) == rank]
    if not numeric:
        message = "system.jsonl is empty or missing" if rank == ALL else f"system.jsonl has no records of rank {rank}"
        return empty_figure(title, f"no data yet: {message}", height=300)
    by_rank: dict[Any, list[dict[str, Any]]] = {}
    for r in numeric:
        by_rank.setdefault(r.get("rank", 0), []).append(r)
    t0 = min(r["time"] for r in numeric)
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
    multi = len(by_rank) > 1
    for ri, (r_id, recs) in enumerate(sorted(by_rank.items(), key=lambda kv: str(kv[0]))):
        recs = sorted(recs, key=lambda r: r["time"])
        x = [r["time"] - t0 for r in recs]
        for row, (_, ks) in enumerate(groups, 1):
            for k in ks:
                scale = 2.0**-30 if k.endswith("bytes") else 1.0
                y = [r[k] * scale if isinstance(r.get(k), (int, float)) else None for r in recs]
                fig.add_trace(go.Scattergl(x=x, y=y, mode="lines", name=f"{k} [rank {r_id}]" if multi else k,
                                           legendgroup=f"rank {r_id}",
                                           line=dict(dash=("solid", "dot", "dash", "dashdot")[ri % 4])),
                              row=row, col=1)
    _base_layout(fig, title, "system")
    fig.update_layout(height=160 + 140 * len(groups), hovermode="x unified")
    fig.update_xaxes(title_text="seconds since the first sample", row=len(groups), col=1)
    return fig


def flame_or_message(folded: Path | None) -> go.Figure:
    """The profiler's flame graph of the latest folded-stacks file, or a 'no data yet' figure."""
    title = "Flame graph (latest profiled window)"
    if folded is None:
        return empty_figure(title, "no data yet: no traces/*.folded (run with the profiler on)", height=300)

    try:
        fig = flame_figure(folded)
    except (FoldedError, OSError, ValueError) as err:
        return empty_figure(title, f"{folded.name}: {err}", height=300)
    fig.update_layout(height=520)
    return fig


def memory_figure(report: dict[str, Any] | None) -> go.Figure:
    """Predicted bytes per phase (stacked components) and the measured peak of each phase (diamonds).

    Only a report that says ``comparable: true`` (CUDA allocator peaks against tensor bytes) gets both on one
    axis; otherwise (RSS on the CPU: the whole process, an upper bound) the measurement has its own panel and
    axis, so nobody reads the gap between the two as an error of the prediction.
    """
    title = "Memory per phase (MiB)"
    if report is None:
        return empty_figure(title, "no data yet: this run has no memory.json (rlhfkit memory ...)", height=380)
    prediction = _dict(report.get("prediction"))
    phases = _dict(prediction.get("phases"))
    measured_block = _dict(report.get("measured"))
    measured = _dict(measured_block.get("phases"))
    names = list(phases) + [p for p in measured if p not in phases]
    if not names:
        return empty_figure(title, "memory.json holds no phases yet", height=380)
    components: list[str] = []
    for comps in phases.values():
        if isinstance(comps, dict):
            components += [c for c in comps if c != "total" and c not in components]
    mib = 2.0**-20
    meas = [(p, _num(measured.get(p))) for p in names if isinstance(measured.get(p), (int, float))]
    method = str(measured_block.get("method", "?"))
    together = report.get("comparable") is True or not meas
    if together:
        fig = go.Figure()
        title = "Memory per phase: prediction (stacked) vs measurement (diamonds), MiB"
    else:
        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12, subplot_titles=[
            "predicted tensor bytes (stacked), MiB", "measured peak, MiB: not comparable with the prediction"])
        title = "Memory per phase: prediction and measurement on separate axes (memory.json: not comparable)"
    col = {} if together else {"row": 1, "col": 1}
    for comp in components:
        y = [_num(_dict(phases.get(p)).get(comp)) * mib if isinstance(phases.get(p), dict) else 0.0 for p in names]
        fig.add_trace(go.Bar(x=names, y=y, name=comp), **col)
    if meas:
        fig.add_trace(go.Scatter(x=[p for p, _ in meas], y=[v * mib for _, v in meas], mode="markers",
                                 name=f"measured ({method})", hovertemplate="%{x}: %{y:.1f} MiB<extra>"
                                 + method[:60] + "</extra>",
                                 marker=dict(symbol="diamond", size=14, color="black")),
                      **({} if together else {"row": 1, "col": 2}))
    _base_layout(fig, title, "memory")
    fig.update_layout(barmode="stack", height=380, hovermode="closest")
    fig.update_yaxes(title_text="MiB")
    peak = prediction.get("peak_phase")
    if peak:
        fig.add_annotation(text=f"predicted peak: {peak} ({_num(prediction.get('peak_bytes')) * mib:.1f} MiB)",
                           showarrow=False, xref="paper", yref="paper", x=1, y=1.08, xanchor="right")
    return fig


def _dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (memory.json is read as it is, never trusted)."""
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def colour_of(index: int) -> str:
    """The palette's colours, then as many more as needed, each as far (in RGB) from all earlier ones as the
    candidate set allows, so the 9th run is not the 1st run's colour again and no two runs look alike."""
    colours = _extra_colours()
    if index < len(colours):
        return colours[index]
    k = index - len(colours)  # beyond ~200 runs: golden-angle hues (distinct, if less far apart)
    return _hsl_hex((k * 137.508) % 360.0, 0.7, (0.35, 0.5, 0.62)[k % 3])


@functools.lru_cache(maxsize=1)
def _extra_colours(count: int = 200) -> tuple[str, ...]:
    """PALETTE followed by a greedy farthest-point pick from an HSL grid (no near-white, no greys)."""
    candidates = [_hsl_hex(h, sat, light) for h in range(0, 360, 10) for sat in (0.55, 0.85)
                  for light in (0.3, 0.45, 0.6)]
    rgb = lambda c: np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)  # noqa: E731
    chosen = list(PALETTE)
    pool = np.array([rgb(c) for c in candidates])
    dist = np.min([np.linalg.norm(pool - rgb(c), axis=1) for c in chosen], axis=0)
    while len(chosen) < min(count, len(PALETTE) + len(candidates)):
        i = int(np.argmax(dist))
        chosen.append(candidates[i])
        dist = np.minimum(dist, np.linalg.norm(pool - pool[i], axis=1))
        dist[i] = -1.0
    return tuple(chosen)


def _hsl_hex(hue: float, sat: float, light: float) -> str:
    c = (1 - abs(2 * light - 1)) * sat
    x = c * (1 - abs((hue / 60.0) % 2 - 1))
    m = light - c / 2
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hue // 60) % 6]
    return "#" + "".join(f"{int(round((v + m) * 255)):02x}" for v in (r, g, b))


def alert_counts(alerts: Iterable[Alert]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in alerts:
        out[a.severity] = out.get(a.severity, 0) + 1
    return out


# ---- timeline tab: phases per rank on one clock (rlhf_core/runformat/timeline.py reads and analyses them)
WAIT_COLOUR = "#d62728"
TIMELINE_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22",
                    "#7f7f7f", "#aec7e8", "#98df8a", "#c5b0d5")
MAX_TIMELINE_BARS = 5000  # above this many bars the Gantt becomes a binned raster (one heatmap) to stay fast
TIMELINE_BINS = 1200  # columns of the raster: about one per pixel of a wide chart
TIMELINE_ROW_PX = 22


def _timeline_rows(tv: TimelineView, ranks: Sequence[int] | None) -> list[int]:
    shown = sorted(tv.timeline.steps)
    return [r for r in shown if ranks is None or r in ranks]


def timeline_row_label(tv: TimelineView, rank: int) -> str:
    proc = tv.timeline.processes.get(rank)
    return f"rank {rank} ({proc.role})" if proc is not None else f"rank {rank}"


def _segments(tv: TimelineView, rank: int) -> Iterable[tuple[str, int, int, int]]:
    """(phase or "waiting", start ns, end ns, step) of a rank: a collective-bound occurrence split into the
    time it waited for the last rank and the rest."""
    for s in tv.report.steps if tv.report is not None else ():
        for o in s.occurrences.get(rank, ()):
            if o.wait:
                yield "waiting", o.start, o.start + o.wait, s.step
            if o.dur > o.wait:
                yield o.name, o.start + o.wait, o.end, s.step


def timeline_figure(tv: TimelineView, ranks: Sequence[int] | None = None, title: str = "Timeline") -> dict[str, Any]:
    """A Gantt of every phase per rank (one row each) over the chosen steps, the waits in red; a plain dict
    (256 ranks x 100 steps is ~200k bars: beyond :data:`MAX_TIMELINE_BARS` it is drawn as a binned heatmap,
    one column per ~pixel, each cell the phase, or the wait, covering the column's centre)."""
    rows = _timeline_rows(tv, ranks)
    height = max(PANEL_HEIGHT, 90 + TIMELINE_ROW_PX * len(rows))
    if tv.report is None or not rows or not tv.report.steps:
        fig = empty_figure(title, tv.message or "no phase intervals for this selection", height=PANEL_HEIGHT)
        return fig.to_plotly_json()
    lo, hi = tv.steps or (0, 0)
    t0 = min(s.start for s in tv.report.steps)
    labels = [timeline_row_label(tv, r) for r in rows]
    phases = [p for p in PHASES if any(p in s.phase_busy for s in tv.report.steps)]
    phases += sorted({n for s in tv.report.steps for n in s.phase_busy} - set(phases))
    colours = {p: TIMELINE_PALETTE[i % len(TIMELINE_PALETTE)] for i, p in enumerate(phases)}
    colours["waiting"] = WAIT_COLOUR
    count = sum(len(items) for s in tv.report.steps for r, items in s.occurrences.items() if r in rows)
    binned = count > MAX_TIMELINE_BARS
    data = _timeline_raster(tv, rows, labels, t0, colours) if binned else _timeline_bars(tv, rows, labels, t0,
                                                                                          colours)
    kind = f"binned into {TIMELINE_BINS} columns ({count:,} phase occurrences)" if binned else "waits in red"
    layout = _layout(f"{title}: steps {lo}-{hi}, {len(rows)} rank{'s' * (len(rows) != 1)}, {kind}",
                     f"timeline-{lo}-{hi}", height=height)
    plot_px = height - 36 - 90  # the plot area between the margins below: the legend goes under the axis title
    layout.update(barmode="overlay", bargap=0.25, hovermode="closest", showlegend=not binned,
                  legend={"orientation": "h", "y": -62 / plot_px, "yanchor": "top", "font": {"size": 10}})
    layout["xaxis"].update(title={"text": f"seconds since step {lo} started (rank 0's clock)"}, type="linear")
    layout["yaxis"].update(type="category", categoryorder="array", categoryarray=labels, autorange="reversed",
                           title={"text": ""})
    layout["margin"] = {"l": 130, "r": 10, "t": 36, "b": 90}
    shapes = []
    if len(tv.report.steps) <= 50:  # step boundaries as light lines (more would be a grey wall)
        shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": (s.start - t0) / 1e9,
                   "x1": (s.start - t0) / 1e9, "y0": 0, "y1": 1,
                   "line": {"color": "#bbb", "width": 1, "dash": "dot"}} for s in tv.report.steps]
    if binned and len(rows) > 1:
        shapes.append(_row_separators(len(rows)))
    if shapes:
        layout["shapes"] = shapes
    return {"data": data, "layout": layout}


def _row_separators(n: int) -> dict[str, Any]:
    """A white line between the raster's rows, all in one path shape: a heatmap's own ``ygap`` makes plotly.js
    draw every cell as a brick of its own, ~0.25 s for 256 ranks x 1,200 columns in headless Chromium, where
    the gap-free heatmap and this shape take ~0.05 s."""
    path = "".join(f"M0,{i + 0.5}L1,{i + 0.5}" for i in range(n - 1))  # y: the rows' category index
    return {"type": "path", "xref": "paper", "yref": "y", "path": path, "layer": "above",
            "line": {"color": "white", "width": 1}}


def _timeline_bars(tv: TimelineView, rows: list[int], labels: list[str], t0: int,
                   colours: dict[str, str]) -> list[dict[str, Any]]:
    """One horizontal bar trace per phase (and one for the waits): ``base`` is the start, ``x`` the length."""
    by_name: dict[str, tuple[list[str], list[float], list[float], list[int]]] = {n: ([], [], [], []) for n in colours}
    for rank, label in zip(rows, labels):
        for name, start, end, step in _segments(tv, rank):
            y, x, base, steps = by_name.setdefault(name, ([], [], [], []))
            y.append(label)
            x.append((end - start) / 1e9)
            base.append((start - t0) / 1e9)
            steps.append(step)
    out = []
    for name, (y, x, base, steps) in by_name.items():
        if not y:
            continue
        what = "waiting for the last rank" if name == "waiting" else name
        out.append({"type": "bar", "orientation": "h", "name": name, "y": y, "x": x, "base": base,
                    "customdata": steps, "marker": {"color": colours.get(name, "#999"), "line": {"width": 0}},
                    "hovertemplate": f"%{{y}}<br>step %{{customdata}}: {what}<br>"
                                     "from %{base:.4f} s for %{x:.4f} s<extra></extra>"})
    return out


def _timeline_raster(tv: TimelineView, rows: list[int], labels: list[str], t0: int,
                     colours: dict[str, str]) -> list[dict[str, Any]]:
    """The Gantt as a heatmap: per rank, the segment under each column's centre (sorted starts, one
    ``searchsorted``), so drawing costs ranks x columns whatever the number of phases."""
    names = list(colours)
    t1 = max(s.end for s in tv.report.steps) if tv.report is not None else t0
    width = max(t1 - t0, 1)
    centres = t0 + (np.arange(TIMELINE_BINS) + 0.5) * (width / TIMELINE_BINS)
    code = {n: i for i, n in enumerate(names)}
    z = np.full((len(rows), TIMELINE_BINS), np.nan)
    wait_code = code["waiting"]
    for row, rank in enumerate(rows):
        occ = [o for st in (tv.report.steps if tv.report is not None else ()) for o in st.occurrences.get(rank, ())]
        if not occ:
            continue
        start = np.fromiter((o.start for o in occ), np.int64, len(occ))
        wait = np.fromiter((o.wait for o in occ), np.int64, len(occ))
        dur = np.fromiter((o.dur for o in occ), np.int64, len(occ))
        phase = np.fromiter((code[o.name] for o in occ), np.float64, len(occ))
        # each occurrence as [start, start + wait) waiting, then [start + wait, end) in its phase; a stable sort
        # keeps an empty wait before its phase, so the phase wins the tie
        starts = np.concatenate([start, start + wait])
        ends = np.concatenate([start + wait, start + dur])
        cats = np.concatenate([np.full(len(occ), float(wait_code)), phase])
        order = np.argsort(starts, kind="stable")
        starts, ends, cats = starts[order], ends[order], cats[order]
        idx = np.searchsorted(starts, centres, side="right") - 1
        ok = (idx >= 0) & (centres < ends[np.clip(idx, 0, None)])
        z[row, ok] = cats[idx[ok]]
    n = len(names)
    scale = []
    for i, name in enumerate(names):  # a stepped colour scale: value i is exactly the colour of names[i]
        scale += [[i / n, colours[name]], [(i + 1) / n, colours[name]]]
    return [{"type": "heatmap", "z": _nulls_2d(z), "y": labels,
             "x": ((centres - t0) / 1e9).round(6).tolist(), "zmin": -0.5, "zmax": n - 0.5, "colorscale": scale,
             "colorbar": {"tickvals": list(range(n)), "ticktext": names, "thickness": 12, "len": 0.9},
             "hovertemplate": "%{y}<br>%{x:.3f} s<extra></extra>", "xgap": 0, "ygap": 0}]


def _nulls_2d(z: np.ndarray) -> list[list[int | None]]:
    """Cell codes as JSON-ready ints, None where no phase covers the cell (drawn transparent)."""
    empty = np.isnan(z)
    cells = np.where(empty, -1, z).astype(np.int64).astype(object)
    cells[empty] = None
    return cells.tolist()
