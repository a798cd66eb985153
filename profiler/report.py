"""``rlhfkit report RUN_DIR``: where the time and memory of a run's steps went.

Per-phase table (ms/step, share of the step, peak memory), the untimed remainder, throughput, the slowest
steps and the phase that made each slow, the top ops of the latest trace and what exporting the trace windows
cost (their ``.export.json``: no step record holds that time), and a system summary. ``--json``
prints the same content as one JSON object. Reads the run only through :class:`rlhf_core.runformat.run_reader.Run` and
never imports torch, so it runs anywhere a run directory can be copied to.

Exit codes (with and without ``--json``): 0 report printed, 1 no step records yet, 2 not a readable run
(missing, no or unreadable meta.json). What the reader could not use (bad lines, wrong field types, files that
are folders or loops, a foreign trace) is a warning on stderr, at most five lines and a count of the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_core.runformat.keys import PHASES, CumulativeRate
from rlhf_core.runformat.run_reader import Run, RunError, read_json_file, summarize
from rlhf_core.stability.analysis import RunAnalysis

from .trace_analysis import TraceError, load_trace, op_kind, op_totals, phase_summary

TRACE_SUFFIX = ".pt.trace.json"
_WINDOW = re.compile(r"_steps(\d+)-(\d+)$")


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _val(v: Any, default: float) -> float:
    """``v`` as a float when it is a number (NaN and inf included), else ``default``: a string or a list where a
    number belongs is treated like a missing value instead of failing the whole report."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _phases_in(records: list[dict[str, Any]]) -> list[str]:
    seen = {k[len("time/"):] for r in records for k in r if k.startswith("time/") and k != "time/step"}
    return [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))


def trace_stem(trace: Path) -> str:
    name = trace.name
    return name[: name.index(TRACE_SUFFIX)] if TRACE_SUFFIX in name else trace.stem


def traced_steps(run: Run) -> set[int]:
    """Steps inside a trace window (from ``rank<r>_steps<first>-<last>`` names): profiling slows them."""
    out: set[int] = set()
    for trace in run.traces():
        m = _WINDOW.search(trace_stem(trace))
        if m:
            out.update(range(int(m.group(1)), int(m.group(2)) + 1))
    return out


def _sidecar_json(trace: Path, suffix: str, problems: list[str]) -> Any:
    path = trace.with_name(trace_stem(trace) + suffix)
    if not os.path.lexists(path):
        return None
    try:
        return read_json_file(path, suffix.lstrip("."))
    except RunError as err:
        problems.append(f"{err}; ignored")
        return None


# what a foreign or damaged trace can make the analysis raise; the rest of the report does not depend on it
_TRACE_ERRORS = (TraceError, RecursionError, MemoryError, ValueError, TypeError, KeyError, AttributeError, IndexError)


def latest_trace_info(run: Run, top: int, problems: list[str]) -> dict[str, Any] | None:
    """Top ops and per-phase allocator peaks of the newest trace (sidecar files, else the trace itself)."""
    traces = run.traces()
    if not traces:
        return None
    trace = traces[-1]
    ops = _sidecar_json(trace, ".ops.json", problems)
    phases = _sidecar_json(trace, ".phases.json", problems)
    source = "ops.json"
    if not isinstance(ops, list) or not isinstance(phases, dict):
        try:
            data = load_trace(trace)
            if not isinstance(ops, list):
                ops, source = op_totals(data, top=10 * top), "trace (inclusive CPU time only)"
            if not isinstance(phases, dict):
                phases = phase_summary(data)
        except _TRACE_ERRORS as err:
            why = "nested too deeply" if isinstance(err, RecursionError) else f"{type(err).__name__}: {err}"
            problems.append(str(err) if isinstance(err, TraceError) else f"{trace}: cannot analyse ({why})"[:300])
            return {"trace": str(trace), "ops": [], "ops_source": None, "phases": {}}
    rows = [r for r in ops if isinstance(r, dict) and (r.get("kind") or op_kind(str(r.get("name")))) == "op"]
    device = any(_val(r.get("self_device_us"), 0.0) for r in rows)
    key = "self_device_us" if device else ("self_cpu_us" if any("self_cpu_us" in r for r in rows) else "cpu_total_us")
    total = sum(_finite(r.get(key) for r in rows)) or 1.0
    rows.sort(key=lambda r: _val(r.get(key), 0.0), reverse=True)
    scalar = (str, int, float, bool, type(None))  # an ops.json row is foreign data: no nested values in the report
    top_rows = [{**{k: v for k, v in r.items() if isinstance(v, scalar)}, "share": _val(r.get(key), 0.0) / total}
                for r in rows[:top]]
    return {"trace": str(trace), "ops_source": source, "sort_key": key, "ops": top_rows, "phases": phases}


