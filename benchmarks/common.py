"""Shared by every benchmark: where results go and what a result looks like.

A result file ``benchmarks/results/<name>.json`` holds ``rows`` (metric, value, unit, target, met, notes) and
free-form ``details``. ``run_all.py`` turns the rows of every file into the README's benchmark table.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import psutil

    return {
        "host_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def row(metric: str, value: float | str, unit: str = "", target: str = "", met: bool | None = None,
        notes: str = "") -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met, "notes": notes}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min/max and stdev: the numbers a claim about speed needs."""
    vals = list(values)
    return {
        "median": statistics.median(vals), "min": min(vals), "max": max(vals),
        "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
    }


def pairwise(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], dict[str, float]]:
    """Ratios a[i] / b[i] of paired measurements (taken together, so both saw the same machine load) and
    their spread: the comparison a shared CPU allows."""
    ratios = [x / y for x, y in zip(a, b)]
    return ratios, spread(ratios)


def write_result(name: str, rows: Iterable[dict[str, Any]], details: dict[str, Any] | None = None,
                 path: Path | None = None) -> Path:
    """The one result format run_all.py turns into the README table: summary rows, and the details."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
               "rows": list(rows), "details": details or {}}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def measure_isolated(script: str | Path, index: int) -> dict[str, Any]:
    """Run ``script --one INDEX`` in a fresh interpreter (one measurement per process: peaks and fake-tensor
    modes must not leak into the next) and return the JSON object on its last line of output."""
    out = subprocess.run([sys.executable, str(script), "--one", str(index)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure_each(script: str | Path, names: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, measurement) of each configuration in order, each measured in its own fresh process
    (:func:`measure_isolated`, ``script --one k`` for the k-th name); a failure raises RuntimeError naming it."""
    for k, name in enumerate(names):
        try:
            yield name, measure_isolated(script, k)
        except RuntimeError as err:
            raise RuntimeError(f"{name}: {err}") from None


def launch_ranks(script: str | Path, world: int, args: Sequence[str], what: str, timeout: float = 600,
                 env: dict[str, str] | None = None) -> list[Any]:
    """Run ``world`` processes of ``script`` (with ``args``) as the ranks of one CPU process group: gloo over a
    free local port, DeepSpeed on its CPU accelerator, one thread each. Returns the JSON object each rank prints
    on its last line, in rank order; a rank that fails or a timeout stops them all with ``what`` in the error."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=RESULTS.parents[1], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{what} timed out") from None
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"a rank failed (rc {p.returncode}) at {what}\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def two_point_fit(script: str | Path, env: dict[str, str], sizes: Sequence[int], what: str,
                  timeout: float = 600) -> tuple[list[int], float, float]:
    """Run ``script --worker`` once in a fresh process (a clean allocator: the peaks are its own) with ``env``,
    read the peak bytes it prints for each of two ``sizes`` on its last line (``{"peaks": [...]}``), and return
    them with the line through them: bytes per unit of size, and the bytes at size zero."""
    proc = subprocess.run([sys.executable, str(script), "--worker"], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(RESULTS.parents[1]), **env))
    if proc.returncode:
        raise RuntimeError(f"{what}: {proc.stderr.strip().splitlines()[-1:]}")
    peaks: list[int] = json.loads(proc.stdout.strip().splitlines()[-1])["peaks"]
    slope = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    return peaks, slope, peaks[0] - slope * sizes[0]


def head_entry_matches(slope: float, intercept: float, planned_slope: float, planned_intercept: float,
                       rel: float = 0.05) -> bool:
    """One entry of a log-prob head table against its two-point measurement (bytes per token and vocabulary
    entry, and the fixed term per token of a row or chunk): each within ``rel`` of the planned value, a fixed term
    the table leaves at zero under half a byte."""
    if abs(slope - planned_slope) > rel * planned_slope:
        return False
    if planned_intercept:
        return abs(intercept - planned_intercept) <= rel * planned_intercept
    return abs(intercept) < 0.5


def out_or_work(doc: str | None, default_out: Path, worker: Callable[[], None]) -> Path | None:
    """The command line of a bench that measures in fresh processes of itself (``two_point_fit``): ``--out PATH``,
    or the hidden ``--worker``, which runs ``worker`` and returns None."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker()
        return None
    return Path(args.out)


def head_row(label: str, measured: dict[str, Any], entry: Sequence[float], grad: bool, fixed: str) -> dict[str, Any]:
    """A README row for one entry of a log-prob head table (``entry``: bytes per token and vocabulary entry with
    and without grad, then the fixed terms per ``fixed`` token) against its two-point measurement, printed too."""
    slope, icpt = measured["per_token_vocab"], measured[f"per_{fixed}_token_vocab"]
    planned, planned_fixed = entry[0 if grad else 1], entry[2 if grad else 3]
    phase = "update (grad)" if grad else "log-prob pass (no grad)"
    print(f"{label:34s} grad={grad!s:5s} measured {slope:7.3f} ({fixed} {icpt:6.2f})  planned {planned} "
          f"({planned_fixed})")
    return row(f"{label}, {phase}: bytes per token and vocabulary entry", round(slope, 3), "B/(token*V)",
               target=f"planner {planned} (fixed {planned_fixed}) within 5%",
               met=head_entry_matches(slope, icpt, planned, planned_fixed),
               notes=f"{fixed} term measured {icpt:.2f}, planned {planned_fixed}")
