"""Every reader-side command on every bad input: no traceback, a documented exit code, a message naming the problem.

Why: a new user's first contact with the kit is often a half-written, copied or foreign run. Each input below
once made at least one command print a Python traceback (or say nothing at all); each is built in a tmp dir
and fed to every command in-process through its ``main(argv)``. Exit codes are the documented ones:
``report`` 0 printed / 1 no step records yet / 2 not a readable run; ``diagnose`` 0 no critical alert /
1 critical alert / 2 bad input; ``memory measure`` 0 written / 2 bad input; ``import`` 0 imported / 2 bad or
empty source. The tables at the end of the file feed the README's reliability section.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.importers import main as import_main
from memory.cli import main as memory_main
from profiler.report import main as report_main
from rlhf_core.cli.diagnose import main as diagnose_main

META = {"format_version": 1, "run_id": "bad", "source": "thin", "config": {"model": "gpt2", "batch_size": 2},
        "env": {"device": "cpu"}, "world_size": 1, "status": "finished", "start_time": 1.0, "end_time": 2.0}


def _rec(step: Any, **extra: Any) -> dict[str, Any]:
    rec = {"step": step, "time": 1.0 + (step if isinstance(step, int) else 0), "rank": 0, "loss/policy": 0.1,
           "time/step": 0.5, "time/rollout": 0.2, "time/update": 0.2, "mem/rollout_peak_bytes": 1000}
    rec.update(extra)
    return rec


def _lines(*recs: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


def _run(tmp: Path, meta: Any = None, metrics: str | None = None, **files: str | bytes) -> Path:
    """A run directory: meta.json (a dict, or raw text/bytes), metrics.jsonl, and any other named files."""
    run = tmp / "run"
    run.mkdir()
    meta = META if meta is None else meta
    raw = meta if isinstance(meta, (str, bytes)) else json.dumps(meta)
    (run / "meta.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)
    if metrics is not None:
        (run / "metrics.jsonl").write_text(metrics)
    for name, content in files.items():
        path = run / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return run


GOOD = _lines(_rec(1), _rec(2), _rec(3))
DEEP = "[" * 100_000 + "]" * 100_000


def _loop(path: Path) -> None:
    """A symlink loop at ``path`` (``path`` -> ``path.loop`` -> ``path``)."""
    other = path.with_name(path.name + ".loop")
    os.symlink(other.name, path)
    os.symlink(path.name, other)


def _with_dir(name: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        run = _run(tmp, metrics=None if name == "metrics.jsonl" else GOOD)
        (run / name).mkdir(parents=True)
        return run
    return build


def _with_loop(name: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        run = _run(tmp, metrics=None if name == "metrics.jsonl" else GOOD)
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        _loop(run / name)
        return run
    return build


def _rank_run(tmp: Path, bad: Any) -> Path:
    run = _run(tmp, meta={**META, "world_size": 2})
    for rank in (0, 1):
        (run / f"metrics.rank{rank}.jsonl").write_text(
            _lines(_rec(1, rank=rank), {k: v for k, v in _rec(2, rank=rank).items() if k != "step"}
                   if bad is None else _rec(bad, rank=rank), _rec(3, rank=rank)))
    return run


def _fifo(tmp: Path) -> Path:
    run = _run(tmp, metrics=None)
    os.mkfifo(run / "metrics.jsonl")
    return run


# name -> (builder, message every command that reads the broken part must print, exit codes by command)
# commands: report, report --json, diagnose, diagnose --json, memory measure, import verl --resume
RUN_INPUTS: dict[str, tuple[Callable[[Path], Path], str, dict[str, int]]] = {
    "meta.json nested 100k deep": (lambda t: _run(t, meta=DEEP, metrics=GOOD), "nested", {"*": 2}),
    "meta.json not UTF-8": (lambda t: _run(t, meta=b'{"run_id": "\xff\xfe"}', metrics=GOOD), "UTF-8", {"*": 2}),
    "meta.json is a directory": (lambda t: _meta_dir(t), "directory", {"*": 2}),
    "meta.json symlink loop": (lambda t: _meta_loop(t), "symlink loop", {"*": 2}),
    "meta.json not an object": (lambda t: _run(t, meta="[1, 2]", metrics=GOOD), "not a JSON object", {"*": 2}),
    "meta.json world_size \"two\"": (lambda t: _run(t, meta={**META, "world_size": "two"}, metrics=GOOD),
                                     "world_size", {"*": 0}),
    "meta.json config \"x\"": (lambda t: _run(t, meta={**META, "config": "x"}, metrics=GOOD), "config",
                               {"*": 0, "memory measure": 2}),
    "meta.json fields of wrong types": (
        lambda t: _run(t, meta={**META, "status": ["x"], "start_time": "yesterday", "world_size": 10 ** 400,
                                "env": 5}, metrics=GOOD), "start_time", {"*": 0}),
    "metrics line nested 100k deep": (lambda t: _run(t, metrics=_lines(_rec(1), '{"step": 2, "x": ' + DEEP + "}",
                                                                       _rec(3))), "nested", {"*": 0}),
    "metrics integer 10^400": (lambda t: _run(t, metrics=_lines(_rec(1), '{"step": 2, "time": 3, "src/big": 1'
                                                                 + "0" * 400 + "}", _rec(3))), "too large", {"*": 0}),
    "metrics step 10^400": (lambda t: _run(t, metrics=_lines(_rec(1), '{"step": 1' + "0" * 400 + ', "time": 3}',
                                                             _rec(3))), "step", {"*": 0}),
    "metrics.jsonl is a directory": (_with_dir("metrics.jsonl"), "directory",
                                     {"*": 0, "report": 1, "report --json": 1, "import verl --resume": 2}),
    "metrics.jsonl symlink loop": (_with_loop("metrics.jsonl"), "symlink loop",
                                   {"*": 0, "report": 1, "report --json": 1, "import verl --resume": 2}),
    "metrics.jsonl is a FIFO": (_fifo, "not a regular file",
                                {"*": 0, "report": 1, "report --json": 1, "import verl --resume": 2}),
    "system.jsonl is a directory": (_with_dir("system.jsonl"), "directory",
                                    {"*": 0, "diagnose": None, "diagnose --json": None, "memory measure": None,
                                     "import verl --resume": 2}),
    "system.jsonl symlink loop": (_with_loop("system.jsonl"), "symlink loop",
                                  {"*": 0, "diagnose": None, "diagnose --json": None, "memory measure": None,
                                   "import verl --resume": 2}),
    "memory.json is a directory": (_with_dir("memory.json"), "memory.json",
                                   {"*": None, "memory measure": 2}),
    # a loop is only a name: measure replaces it with the file (and says where it wrote)
    "memory.json symlink loop": (_with_loop("memory.json"), "memory.json", {"*": None, "memory measure": 0}),
    "trace file symlink loop": (_with_loop("traces/rank0_steps1-2.pt.trace.json"), "symlink loop",
                                {"*": None, "report": 0, "report --json": 0}),
    "trace file nested 100k deep": (lambda t: _run(t, metrics=GOOD, **{"traces__rank0.pt.trace.json": DEEP}),
                                    "nested", {"*": None, "report": 0, "report --json": 0}),
    "rank lines without a step": (lambda t: _rank_run(t, None), "without a step", {"*": 0}),
    "rank lines with step \"x\"": (lambda t: _rank_run(t, "x"), "step", {"*": 0}),
    "system key gpu/bad": (lambda t: _run(t, metrics=GOOD, **{"system.jsonl": _lines(
        {"time": 1.0, "gpu/bad": 1.0, "gpu/0/util_percent": 50.0})}), "gpu/bad",
        {"*": None, "report": 0, "report --json": 0}),
    "1 MB of binary garbage": (lambda t: _run(t, metrics=None,
                                              **{"metrics.jsonl": random.Random(0).randbytes(1 << 20)}),
                               "bad lines skipped", {"*": 0, "report": 1, "report --json": 1}),
    "duplicate, decreasing, negative, non-integer steps": (
        lambda t: _run(t, metrics=_lines(_rec(1), _rec(2), _rec(2), _rec(5), _rec(3), _rec(-3), _rec(2.5),
                                         _rec(True), _rec(6))), "repeat", {"*": 0}),
    "meta only, no records": (lambda t: _run(t), "no step records", {"*": None, "report": 1, "report --json": 1}),
}


def _meta_dir(tmp: Path) -> Path:
    run = tmp / "run"
    (run / "meta.json").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(GOOD)
    return run


def _meta_loop(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    _loop(run / "meta.json")
    (run / "metrics.jsonl").write_text(GOOD)
    return run


def _verl_source(tmp: Path) -> Path:
    src = tmp / "verl_more.jsonl"
    src.write_text(_lines(*({"step": s, "data": {"actor/pg_loss": 0.1}} for s in (1000, 1001))))
    return src


RUN_COMMANDS: dict[str, Callable[[Path, Path], int]] = {
    "report": lambda run, tmp: report_main([str(run)]),
    "report --json": lambda run, tmp: report_main([str(run), "--json"]),
    "diagnose": lambda run, tmp: diagnose_main([str(run)]),
    "diagnose --json": lambda run, tmp: diagnose_main([str(run), "--json"]),
    "memory measure": lambda run, tmp: memory_main(["measure", str(run)]),
    "import verl --resume": lambda run, tmp: import_main(["verl", str(_verl_source(tmp)), "--out", str(run),
                                                          "--resume", "--no-alerts"]),
}


def _invoke(fn: Callable[[], int], capsys: pytest.CaptureFixture) -> tuple[int | None, str, BaseException | None]:
    """(exit code, stdout+stderr, exception that escaped): an escaped exception is what a user sees as a traceback."""
    try:
        rc: int | None = fn()
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001 - this is what the test looks for
        cap = capsys.readouterr()
        return None, cap.out + cap.err, exc
    cap = capsys.readouterr()
    return rc, cap.out + cap.err, None


def _summary(text: str) -> dict[str, Any]:
    """The JSON summary line an import prints on stdout (warnings go to stderr, around it)."""
    return json.loads(next(ln for ln in text.splitlines() if ln.startswith('{"out"')))


def _check(rc: int | None, text: str, exc: BaseException | None, want_rc: int | None, message: str | None) -> None:
    assert exc is None, f"TRACEBACK {type(exc).__name__}: {str(exc)[:200]}"
    assert "Traceback" not in text
    if want_rc is not None:
        assert rc == want_rc, f"exit {rc}, expected {want_rc}: {text[-600:]}"
    if message is not None:
        assert message.lower() in text.lower(), f"no message naming the problem ({message!r}) in: {text[-600:]}"


@pytest.mark.parametrize("command", list(RUN_COMMANDS))
@pytest.mark.parametrize("name", list(RUN_INPUTS))
def test_run_input(name: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build, message, codes = RUN_INPUTS[name]
    run = build(tmp_path)
    rc, text, exc = _invoke(lambda: RUN_COMMANDS[command](run, tmp_path), capsys)
    want = codes.get(command, codes.get("*"))
    # None: this command does not read the broken part; it must still not crash, and exit 0 or 1
    _check(rc, text, exc, want, None if want is None else message)
    if want is None:
        assert rc in (0, 1), text[-600:]
    if name == "1 MB of binary garbage" and command.startswith("diagnose"):
        warnings = [ln for ln in text.splitlines() if ln.startswith("warning:")]
        assert 0 < len(warnings) <= 6, f"{len(warnings)} warning lines"
    if name == "duplicate, decreasing, negative, non-integer steps" and command in ("report", "diagnose"):
        for kind in ("repeat", "decreas", "negative", "not an integer"):
            assert sum(kind in ln for ln in text.splitlines()) == 1, (kind, text)


# ---- import tensorboard / openrlhf / verl on sources that are not what they claim to be
def _tb_scalars(folder: Path, steps: int = 10) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(folder))
    for step in range(steps):
        w.add_scalar("train/reward", 0.1 * step, step)
    w.close()
    return next(folder.glob("events.out.tfevents.*"))


def _tb2_scalars(folder: Path) -> Path:
    """Event file written the TF2 / Keras way: tensor summaries whose metadata names the scalars plugin."""
    from tensorboard.summary import Writer

    w = Writer(str(folder))
    for step in range(5):
        w.add_scalar("epoch_loss", 1.0 / (step + 1), step)
        w.add_scalar("train/reward", 0.2 * step, step)
    w.close()
    return next(folder.glob("events.out.tfevents.*"))


def _src_file(tmp: Path, content: bytes, name: str = "events.out.tfevents.1.host") -> Path:
    folder = tmp / "src"
    folder.mkdir()
    (folder / name).write_bytes(content)
    return folder


def _zeros_50mb(tmp: Path) -> Path:
    folder = tmp / "src"
    folder.mkdir()
    with open(folder / "events.out.tfevents.1.host", "wb") as fh:
        fh.truncate(50 << 20)
    return folder


def _truncated(tmp: Path) -> Path:
    event = _tb_scalars(tmp / "src")
    data = event.read_bytes()
    event.write_bytes(data[: len(data) - 10])
    return tmp / "src"


def _corrupt_middle(tmp: Path) -> Path:
    event = _tb_scalars(tmp / "src")
    data = bytearray(event.read_bytes())
    data[len(data) // 2] ^= 0xFF
    event.write_bytes(bytes(data))
    return tmp / "src"


def _text_only(tmp: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp / "src"))
    w.add_text("notes", "hello", 0)
    w.close()
    return tmp / "src"


def _tb_loop(tmp: Path) -> Path:
    folder = tmp / "src"
    folder.mkdir()
    _loop(folder / "events.out.tfevents.1.host")
    return folder


def _loop_source(tmp: Path) -> Path:
    _loop(tmp / "src")
    return tmp / "src"


JSONL = _lines({"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4})

# name -> (builder, message, exit code, steps imported when it succeeds)
TB_INPUTS: dict[str, tuple[Callable[[Path], Path], str, int, int | None]] = {
    "random bytes": (lambda t: _src_file(t, random.Random(1).randbytes(1 << 20)), "not a TensorBoard event file", 2,
                     None),
    "50 MB of zeros": (_zeros_50mb, "not a TensorBoard event file", 2, None),
    "/etc/passwd": (lambda t: _src_file(t, Path("/etc/passwd").read_bytes()), "not a TensorBoard event file", 2, None),
    "/etc/passwd given as a file": (lambda t: Path("/etc/passwd"), "not a TensorBoard event file", 2, None),
    "a JSONL file": (lambda t: _src_file(t, JSONL.encode(), "log.jsonl"), "no TensorBoard event files", 2, None),
    "a JSONL file named like events": (lambda t: _src_file(t, JSONL.encode()), "not a TensorBoard event file", 2, None),
    "an empty folder": (lambda t: (t / "src").mkdir() or t / "src", "no TensorBoard event files", 2, None),
    "an empty event file": (lambda t: _src_file(t, b""), "no scalar", 2, None),
    "text summaries only": (_text_only, "no scalar", 2, None),
    "event file symlink loop": (_tb_loop, "symlink loop", 2, None),
    "source symlink loop": (_loop_source, "symlink loop", 2, None),
    "TF2 tensor scalars": (lambda t: _tb2_scalars(t / "src").parent, "\"steps\": 5", 0, 5),
    "truncated event file": (_truncated, "could not be read", 0, 9),
    "record corrupt in the middle": (_corrupt_middle, "could not be read", 0, None),
}


@pytest.mark.parametrize("kind", ["tensorboard", "openrlhf"])
@pytest.mark.parametrize("name", list(TB_INPUTS))
def test_import_tensorboard_input(name: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build, message, want, steps = TB_INPUTS[name]
    src = build(tmp_path)
    out = tmp_path / "out"
    rc, text, exc = _invoke(lambda: import_main([kind, str(src), "--out", str(out), "--no-alerts"]), capsys)
    _check(rc, text, exc, want, message)
    if want == 2:
        assert not out.exists(), "a failed import left a run behind"
        assert len([ln for ln in text.splitlines() if ln.strip()]) <= 6
    elif steps is not None:
        assert _summary(text)["steps"] == steps


def test_import_tf2_scalars_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rlhf_core.runformat.run_reader import Run

    _tb2_scalars(tmp_path / "src")
    assert import_main(["tensorboard", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    recs = Run(tmp_path / "out").metrics()
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[1]["src/epoch_loss"] == pytest.approx(0.5) and recs[4]["src/train/reward"] == pytest.approx(0.8)


def test_import_follow_without_data_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "src").mkdir()
    rc, text, exc = _invoke(lambda: import_main(["tensorboard", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                                                 "--follow", "--poll", "0.01", "--max-idle", "0"]), capsys)
    _check(rc, text, exc, 2, "no steps")


def _verl_run_without_steps(tmp: Path) -> Path:
    """An imported veRL run whose metrics.jsonl then gained records with no step (what --resume must survive)."""
    src = tmp / "first.jsonl"
    src.write_text(_lines({"step": 1, "data": {"actor/pg_loss": 0.1}}))
    assert import_main(["verl", str(src), "--out", str(tmp / "run"), "--no-alerts"]) == 0
    with open(tmp / "run" / "metrics.jsonl", "a") as fh:
        fh.write(_lines({"time": 1.0, "loss/policy": 0.2}, {"step": "x", "time": 1.0}))
    return tmp / "run"


VERL_INPUTS: dict[str, tuple[Callable[[Path], Path], str, int, int | None]] = {
    "line nested 100k deep": (lambda t: _src_file(t, _lines({"step": 1, "data": {"a": 1}}, '{"step": 2, "data": '
                                                                 + DEEP + "}").encode(), "v.jsonl") / "v.jsonl",
                              "nested", 0, 1),
    "integer 10^400 in data": (lambda t: _src_file(t, ('{"step": 1, "data": {"actor/pg_loss": 1' + "0" * 400
                                                       + "}}\n").encode(), "v.jsonl") / "v.jsonl", "too large", 0, 1),
    "step 10^400": (lambda t: _src_file(t, _lines({"step": 1, "data": {"a": 1}}, '{"step": 1' + "0" * 400
                                                  + ', "data": {}}').encode(), "v.jsonl") / "v.jsonl",
                    "not a veRL record", 0, 1),
    "random bytes": (lambda t: _src_file(t, random.Random(2).randbytes(1 << 20), "v.jsonl") / "v.jsonl",
                     "no veRL records", 2, None),
    "an empty file": (lambda t: _src_file(t, b"", "v.jsonl") / "v.jsonl", "no veRL records", 2, None),
    "a directory": (lambda t: (t / "d").mkdir() or t / "d", "is a directory", 2, None),
    "/etc/passwd": (lambda t: Path("/etc/passwd"), "no veRL records", 2, None),
    "symlink loop": (_loop_source, "symlink loop", 2, None),
    "a TensorBoard event file": (lambda t: _tb_scalars(t / "tb"), "no veRL records", 2, None),
    "kit metrics.jsonl": (lambda t: _src_file(t, GOOD.encode(), "m.jsonl") / "m.jsonl", "no veRL records", 2, None),
}


@pytest.mark.parametrize("name", list(VERL_INPUTS))
def test_import_verl_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build, message, want, steps = VERL_INPUTS[name]
    src = build(tmp_path)
    out = tmp_path / "out"
    rc, text, exc = _invoke(lambda: import_main(["verl", str(src), "--out", str(out), "--no-alerts"]), capsys)
    _check(rc, text, exc, want, message)
    if want == 2:
        assert not out.exists(), "a failed import left a run behind"
    elif steps is not None:
        assert _summary(text)["steps"] == steps


def test_import_verl_resume_into_records_without_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _verl_run_without_steps(tmp_path)
    capsys.readouterr()
    src = tmp_path / "more.jsonl"
    src.write_text(_lines({"step": 1, "data": {"actor/pg_loss": 0.1}}, {"step": 2, "data": {"actor/pg_loss": 0.3}}))
    rc, text, exc = _invoke(lambda: import_main(["verl", str(src), "--out", str(run), "--resume", "--no-alerts"]),
                            capsys)
    _check(rc, text, exc, 0, "without a step")
    summary = _summary(text)
    assert summary["steps"] == 1 and summary["skipped_steps"] == 1  # step 1 was there already; step 2 is new


def test_rlhfkit_entry_point_turns_an_unexpected_error_into_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The last line of defence: whatever a subcommand lets escape is one line and exit 3, not a traceback."""
    import profiler.report
    from rlhf_core.cli.main import main as cli_main

    def boom(argv: list[str]) -> int:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(profiler.report, "main", boom)
    monkeypatch.delenv("RLHFKIT_DEBUG", raising=False)
    rc, text, exc = _invoke(lambda: cli_main(["report", "x"]), capsys)
    _check(rc, text, exc, 3, "RecursionError")
    assert len(text.strip().splitlines()) == 1


