"""Run data for the dashboard: resolved safely under the runs root, read through ``Run``, cached and followed.

One :class:`RunData` per run is kept in a :class:`RunCache` (small LRU), so a page poll costs only the bytes
appended since the last one. The cache counts rows itself (``Run.metrics()`` / ``Run.rank_metrics()`` are
incremental: each call reads only new complete lines) instead of consuming ``Run.tail()``, because the
detectors read the same ``Run`` and ``tail()`` hands each record out once: two consumers would steal each
other's records. Clients keep their own row counts, so any number of open pages can follow one run.
"""
from __future__ import annotations

import bisect
import csv
import gc
import io
import itertools
import json
import logging
import math
import operator
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tsdownsample import MinMaxLTTBDownsampler

from profiler.flamegraph import folded_files
from rlhf_core.runformat.metric_columns import MetricColumns
from rlhf_core.runformat.run_reader import RecordStream, Run, RunError, list_runs, resolve_run_path
from rlhf_core.runformat.timeline import (
    Timeline,
    TimelineReport,
    analyse,
    prepare_range_read,
    read_timeline,
    timeline_files,
)
from rlhf_core.stability.analysis import Analysis
from rlhf_core.stability.rules.base import is_alerting

ALL = "all"  # the run-level view (one record per step, ranks merged)
MAX_POINTS = 1000  # points per line trace after downsampling
TIMELINE_DEFAULT_STEPS = 10  # steps the Timeline tab shows until a range is chosen: one bar per phase stays legible
TIMELINE_MAX_STEPS = 500  # a wider range is cut to its last steps (the analysis reads and walks every one)
HEATMAP_COLUMNS = 400  # step buckets of a layer heatmap
SMALL_METRICS_BYTES = 20 * 2**20  # runs below this are read for the run list; bigger ones when opened
STALE_S = 600  # a "running" run silent this long is shown as possibly dead
NICE_BACKGROUND = 10  # nice increment of background reads
COLUMNAR_MIN_BYTES = 8 * 2**20  # a first read this big takes the columnar parse (smaller: records directly)
CATCH_UP_BYTES = 4 * 2**20  # bytes of records read per lock hold behind a columnar read (~25 ms here)
DETECT_CHUNK = 2000  # records per detector pass; the data lock is free between passes
RANK_CHUNK_BYTES = 32 << 10  # bytes of each rank file per straggler pass (256 ranks x ~60 steps: ~70 ms here)
REQUEST_YIELD_S = 2.0  # the longest a background pass waits for the page's requests before it goes on

_DOWNSAMPLER = MinMaxLTTBDownsampler()
log = logging.getLogger("rlhfkit.dashboard")
_DETECT_SLOT = threading.Lock()
_serving = 0  # callbacks being served now (see serving())
_served = threading.Condition()


@contextmanager
def serving() -> Iterator[None]:
    """Mark a callback being served: the detectors wait between their passes until none is (at most
    :data:`REQUEST_YIELD_S` at a time). Nice +10 does not share the GIL: a detector pass running beside a
    callback (the straggler rule over 256 ranks, reading their files) made the callback ~2x slower or worse."""
    global _serving
    with _served:
        _serving += 1
    try:
        yield
    finally:
        with _served:
            _serving -= 1
            if not _serving:
                _served.notify_all()


