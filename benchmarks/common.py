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
from collections.abc import Iterable, Sequence
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
