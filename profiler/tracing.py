"""TraceSession: a scheduled ``torch.profiler`` window that leaves every artefact a user needs in ``traces/``.

For each completed window (``wait`` idle steps, ``warmup`` steps, ``active`` recorded steps, ``repeat`` times;
0 repeats forever) it writes, under one stem ``rank<r>_steps<first>-<last>``:

- ``.pt.trace.json.gz``: the Chrome trace (Perfetto, chrome://tracing);
- ``.ops.txt`` / ``.ops.json``: the op table (``key_averages``), text and machine-readable;
- ``.folded`` (and ``.cuda.folded`` on CUDA): folded stacks of the op tree (phase ranges, modules with
  ``with_stack``, ops; self time in µs), with ``.flame.svg`` rendered from it;
- ``.phases.json``: per-phase time and allocator peak read back from the trace (:mod:`profiler.trace_analysis`);
- ``.export.json``: what the export of this window cost (seconds per artefact, bytes, options), written last;
- on CUDA ``.snapshot.pickle``: a CUDA memory snapshot of the window (``_record_memory_history``), for
  https://pytorch.org/memory_viz;
- opt-in, because they are the slow part of the export: ``.stacks.folded``, the Python stacks of
  ``export_stacks`` (``with_stack=True``; needs ``_ExperimentalConfig(verbose=True)`` in torch 2.13, set here),
  and ``.memory.html``, the memory timeline (``memory_timeline=True``, which turns on the ``with_stack``,
  ``record_shapes`` and ``profile_memory`` it needs; ``torch.cuda._memory_viz.profile_plot``).

Export failures never stop training: each artefact is written on its own and a failure is one warning line.
The export blocks the step that closes the window, and no step record holds that time, hence ``.export.json``.
A requested window the run never reached (it ended first) is one warning line at the end and, with a
``writer``, a ``trace`` event in ``events.jsonl``: otherwise a run asked to trace says nothing when it did not.
The runner (and the adapters) call :meth:`TraceSession.step` once at the end of each optimizer step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.cuda import _memory_viz
from torch.profiler import ProfilerAction, ProfilerActivity

from .flamegraph import parse_folded, write_svg
from .kineto_log import quiet_kineto
from .trace_analysis import load_trace, op_kind, phase_summary

log = logging.getLogger(__name__)

RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)
_KEEP_PYTHON = "nn.Module: "


def folded_from_events(events: Any, metric: str = "self_cpu_time_total") -> dict[tuple[str, ...], float]:
    """Folded stacks of the profiler's event tree: ranges (``ProfilerStep*``, ``phase/…``), modules and ops.

    Python frames (``with_stack``) are left out of the path and their self time goes to the nearest kept
    ancestor, so the graph reads ``ProfilerStep*;phase/update;nn.Module: GPT2Model_0;aten::linear;…``.
    Frames with no kept ancestor are dropped: they enclose the whole loop, and torch's self time for them
    counts the profiled steps a second time.
    """
    stacks: dict[tuple[str, ...], float] = {}
    paths: dict[int, tuple[str, ...]] = {}

    def kept(evt: Any) -> bool:
        return not getattr(evt, "is_python_function", False) or evt.name.startswith(_KEEP_PYTHON)

    def path_of(evt: Any) -> tuple[str, ...]:
        key = id(evt)
        if key not in paths:
            parent = evt.cpu_parent
            base = path_of(parent) if parent is not None else ()
            paths[key] = base + (evt.name.replace(";", ":"),) if kept(evt) else base
        return paths[key]

    for evt in events:
        if getattr(evt, "is_async", False) or getattr(evt, "device_type", None) != torch.autograd.DeviceType.CPU:
            continue
        value = float(getattr(evt, metric, 0.0) or 0.0)
        if value <= 0:
            continue
        stack = path_of(evt)
        if stack:
            stacks[stack] = stacks.get(stack, 0.0) + value
    return stacks


def write_folded(stacks: dict[tuple[str, ...], float], path: Path) -> bool:
    """Write folded lines (integer µs, as flamegraph tools expect); False when there was nothing to write."""
    lines = [f"{';'.join(s)} {round(v)}" for s, v in sorted(stacks.items()) if round(v) > 0]
    if not lines:
        return False
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return True


def op_rows(averages: Any) -> list[dict[str, Any]]:
    """The op table (``prof.key_averages()``) as plain rows (times in µs, memory in bytes), most self CPU first."""
    rows = []
    for avg in averages:
        rows.append({
            "name": avg.key, "kind": op_kind(avg.key, bool(getattr(avg, "is_user_annotation", False))),
            "count": int(avg.count),
            "self_cpu_us": float(avg.self_cpu_time_total), "cpu_total_us": float(avg.cpu_time_total),
            "self_device_us": float(getattr(avg, "self_device_time_total", 0.0) or 0.0),
            "device_total_us": float(getattr(avg, "device_time_total", 0.0) or 0.0),
            "self_cpu_mem_bytes": int(avg.self_cpu_memory_usage), "cpu_mem_bytes": int(avg.cpu_memory_usage),
            "self_device_mem_bytes": int(getattr(avg, "self_device_memory_usage", 0) or 0),
            "flops": int(getattr(avg, "flops", 0) or 0),
        })
    rows.sort(key=lambda r: r["self_cpu_us"], reverse=True)
    return rows


class TraceSession:
    """Context manager around ``torch.profiler.profile`` with a wait/warmup/active/repeat schedule.

    ``step_offset`` is the global step of the first :meth:`step` (a resumed run), used in file names only.
    ``windows`` lists, per exported window, its steps, the artefacts written and the export seconds.
    The defaults keep the export cheap (no Python stacks, no memory timeline); ``with_stack=True`` adds the
    stacks, ``memory_timeline=True`` the timeline and what it needs. ``writer`` (a ``RunWriter``) records a
    window that never ran.
    """

    def __init__(
        self,
        traces_dir: str | os.PathLike,
        wait: int = 1,
        warmup: int = 1,
        active: int = 2,
        repeat: int = 1,
        device: torch.device | str = "cpu",
        rank: int = 0,
        *,
        record_shapes: bool = True,
        profile_memory: bool = True,
        with_stack: bool = False,
        memory_timeline: bool = False,
        step_offset: int = 0,
        row_limit: int = 40,
        writer: Any = None,
    ):
        for name, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                                 ("repeat", repeat, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"profile {name} must be an integer >= {low}, got {value!r}")
        if memory_timeline:  # profile_plot reads allocations with their shapes and Python stacks
            record_shapes = profile_memory = with_stack = True
        self.traces_dir = Path(traces_dir)
        self.device = torch.device(device)
        self.rank = int(rank)
        self.schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat)
        self.cycle = {"wait": wait, "warmup": warmup, "active": active, "repeat": repeat}
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.memory_timeline = memory_timeline
        self.row_limit = row_limit
        self.writer = writer
        self.windows: list[dict[str, Any]] = []
        self._cuda = self.device.type == "cuda"
        self._first_step = int(step_offset)
        self._step = int(step_offset)
        self._t_call: float | None = None
        self._recorded: list[int] = []
        self._history_on = False
        self._stopping = False
        self._prof: Any = None

    # ---- lifecycle
    def __enter__(self) -> TraceSession:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        self._prof = torch.profiler.profile(
            activities=activities, schedule=self.schedule, on_trace_ready=self._on_ready,
            record_shapes=self.record_shapes, profile_memory=self.profile_memory, with_stack=self.with_stack,
            experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True) if self.with_stack else None,
        )
        with quiet_kineto():
            self._prof.__enter__()
        self._sync_memory_history()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopping = exc[0] is not None  # left mid-step by an error: that step was recorded in part
        try:
            self._t_call = time.perf_counter()
            with quiet_kineto():
                self._prof.__exit__(*exc)
        finally:
            self._t_call = None
            self._set_memory_history(False)
            self._prof = None
        if not self._stopping:
            self._report_missed()

    def step(self) -> None:
        """Mark the end of one optimizer step (call it after the step's last phase)."""
        if self._prof is None:
            raise RuntimeError("TraceSession.step() outside its 'with' block")
        if self._prof.current_action in RECORDING:
            self._recorded.append(self._step)
        self._step += 1
        self._t_call = time.perf_counter()
        with quiet_kineto():  # a window may start or stop here
            self._prof.step()
        self._t_call = None
        self._sync_memory_history()

    @property
    def recording(self) -> bool:
        """True while the current step is inside an active window."""
        return self._prof is not None and self._prof.current_action in RECORDING

    # ---- windows the run never reached
    def missed(self) -> dict[str, Any] | None:
        """What was requested and never traced (None when every requested window ran): with ``repeat`` N,
        the windows short of N; with ``repeat`` 0 (until the end), none at all."""
        c = self.cycle
        wanted = c["repeat"] if c["repeat"] > 0 else 1
        if len(self.windows) >= wanted:
            return None
        period = c["wait"] + c["warmup"] + c["active"]
        first = self._first_step + len(self.windows) * period + c["wait"] + c["warmup"]
        steps_run = self._step - self._first_step
        last = self._step - 1
        what = "no trace window ran" if not self.windows else (
            f"{wanted - len(self.windows)} of {wanted} trace windows never ran")
        message = (f"{what}: the run ended at step {last}, before the window that records steps "
                   f"{first}-{first + c['active'] - 1} (wait {c['wait']}, warm-up {c['warmup']}, active "
                   f"{c['active']}); start it earlier or train longer")
        return {"message": message, "windows_requested": c["repeat"] or None, "windows_written": len(self.windows),
                "steps_run": steps_run, "last_step": last, "next_window_first_step": first, "schedule": dict(c)}

    def _report_missed(self) -> None:
        missed = self.missed()
        if missed is None:
            return
        if self.rank == 0:
            log.warning("rlhfkit: %s", missed["message"])
        if self.writer is not None:
            self.writer.event(missed["last_step"], "trace", rule="window_missed", severity="warning",
                              message=missed["message"], data={k: v for k, v in missed.items() if k != "message"})

    # ---- CUDA memory snapshots
    def _sync_memory_history(self) -> None:
        if self._cuda and self.recording and not self._history_on:
            self._set_memory_history(True)

    def _set_memory_history(self, on: bool) -> None:
        if not self._cuda or on == self._history_on:
            return
        try:
            torch.cuda.memory._record_memory_history(enabled="all" if on else None, max_entries=200_000)
            self._history_on = on
        except (RuntimeError, AttributeError, TypeError) as err:
            log.warning("CUDA memory history %s failed: %s", "start" if on else "stop", err)

    # ---- export
    def _window(self) -> list[int]:
        """Steps of the window being exported (the current one too when an error cut it short)."""
        steps = list(self._recorded)
        if self._stopping and self._prof is not None and self._prof.current_action in RECORDING:
            steps.append(self._step)
        self._recorded.clear()
        return steps

    def _on_ready(self, prof: Any) -> None:
        steps = self._window()
        if not steps:  # the run ended just as a new window opened: nothing was recorded
            return
        stem = f"rank{self.rank}_steps{steps[0]:06d}-{steps[-1]:06d}"
        self.traces_dir.mkdir(parents=True, exist_ok=True)  # here, so a window that never ran leaves no folder
        base = self.traces_dir / stem
        written: dict[str, str] = {}
        seconds: dict[str, float] = {}
        if self._t_call is not None:  # torch stopping the profiler and collecting its events, before any file
            seconds["collect"] = time.perf_counter() - self._t_call

        def attempt(kind: str, path: Path, fn: Callable[[], Any]) -> None:
            t0 = time.perf_counter()
            try:
                if fn() is not False:
                    written[kind] = str(path)
            except Exception as err:  # noqa: BLE001 - one failed artefact must not stop training or the others
                log.warning("trace export of %s failed: %s: %s", path.name, type(err).__name__, err)
            seconds[kind] = time.perf_counter() - t0

        trace_path = base.with_name(stem + ".pt.trace.json.gz")
        attempt("trace", trace_path, lambda: prof.export_chrome_trace(str(trace_path)))
        attempt("ops_json", base.with_name(stem + ".ops.json"), lambda: self._write_ops(prof, base))
        if "ops_json" in written:
            written["ops_txt"] = str(base.with_name(stem + ".ops.txt"))
        folded = base.with_name(stem + ".folded")
        attempt("folded", folded, lambda: write_folded(folded_from_events(prof.events()), folded))
        if "folded" in written:
            svg = base.with_name(stem + ".flame.svg")
            attempt("flame_svg", svg, lambda: write_svg(folded, svg, title=f"CPU self time (µs), {stem}"))
        if self._cuda:
            cfolded = base.with_name(stem + ".cuda.folded")
            attempt("cuda_folded", cfolded,
                    lambda: write_folded(folded_from_events(prof.events(), "self_device_time_total"), cfolded))
        if self.with_stack:
            stacks = base.with_name(stem + ".stacks.folded")
            attempt("stacks", stacks, lambda: self._export_stacks(prof, stacks))
        if self.memory_timeline:
            mem_html = base.with_name(stem + ".memory.html")
            attempt("memory_html", mem_html, lambda: self._memory_timeline(prof, mem_html))
        if "trace" in written:
            phases = base.with_name(stem + ".phases.json")
            attempt("phases", phases, lambda: phases.write_text(
                json.dumps(phase_summary(load_trace(trace_path)), indent=1)))
        if self._cuda and self._history_on:
            snap = base.with_name(stem + ".snapshot.pickle")
            attempt("cuda_snapshot", snap, lambda: torch.cuda.memory._dump_snapshot(str(snap)))
            self._set_memory_history(False)
        self.windows.append({"stem": stem, "steps": steps, "files": written, "export_s": seconds,
                             "total_s": sum(seconds.values())})
        self._write_export_info(base.with_name(stem + ".export.json"), self.windows[-1])

    def _write_export_info(self, path: Path, window: dict[str, Any]) -> None:
        """``<stem>.export.json``: the seconds the export of this window blocked training, per artefact, with the
        bytes written and the options that decided which artefacts there are (``rlhfkit report`` shows it)."""
        sizes: dict[str, int] = {}
        for kind, name in window["files"].items():
            with contextlib.suppress(OSError):
                sizes[kind] = os.path.getsize(name)
        info = {"stem": window["stem"], "rank": self.rank, "steps": window["steps"],
                "total_s": round(window["total_s"], 4),
                "export_s": {k: round(v, 4) for k, v in window["export_s"].items()}, "bytes": sizes,
                "options": {"with_stack": self.with_stack, "record_shapes": self.record_shapes,
                            "profile_memory": self.profile_memory, "memory_timeline": self.memory_timeline}}
        try:
            path.write_text(json.dumps(info, indent=1), encoding="utf-8")
            window["files"]["export"] = str(path)
        except OSError as err:
            log.warning("trace export of %s failed: %s", path.name, err)

    def _write_ops(self, prof: Any, base: Path) -> None:
        sort = "self_device_time_total" if self._cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        table = averages.table(sort_by=sort, row_limit=self.row_limit)
        base.with_name(base.name + ".ops.txt").write_text(table + "\n", encoding="utf-8")
        base.with_name(base.name + ".ops.json").write_text(json.dumps(op_rows(averages), indent=1), encoding="utf-8")

    def _export_stacks(self, prof: Any, path: Path) -> bool:
        """``export_stacks`` writes one line per event; identical stacks are summed so the file stays small."""
        metric = "self_cuda_time_total" if self._cuda else "self_cpu_time_total"
        prof.export_stacks(str(path), metric)
        if not path.exists():
            return False
        stacks, _ = parse_folded(path.read_text(encoding="utf-8", errors="replace"))
        if not write_folded(stacks, path):
            path.unlink()
            return False
        return True

    @staticmethod
    def _memory_timeline(prof: Any, path: Path) -> None:
        path.write_text(_memory_viz.profile_plot(prof), encoding="utf-8")