def yield_to_requests(timeout: float = REQUEST_YIELD_S) -> None:
    """Return once no callback is being served (or after ``timeout`` seconds); at once when none is."""
    if _serving:
        with _served:
            _served.wait_for(lambda: not _serving, timeout)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while reading: parsed records are acyclic, and on a 100k-step run the collector's
    passes over millions of new objects cost ~25% of the read."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class View:
    """The records of one view of a run (run-level or one rank) with float columns built lazily per key.

    A column is a numpy array grown by doubling and filled only for rows it has not seen, so a poll costs
    the new rows and a redraw costs no conversion at all. A big run's first rows may come as columns from
    one columnar parse (:meth:`load_columns`) before their records are read: the view then has more rows
    than records (``lagging``) until a background reader catches up, and the charts need not wait for it.

    A column cannot tell a key logged as NaN/inf (the run format writes null and names the key in the
    record's ``nonfinite`` list) from a key not logged at that step: both are NaN. The rows of the first
    are kept per key (:meth:`gap_rows`), so a chart breaks its line there and skips the second.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.keys: dict[str, Any] = {}  # every key seen, in first-seen order (values are irrelevant)
        self._cols: dict[str, tuple[np.ndarray, int]] = {}
        self._gaps: dict[str, list[int]] = {}  # key -> rows (ascending) where it was logged non-finite
        self.bulk_rows = 0  # rows whose columns came from a columnar parse

    def __len__(self) -> int:
        return max(len(self.records), self.bulk_rows)

    @property
    def lagging(self) -> bool:
        """Rows known from the columnar parse whose records have not been read yet."""
        return len(self.records) < self.bulk_rows

    def load_columns(self, columns: MetricColumns) -> None:
        """Take the first ``columns.rows`` rows as columns (only into an empty view)."""
        if len(self):
            raise ValueError("columns can only be loaded into an empty view")
        self.bulk_rows = columns.rows
        self.keys.update(dict.fromkeys(columns.keys))
        self._cols = {k: (v, columns.rows) for k, v in columns.values.items()}
        self._gaps = {k: rows.tolist() for k, rows in columns.nonfinite.items()}

    def drop_columns(self) -> None:
        """Forget the columnar rows (the records disagree with them): every column is rebuilt from records."""
        self.bulk_rows = 0
        self._cols = {}
        self._gaps = {}
        self._note_gaps(self.records, 0)

    def extend(self, records: Sequence[dict[str, Any]]) -> None:
        first = len(self.records)
        self.records.extend(records)
        for rec in records:
            self.keys.update(rec)  # C-level: cheaper than adding the keys one by one
        if first + len(records) > self.bulk_rows:  # rows the columnar parse already noted are skipped
            skip = max(0, self.bulk_rows - first)
            self._note_gaps(records[skip:], first + skip)

    def _note_gaps(self, records: Sequence[dict[str, Any]], first_row: int) -> None:
        """Note the rows of ``records`` (the first is row ``first_row``) whose ``nonfinite`` lists name keys."""
        for i, rec in enumerate(records):
            names = rec.get("nonfinite")
            if names and isinstance(names, list):
                for name in names:
                    if isinstance(name, str):
                        self._gaps.setdefault(name, []).append(first_row + i)

    def gap_rows(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start <= row < stop`` where ``key`` was logged non-finite (NaN/inf), ascending."""
        rows = self._gaps.get(key)
        if not rows:
            return np.empty(0, dtype=np.int64)
        stop = len(self) if stop is None else stop
        return np.asarray(rows[bisect.bisect_left(rows, start):bisect.bisect_left(rows, stop)], dtype=np.int64)

    def _state(self, key: str) -> tuple[np.ndarray, int]:
        """A column and the rows it holds; a key the columnar rows lack is NaN over them (kept, so later
        calls do not allocate it again)."""
        got = self._cols.get(key)
        if got is None:
            if not self.bulk_rows:
                return np.empty(0), 0
            got = self._cols[key] = (np.full(self.bulk_rows, np.nan), self.bulk_rows)
        return got

    def column(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of ``key`` for rows ``start:stop`` as float64; missing or non-numeric values are NaN."""
        arr, filled = self._state(key)
        n = len(self.records)
        if filled < n:
            if len(arr) < n:
                grown = np.empty(max(n, 2 * len(arr), 1024))
                grown[:filled] = arr[:filled]
                arr = grown
            arr[filled:n] = _floats([r.get(key) for r in self.records[filled:n]])
            self._cols[key] = (arr, n)
        return arr[:len(self)][start:stop]

    def steps(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.column("step", start, stop)

    def prefetch(self, keys: Iterable[str]) -> None:
        """Fill several columns in one pass over the rows (a C-level itemgetter per row instead of a
        ``dict.get`` per value: ~3x faster on a cold 100k-step run). Rows missing a key fall back to
        :meth:`column`, key by key."""
        n = len(self.records)
        todo = sorted({k for k in keys if k in self.keys and self._state(k)[1] < n})
        if len(todo) < 2:
            return
        start = min(self._state(k)[1] for k in todo)
        getter = operator.itemgetter(*todo)
        try:  # fromiter over one flat stream: ~2x faster than np.array of row tuples
            block = np.fromiter(itertools.chain.from_iterable(map(getter, self.records[start:n])),
                                dtype=np.float64, count=(n - start) * len(todo)).reshape(n - start, len(todo))
        except (KeyError, TypeError, ValueError):
            return
        for j, key in enumerate(todo):
            arr, _ = self._state(key)
            full = arr if len(arr) >= n else np.empty(max(n, 2 * len(arr), 1024))
            full[:start] = arr[:start]  # every key had at least ``start`` rows filled
            full[start:n] = block[:, j]
            self._cols[key] = (full, n)

    def last(self, key: str) -> Any:
        """``key`` of the last row: from its record, or from its column while the records lag (None if NaN)."""
        if not len(self):
            return None
        if not self.lagging:
            return self.records[-1].get(key)
        value = float(self.column(key, len(self) - 1)[0])
        return None if math.isnan(value) else (int(value) if key == "step" else value)

    def prefixed(self, prefix: str) -> list[str]:
        """Suffixes of the keys under ``prefix`` (e.g. the blocks of ``grad/layer/``) in logged order, which
        for the runner is model order (embeddings, blocks, head)."""
        return [k[len(prefix):] for k in self.keys if k.startswith(prefix)]


def _floats(values: list[Any]) -> np.ndarray:
    """float64 array of JSON values: numbers (and bools) as is, None as NaN, anything else as NaN."""
    # numpy's C loop handles the usual case (numbers and None); odd values fall back to the slow path
    try:
        out = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        return np.array([_number(v) for v in values], dtype=np.float64)
    if out.ndim != 1:
        return np.array([_number(v) for v in values], dtype=np.float64)
    return out


def _number(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    return math.nan


@dataclass
class Alert:
    """An alert as the page shows it (from the detectors or from ``events.jsonl``)."""

    rule: str
    severity: str
    step: int | None
    message: str
    suggestion: str = ""
    rank: Any = None
    origin: str = "detector"

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "step": self.step, "message": self.message,
                "suggestion": self.suggestion, "rank": self.rank, "origin": self.origin}


class RunData:
    """One run as the dashboard sees it: views, alerts, system records, memory report, problems."""

    def __init__(self, key: str, path: Path):
        self.key = key
        self.path = path
        self.lock = threading.RLock()
        self._open()

    def _open(self) -> None:
        self.run = Run(self.path)
        self.meta = self.run.reload_meta()
        self.start_time = self.meta.get("start_time")
        self.views: dict[Any, View] = {ALL: View()}
        self.rank_ids: list[int] = []
        self.system: list[dict[str, Any]] = []
        self.detector_error: str | None = None
        self.meta_error: str | None = None
        self.alert_count: int | None = None
        self._diagnoser: Analysis | None = None
        self._detector: threading.Thread | None = None
        self._catch_up: threading.Thread | None = None
        self._columnar_tried = False
        self._diag_rows = 0
        self._rank_streams: dict[int, RecordStream] = {}  # the straggler pass's own readers of the rank files
        self._rank_pending: dict[int, dict[int, dict[str, Any]]] = {}
        self._timeline: tuple[Any, TimelineView] | None = None  # (range and file stats, view) of the last read
        self._rank_tails: tuple[Any, dict[Any, View]] | None = None  # (file stats, views) of rank_tails()
        self._timeline_prepared = False

    # ---- reading
    def refresh(self) -> None:
        """Read what was appended since the last call (all views); start over if the run was replaced."""
        with self.lock, _gc_paused():
            try:
                meta = self.run.reload_meta()
            except RunError as err:
                self.meta_error = str(err)  # reported by problems(); the rows read so far stay
                return
            self.meta_error = None
            if meta.get("start_time") != self.start_time:
                self._open()
                meta = self.meta
            self.meta = meta
            view = self.views[ALL]
            if not self._columnar_tried and not self.run.rank_files():
                self._columnar_tried = True  # once per run: after a fallback the line reader takes over
                self._load_columns(view)
            if not view.lagging:  # while it lags, the catch-up thread reads the records
                self._extend(view, self.run.metrics())
            rank_files = self.run.rank_files()
            if rank_files:
                # A rank's records are read when that rank is first asked for (view(), the detectors): 256 ranks
                # x 10k steps are 2.56 M records, ~10 s and ~3 GB, of which the run-level view needs none.
                self.rank_ids = sorted(rank_files)
                loaded = [r for r in self.views if r != ALL]
                if loaded:
                    for rank, recs in self.run.rank_metrics(loaded).items():
                        self._extend(self.views[rank], recs)
            self.system = self.run.system()
            if not self._timeline_prepared:
                self._timeline_prepared = True
                threading.Thread(target=self._prepare_timeline, daemon=True, name=f"timeline-{self.key}").start()

    def _prepare_timeline(self) -> None:
        """What the Timeline tab's first range read would search its files for (a resume's second header),
        searched now in the background: one file at a time, at nice +10, pausing while a callback is served
        (the page's first render draws meanwhile). Saves that read ~0.3 s at 256 ranks x 10k steps."""
        _lower_priority()
        for path in timeline_files(self.path).values():
            yield_to_requests()
            prepare_range_read(path)

    def _load_columns(self, view: View) -> None:
        """A big first read: the charts' columns from one columnar parse (~3x faster than building a dict per
        line, and off the GIL); the records follow once the detectors start (:meth:`_start_catch_up`)."""
        columns = self.run.metric_columns(min_bytes=COLUMNAR_MIN_BYTES)
        if columns is None or not columns.rows:
            return
        view.load_columns(columns)

    def _start_catch_up(self) -> None:
        """Read the records behind the columnar rows on a background thread (once), after the first render:
        it is started with the detectors, which need them, so it does not compete with the page's drawing."""
        if self.views[ALL].lagging and self._catch_up is None:
            self._catch_up = threading.Thread(target=self._read_records, args=(self.start_time,), daemon=True,
                                              name=f"records-{self.key}")
            self._catch_up.start()

    def _read_records(self, generation: Any) -> None:
        """Read the records behind columnar rows in pieces (the lock is free between them), then check that
        they match the columns row for row; on any disagreement the records win and the columns are rebuilt."""
        _lower_priority()
        while True:
            with self.lock, _gc_paused():
                view = self.views[ALL]
                if generation != self.start_time or not view.lagging:
                    break
                before = len(view.records)
                self._extend(view, self.run.metrics(max_bytes=CATCH_UP_BYTES))
                if len(view.records) == before:  # the end of the lines, or a piece of lines the line reader
                    break  # rejects: either way it disagrees with the columns (checked below)
            time.sleep(0.001)
        with self.lock:
            if generation != self.start_time:
                return
            view = self.views[ALL]
            rows = view.bulk_rows
            steps = _floats([r.get("step") for r in view.records[:rows]])
            if view.lagging or not np.array_equal(steps, view.column("step", 0, rows), equal_nan=True):
                log.warning("%s: columnar and line reads of metrics.jsonl disagree; using the line read", self.key)
                view.drop_columns()

    def try_refresh(self) -> bool:
        """:meth:`refresh` unless another thread holds the run (a big first read): False then, at once."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.refresh()
        finally:
            self.lock.release()
        return True

    @staticmethod
    def _extend(view: View, records: list[dict[str, Any]]) -> None:
        if len(records) > len(view.records):
            view.extend(records[len(view.records):])

    def view(self, rank: Any = ALL) -> View:
        """The records of ``rank`` (its file is read the first time it is asked for), or the run-level view
        where this run has no such rank."""
        if rank != ALL and rank not in self.views and rank in self.rank_ids:
            with self.lock, _gc_paused():
                if rank not in self.views:
                    self.views[rank] = View()
                    for recs in self.run.rank_metrics([rank]).values():
                        self._extend(self.views[rank], recs)
        return self.views[rank] if rank in self.views else self.views[ALL]

    def rank_tails(self, last: int) -> dict[Any, View]:
        """Per rank, a view of its last ``last`` records read from the end of its file (the per-rank phase
        chart: a few KiB per rank, where every rank's whole file is 10+ s at 256 ranks x 10k steps); kept until
        a rank file changes. Empty for a run without rank files."""
        files = self.run.rank_files()
        stats = []
        for rank, name in files.items():
            try:
                st = os.stat(self.path / name)
            except OSError:
                continue
            stats.append((rank, st.st_size, st.st_mtime_ns))
        key = (last, tuple(stats))
        cached = self._rank_tails
        if cached is not None and cached[0] == key:
            return cached[1]
        views: dict[Any, View] = {}
        for rank, recs in self.run.rank_tails(last).items() if files else ():
            views[rank] = View()
            views[rank].extend(recs)
        self._rank_tails = (key, views)
        return views

    # ---- alerts
    def start_detection(self) -> None:
        """Run the detectors over rows not seen yet, on a background thread (no-op while one runs)."""
        with self.lock:
            self._start_catch_up()
            if self.detector_error or (self._detector is not None and self._detector.is_alive()):
                return
            pending = self._diag_rows < len(self.views[ALL]) or any(
                r not in self._rank_streams or self._rank_streams[r].pending_bytes() for r in self.rank_ids)
            if not pending:
                return
            self._detector = threading.Thread(target=self._detect_loop, args=(self.start_time,), daemon=True,
                                              name=f"detect-{self.key}")
            self._detector.start()

    def _make_diagnoser(self) -> Analysis:
        """The run's one analysis: the same rule settings as ``rlhfkit diagnose`` and the producer's live alerts."""
        return Analysis(self.meta, run_id=self.run.run_id)

    def _detect_loop(self, generation: Any) -> None:
        _lower_priority()  # the page being drawn comes first
        with _DETECT_SLOT:  # one detector thread at a time: a long run list must not starve the page
            self._detect_chunks(generation)

    def _detect_chunks(self, generation: Any) -> None:
        try:
            while True:
                yield_to_requests()
                with self.lock:
                    if generation != self.start_time:
                        return
                    if self._diagnoser is None:
                        self._diagnoser = self._make_diagnoser()
                    diagnoser = self._diagnoser
                    start = self._diag_rows
                    chunk = self.views[ALL].records[start:start + DETECT_CHUNK]
                    ranks = list(self.rank_ids) if not chunk else []
                    state = (self.run, self._rank_streams, self._rank_pending)  # this generation's
                    waiting = self.views[ALL].lagging and self._catch_up is not None and self._catch_up.is_alive()
                rank_steps, more = self._next_rank_steps(ranks, *state) if ranks else ([], False)
                if not chunk and not rank_steps:
                    if more:  # rank records read, no step complete yet
                        continue
                    if waiting:  # the records behind the columnar rows are still being read
                        time.sleep(0.05)
                        continue
                    return
                diagnoser.update(chunk)  # outside the lock: the page keeps reading while this runs
                for step, per_rank in rank_steps:
                    yield_to_requests()
                    diagnoser.update_ranks(step, per_rank)
                with self.lock:
                    if generation != self.start_time:
                        return
                    self._diag_rows = start + len(chunk)
                time.sleep(0.001)  # yield the GIL to request threads between chunks
        except Exception as err:  # noqa: BLE001 - a detector bug must leave the page alive
            self.detector_error = f"detectors failed on {self.key}: {type(err).__name__}: {err}"

    @staticmethod
    def _next_rank_steps(ranks: list[int], run: Run, streams: dict[int, RecordStream],
                         pending: dict[int, dict[int, dict[str, Any]]]
                         ) -> tuple[list[tuple[int, dict[int, dict[str, Any]]]], bool]:
        """Per-rank records of the next steps every rank has reported (for the straggler rule), and whether any
        record was read. The detector thread reads the rank files itself, :data:`RANK_CHUNK_BYTES` of each per
        call, and keeps only the steps not complete yet: the rank views are read only for a rank that is shown
        (256 ranks x 10k steps kept as records were ~3 GB, and the collector's passes over them stalled
        every request thread for seconds)."""
        read = False
        for rank in ranks:
            if rank not in streams:
                streams.update({r: s for r, s in run.rank_streams().items() if r not in streams})
            stream = streams.get(rank)
            if stream is None:
                continue
            yield_to_requests()
            with _gc_paused():
                records = stream.read(RANK_CHUNK_BYTES)
            for rec in records:
                pending.setdefault(rec["step"], {})[rank] = rec
            read = read or bool(records)
        done = sorted(s for s, per in pending.items() if len(per) == len(ranks))
        return [(s, pending.pop(s)) for s in done], read

    def alerts(self, start: bool = True) -> tuple[list[Alert], str]:
        """Detector alerts plus alert events of ``events.jsonl`` (deduplicated by rule and step) and progress.

        ``start`` launches the detectors on rows they have not seen; without it this is a cheap snapshot.
        """
        if start:
            self.start_detection()
        with self.lock:
            found: dict[tuple[str, Any], Alert] = {}
            if self._diagnoser is not None:
                for a in list(self._diagnoser.alerts):
                    found[(a.rule, a.step)] = Alert(rule=a.rule, severity=a.severity, step=a.step,
                                                    message=a.message, suggestion=a.suggestion,
                                                    rank=getattr(a, "rank", None))
            for ev in self.run.events():
                if ev.get("kind") != "alert":
                    continue
                data = ev.get("data")
                data = data if isinstance(data, dict) else {}
                step = ev.get("step") if isinstance(ev.get("step"), int) else None
                found.setdefault((str(ev.get("rule")), step), Alert(
                    rule=str(ev.get("rule") or "event"), severity=str(ev.get("severity") or "info"), step=step,
                    message=str(ev.get("message") or ""), suggestion=str(data.get("suggestion") or ""),
                    rank=data.get("rank", ev.get("rank")), origin="events.jsonl"))
            total = len(self.views[ALL])
            progress = "" if self._diag_rows >= total else f"checking {self._diag_rows:,} / {total:,} steps"
            self.alert_count = sum(is_alerting(a.severity) for a in found.values()) if not progress else None
            return sorted(found.values(), key=lambda a: (a.step is None, a.step or 0, a.rule)), progress

    # ---- other files
    def samples(self) -> list[dict[str, Any]]:
        """The completions the producer kept (``samples.jsonl``), read incrementally."""
        with self.lock:
            return self.run.samples()

    def memory(self) -> dict[str, Any] | None:
        return self.run.memory()

    def timeline(self, steps: tuple[int, int] | None = None, last: int = TIMELINE_DEFAULT_STEPS) -> TimelineView:
        """The per-rank phase intervals of ``steps`` (default: the last ``last`` steps) and their analysis;
        kept until a timeline file changes, so the page's periodic refresh does not redo the analysis
        (~1 s at 256 ranks x 100 steps)."""
        files = timeline_files(self.path)
        stats = tuple((r, st.st_size, st.st_mtime_ns) for r, st in ((r, f.stat()) for r, f in files.items()))
        key = (steps, last, stats)
        cached = self._timeline
        if cached is not None and cached[0] == key:
            return cached[1]
        with _gc_paused():  # ~0.3 M objects of the analysis beside the run's records: no collector passes
            view = timeline_view(self.path, steps, last)
        view.signature = f"{self.key}|{steps}|{last}|{hash(stats)}"
        self._timeline = (key, view)
        return view

    def folded_files(self) -> list[Path]:
        """The profiler's op-level folded stacks (not its ``.stacks``/``.cuda`` variants), oldest first."""
        return folded_files(self.path / "traces", "cpu")

    def traces(self) -> list[Path]:
        return self.run.traces()

    def problems(self) -> list[str]:
        """Bad lines, torn last lines, an unreadable meta.json and detector failures, one line each."""
        with self.lock:
            try:
                out = [str(p) for p in self.run.problems()]
            except RunError as err:
                out = [str(err)]
            if self.meta_error and self.meta_error not in out:
                out.insert(0, self.meta_error)
        return out + [self.detector_error] if self.detector_error else out

    def summary(self) -> dict[str, Any]:
        with self.lock:
            view = self.views[ALL]
            status = str(self.meta.get("status", "unknown"))
            written = view.last("time")
            if status == "running" and self.run.process_gone():
                status = "running? (its process has ended: killed?)"
            elif status == "running" and isinstance(written, (int, float)) and time.time() - written > STALE_S:
                status = f"running? (silent {int((time.time() - written) // 60)} min)"
            return {"id": self.key, "run_id": self.run.run_id, "source": self.meta.get("source"),
                    "status": status, "steps": len(view), "last_step": view.last("step"),
                    "start_time": self.start_time, "world_size": self.run.world_size,
                    "alerts": self.alert_count}


class RunCache:
    """RunData by run id (its path relative to the root), refusing ids that leave the root.

    Least recently used runs are dropped once the cache holds more than ``max_rows`` records (a 100k-step,
    50-key run takes ~0.4 GB in memory) or more than ``capacity`` runs; the run in use always stays.
    """

    def __init__(self, root: str | Path, capacity: int = 64, max_rows: int = 400_000):
        self.root = Path(root).resolve()
        self.capacity = capacity
        self.max_rows = max_rows
        self._items: OrderedDict[str, RunData] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_key: str) -> RunData:
        """The cached run, refreshed; RunError (one line) for a refused or unreadable id."""
        data, _ = self._entry(run_key)
        data.refresh()
        self._evict()
        return data

    def _entry(self, run_key: str) -> tuple[RunData, bool]:
        """The cache entry of ``run_key`` (not refreshed) and whether it was created now."""
        path = resolve_run_path(self.root, run_key)
        with self._lock:
            data = self._items.get(run_key)
            created = data is None or not data.path.is_dir()
            if data is None or created:
                data = RunData(run_key, path)
                self._items[run_key] = data
            self._items.move_to_end(run_key)
        return data, created

    def _evict(self) -> None:
        with self._lock:
            while len(self._items) > 1 and (len(self._items) > self.capacity or sum(
                    sum(len(v) for v in list(d.views.values())) for d in self._items.values()) > self.max_rows):
                self._items.popitem(last=False)

    def warm(self, run_keys: Sequence[str], prepare: Callable[[RunData], None] | None = None) -> None:
        """Start reading runs on a background thread (the page's first render then finds them read or
        being read, instead of starting the read after its round trips); ``prepare`` then runs on each
        (the figures' columns, built while the page is still loading). Runs already in the cache are left to
        the requests that refresh them: a page linked to a run warms it twice (index request, run list).
        The read keeps normal priority: the page is waiting for it (at nice +10 a 100k-step first render took
        ~0.15 s longer here, the browser's work crowding the read out)."""
        new = []
        for key in run_keys:
            try:
                data, created = self._entry(key)
            except RunError:
                continue  # the render reports it
            if created:
                new.append(data)
        if not new:
            return

        def read() -> None:
            for data in new:
                try:
                    data.refresh()
                except RunError:
                    continue  # the render reports it
                if prepare is not None:
                    prepare(data)
            self._evict()

        threading.Thread(target=read, daemon=True, name="warm-runs").start()

    def newest(self) -> list[str]:
        """The id of the newest run (the run list's first row, what a page without a selection shows), or
        none."""
        runs = list_runs(self.root)
        return [self._key(runs[0])] if runs else []

    def _key(self, run: Run) -> str:
        """A run's id: its path relative to the root ("." for a root that is itself a run)."""
        return run.path.relative_to(self.root).as_posix() if run.path != self.root else "."

    def peek(self, run_key: str) -> RunData | None:
        with self._lock:
            return self._items.get(run_key)

    def listing(self) -> list[dict[str, Any]]:
        """Rows of the run list, newest first. Small runs are read for their step count; big ones once opened."""
        rows = []
        for run in list_runs(self.root):
            key = self._key(run)
            data = self.peek(key)
            try:
                if data is not None:
                    if not data.try_refresh():  # being read by another thread: list it from its meta for now
                        data = None
                elif _metrics_bytes(run.path) <= SMALL_METRICS_BYTES:
                    data = self.get(key)
            except RunError:
                data = None
            if data is not None:
                data.alerts()  # starts the detectors in the background; the count shows once they are done
                rows.append(data.summary())
                continue
            meta = run.meta
            rows.append({"id": key, "run_id": run.run_id, "source": meta.get("source"),
                         "status": meta.get("status", "unknown"), "steps": None, "last_step": None,
                         "start_time": meta.get("start_time"), "world_size": run.world_size, "alerts": None})
        return rows


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: per-thread nice), so a big read in the background yields the
    cores to the browser drawing the page and to request threads; elsewhere a no-op."""
    if NICE_BACKGROUND and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE_BACKGROUND)
        except OSError:
            pass


def _metrics_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("metrics*.jsonl"))


def downsample_rows(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Rows (ascending) of at most ``max_points`` points that keep every spike: MinMaxLTTB over the finite
    values."""
    finite = np.isfinite(y)
    if finite.all():
        return np.arange(len(y)) if len(y) <= max_points else _DOWNSAMPLER.downsample(y, n_out=max_points)
    rows = np.flatnonzero(finite)
    if len(rows) <= max_points:
        return rows
    return rows[_DOWNSAMPLER.downsample(y[rows], n_out=max_points)]


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The points of :func:`downsample_rows`."""
    rows = downsample_rows(y, max_points)
    return x[rows], y[rows]


def bucket_edges(n: int, buckets: int = HEATMAP_COLUMNS) -> np.ndarray:
    """Row indices that split ``n`` rows into at most ``buckets`` contiguous buckets."""
    return np.unique(np.linspace(0, n, min(n, buckets) + 1).astype(int))


def bucket_reduce(values: np.ndarray, edges: np.ndarray, how: str = "max") -> np.ndarray:
    """Per-bucket max (keeps spikes) or mean of ``values``, ignoring NaN; an all-NaN bucket gives NaN."""
    starts = edges[:-1]
    if len(values) == 0 or len(starts) == 0:
        return np.full(len(starts), np.nan)
    if how == "max":
        return np.fmax.reduceat(values, starts)
    finite = np.isfinite(values)
    sums = np.add.reduceat(np.where(finite, values, 0.0), starts)
    counts = np.add.reduceat(finite.astype(np.int64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def metrics_csv(views: dict[str, View], keys: Sequence[str] | None = None, stops: dict[str, int] | None = None
                ) -> str:
    """CSV of runs' rows: ``run, step, time`` then ``keys`` (every key the views logged when None), one line per
    row, empty where a row lacks a key or its value is not finite."""
    if keys is None:
        keys = sorted({k for v in views.values() for k in v.keys} - {"step", "time", "rank", "nonfinite"})
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["run", "step", "time", *keys])
    for run, view in views.items():
        n = (stops or {}).get(run, len(view))
        cols = [view.column(k, 0, n) for k in ("step", "time", *keys)]
        for i in range(n):
            row: list[str | int] = [run]
            for j, col in enumerate(cols):
                v = col[i] if i < len(col) else math.nan
                row.append("" if not math.isfinite(v) else (int(v) if j == 0 else repr(float(v))))
            out.writerow(row)
    return buf.getvalue()


META_SECTIONS = (("run", ("source", "run_id", "status", "world_size", "format_version", "start_time", "end_time")),
                 ("config", None), ("env", None))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``ppo.clip_range``); lists and scalars are values."""
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in value.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def _utc(value: Any) -> Any:
    """A unix time as ``YYYY-MM-DD HH:MM:SS UTC`` (anything else as is)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def config_rows(metas: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The config diff of several runs: one row per setting (run fields, ``config.*``, environment ``env.*``:
    versions, device, git commit), one column per run, ``differs`` set where the runs disagree (a setting
    one run lacks counts as a difference)."""
    rows: list[dict[str, Any]] = []
    for section, fields in META_SECTIONS:
        per_run: dict[str, dict[str, Any]] = {}
        for run, meta in metas.items():
            if fields is None:
                block = meta.get(section)
                per_run[run] = flatten(block) if isinstance(block, dict) else {}
            else:
                per_run[run] = {f: _utc(meta[f]) if f.endswith("_time") else meta.get(f) for f in fields if f in meta}
        names: list[str] = []
        for values in per_run.values():
            names += [n for n in values if n not in names]
        if fields is None:
            names.sort()
        for name in names:
            cells = {run: _cell(per_run[run].get(name)) if name in per_run[run] else "(not set)" for run in metas}
            rows.append({"section": section, "setting": name, **cells,
                         "differs": "yes" if len(set(cells.values())) > 1 else ""})
    return rows