def _export_info(data: Any) -> dict[str, Any] | None:
    """The usable part of one ``.export.json`` (seconds per artefact, total, bytes); None when it is foreign."""
    if not isinstance(data, dict) or not isinstance(data.get("export_s"), dict):
        return None
    parts = {str(k): float(v) for k, v in data["export_s"].items() if _finite([v])}
    total = _val(data.get("total_s"), math.nan)
    sizes = data.get("bytes")
    size_values: list[float] = _finite(sizes.values()) if isinstance(sizes, dict) else []
    return {"total_s": total if math.isfinite(total) else sum(parts.values()),
            "parts_s": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
            "bytes": round(sum(size_values)),
            "rank": data.get("rank") if isinstance(data.get("rank"), int) else None}


def trace_exports(run: Run, problems: list[str]) -> dict[str, Any] | None:
    """Export cost of every trace window: the latest one by artefact, and per rank the seconds all its windows
    blocked training (the largest of those is ``total_s``). None when no window left an ``.export.json``."""
    per_window = []
    for trace in run.traces():
        info = _export_info(_sidecar_json(trace, ".export.json", problems))
        if info is not None:
            per_window.append(info)
    if not per_window:
        return None
    by_rank: dict[str, tuple[float, int]] = {}
    for info in per_window:
        seconds, count = by_rank.get(str(info["rank"]), (0.0, 0))
        by_rank[str(info["rank"])] = (seconds + info["total_s"], count + 1)
    total, windows = max(by_rank.values())
    return {"windows": windows, "total_s": total, "latest": per_window[-1]}


def trace_hint(source: Any) -> str:
    """How to get a trace, in the words of the producer that wrote the run (the runner's flags mean nothing to
    a TRL user, and an imported run cannot be traced after the fact)."""
    if source == "rlhf_core":
        return "train with --profile, window set by --profile_wait, --profile_warmup, --profile_active"
    if source in ("trl", "transformers"):
        return "profile_trainer(trainer, run_dir, trace_steps=N), or RLHFKitCallback(..., trace_steps=N)"
    if source in ("import", "openrlhf", "verl", "tensorboard"):
        return "traces are not available from an imported run"
    return "kit.run(..., trace_steps=N) in adapters.generic"


def missed_windows(run: Run) -> list[str]:
    """The messages of ``trace`` events saying a requested window never ran (the run ended first)."""
    return [str(e.get("message")) for e in run.events()
            if e.get("kind") == "trace" and e.get("rule") == "window_missed"]


def cumulative_rates(records: list[dict[str, Any]], key: str = "src/num_tokens") -> list[float]:
    """Tokens/s from a cumulative token count (TRL's ``num_tokens``, kept as ``src/num_tokens`` by runs written
    before the TRL adapter mapped it) and the step times since the count last grew; from 0 when the run starts
    at step 1, else from its first reading."""
    counter = CumulativeRate(start=0.0 if records and records[0].get("step") == 1 else None)
    rates: list[float] = []
    for r in records:
        counter.add_time(_val(r.get("time/step"), 0.0))
        count = _val(r.get(key), math.nan)
        rate = counter.update(count)
        if rate is not None:
            rates.append(rate)
    return rates


