"""``rlhfkit timeline RUN``: every rank's phases in one Chrome/Perfetto trace, and who waited for whom.

The trace has a process per rank (``pid`` = rank, named by role, host and pid), the phases as complete slices,
each rank's measured waits on a second row, the steps as instant markers, the critical path as a process of
its own, and each rank's ``torch.profiler`` traces from ``traces/`` (``rank<r>_steps<a>-<b>.pt.trace.json.gz``)
shifted onto the shared clock: Kineto stamps events in µs from ``baseTimeNanoseconds`` on the host's wall
clock, to which the rank's measured offset to rank 0 is added. The analysis (tables, or ``--json``) is
:func:`rlhf_core.runformat.timeline.analyse`; definitions are in docs/timeline.md.

Torch-free. Exit codes: 0 done, 1 the run has no timeline records (in the range), 2 not a readable run or bad
arguments.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from rlhf_core.runformat.run_reader import Run, RunError
from rlhf_core.runformat.timeline import Timeline, TimelineReport, analyse, parse_steps, read_timeline

from .trace_analysis import TraceError, load_trace

_TRACE = re.compile(r"^rank(\d+)_steps(\d+)-(\d+)\.pt\.trace\.json(\.gz)?$")
_KEEP_PH = frozenset("XBEiIC")
PATH_TID, WAIT_TID, PHASE_TID = 0, 1, 0

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


def _meta(pid: int, name: str, value: Any, tid: int | None = None) -> dict[str, Any]:
    key = "sort_index" if name.endswith("sort_index") else "name"
    ev = {"name": name, "ph": "M", "pid": pid, "args": {key: value}}
    if tid is not None:
        ev["tid"] = tid
    return ev


def trace_events(timeline: Timeline, report: TimelineReport, base: int) -> list[str]:
    """The phases, waits, step markers and critical path as Chrome trace events (µs from ``base``), each
    already JSON text: at 256 ranks x 100 steps (~350k events) formatting them directly is several times
    faster than building dicts for a serializer."""
    q = json.dumps
    events: list[str] = []
    for rank, proc in timeline.processes.items():
        events += [_dumps(e).decode() for e in (
            _meta(rank, "process_name", proc.label), _meta(rank, "process_sort_index", rank),
            _meta(rank, "thread_name", "phases", PHASE_TID), _meta(rank, "thread_name", "waiting", WAIT_TID))]
    names: dict[str, str] = {}
    for s in report.steps:
        for rank, items in s.occurrences.items():
            t0 = timeline.steps[rank][s.step].t0
            events.append(f'{{"name":"step {s.step}","ph":"i","s":"p","pid":{rank},"tid":{PHASE_TID},'
                          f'"ts":{(t0 - base) / 1000:.3f},"cat":"step"}}')
            for o in items:
                name = names.get(o.name) or names.setdefault(o.name, q(o.name))
                ts = (o.start - base) / 1000
                events.append(f'{{"name":{name},"ph":"X","pid":{rank},"tid":{PHASE_TID},"ts":{ts:.3f},'
                              f'"dur":{o.dur / 1000:.3f},"cat":"phase","args":{{"step":{s.step},'
                              f'"wait_ms":{o.wait / 1e6:.6f}}}}}')
                if o.wait:
                    events.append(f'{{"name":{q("wait (" + o.name + ")")},"ph":"X","pid":{rank},"tid":{WAIT_TID},'
                                  f'"ts":{ts:.3f},"dur":{o.wait / 1000:.3f},"cat":"wait","args":{{"step":{s.step}}}}}')
    if len(timeline.processes) > 1:
        cp = max(timeline.processes) + 1
        events += [_dumps(e).decode() for e in (
            _meta(cp, "process_name", "critical path"), _meta(cp, "process_sort_index", -1),
            _meta(cp, "thread_name", "critical path", PATH_TID))]
        for s in report.steps:
            for rank, name, start, dur in s.critical_path:
                events.append(f'{{"name":{q(f"{name} (rank {rank})")},"ph":"X","pid":{cp},"tid":{PATH_TID},'
                              f'"ts":{(start - base) / 1000:.3f},"dur":{dur / 1000:.3f},"cat":"critical_path",'
                              f'"args":{{"step":{s.step},"rank":{rank}}}}}')
    return events


def torch_trace_events(run_dir: Path, timeline: Timeline, base: int, steps: tuple[int, int] | None,
                       warnings: list[str]) -> list[dict[str, Any]]:
    """Events of the ranks' ``torch.profiler`` traces that overlap ``steps``, moved onto the shared clock."""
    out: list[dict[str, Any]] = []
    tids: dict[tuple[int, Any, Any], int] = {}
    for path in sorted((run_dir / "traces").glob("rank*_steps*.pt.trace.json*")):
        m = _TRACE.match(path.name)
        if m is None:
            continue
        rank, first, last = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if steps is not None and (last < steps[0] or first > steps[1]):
            continue
        proc = timeline.processes.get(rank)
        if proc is None:
            continue
        try:
            trace = load_trace(path)
        except TraceError as err:
            warnings.append(str(err))
            continue
        base_ns = trace.get("baseTimeNanoseconds")
        if not isinstance(base_ns, int):
            warnings.append(f"{path}: no baseTimeNanoseconds (torch < 2.1?), so it cannot be placed; left out")
            continue
        shift_us = (base_ns + proc.wall_skew_ns + int(proc.clock.get("offset_ns") or 0) - base) / 1000.0
        names: dict[tuple[Any, Any], str] = {}
        for ev in trace["traceEvents"]:
            if isinstance(ev, dict) and ev.get("ph") == "M" and ev.get("name") == "thread_name":
                names[(ev.get("pid"), ev.get("tid"))] = str((ev.get("args") or {}).get("name", ""))
        for ev in trace["traceEvents"]:
            if not isinstance(ev, dict) or ev.get("ph") not in _KEEP_PH or not isinstance(ev.get("ts"), (int, float)):
                continue
            key = (rank, ev.get("pid"), ev.get("tid"))
            if key not in tids:
                tids[key] = 10 + len([k for k in tids if k[0] == rank])
                label = names.get(key[1:]) or f"{key[1]}/{key[2]}"
                out.append(_meta(rank, "thread_name", f"torch.profiler {label}", tids[key]))
            new = dict(ev)
            new["pid"], new["tid"] = rank, tids[key]
            new["ts"] = round(float(ev["ts"]) + shift_us, 3)
            out.append(new)
    return out