SAMPLE_SORTS = ("reward", "kl", "length")


def sample_rows(records: Sequence[dict[str, Any]], step: int | None, text: str = "", sort: str = "",
                descending: bool = True) -> list[dict[str, Any]]:
    """Table rows of one step's samples: reward components as ``reward:<name>`` columns, rows whose prompt or
    completion (or chosen/rejected) contains ``text`` (case-insensitive), sorted by ``sort`` (missing last)."""
    rows = []
    needle = text.lower().strip()
    for rec in records:
        if rec.get("step") != step:
            continue
        texts = [str(rec.get(k) or "") for k in ("prompt", "completion", "chosen", "rejected")]
        if needle and not any(needle in t.lower() for t in texts):
            continue
        row: dict[str, Any] = {k: v for k, v in rec.items()
                               if k not in ("rewards", "time", "rank", "nonfinite", "truncated")
                               and isinstance(v, (str, int, float, type(None)))}
        parts = rec.get("rewards")
        parts = parts if isinstance(parts, dict) else {}
        row.update({f"reward:{k}": v for k, v in parts.items()})
        rows.append(row)
    if sort:
        present = [r for r in rows if isinstance(r.get(sort), (int, float))]
        absent = [r for r in rows if not isinstance(r.get(sort), (int, float))]
        rows = sorted(present, key=lambda r: r[sort], reverse=descending) + absent
    return rows


