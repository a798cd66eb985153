"""Flame graphs from folded stacks (``frame;frame;leaf value`` lines, Brendan Gregg's format).

Three outputs of one tree: :func:`flame_figure` (a plotly icicle drawn as a flame graph, root at the bottom,
click to zoom: what the dashboard shows), :func:`write_html` (that figure as one self-contained HTML file) and
:func:`write_svg` (a plain SVG with hover tooltips: opens anywhere, converts to PNG). Frames inside a
``phase/<name>`` range share that phase's colour so the RLHF phases stand out. Torch-free.

``python -m profiler.flamegraph FOLDED [-o OUT.svg|OUT.html]`` renders a folded file from the command line.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASE_COLOURS = {
    "rollout": "#e45756", "reward": "#f58518", "ref_logprobs": "#54a24b", "old_logprobs": "#88d27a",
    "values": "#b279a2", "advantages": "#ff9da6", "update": "#4c78a8", "optimizer": "#72b7b2",
    "logging": "#9d755d",
}
OTHER_PHASE_COLOUR = "#bab0ac"


class FoldedError(Exception):
    """A folded-stacks file that is missing or holds no usable line."""


@dataclass
class Node:
    name: str
    total: float = 0.0
    children: dict[str, Node] = field(default_factory=dict)

    @property
    def self_value(self) -> float:
        return max(0.0, self.total - sum(c.total for c in self.children.values()))


FOLDED_KINDS = {"cpu": ".folded", "cuda": ".cuda.folded", "python": ".stacks.folded"}


def folded_files(traces_dir: str | os.PathLike, kind: str = "cpu") -> list[Path]:
    """Folded files of a run's ``traces/`` folder, oldest first: ``cpu`` (op tree, CPU self time), ``cuda``
    (op tree, device self time) or ``python`` (``export_stacks``)."""
    if kind not in FOLDED_KINDS:
        raise ValueError(f"unknown folded kind {kind!r}; expected one of {', '.join(FOLDED_KINDS)}")
    found = list(Path(traces_dir).glob(f"*{FOLDED_KINDS[kind]}"))
    if kind == "cpu":
        found = [p for p in found if not p.name.endswith((".cuda.folded", ".stacks.folded"))]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def latest_folded(traces_dir: str | os.PathLike, kind: str = "cpu") -> Path | None:
    """Newest folded file of ``kind`` (see :func:`folded_files`); None when there is none yet."""
    found = folded_files(traces_dir, kind)
    return found[-1] if found else None


def parse_folded(text: str) -> tuple[dict[tuple[str, ...], float], list[int]]:
    """Stacks and their summed values, plus the numbers of the lines that were not ``stack value``."""
    stacks: dict[tuple[str, ...], float] = {}
    bad: list[int] = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        stack, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            bad.append(no)
            continue
        frames = tuple(f for f in stack.split(";") if f)
        if not frames or v != v or v < 0:
            bad.append(no)
            continue
        stacks[frames] = stacks.get(frames, 0.0) + v
    return stacks, bad


def read_folded(path: str | os.PathLike) -> dict[tuple[str, ...], float]:
    """Stacks of a folded file; malformed lines are skipped with one warning line on stderr."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise FoldedError(f"{p}: cannot read folded stacks ({err.strerror or err})") from None
    stacks, bad = parse_folded(text)
    if bad:
        print(f"{p}: skipped {len(bad)} malformed line(s), first at line {bad[0]}", file=sys.stderr)
    if not stacks:
        raise FoldedError(f"{p}: no stack lines (expected 'frame;frame;leaf value')")
    return stacks


def build_tree(stacks: dict[tuple[str, ...], float], root_name: str = "all") -> Node:
    root = Node(root_name)
    for frames, value in stacks.items():
        root.total += value
        node = root
        for frame in frames:
            node = node.children.setdefault(frame, Node(frame))
            node.total += value
    return root


def _phase_of(name: str, inherited: str | None) -> str | None:
    return name[len("phase/"):] if name.startswith("phase/") else inherited


def _colour(name: str, phase: str | None) -> str:
    if phase is not None:
        return PHASE_COLOURS.get(phase, OTHER_PHASE_COLOUR)
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16)  # stable warm colours, as flamegraph.pl
    return f"rgb({205 + h % 50},{(h >> 8) % 180 + 40},{(h >> 16) % 55})"


def _walk(node: Node, path: str, phase: str | None, depth: int, min_value: float
          ) -> Iterator[tuple[str, str, Node, str | None, int]]:
    for child in sorted(node.children.values(), key=lambda c: c.name):
        if child.total < min_value:
            continue
        cid = f"{path};{child.name}"
        cphase = _phase_of(child.name, phase)
        yield cid, path, child, cphase, depth + 1
        yield from _walk(child, cid, cphase, depth + 1, min_value)