# ---- the defensive layer itself (rlhf_core.runformat.run_reader, rlhf_core.runformat.metric_columns)
def test_step_checks_count_each_kind_once_and_keep_what_can_be_placed(tmp_path: Path) -> None:
    from rlhf_core.runformat.run_reader import Run

    run = _run(tmp_path, metrics=_lines(_rec(0), _rec(1), _rec(1), _rec(4), _rec(2), _rec(-1), _rec(-1), _rec("x"),
                                        {"time": 1.0}, _rec(3.0), _rec(5)))
    steps = [r["step"] for r in Run(run).metrics()]
    assert steps == [0, 1, 1, 4, 2, -1, -1, 5]  # missing / non-integer skipped, the rest kept in file order
    run_ = Run(run)
    run_.metrics()
    messages = [p.message for p in run_.problems()]
    assert sum("repeat" in m for m in messages) == 1 and any(m.startswith("1 record(s) that repeat") for m in messages)
    assert any(m.startswith("2 record(s) with a negative step") for m in messages)  # -1 twice: negative wins
    assert any(m.startswith("1 record(s) whose step decreases") and "2 after 4" in m for m in messages)
    assert any(m.startswith("2 record(s) whose step is not an integer") for m in messages)  # "x" and 3.0
    assert any(m.startswith("1 record(s) without a step") for m in messages)