def join_problems(items: Iterable[str], limit: int = 6) -> list[str]:
    """At most ``limit`` distinct messages, with a count of the rest."""
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    if len(seen) > limit:
        return seen[:limit] + [f"... and {len(seen) - limit} more"]
    return seen


# ---------------------------------------------------------------------------------------------- timeline


def timeline_step_of(line: bytes) -> int | None:
    """The step of a timeline step line (``{"step":N,...``) without parsing the JSON."""
    if not line.startswith(b'{"step":'):
        return None
    digits = line[8:line.find(b",", 8)]
    return int(digits) if digits.isdigit() else None


@dataclass
class TimelineView:
    """What the Timeline tab draws: the range read, its intervals, their analysis, and why anything is missing."""

    steps: tuple[int, int] | None  # inclusive range shown; None when the run has no intervals
    last_step: int | None  # the last step any process recorded (the range control's bound)
    timeline: Timeline
    report: TimelineReport | None
    message: str = ""
    signature: str = ""  # changes when the range or any timeline file changes (the page skips equal redraws)


def _edge_steps(path: Path) -> tuple[int, int] | None:
    """(first, last) step of one timeline file from its first step line and its last complete line, without
    reading the whole file (256 files of 10k steps: a few ms)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).split(b"\n")
        first = next((s for s in (timeline_step_of(line) for line in head[1:]) if s is not None), None)
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - (1 << 16)))
        tail = fh.read().split(b"\n")
    last = next((s for s in (timeline_step_of(line) for line in reversed(tail[:-1])) if s is not None), None)
    return (first, last) if first is not None and last is not None else None


def timeline_step_span(run_dir: Path) -> tuple[int, int] | None:
    """The steps the run's timeline files cover (first of any, last of any); None without intervals."""
    spans = [e for e in (_edge_steps(f) for f in timeline_files(run_dir).values()) if e is not None]
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None


