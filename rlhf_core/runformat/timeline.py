"""Phase intervals of every process of a run on one clock: reading ``timeline.rank<N>.jsonl`` and analysing it.

Torch-free (the dashboard and ``rlhfkit timeline`` import it). The format is in docs/timeline.md: per process
one file, a ``{"process": {...}}`` header line (rank, role, host, pid, clock offset, collective phases) and one
line per step ``{"step", "t0" (ns, rank 0's clock), "dur" (µs), "ph": [[name, start µs from t0, dur µs], ...]}``.

Definitions (shared with the live wait exchange of :mod:`profiler.timeline`):

- A phase is *collective-bound* when it contains a collective every rank must enter (the process header lists
  them). Its k-th occurrence in a step is matched across ranks by (name, k).
- The *wait* of a rank in such an occurrence is the time it spent in the phase before the last rank entered
  it: ``clamp(last_start - own_start, 0, own_duration)``. The ranks run the same code up to the collective,
  so until the last rank arrives the others can only wait. Work hidden inside a collective-bound phase after
  all ranks entered it is not counted as waiting (the phase is the resolution).
- A *wait phase* (listed under ``waits`` in the header) is time a process spent waiting for other processes'
  results, e.g. a Ray trainer in ``ray.get`` for its actors: all of it is waiting, and it ended on the latest
  phase of another process that ended inside it.
- The *window* of a step is [earliest start, latest end] over all ranks. In it each rank is *busy* (in a phase,
  not waiting), *waiting*, or *idle* (outside every phase: before its step started, after it ended, between
  phases). The three shares add up to 1.
- *Bubbles* are maximal stretches of the window where a rank is waiting or idle.
- The *critical path* is walked back from the rank that ends the step last: phase by phase on that rank, and at
  each collective-bound occurrence over to the rank that entered it last (the others were waiting for it), at
  each wait phase over to the phase it ended on, and from there back through the processes that fed each other
  (a process reached through a wait continues, before its first phase, on the phase that ended just before).
"""
from __future__ import annotations

import mmap
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # orjson parses the step lines ~3x faster; json is the fallback
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a core dependency (pyproject.toml)
    import json

    _loads = json.loads

FORMAT = 1
PREFIX, SUFFIX = "timeline.rank", ".jsonl"
MIN_BUBBLE_NS = 1_000_000
WAIT_SLACK_NS = 5_000_000  # a wait may end this long after the phase it waited for (clock offsets, transfer)


def timeline_file(rank: int) -> str:
    return f"{PREFIX}{int(rank)}{SUFFIX}"


def timeline_files(run_dir: str | Path) -> dict[int, Path]:
    """{rank: path} of the run's timeline files, by rank."""
    out = {}
    for p in Path(run_dir).glob(f"{PREFIX}*{SUFFIX}"):
        digits = p.name[len(PREFIX): -len(SUFFIX)]
        if digits.isdigit():
            out[int(digits)] = p
    return dict(sorted(out.items()))