def test_over_long_lines_are_skipped_not_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rlhf_core.runformat.run_reader as reader

    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    run = _run(tmp_path, metrics=_lines(_rec(1), _rec(2, **{"src/long": "x" * 2000}), _rec(3)))
    r = reader.Run(run)
    assert [x["step"] for x in r.metrics()] == [1, 3]
    assert any(p.line == 2 and "over the" in p.message for p in r.problems())


def test_columnar_read_refuses_what_the_line_reader_must_report(tmp_path: Path) -> None:
    from rlhf_core.runformat.metric_columns import read_columns

    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    assert read_columns(fifo) is None  # checked before opening: opening a FIFO would block
    bad = tmp_path / "m.jsonl"
    bad.write_text(_lines(_rec(1), {"time": 1.0, "loss/policy": 0.1}, _rec(3)))
    assert read_columns(bad) is None  # a record without a step: the line reader counts it
    bad.write_text(GOOD)
    assert read_columns(bad).rows == 3


def test_a_meta_field_of_the_wrong_type_is_dropped_and_reported(tmp_path: Path) -> None:
    from rlhf_core.runformat.run_reader import Run, list_runs

    run = _run(tmp_path, meta={**META, "world_size": "two", "start_time": "yesterday", "config": "x"}, metrics=GOOD)
    r = Run(run)
    assert r.world_size == 1 and "config" not in r.meta and r.meta_invalid["config"] == "x"
    assert {p.message.split()[0] for p in r.problems()} == {"world_size", "start_time", "config"}
    assert [x.path for x in list_runs(tmp_path)] == [run]  # sorting by start_time no longer meets a string