def timeline_view(run_dir: Path, steps: tuple[int, int] | None, last: int = TIMELINE_DEFAULT_STEPS) -> TimelineView:
    """Read only the chosen step range of every rank (the reader's range read) and analyse it with
    :func:`rlhf_core.runformat.timeline.analyse`; the range is clamped to the run and to :data:`TIMELINE_MAX_STEPS`."""
    span = timeline_step_span(run_dir)
    if span is None:
        return TimelineView(None, None, Timeline({}, {}), None,
                            "no phase intervals in this run (timeline.rank<N>.jsonl; docs/timeline.md)")
    lo, hi = steps if steps is not None else (span[1] - last + 1, span[1])
    lo, hi = max(lo, span[0]), min(hi, span[1])
    note = ""
    if hi - lo + 1 > TIMELINE_MAX_STEPS:
        lo, note = hi - TIMELINE_MAX_STEPS + 1, f"range cut to its last {TIMELINE_MAX_STEPS} steps"
    if lo > hi:
        return TimelineView(None, span[1], Timeline({}, {}), None,
                            f"no recorded steps in that range (the run has steps {span[0]}-{span[1]})")
    timeline = read_timeline(run_dir, (lo, hi))
    return TimelineView((lo, hi), span[1], timeline, analyse(timeline), note)