def flame_figure(folded_path: str | os.PathLike, *, min_fraction: float = 0.001, unit: str = "us",
                 title: str | None = None) -> Any:
    """A plotly flame graph (icicle, root at the bottom) of a folded-stacks file.

    ``min_fraction`` hides frames under that share of the total (they stay counted in their parent) so big
    traces stay light; ``unit`` is the unit of the folded values (``us`` from our traces). Raises
    :class:`FoldedError` with a one-line message for a missing or empty file.
    """
    import plotly.graph_objects as go

    root = build_tree(read_folded(folded_path))
    scale, shown = (1e-3, "ms") if unit == "us" else (1.0, unit)
    ids, labels, parents, values, colours, custom = ["all"], ["all"], [""], [root.total], [OTHER_PHASE_COLOUR], []
    custom.append([root.total * scale, 100.0, root.self_value * scale])
    for cid, pid, node, phase, _ in _walk(root, "all", None, 0, root.total * min_fraction):
        ids.append(cid)
        labels.append(node.name)
        parents.append(pid)
        values.append(node.total)
        colours.append(_colour(node.name, phase))
        custom.append([node.total * scale, 100.0 * node.total / root.total if root.total else 0.0,
                       node.self_value * scale])
    fig = go.Figure(go.Icicle(
        ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
        marker=dict(colors=colours), customdata=custom, tiling=dict(orientation="v", flip="y"),
        hovertemplate=f"<b>%{{label}}</b><br>%{{customdata[0]:.3f}} {shown} (%{{customdata[1]:.1f}}%)"
                      f"<br>self %{{customdata[2]:.3f}} {shown}<extra></extra>",
        maxdepth=-1,
    ))
    fig.update_layout(title=title or f"Flame graph: {Path(folded_path).name}", margin=dict(l=10, r=10, t=40, b=10),
                      height=600)
    return fig


def write_html(folded_path: str | os.PathLike, html_path: str | os.PathLike, **kwargs: Any) -> Path:
    """The interactive figure as one self-contained HTML file (plotly.js inlined: works offline)."""
    out = Path(html_path)
    flame_figure(folded_path, **kwargs).write_html(str(out), include_plotlyjs=True, full_html=True)
    return out


def svg_text(stacks: dict[tuple[str, ...], float], *, title: str = "Flame graph", width: int = 1200,
             frame_height: int = 17, min_px: float = 0.3, unit: str = "us") -> str:
    """A flame graph SVG (root at the bottom, hover a frame for its time and share)."""
    root = build_tree(stacks)
    scale, shown = (1e-3, "ms") if unit == "us" else (1.0, unit)
    px_per = (width - 20) / root.total if root.total else 0.0
    rows: list[tuple[float, int, Node, str | None]] = []

    def place(node: Node, x: float, depth: int, phase: str | None) -> None:
        rows.append((x, depth, node, phase))
        cx = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            w = child.total * px_per
            if w >= min_px:
                place(child, cx, depth + 1, _phase_of(child.name, phase))
            cx += w

    place(root, 10.0, 0, None)
    max_depth = max(d for _, d, _, _ in rows)
    top = 40
    height = top + (max_depth + 1) * frame_height + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Verdana, sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="#fdfdf6"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="16">{html.escape(title)}</text>',
    ]
    for x, depth, node, phase in rows:
        w = node.total * px_per
        y = height - 20 - (depth + 1) * frame_height
        pct = 100.0 * node.total / root.total if root.total else 0.0
        tip = f"{node.name} ({node.total * scale:.3f} {shown}, {pct:.2f}%, self {node.self_value * scale:.3f} {shown})"
        parts.append(f'<g><title>{html.escape(tip)}</title><rect x="{x:.2f}" y="{y}" width="{max(w - 0.5, 0.1):.2f}" '
                     f'height="{frame_height - 1}" fill="{_colour(node.name, phase)}" rx="2"/>')
        chars = int((w - 6) / 6.5)
        if chars >= 3:
            label = node.name if len(node.name) <= chars else node.name[: chars - 2] + ".."
            parts.append(f'<text x="{x + 3:.2f}" y="{y + frame_height - 5}">{html.escape(label)}</text>')
        parts.append("</g>")
    legend_x = 10
    for phase, colour in PHASE_COLOURS.items():
        parts.append(f'<rect x="{legend_x}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{legend_x + 14}" y="{height - 5}">{phase}</text>')
        legend_x += 24 + 7 * len(phase)
    parts.append("</svg>")
    return "\n".join(parts)


def write_svg(folded_path: str | os.PathLike, svg_path: str | os.PathLike, **kwargs: Any) -> Path:
    out = Path(svg_path)
    kwargs.setdefault("title", f"Flame graph: {Path(folded_path).name}")
    out.write_text(svg_text(read_folded(folded_path), **kwargs), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m profiler.flamegraph",
        description="Render a folded-stacks file as an SVG or a self-contained HTML flame graph.")
    parser.add_argument("folded", help="folded stacks file (traces/*.folded)")
    parser.add_argument("-o", "--output", help="OUT.svg or OUT.html (default: next to the input, .svg)")
    args = parser.parse_args(argv)
    out = Path(args.output) if args.output else Path(args.folded).with_suffix(".svg")
    try:
        if out.suffix == ".html":
            write_html(args.folded, out)
        else:
            write_svg(args.folded, out)
    except FoldedError as err:
        print(f"flamegraph: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"flamegraph: cannot write {out} ({err.strerror or err})", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
