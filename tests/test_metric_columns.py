"""Columnar read of metrics.jsonl (pyarrow) against the line reader, and the line reader's chunked reads."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dashboard.data import View
from rlhf_core.runformat.metric_columns import read_columns
from rlhf_core.runformat.run_reader import JsonlCursor, Run
from rlhf_core.runformat.run_writer import RunWriter


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _line_columns(path: Path) -> View:
    view = View()
    view.extend(JsonlCursor(path).read_new())
    return view


def test_columns_equal_the_line_readers_values(tmp_path):
    run = tmp_path / "r"
    with RunWriter(run, source="generic", tensorboard=False) as w:
        for s in range(300):
            m = {"loss/total": 0.1 * s, "grad/layer/h.0": float(s % 7)}
            if s == 40:
                m["loss/total"] = math.nan  # written as null + nonfinite
            if s == 41:
                m["kl/ref_k3"] = math.inf
            if s >= 200:
                m["grad/layer/h.1"] = 1.0  # a key that appears late
            w.log(s, m)
    path = run / "metrics.jsonl"
    cols = Run(run).metric_columns()
    assert cols is not None and cols.rows == 300 and cols.end == path.stat().st_size
    lines = _line_columns(path)
    assert cols.keys == list(lines.keys)  # first-seen order: the heatmaps' block order depends on it
    for key in lines.keys:
        np.testing.assert_array_equal(cols.values[key], lines.column(key), err_msg=key)
    assert math.isnan(cols.values["loss/total"][40]) and math.isnan(cols.values["kl/ref_k3"][41])
    assert np.isnan(cols.values["grad/layer/h.1"][:200]).all() and (cols.values["grad/layer/h.1"][200:] == 1).all()


def test_odd_but_valid_values_match_the_line_reader(tmp_path):
    path = _write(tmp_path / "m.jsonl", [
        json.dumps({"step": 0, "a": 1, "b": True, "c": "text", "d": None, "e": [1, 2]}),
        json.dumps({"step": 1, "a": 2.5, "b": False, "c": "more", "d": None, "e": [3]}),
        json.dumps({"step": 2, "f": {"x": 1}}),
    ])
    cols = read_columns(path)
    lines = _line_columns(path)
    assert cols is not None and cols.rows == 3
    for key in lines.keys:
        np.testing.assert_array_equal(cols.values[key], lines.column(key), err_msg=key)


@pytest.mark.parametrize("bad", [
    '{"step": 1, "a": "now a string"}',  # a type change inside a column
    '{"step": 1, "a": 2',  # malformed
    "[1, 2]",  # not an object
    "",  # a blank line: rows would no longer match lines
    '{"step": 1, "a": 1} {"step": 2, "a": 2}',  # two objects on one line
])
def test_anything_but_clean_json_lines_falls_back_to_the_line_reader(tmp_path, bad):
    path = _write(tmp_path / "m.jsonl", ['{"step": 0, "a": 1}', bad, '{"step": 3, "a": 3}'])
    assert read_columns(path) is None


def test_only_complete_lines_are_read_and_small_files_are_left_to_the_line_reader(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')  # a line being written
    cols = read_columns(path)
    assert cols is not None and cols.rows == 2 and cols.end == path.read_bytes().rindex(b"\n") + 1
    assert read_columns(path, min_bytes=10_000) is None
    assert read_columns(tmp_path / "missing.jsonl") is None


def test_chunked_reads_give_the_same_records_and_line_numbers(tmp_path):
    lines = [json.dumps({"step": s, "pad": "x" * (s % 50)}) for s in range(200)]
    lines[50] = "{not json"
    path = _write(tmp_path / "m.jsonl", lines)
    whole = JsonlCursor(path)
    expected = whole.read_new()
    pieces = JsonlCursor(path)
    got, calls = [], 0
    while True:
        new = pieces.read_new(max_bytes=500)
        if not new and pieces.offset == path.stat().st_size:
            break
        got += new
        calls += 1
    assert got == expected and calls > 10
    assert pieces.line_no == whole.line_no == 200
    assert [(p.line, p.message) for p in pieces.problems] == [(p.line, p.message) for p in whole.problems]
    assert pieces.problems[0].line == 51


def test_a_line_longer_than_max_bytes_is_read_whole(tmp_path):
    path = _write(tmp_path / "m.jsonl", [json.dumps({"step": 0, "blob": "y" * 5000}), '{"step": 1}'])
    cursor = JsonlCursor(path)
    first = cursor.read_new(max_bytes=100)
    assert [r["step"] for r in first] == [0]
    assert [r["step"] for r in cursor.read_new(max_bytes=100)] == [1]


def test_columns_read_without_pandas(tmp_path):
    """Nulls become NaN from Arrow's validity bitmaps (sliced chunks included) and pandas is never imported."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "a": (None if i % 3 == 0 else i * 0.5), "b": i, "flag": i % 2 == 0} for i in range(1, 200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = (f"import sys, numpy as np\nfrom rlhf_core.runformat.metric_columns import read_columns\n"
            f"c = read_columns({str(path)!r})\nprint('pandas' in sys.modules)\n"
            "print(np.isnan(c.values['a']).sum(), c.values['a'][1], c.values['b'][-1], c.values['flag'][1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "66", "1.0", "199.0", "1.0"]


def test_lines_are_counted_in_pieces_as_bytes_count_does(monkeypatch):
    """The line count (rows must match lines) is taken by numpy in pieces, off the GIL, not by bytes.count."""
    from rlhf_core.runformat import metric_columns

    data = b"".join(b'{"step": %d, "pad": "%s"}\n' % (s, b"x" * (s % 13)) for s in range(500)) + b'{"step": 5'
    end = data.rfind(b"\n") + 1
    for piece in (1, 7, 64, 1 << 20):
        monkeypatch.setattr(metric_columns, "COUNT_BYTES", piece)
        for stop in (0, 1, 26, end):
            assert metric_columns._count_lines(data, stop) == data.count(b"\n", 0, stop), (piece, stop)