def union_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length of the union of (start, end) intervals."""
    total, cur_s, cur_e = 0, 0, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    return total + (cur_e - cur_s if cur_e is not None else 0)


def wait_ns(own_start: int, own_dur: int, last_start: int) -> int:
    """Time a rank spent in a collective-bound phase occurrence before the last rank entered it."""
    return max(0, min(own_dur, last_start - own_start))


@dataclass
class Process:
    """One recording process (a rank, or an actor): who it was and how its clock was aligned."""

    rank: int
    role: str = "runner"
    host: str = ""
    pid: int = 0
    world_size: int = 1
    clock: dict[str, Any] = field(default_factory=dict)
    collective: frozenset[str] = frozenset()
    waits: frozenset[str] = frozenset()  # phases that are all waiting for another process (e.g. a Ray driver's get)
    source: str | None = None
    wall_skew_ns: int = 0
    name: str = ""  # e.g. the actor class and Ray worker of an imported Ray process

    @property
    def label(self) -> str:
        where = self.name or f"{self.host}:{self.pid}"
        return f"rank {self.rank} ({self.role}) {where}"


@dataclass
class StepSpan:
    """One step of one process: start (ns, shared clock), duration (ns), phases as (name, start ns, dur ns)."""

    step: int
    t0: int
    dur: int
    phases: list[tuple[str, int, int]]

    @property
    def end(self) -> int:
        return self.t0 + self.dur


@dataclass
class Timeline:
    processes: dict[int, Process]
    steps: dict[int, dict[int, StepSpan]]  # rank -> step -> span
    problems: list[str] = field(default_factory=list)

    @property
    def collective(self) -> frozenset[str]:
        out: set[str] = set()
        for p in self.processes.values():
            out |= p.collective
        return frozenset(out)

    @property
    def waits(self) -> frozenset[str]:
        out: set[str] = set()
        for p in self.processes.values():
            out |= p.waits
        return frozenset(out)

    def step_numbers(self) -> list[int]:
        return sorted({s for by_step in self.steps.values() for s in by_step})

    def __bool__(self) -> bool:
        return any(self.steps.values())


def _step_of(line: bytes) -> int | None:
    """The step of a step line without parsing it (lines start ``{"step":N,``), so a range read skips fast."""
    if not line.startswith(b'{"step":'):
        return None
    end = line.find(b",", 8)
    try:
        return int(line[8:end])
    except ValueError:
        return None


def _process(head: dict[str, Any], rank: int) -> Process:
    return Process(rank=int(head.get("rank", rank)), role=str(head.get("role") or "runner"),
                   host=str(head.get("host") or ""), pid=int(head.get("pid") or 0),
                   world_size=int(head.get("world_size") or 1), clock=dict(head.get("clock") or {}),
                   collective=frozenset(head.get("collective") or ()), waits=frozenset(head.get("waits") or ()),
                   source=head.get("source"),
                   wall_skew_ns=int(head.get("wall_skew_ns") or 0), name=str(head.get("name") or ""))


def _header(head: Any, rank: int, where: str, problems: list[str] | None) -> Process:
    """The process of a header line; the defaults (reported in ``problems``) for one that is not an object or
    has a field of the wrong type, so that the file's steps are still read."""
    try:
        if isinstance(head, dict):
            return _process(head, rank)
    except (TypeError, ValueError):
        pass
    if problems is not None:
        problems.append(f"{where}: process header not understood; rank {rank} shown with default identity")
    return Process(rank=rank)


# Per timeline file (device, inode, header line): how many bytes were searched for a second process header,
# and whether one was found; a file that grew is searched only in what was appended.
_HEADER_SEARCHED: dict[tuple[int, int, bytes], tuple[int, bool]] = {}


def _resumed(mm: mmap.mmap, key: tuple[int, int, bytes]) -> bool:
    """Whether a process header follows the first line (the file was resumed)."""
    done, found = _HEADER_SEARCHED.get(key, (0, False))
    if not found:
        found = mm.find(b'\n{"process":', max(0, min(done, len(mm)) - 16)) >= 0
        if len(_HEADER_SEARCHED) >= 65536:  # a bound for a long-lived dashboard over many runs
            _HEADER_SEARCHED.clear()
        _HEADER_SEARCHED[key] = (len(mm), found)
    return found


def prepare_range_read(path: Path) -> None:
    """Search one timeline file for a second header now (remembered), so that its first range read need not:
    ~1 ms per 3.5 MB file, ~0.3 s for 256 ranks x 10k steps (the dashboard does it in the background when it
    opens a run)."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            head_end = mm.find(b"\n")
            if head_end > 0:
                st = os.fstat(fh.fileno())
                _resumed(mm, (st.st_dev, st.st_ino, mm[:head_end]))
    except (OSError, ValueError):  # gone, unreadable or empty: the read itself reports it
        pass


def _step_line_at(mm: mmap.mmap, step: int, pos: int) -> int:
    """The offset of the newline that begins the first line with a step >= ``step`` after ``pos``, or -1;
    for step lines in increasing order (a file without a second header): a bisection, then a short walk."""
    lo, hi = pos, len(mm)
    while hi - lo > 1 << 14:
        mid = (lo + hi) // 2
        nl = mm.find(b'\n{"step":', mid, hi)
        found = _step_of(mm[nl + 1: nl + 48]) if nl >= 0 else None
        if found is not None and found < step:
            lo = nl + 1  # every line up to this one is before ``step``
        else:
            hi = mid  # only bounds the bisection: the walk below is not bounded by it
    while True:
        nl = mm.find(b'\n{"step":', lo)
        if nl < 0:
            return -1
        found = _step_of(mm[nl + 1: nl + 48])
        if found is not None and found >= step:
            return nl
        lo = nl + 1


def _range_bytes(path: Path, lo: int, hi: int) -> bytes | None:
    """The header line and the lines of steps ``lo..hi`` of a file written in one go, found by bisection over
    the step lines of a memory map (no copy of the file, no search through it but for a second header,
    remembered per file); None where only a full scan is right: a resumed file (a second header: a step may
    appear twice and the later line wins), a missing step ``lo``, an empty file."""
    with open(path, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty
            return None
        with mm:
            head_end = mm.find(b"\n")
            if mm[:11] != b'{"process":' or head_end < 0:
                return None
            st = os.fstat(fh.fileno())
            if _resumed(mm, (st.st_dev, st.st_ino, mm[:head_end])):
                return None
            first = _step_line_at(mm, lo, head_end)
            if first < 0 or not mm[first + 1: first + 48].startswith(b'{"step":%d,' % lo):
                return None
            after = _step_line_at(mm, hi + 1, first + 1) if hi < 2 ** 62 else -1
            stop = after + 1 if after >= 0 else mm.rfind(b"\n") + 1  # past hi (a gap, the end): filtered later
            return mm[:head_end + 1] + mm[first + 1: stop]


def read_file(path: Path, rank: int, steps: tuple[int, int] | None = None,
              problems: list[str] | None = None) -> tuple[Process, dict[int, StepSpan]]:
    """One process's header and steps (``steps``: inclusive range). A later line of a step (resume) wins;
    a torn last line is skipped; other bad lines are reported in ``problems``.

    A range read of a file written in one go finds the range's first line with a byte search and parses only
    the range (256 files of 10k steps: a 100-step window in well under a second)."""
    process = Process(rank=rank)
    out: dict[int, StepSpan] = {}
    ranged = _range_bytes(path, *steps) if steps is not None else None
    torn = b""
    if ranged is not None:
        body = ranged
    else:
        with open(path, "rb") as fh:
            data = fh.read()
        cut = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        body, torn = data[:cut], data[cut:]
    lines = body.split(b"\n")
    lines.pop()
    for i, line in enumerate(lines, 1):
        step = _step_of(line)
        if step is not None and steps is not None and not steps[0] <= step <= steps[1]:
            continue
        if not line.strip():
            continue
        where = f"{path}:{i}" if ranged is None else f"{path} (step {step})"
        try:
            rec = _loads(line)
        except ValueError:
            if problems is not None:
                problems.append(f"{where}: malformed JSON; line skipped")
            continue
        if not isinstance(rec, dict):
            continue
        if "process" in rec:
            process = _header(rec["process"], rank, where if ranged is None else f"{path}:1", problems)
            continue
        try:
            t0, step = int(rec["t0"]), int(rec["step"])
            phases = [(str(n), t0 + int(s) * 1000, int(d) * 1000) for n, s, d in rec.get("ph") or ()]
            out[step] = StepSpan(step, t0, int(rec["dur"]) * 1000, phases)
        except (KeyError, TypeError, ValueError):
            if problems is not None:
                problems.append(f"{where}: not a step record; line skipped")
    if torn.strip() and problems is not None:
        problems.append(f"{path}: torn last line (still being written, or the writer stopped); skipped")
    return process, out


def read_timeline(run_dir: str | Path, steps: tuple[int, int] | None = None) -> Timeline:
    """Every process's intervals (optionally only steps ``lo..hi``) of a run directory."""
    problems: list[str] = []
    processes: dict[int, Process] = {}
    by_rank: dict[int, dict[int, StepSpan]] = {}
    for rank, path in timeline_files(run_dir).items():
        processes[rank], by_rank[rank] = read_file(path, rank, steps, problems)
    return Timeline(processes, by_rank, problems)


def read_processes(run_dir: str | Path) -> dict[int, Process]:
    """Every process's header only (one line per file): enough to decide whether a run's intervals are worth
    reading at all (``diagnose`` of 256 ranks × 10k steps must not parse 2 GB to learn they share one role)."""
    out = {}
    for rank, path in timeline_files(run_dir).items():
        with open(path, "rb") as fh:
            line = fh.readline()
        try:
            head = _loads(line) if line.endswith(b"\n") else None
        except ValueError:
            head = None
        out[rank] = _header(head.get("process") if isinstance(head, dict) else None, rank, str(path), None)
    return out


# ---------------------------------------------------------------------------------------------- analysis
@dataclass(slots=True)
class Occurrence:
    rank: int
    name: str
    start: int
    dur: int
    wait: int = 0
    index: int = 0  # k-th occurrence of this name in the step on this rank

    @property
    def end(self) -> int:
        return self.start + self.dur


@dataclass
class StepAnalysis:
    """What one step of all ranks shows: per-rank busy/wait/idle (ns), bubbles, critical path."""

    step: int
    start: int
    end: int
    busy: dict[int, int]
    wait: dict[int, int]
    idle: dict[int, int]
    phase_busy: dict[str, dict[int, int]]
    phase_wait: dict[str, dict[int, int]]
    bubbles: list[tuple[int, int, int, str]]  # (rank, start, dur, what)
    critical_path: list[tuple[int, str, int, int]]  # (rank, phase or "(gap)", start, dur) in time order
    occurrences: dict[int, list[Occurrence]]  # rank -> its phase occurrences, waits filled in

    @property
    def window(self) -> int:
        return self.end - self.start


def _occurrences(span: StepSpan, rank: int) -> list[Occurrence]:
    seen: dict[str, int] = {}
    out = []
    for name, start, dur in span.phases:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(Occurrence(rank, name, start, dur, 0, k))
    return out


def analyse_step(step: int, spans: dict[int, StepSpan], collective: frozenset[str],
                 min_bubble_ns: int = MIN_BUBBLE_NS, waits: frozenset[str] = frozenset()) -> StepAnalysis:
    """The analysis of one step over the ranks that recorded it (definitions in the module docstring).

    Written for 256 ranks x 100 steps in a few seconds: one pass to find each collective occurrence's last
    entrant, one pass per rank for waits, shares, per-phase busy time and bubbles."""
    occ = {rank: _occurrences(span, rank) for rank, span in spans.items()}
    last: dict[tuple[str, int], tuple[int, int]] = {}  # (name, k) -> (latest start, rank)
    for rank, items in occ.items():
        for o in items:
            if o.name in collective:
                key = (o.name, o.index)
                seen = last.get(key)
                if seen is None or o.start > seen[0]:
                    last[key] = (o.start, rank)
    start = min(s.t0 for s in spans.values())
    end = max(s.end for s in spans.values())
    busy, wait, idle = {}, {}, {}
    phase_busy: dict[str, dict[int, int]] = {}
    phase_wait: dict[str, dict[int, int]] = {}
    bubbles: list[tuple[int, int, int, str]] = []
    for rank, items in occ.items():
        b = w = 0
        cursor, prev = start, "step start"
        for o in items:
            name, o_start, dur = o.name, o.start, o.dur
            if name in collective:  # wait_ns, inlined: this loop runs for every occurrence of every rank
                o.wait = ow = max(0, min(dur, last[(name, o.index)][0] - o_start))
            elif name in waits:
                o.wait = ow = dur
            else:
                ow = 0
            b += dur - ow
            pb = phase_busy.get(name)
            if pb is None:
                pb = phase_busy[name] = {}
            pb[rank] = pb.get(rank, 0) + dur - ow
            if ow:
                w += ow
                pw = phase_wait.setdefault(name, {})
                pw[rank] = pw.get(rank, 0) + ow
            if o_start + ow - cursor >= min_bubble_ns:
                waited = ow and o_start - cursor < min_bubble_ns
                bubbles.append((rank, cursor, o_start + ow - cursor,
                                f"waiting in {name}" if waited else f"idle before {name}"))
            if o_start + dur > cursor:
                cursor = o_start + dur
            prev = name
        if end - cursor >= min_bubble_ns:
            bubbles.append((rank, cursor, end - cursor, f"idle after {prev}"))
        busy[rank], wait[rank] = b, w
        idle[rank] = max(0, (end - start) - b - w)
    path = _critical_path(occ, last, collective, waits)
    return StepAnalysis(step, start, end, busy, wait, idle, phase_busy, phase_wait, bubbles, path, occ)


def _latest_other(occ: dict[int, list[Occurrence]], rank: int,
                  keep: Callable[[Occurrence], bool]) -> tuple[int, int] | None:
    """(rank, index) of the occurrence of another process than ``rank`` that ends last among those ``keep``
    accepts; None when there is none."""
    best: tuple[int, int, int] | None = None
    for r, items in occ.items():
        if r == rank:
            continue
        for i, x in enumerate(items):
            if keep(x) and (best is None or x.end > best[0]):
                best = (x.end, r, i)
    return None if best is None else (best[1], best[2])


def _waited_on(occ: dict[int, list[Occurrence]], rank: int, o: Occurrence) -> tuple[int, int] | None:
    """The other process's occurrence that a wait phase ended on: the latest to end inside it (up to
    ``WAIT_SLACK_NS`` after, for the clocks' uncertainty)."""
    return _latest_other(occ, rank, lambda x: o.start < x.end <= o.end + WAIT_SLACK_NS)


def _fed_by(occ: dict[int, list[Occurrence]], rank: int, first: Occurrence,
            waits: frozenset[str]) -> tuple[int, int] | None:
    """The other process's occurrence that ended last before ``first`` started (within ``WAIT_SLACK_NS``): the
    input a process sat idle for, as a Ray actor waits for another's result. Only occurrences that started
    earlier count, and no wait phase (it feeds nothing), so walking back always moves back in time."""
    return _latest_other(occ, rank, lambda x: (x.name not in waits and x.start < first.start
                                               and x.end <= first.start + WAIT_SLACK_NS))


def _critical_path(occ: dict[int, list[Occurrence]], last: dict[tuple[str, int], tuple[int, int]],
                   collective: frozenset[str], waits: frozenset[str] = frozenset()) -> list[tuple[int, str, int, int]]:
    """Walk back from the latest-ending rank; at a collective occurrence, continue on its last entrant; at a
    wait phase, on the occurrence of another process it waited for."""
    ranks = [r for r, items in occ.items() if items]
    if not ranks:
        return []
    rank = max(ranks, key=lambda r: occ[r][-1].end)
    pos = {r: {(o.name, o.index): i for i, o in enumerate(items)} for r, items in occ.items()}
    i = len(occ[rank]) - 1
    path: list[tuple[int, str, int, int]] = []
    cursor = occ[rank][-1].end
    followed_wait = False
    steps_left = 2 * sum(len(items) for items in occ.values())  # a bound for clocks that make times disagree
    while i >= 0 and steps_left > 0:
        steps_left -= 1
        o = occ[rank][i]
        if o.name in collective:
            entrant = last[(o.name, o.index)][1]
            if entrant != rank and (o.name, o.index) in pos[entrant]:
                rank = entrant
                i = pos[rank][(o.name, o.index)]
                o = occ[rank][i]
        elif o.name in waits and (found := _waited_on(occ, rank, o)) is not None:
            rank, i = found
            o = occ[rank][i]
            followed_wait = True
        end = min(o.end, cursor)
        if end < cursor:
            path.append((rank, "(gap)", max(end, o.start), cursor - max(end, o.start)))
        if end > o.start:
            path.append((rank, o.name, o.start, end - o.start))
        cursor = min(cursor, o.start)
        i -= 1
        if i < 0 and followed_wait and (found := _fed_by(occ, rank, o, waits)) is not None:
            rank, i = found  # a process waited for started when another one's result came: continue on that one
    path.reverse()
    return path


@dataclass
class TimelineReport:
    """Analysis of a step range: per step, and aggregated per rank, role and phase."""

    processes: dict[int, Process]
    steps: list[StepAnalysis]
    problems: list[str]

    def per_rank(self) -> dict[int, dict[str, float]]:
        """Busy/wait/idle shares of the summed step windows, and seconds, per rank."""
        out: dict[int, dict[str, float]] = {}
        for rank in self.processes:
            window = sum(s.window for s in self.steps if rank in s.busy)
            if not window:
                continue
            b = sum(s.busy.get(rank, 0) for s in self.steps)
            w = sum(s.wait.get(rank, 0) for s in self.steps)
            i = sum(s.idle.get(rank, 0) for s in self.steps)
            out[rank] = {"busy_share": b / window, "wait_share": w / window, "idle_share": i / window,
                         "busy_s": b / 1e9, "wait_s": w / 1e9, "idle_s": i / 1e9,
                         "steps": sum(1 for s in self.steps if rank in s.busy)}
        return out

    def per_role(self) -> dict[str, dict[str, float]]:
        """The per-rank shares averaged over the ranks of each role."""
        groups: dict[str, list[dict[str, float]]] = {}
        for rank, row in self.per_rank().items():
            groups.setdefault(self.processes[rank].role, []).append(row)
        return {role: {"ranks": len(rows), **{k: statistics.fmean(r[k] for r in rows)
                                              for k in ("busy_share", "wait_share", "idle_share")}}
                for role, rows in groups.items()}

    def slowest_per_phase(self) -> dict[str, dict[str, Any]]:
        """Per phase: the rank most often the busiest, in how many steps, and by how much its busy time exceeded
        the median of the other ranks (mean over those steps)."""
        counts: dict[str, dict[int, int]] = {}
        excess: dict[str, dict[int, list[float]]] = {}
        for s in self.steps:
            for name, by_rank in s.phase_busy.items():
                if len(by_rank) < 2:
                    continue
                rank = max(by_rank, key=by_rank.__getitem__)
                med = statistics.median(v for r, v in by_rank.items() if r != rank)
                counts.setdefault(name, {})[rank] = counts.get(name, {}).get(rank, 0) + 1
                excess.setdefault(name, {}).setdefault(rank, []).append((by_rank[rank] - med) / 1e9)
        out = {}
        for name, by_rank in counts.items():
            rank = max(by_rank, key=by_rank.__getitem__)
            out[name] = {"rank": rank, "steps": by_rank[rank], "of_steps": sum(by_rank.values()),
                         "excess_over_median_s": statistics.fmean(excess[name][rank])}
        return out

    def critical_path_share(self) -> list[dict[str, Any]]:
        """(rank, phase) pairs by their share of the summed critical paths, largest first."""
        total: dict[tuple[int, str], int] = {}
        for s in self.steps:
            for rank, name, _, dur in s.critical_path:
                total[(rank, name)] = total.get((rank, name), 0) + dur
        whole = sum(total.values()) or 1
        return [{"rank": r, "phase": n, "seconds": d / 1e9, "share": d / whole}
                for (r, n), d in sorted(total.items(), key=lambda kv: -kv[1])]

    def phase_share(self) -> dict[str, float]:
        """Per phase, the share of the summed step windows during which any process ran it (the weight sync's
        share of a Ray step, the rollout's share of a runner step), largest first."""
        total: dict[str, int] = {}
        for s in self.steps:
            by_phase: dict[str, list[tuple[int, int]]] = {}
            for items in s.occurrences.values():
                for o in items:
                    by_phase.setdefault(o.name, []).append((o.start, o.start + o.dur))
            for name, intervals in by_phase.items():
                total[name] = total.get(name, 0) + union_ns(intervals)
        windows = sum(s.window for s in self.steps) or 1
        return {n: v / windows for n, v in sorted(total.items(), key=lambda kv: -kv[1])}

    def bubbles(self, top: int = 10) -> list[dict[str, Any]]:
        """The longest bubbles of the range."""
        rows = [(s.step, r, start - s.start, dur, what) for s in self.steps for r, start, dur, what in s.bubbles]
        rows.sort(key=lambda x: -x[3])
        return [{"step": st, "rank": r, "at_s": at / 1e9, "seconds": d / 1e9, "what": what}
                for st, r, at, d, what in rows[:top]]

    def as_dict(self, per_step: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": [s.step for s in self.steps],
            "processes": {r: {"role": p.role, "host": p.host, "pid": p.pid, "clock": p.clock}
                          for r, p in self.processes.items()},
            "per_rank": self.per_rank(), "per_role": self.per_role(),
            "slowest_per_phase": self.slowest_per_phase(), "phase_share": self.phase_share(),
            "critical_path_share": self.critical_path_share(),
            "bubbles": self.bubbles(), "problems": self.problems,
        }
        if per_step:
            out["per_step"] = [{
                "step": s.step, "window_s": s.window / 1e9,
                "ranks": {r: {"busy_share": s.busy[r] / max(s.window, 1), "wait_share": s.wait[r] / max(s.window, 1),
                              "idle_share": s.idle[r] / max(s.window, 1)} for r in s.busy},
                "critical_path": [{"rank": r, "phase": n, "start_s": (t - s.start) / 1e9, "seconds": d / 1e9}
                                  for r, n, t, d in s.critical_path],
            } for s in self.steps]
        return out


def analyse(timeline: Timeline, min_bubble_ns: int = MIN_BUBBLE_NS) -> TimelineReport:
    """Every step of ``timeline`` analysed (see the module docstring for the definitions)."""
    collective = timeline.collective
    steps = []
    for step in timeline.step_numbers():
        spans = {r: by_step[step] for r, by_step in timeline.steps.items() if step in by_step}
        steps.append(analyse_step(step, spans, collective, min_bubble_ns, timeline.waits))
    return TimelineReport(timeline.processes, steps, list(timeline.problems))


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """``A:B`` (inclusive; either side may be empty) as a range; None for all steps."""
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            return int(lo), int(lo)
        return int(lo) if lo else 0, int(hi) if hi else 2 ** 62
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected A:B, e.g. 10:110") from None

