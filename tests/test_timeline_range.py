"""Range reads of timeline files (the dashboard's Timeline tab, ``rlhfkit timeline --steps``): the range is found
by bisection over the step lines and agrees with a full read, across gaps, a missing first step, the file's end,
and a file resumed (a second header) after an earlier range read of it."""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.runformat.timeline import prepare_range_read, read_timeline, timeline_files


def _line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"  # as the recorder writes them: {"step":N,...


def _header(rank: int, pid: int) -> str:
    return _line({"process": {"format": 1, "rank": rank, "world_size": 2, "role": "runner", "host": "h", "pid": pid,
                              "collective": ["update"]}, "time_ns": 1_000 + pid})


def _step(step: int, t0: int) -> str:
    return _line({"step": step, "t0": t0, "dur": 300, "ph": [["rollout", 0, 200], ["update", 200, 100]]})


def _write(run: Path, steps: list[int], shift: int = 0) -> None:
    for rank in (0, 1):
        with open(run / f"timeline.rank{rank}.jsonl", "w") as fh:
            fh.write(_header(rank, 10 + rank))
            fh.writelines(_step(s, s * 1_000_000 + rank * 7 + shift) for s in steps)


def _filtered(run: Path, lo: int, hi: int) -> dict:
    return {r: {s: v for s, v in by.items() if lo <= s <= hi} for r, by in read_timeline(run).steps.items()}


def test_range_reads_agree_with_a_full_read(tmp_path: Path) -> None:
    steps = [s for s in range(1, 3001) if s % 97]  # gaps at every 97th step
    _write(tmp_path, steps)
    for lo, hi in [(1, 10), (5, 5), (96, 200), (97, 120), (2900, 5000), (3000, 3000), (1500, 1600), (0, 3),
                   (4000, 4100)]:
        got = read_timeline(tmp_path, (lo, hi))
        assert got.steps == _filtered(tmp_path, lo, hi), (lo, hi)
        assert not got.problems


def test_a_file_resumed_after_a_range_read_is_read_in_full(tmp_path: Path) -> None:
    _write(tmp_path, list(range(1, 301)))
    for path in timeline_files(tmp_path).values():  # searched ahead, as the dashboard does when it opens a run
        prepare_range_read(path)
    assert sorted(read_timeline(tmp_path, (100, 150)).steps[0]) == list(range(100, 151))
    for rank in (0, 1):  # resumed from step 120: a second header, then steps 120.. again, later on the clock
        with open(tmp_path / f"timeline.rank{rank}.jsonl", "a") as fh:
            fh.write(_header(rank, 20 + rank))
            fh.writelines(_step(s, 10**12 + s * 1_000_000) for s in range(120, 201))
    got = read_timeline(tmp_path, (100, 150))
    assert got.steps == _filtered(tmp_path, 100, 150)
    assert got.steps[0][130].t0 == 10**12 + 130 * 1_000_000  # the later line of a step wins
    assert got.steps[0][110].t0 == 110 * 1_000_000