def build_trace(run_dir: Path, timeline: Timeline, report: TimelineReport, steps: tuple[int, int] | None,
                warnings: list[str]) -> bytes:
    """The merged Chrome trace of the analysed steps, as JSON bytes."""
    base = min((s.start for s in report.steps), default=0)
    events = trace_events(timeline, report, base)
    events += [_dumps(e).decode() for e in torch_trace_events(run_dir, timeline, base, steps, warnings)]
    other = {"producer": "rlhfkit timeline", "base_time_ns": base, "clock": "rank 0 wall clock",
             "steps": [report.steps[0].step, report.steps[-1].step] if report.steps else []}
    return (f'{{"traceEvents":[{",".join(events)}],"displayTimeUnit":"ms","otherData":'
            f'{_dumps(other).decode()}}}').encode()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(report: TimelineReport, title: str, top: int, console: Any) -> None:
    """The analysis as rich tables."""
    from rich.table import Table

    windows = [s.window for s in report.steps]
    console.print(f"{title}: {len(report.processes)} process(es), steps {report.steps[0].step}-"
                  f"{report.steps[-1].step} ({len(report.steps)}), mean step window "
                  f"{sum(windows) / len(windows) / 1e6:.1f} ms")
    t = Table(title="Per role (mean over its ranks; share of the step windows)")
    for col in ("role", "ranks", "busy", "waiting", "idle"):
        t.add_column(col, justify="left" if col == "role" else "right")
    for role, row in report.per_role().items():
        t.add_row(role, str(row["ranks"]), _pct(row["busy_share"]), _pct(row["wait_share"]), _pct(row["idle_share"]))
    console.print(t)
    per_rank = report.per_rank()
    shown = sorted(per_rank, key=lambda r: -per_rank[r]["wait_share"])[:top]
    which = "all" if len(shown) == len(per_rank) else f"{len(shown)} of {len(per_rank)}, most waiting first"
    t = Table(title=f"Per rank ({which})")
    for col in ("rank", "role", "host:pid", "clock offset", "busy", "waiting", "idle", "wait s"):
        t.add_column(col, justify="left" if col in ("role", "host:pid") else "right")
    for rank in sorted(shown):
        p, row = report.processes[rank], per_rank[rank]
        off = p.clock.get("offset_ns") or 0
        unc = p.clock.get("uncertainty_ns") or 0
        t.add_row(str(rank), p.role, f"{p.host}:{p.pid}", f"{off / 1e6:+.3f} ± {unc / 1e6:.3f} ms",
                  _pct(row["busy_share"]), _pct(row["wait_share"]), _pct(row["idle_share"]), f"{row['wait_s']:.3f}")
    console.print(t)
    slowest = report.slowest_per_phase()
    if slowest:
        t = Table(title="Slowest rank per phase (busy time, waits excluded)")
        for col in ("phase", "rank", "slowest in", "over median"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for name, row in slowest.items():
            t.add_row(name, str(row["rank"]), f"{row['steps']}/{row['of_steps']} steps",
                      f"{1000 * row['excess_over_median_s']:+.1f} ms")
        console.print(t)
    t = Table(title="Phases (share of the step windows during which any process ran them)")
    for col in ("phase", "share"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for name, share in report.phase_share().items():
        t.add_row(name, _pct(share))
    console.print(t)
    t = Table(title="Critical path (share of the summed step paths)")
    for col in ("rank", "phase", "seconds", "share"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for part in report.critical_path_share()[:top]:
        t.add_row(str(part["rank"]), part["phase"], f"{part['seconds']:.3f}", _pct(part["share"]))
    console.print(t)
    bubbles = report.bubbles(top)
    if bubbles:
        t = Table(title="Longest bubbles (waiting or idle)")
        for col in ("step", "rank", "at", "length", "what"):
            t.add_column(col, justify="left" if col == "what" else "right")
        for b in bubbles:
            t.add_row(str(b["step"]), str(b["rank"]), f"{1000 * b['at_s']:.1f} ms", f"{1000 * b['seconds']:.1f} ms",
                      b["what"])
        console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit timeline", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holds meta.json and timeline.rank<N>.jsonl)")
    parser.add_argument("--out", help="where to write the merged trace (default RUN/timeline.trace.json)")
    parser.add_argument("--steps", help="inclusive step range A:B (default: all steps)")
    parser.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    parser.add_argument("--top", type=int, default=16, help="rows of the per-rank, path and bubble tables")
    args = parser.parse_args(argv)
    try:
        steps = parse_steps(args.steps)
        run = Run(args.run_dir)
        _ = run.meta  # reads meta.json: an unreadable one is reported here
    except (ValueError, RunError) as err:
        print(f"rlhfkit timeline: {err}", file=sys.stderr)
        return 2
    timeline = read_timeline(run.path, steps)
    if not timeline:
        print(f"rlhfkit timeline: {run.path}: no timeline records"
              f"{f' in steps {args.steps}' if steps else ''} (timeline.rank<N>.jsonl)", file=sys.stderr)
        return 1
    report = analyse(timeline)
    warnings: list[str] = list(timeline.problems)
    out = Path(args.out) if args.out else run.path / "timeline.trace.json"
    try:
        out.write_bytes(build_trace(run.path, timeline, report, steps, warnings))
    except OSError as err:
        print(f"rlhfkit timeline: cannot write {out}: {err.strerror or err}", file=sys.stderr)
        return 2
    for w in warnings[:5]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > 5:
        print(f"warning: … and {len(warnings) - 5} more", file=sys.stderr)
    if args.json:
        data = report.as_dict()
        data["trace"] = str(out)
        sys.stdout.write(_dumps(data).decode() + "\n")
        return 0
    from rich.console import Console

    render(report, run.run_id, max(args.top, 1), Console(highlight=False, width=None if sys.stdout.isatty() else 120))
    print(f"trace: {out} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