def _system_summary(records: list[dict[str, Any]], problems: list[str], path: Path) -> dict[str, Any] | None:
    if not records:
        return None
    out: dict[str, Any] = {
        "samples": len(records),
        "cpu_process_percent_mean": _mean(_finite(r.get("cpu/process_percent") for r in records)),
        "rss_max_bytes": max(_finite(r.get("mem/rss_bytes") for r in records), default=None),
    }
    gpus: dict[str, dict[str, Any]] = {}
    keys = sorted({k for r in records for k in r if k.startswith("gpu/")})
    bad = [k for k in keys if len(k.split("/", 2)) < 3]
    if bad:  # gpu/<index>/<field> is the only layout the sampler writes
        names = ", ".join(repr(k[:40]) for k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        problems.append(f"{path}: {len(bad)} key(s) not of the form gpu/<index>/<field> ({names}); ignored")
    for key in keys:
        if key in bad:
            continue
        _, idx, field = key.split("/", 2)
        vals = _finite(r.get(key) for r in records)
        g = gpus.setdefault(idx, {})
        if field in ("util_percent", "power_w"):
            g[f"{field}_mean"] = _mean(vals)
        elif field == "mem_used_bytes":
            g["mem_used_max_bytes"] = max(vals, default=None)
        elif field == "mem_total_bytes":
            g["mem_total_bytes"] = max(vals, default=None)
    if gpus:
        out["gpus"] = gpus
    return out


def build_report(run: Run, *, top: int = 15, slowest: int = 5) -> dict[str, Any]:
    """Everything the report shows, as plain data (what ``--json`` prints)."""
    records = [r for r in run.metrics() if isinstance(r.get("step"), int)]
    problems: list[str] = []
    phases = _phases_in(records)
    steps = _finite(r.get("time/step") for r in records)
    mean_step = _mean(steps)
    trace = latest_trace_info(run, top, problems)
    trace_phases = (trace or {}).get("phases") or {}
    phase_rows: list[dict[str, Any]] = []
    for phase in phases:
        key = f"time/{phase}"
        per_step = [_val(r.get(key), 0.0) for r in records if "time/step" in r]
        vals = _finite(per_step)
        mean = _mean(vals)
        peaks = _finite(r.get(f"mem/{phase}_peak_bytes") for r in records)
        entry = trace_phases.get(phase) if isinstance(trace_phases, dict) else None
        alloc = entry.get("alloc_peak_bytes") if isinstance(entry, dict) else None
        alloc_peaks = _finite(alloc.values()) if isinstance(alloc, dict) else []
        phase_rows.append({
            "phase": phase, "ms_per_step": None if mean is None else 1000 * mean,
            "median_ms": None if not vals else 1000 * statistics.median(vals),
            "share": (mean / mean_step) if mean is not None and mean_step else None,
            "peak_bytes": max(peaks) if peaks else None,
            "trace_alloc_peak_bytes": max(alloc_peaks) if alloc_peaks else None,
        })
    timed = sum(r["ms_per_step"] or 0.0 for r in phase_rows)
    untimed = None if mean_step is None else {"ms_per_step": 1000 * mean_step - timed,
                                               "share": 1 - timed / (1000 * mean_step) if mean_step else None}
    tps = _finite(r.get("throughput/tokens_per_s") for r in records)
    tps_source = "throughput/tokens_per_s"
    if not tps:
        tps, tps_source = cumulative_rates(records), "src/num_tokens over time/step"
    throughput = {"tokens_per_s_mean": _mean(tps), "tokens_per_s_median": _median(tps),
                  "source": tps_source} if tps else None
    slow_rows = []
    traced = traced_steps(run)
    if steps:
        med_step = statistics.median(steps)
        med_phase = {p: statistics.median([_val(r.get(f"time/{p}"), 0.0) for r in records]) for p in phases}
        timed_records = [r for r in records if _finite([r.get("time/step")])]
        for r in sorted(timed_records, key=lambda r: r["time/step"], reverse=True)[:slowest]:
            excess = {p: _val(r.get(f"time/{p}"), 0.0) - med_phase[p] for p in phases}
            culprit = max(excess, key=lambda p: excess[p]) if excess else None
            slow_rows.append({
                "step": r["step"], "step_ms": 1000 * r["time/step"],
                "over_median_ms": 1000 * (r["time/step"] - med_step),
                "phase": culprit, "phase_over_median_ms": 1000 * excess[culprit] if culprit else None,
                "traced": r["step"] in traced,
            })
    peaks = _finite(r.get("mem/peak_bytes") for r in records)
    system = _system_summary(run.system(), problems, run.path / "system.jsonl")  # before the reader's problems
    analysis = RunAnalysis(run)  # the same alerts as `rlhfkit diagnose` and the dashboard
    alerts = [{k: v for k, v in a.as_dict().items() if k != "evidence"} for a in analysis.alerts()]
    problems += analysis.problems()
    return {
        "run": {"id": run.run_id, "path": str(run.path), "status": run.status, "process_gone": run.process_gone(),
                "source": run.meta.get("source"), "world_size": run.world_size, "steps": len(records)},
        "step": {"mean_ms": None if mean_step is None else 1000 * mean_step,
                 "median_ms": None if not steps else 1000 * statistics.median(steps),
                 "peak_bytes": max(peaks) if peaks else None},
        "phases": phase_rows, "untimed": untimed, "throughput": throughput, "slowest": slow_rows,
        "trace": None if trace is None else {k: v for k, v in trace.items() if k != "phases"},
        "trace_export": trace_exports(run, problems),
        "trace_missed": missed_windows(run),
        "trace_hint": trace_hint(run.meta.get("source")),
        "system": system,
        "alerts": alerts,
        "problems": problems,
    }


# ---- text rendering
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _signed_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:+,.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:,.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def render(report: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    run, step = report["run"], report["step"]
    status = run["status"] + (", its process has ended without closing the run (killed?)"
                              if run.get("process_gone") else "")
    console.print(f"[bold]{run['id']}[/bold] ({run['source']}, {status}, world size {run['world_size']}): "
                  f"{run['steps']} steps, {_ms(step['mean_ms'])} ms/step mean, {_ms(step['median_ms'])} median, "
                  f"peak memory {_bytes(step['peak_bytes'])}", soft_wrap=True)
    t = Table(title="Phases (per step)", title_justify="left")
    for col in ("phase", "ms/step", "median ms", "share", "peak mem", "trace alloc peak"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for r in report["phases"]:
        t.add_row(escape(r["phase"]), _ms(r["ms_per_step"]), _ms(r["median_ms"]), _pct(r["share"]),
                  _bytes(r["peak_bytes"]), _bytes(r["trace_alloc_peak_bytes"]))
    if report["untimed"]:
        u = report["untimed"]
        t.add_row("[dim](untimed)[/dim]", _ms(u["ms_per_step"]), "", _pct(u["share"]), "", "")
    console.print(t)
    tp = report["throughput"]
    if tp is None:
        console.print("throughput: not logged (throughput/tokens_per_s)")
    else:
        derived = "" if tp["source"] == "throughput/tokens_per_s" else f" (from {tp['source']})"
        console.print(f"throughput: {tp['tokens_per_s_mean']:,.1f} tokens/s mean, "
                      f"{tp['tokens_per_s_median']:,.1f} median{derived}", soft_wrap=True)
    if report["slowest"]:
        t = Table(title="Slowest steps", title_justify="left")
        for col in ("step", "ms", "over median", "slowest phase", "phase over median", "note"):
            t.add_column(col, justify="left" if col in ("slowest phase", "note") else "right")
        for r in report["slowest"]:
            t.add_row(str(r["step"]), _ms(r["step_ms"]), _signed_ms(r["over_median_ms"]), escape(r["phase"] or "-"),
                      _signed_ms(r["phase_over_median_ms"]), "in a trace window" if r.get("traced") else "")
        console.print(t)
    tr = report["trace"]
    for message in report["trace_missed"]:
        console.print(f"[yellow]trace:[/yellow] {escape(message)}", soft_wrap=True)
    if tr is None:
        # a run that asked for a trace is told why it has none, not how to ask for one
        hint = "" if report["trace_missed"] else f" ({escape(report['trace_hint'])})"
        console.print(f"top ops: no trace{hint}", soft_wrap=True)
    elif tr["ops"]:
        key = tr["sort_key"]
        console.print(f"latest trace: {escape(tr['trace'])}", soft_wrap=True)
        t = Table(title=f"Top ops by {key.replace('_us', '')} time (from {tr['ops_source']})", title_justify="left")
        for col in ("op", "calls", f"{key.replace('_us', '')} ms", "share"):
            t.add_column(col, justify="left" if col == "op" else "right")
        for r in tr["ops"]:
            t.add_row(escape(str(r.get("name"))), escape(str(r.get("count", ""))), _ms(_val(r.get(key), 0.0) / 1000),
                      _pct(r.get("share")))
        console.print(t)
    _render_export(report["trace_export"], console)
    sysrec = report["system"]
    if sysrec:
        line = (f"system: {sysrec['samples']} samples, process CPU {_ms(sysrec['cpu_process_percent_mean'])}% mean, "
                f"RSS max {_bytes(sysrec['rss_max_bytes'])}")
        for idx, g in (sysrec.get("gpus") or {}).items():
            line += (f"; GPU {idx}: util {_ms(g.get('util_percent_mean'))}% mean, "
                     f"mem {_bytes(g.get('mem_used_max_bytes'))} max, power {_ms(g.get('power_w_mean'))} W mean")
        console.print(line, soft_wrap=True)
    _render_alerts(report["alerts"], console)
    for p in summarize(report["problems"]):
        console.print(f"[yellow]warning:[/yellow] {escape(p)}", soft_wrap=True)


def _render_export(export: dict[str, Any] | None, console: Any) -> None:
    """One line: the seconds the trace export blocked training, the latest window's artefacts by cost."""
    from rich.markup import escape

    if not export:
        return
    latest = export["latest"]
    parts = ", ".join(f"{escape(k)} {v:.1f} s" for k, v in latest["parts_s"].items() if v >= 0.05)
    line = (f"trace export: {latest['total_s']:.1f} s for the latest window ({parts or 'all under 0.1 s'}; "
            f"{_bytes(latest['bytes'])} written)")
    if export["windows"] > 1:
        line += f"; {export['total_s']:.1f} s over {export['windows']} windows"
    console.print(line + ", not in any step time", soft_wrap=True)


def _render_alerts(alerts: list[dict[str, Any]], console: Any) -> None:
    """Stability alerts in one table (details and suggestions: ``rlhfkit diagnose``)."""
    from rich.markup import escape
    from rich.table import Table

    shown = [a for a in alerts if a["severity"] in ("warning", "critical")]
    if not shown:
        console.print("stability: no warning or critical alert (details: rlhfkit diagnose)")
        return
    t = Table(title=f"Stability alerts ({len(shown)}; details and suggestions: rlhfkit diagnose)",
              title_justify="left")
    for col in ("step", "severity", "rule", "message"):
        t.add_column(col, justify="right" if col == "step" else "left")
    for a in shown:
        style = "red" if a["severity"] == "critical" else "yellow"
        t.add_row(str(a["step"]), f"[{style}]{a['severity']}[/{style}]", escape(a["rule"]), escape(a["message"]))
    console.print(t)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holds meta.json)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--top", type=int, default=15, help="ops to list from the latest trace")
    parser.add_argument("--slowest", type=int, default=5, help="slowest steps to list")
    args = parser.parse_args(argv)
    try:
        run = Run(args.run_dir)
        _ = run.meta  # reads meta.json: an unreadable one is reported here
        report = build_report(run, top=max(args.top, 0), slowest=max(args.slowest, 0))
    except RunError as err:
        print(f"rlhfkit report: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False, default=str))
    from rich.console import Console

    if not report["run"]["steps"]:  # the same exit status with --json, so scripts can test for it either way
        for p in summarize(report["problems"]):
            print(f"warning: {p}", file=sys.stderr)
        print(f"rlhfkit report: {run.path}: no step records yet", file=sys.stderr)
        return 1
    if args.json:
        return 0
    render(report, Console(highlight=False, width=None if sys.stdout.isatty() else 120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
