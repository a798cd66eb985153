"""``rlhfkit dashboard``: the Dash app over a runs folder (live, overlay, alerts, profiler and memory tabs).

Binds to 127.0.0.1 unless ``--host`` says otherwise; only files under ``--runs`` are ever read or served.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.runformat.run_reader import RunError, resolve_run_path

from .data import ALL, RunCache, metrics_csv

if TYPE_CHECKING:
    from dash import Dash

TRACE_TYPES = {"auto": "auto", "webgl": "scattergl", "svg": "scatter"}


def create_app(runs_root: str | Path, render: str = "auto", preload: bool = False) -> Dash:
    """A Dash app serving the runs under ``runs_root`` (the folder may be empty or not exist yet).

    ``render`` picks the line traces: ``webgl`` (Scattergl), ``svg`` (plain Scatter) or ``auto`` (default:
    WebGL when the browser renders it on a GPU, SVG when WebGL is software-rendered or missing, where
    Scattergl costs seconds per page; downsampling keeps every trace at a few thousand points either way).
    ``preload`` (``rlhfkit dashboard``) starts reading the newest run, the one a page opened without a
    selection shows, on a background thread first, while the server imports Dash and builds the page (~0.5 s
    here, half a 100k-step run's read); a page that arrives sooner waits for the read as it would anyway.
    """
    if render not in TRACE_TYPES:
        raise ValueError(f"render must be one of {', '.join(TRACE_TYPES)}, not {render!r}")
    cache = RunCache(runs_root)
    if preload:
        cache.warm(cache.newest())
    # Dash, Flask and the page's modules are imported here, after the read above has started
    from dash import Dash
    from flask import Response, abort, request, send_file

    from .callbacks import holding, register
    from .figures import PANELS, key_panel
    from .layout import build_layout

    _import_pandas()
    # dash documents update_title=None (no "Updating..." tab title while callbacks run) but annotates it str
    app = Dash(__name__, title="RLHF Systems Kit", update_title=None,  # type: ignore[arg-type]
               suppress_callback_exceptions=False)
    app.layout = build_layout(str(cache.root))
    builder = register(app, cache, TRACE_TYPES[render])
    app.server.config["RLHFKIT_CACHE"] = cache

    @app.server.before_request
    def warm_linked_runs() -> None:
        """A page asked for by run (``/?run=ID``): start reading it now, while the browser loads the scripts
        (~0.4 s here), rather than when the page's first callback arrives."""
        if request.path == "/" and request.args.get("run"):
            cache.warm([k for k in request.args.getlist("run") if k], builder.prepare)

    @app.server.route("/files/<path:run_key>/traces/<name>")
    def trace_file(run_key: str, name: str):  # a Chrome trace of a run, for Perfetto
        try:
            run_dir = resolve_run_path(cache.root, run_key)
        except RunError:
            abort(404)
        path = run_dir / "traces" / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.resolve().parent != run_dir / "traces":
            abort(404)
        return send_file(path, as_attachment=True)

    @app.server.route("/download/<kind>.csv")
    def download_csv(kind: str):
        """A chart's data (``chart.csv?chart=kl&run=a&run=b&rank=all``) or a run's metrics
        (``metrics.csv?run=a``) as CSV, read from the runs root only."""
        runs, problems = builder.load([r for r in request.args.getlist("run") if r])
        if not runs:
            abort(404, "; ".join(problems) or "no run")
        rank = _rank_arg(request.args.get("rank"))
        chart = request.args.get("chart", "")
        if kind == "chart":
            panel = next((p for p in PANELS if p.id == chart), None)
            if panel is None and chart.startswith("key:"):
                panel = key_panel(chart[4:])
            if panel is None:
                abort(404, f"no chart {chart!r}")
            keys: list[str] | None = list(panel.keys)
        elif kind == "metrics":
            keys = None
        else:
            abort(404)
        with holding(runs):
            body = metrics_csv({d.key: d.view(rank) for d in runs}, keys)
        name = (chart.replace("key:", "").replace("/", "_") or "metrics") + "_" + "_".join(d.key for d in runs)
        return Response(body, mimetype="text/csv", headers={
            "Content-Disposition": f"attachment; filename=\"{_safe_name(name)}.csv\""})

    return app


def _import_pandas() -> None:
    """Import pandas (when installed) with the server, not during a page: pyarrow's column conversion imports
    it on the first columnar read, ~0.35 s holding the GIL inside a big run's first render, and meanwhile
    plotly's JSON encoder, in another request thread, took the half-imported module from ``sys.modules`` and
    failed (the page said "Error loading layout")."""
    with contextlib.suppress(ImportError):
        importlib.import_module("pandas")


def _rank_arg(value: str | None) -> Any:
    return int(value) if value and value.isdigit() else ALL


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfkit dashboard", description="Serve the Dash dashboard over a runs folder.")
    p.add_argument("--runs", default="runs", help="folder holding the run directories (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument("--render", choices=sorted(TRACE_TYPES), default="auto",
                   help="line traces: webgl (Scattergl), svg, or auto (default: WebGL when the browser has a GPU)")
    p.add_argument("--debug", action="store_true", help="Dash debug mode (dev tools, reloader)")
    p.add_argument("--verbose", action="store_true",
                   help="log every HTTP request (werkzeug); by default only warnings and errors")
    return p


def configure_logging(verbose: bool = False) -> None:
    """The dashboard's own messages at INFO; werkzeug's per-request lines (one per poll: hundreds a minute)
    only with ``--verbose``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path(args.runs)
    if root.exists() and not root.is_dir():
        print(f"rlhfkit dashboard: --runs {root} is not a folder", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"rlhfkit dashboard: --port {args.port} is not a valid port", file=sys.stderr)
        return 2
    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"rlhfkit dashboard: cannot serve on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return 1
    configure_logging(args.verbose)
    # not under --debug: its reloader runs this in a watching process too, which would read the run for nothing
    app = create_app(root, args.render, preload=not args.debug)
    print(f"dashboard over {root.resolve()} at http://{args.host}:{args.port}/", flush=True)
    app.run(host=args.host, port=args.port, debug=args.debug)
    return 0


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (in use, unknown host), or None; checked before Dash starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as err:
        return err.strerror or str(err)
    return None


if __name__ == "__main__":
    sys.exit(main())
