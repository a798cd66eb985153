"""RunWriter/Run: the run-format contract under bad input (torn, malformed, empty, NaN, unknown keys, live
tailing, rank merge, path safety)."""
import json
import math
import os

import pytest

from rlhf_core.runformat.keys import sanitize, unknown_keys
from rlhf_core.runformat.run_reader import Run, RunError, list_run_problems, list_runs, merge_ranks, resolve_run_path
from rlhf_core.runformat.run_writer import RunWriter


def make_run(path, **kw):
    return RunWriter(path, source="rlhf_core", config={"lr": 1e-5}, tensorboard=False, **kw)


def test_round_trip_and_meta(tmp_path):
    with make_run(tmp_path / "r") as w:
        w.log(1, {"loss/total": 0.5, "reward/mean": 1, "epoch": 1})
        w.event(1, "alert", rule="x", severity="warning", message="m")
        w.system({"sys/cpu_percent": 12.0})
    run = Run(tmp_path / "r")
    assert run.status == "finished" and run.meta["format_version"] == 1 and run.meta["config"] == {"lr": 1e-5}
    (rec,) = run.metrics()
    assert rec["step"] == 1 and rec["loss/total"] == 0.5 and rec["reward/mean"] == 1 and rec["rank"] == 0
    assert run.events()[0]["rule"] == "x" and run.system()[0]["sys/cpu_percent"] == 12.0
    assert run.summary()["steps"] == 1 and run.summary()["alerts"] == 1


def test_nan_and_inf_become_null_plus_nonfinite_and_come_back_as_nan(tmp_path):
    with make_run(tmp_path / "r") as w:
        w.log(1, {"loss/total": float("nan"), "grad/norm": float("inf"), "reward/mean": 0.25})
    raw = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    line = json.loads(raw)
    assert line["loss/total"] is None and sorted(line["nonfinite"]) == ["grad/norm", "loss/total"]
    rec = Run(tmp_path / "r").metrics()[0]
    assert math.isnan(rec["loss/total"]) and math.isnan(rec["grad/norm"]) and rec["reward/mean"] == 0.25


def test_sanitize_keeps_types():
    clean, bad = sanitize({"a": 1, "b": 2.5, "c": float("-inf"), "d": "text", "e": None, "f": True})
    assert clean == {"a": 1, "b": 2.5, "c": None, "d": "text", "e": None, "f": 1.0} and bad == ["c"]


def _write_meta(path, status="running"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.json").write_text(json.dumps({"run_id": "x", "source": "generic", "status": status}))


def test_torn_last_line_of_a_live_run_waits_then_is_read(tmp_path):
    _write_meta(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
    run = Run(tmp_path)
    assert [r["step"] for r in run.tail()] == [1]
    assert run.problems() == []  # still running: the half line is pending, not an error
    with open(metrics, "a") as fh:
        fh.write(': 2}\n{"step": 3, "a": 3}\n')
    assert [r["step"] for r in run.tail()] == [2, 3]
    assert run.tail() == []
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]


def test_torn_last_line_of_a_finished_run_is_skipped_with_a_warning(tmp_path):
    _write_meta(tmp_path, status="failed")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    run = Run(tmp_path)
    assert [r["step"] for r in run.metrics()] == [1]
    (problem,) = run.problems()
    assert problem.line == 2 and "torn last line" in problem.message


def test_malformed_middle_lines_are_reported_with_line_numbers(tmp_path):
    _write_meta(tmp_path, status="finished")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n[1, 2]\n\n{"step": 4}\n')
    run = Run(tmp_path)
    assert [r["step"] for r in run.metrics()] == [1, 4]
    lines = sorted(p.line for p in run.problems())
    assert lines == [2, 3]
    assert all(str(tmp_path / "metrics.jsonl") in str(p) for p in run.problems())


def test_empty_and_missing_files(tmp_path):
    _write_meta(tmp_path, status="finished")
    run = Run(tmp_path)
    assert run.metrics() == [] and run.events() == [] and run.system() == [] and run.memory() is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert run.metrics() == [] and run.problems() == []
    assert run.frame().empty


def test_unknown_keys_are_kept_and_listed(tmp_path):
    with make_run(tmp_path / "r") as w:
        w.log(1, {"loss/total": 1.0, "my_custom": 3.0, "src/kept": 1.0})
    run = Run(tmp_path / "r")
    assert run.metrics()[0]["my_custom"] == 3.0
    assert run.unknown_keys() == ["my_custom"]
    assert unknown_keys(["loss/total", "grad/layer/h.0", "weird"]) == ["weird"]


def test_not_a_run(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        Run(tmp_path / "missing")
    with pytest.raises(RunError, match="no meta.json"):
        Run(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(RunError, match="unreadable meta.json"):
        _ = Run(tmp_path).meta
    assert list_runs(tmp_path) == [] and len(list_run_problems(tmp_path)) == 1


def test_writer_refuses_to_clobber_and_overwrite_clears(tmp_path):
    with make_run(tmp_path / "r") as w:
        w.log(1, {"loss/total": 1.0})
    with pytest.raises(FileExistsError):
        make_run(tmp_path / "r")
    with make_run(tmp_path / "r", overwrite=True) as w:
        pass
    assert Run(tmp_path / "r").metrics() == []
    with make_run(tmp_path / "r", resume=True) as w:
        w.log(2, {"loss/total": 2.0})
    run = Run(tmp_path / "r")
    assert [r["step"] for r in run.metrics()] == [2] and len(run.meta["resumed_at"]) == 1


def test_crash_marks_the_run_failed(tmp_path):
    with pytest.raises(RuntimeError), make_run(tmp_path / "r") as w:
        w.log(1, {"loss/total": 1.0})
        raise RuntimeError("boom")
    assert Run(tmp_path / "r").status == "failed"


def test_rank_files_and_merge(tmp_path):
    writers = [make_run(tmp_path / "r", rank=k, world_size=2) for k in (0, 1)]
    for step in (1, 2):
        for k, w in enumerate(writers):
            w.log(step, {"loss/total": float(k + step), "reward/mean": float("nan") if (k, step) == (1, 2) else 1.0})
    for w in reversed(writers):
        w.close()
    run = Run(tmp_path / "r")
    assert run.rank_files() == {0: "metrics.rank0.jsonl", 1: "metrics.rank1.jsonl"}
    merged = run.metrics()  # no reduced metrics.jsonl: mean over the rank files
    assert [r["loss/total"] for r in merged] == [1.5, 2.5]
    assert merged[0]["rank"] == "all" and merged[0]["reward/mean"] == 1.0
    assert math.isnan(merged[1]["reward/mean"]) and merged[1]["nonfinite"] == ["reward/mean"]  # not hidden by the mean
    per_rank = run.rank_metrics()
    assert [r["loss/total"] for r in per_rank[1]] == [2.0, 3.0]
    assert merge_ranks({0: [{"step": 1, "x": 1.0}], 1: [{"step": 1, "x": 3.0}, {"step": 2, "x": 5.0}]}) == [
        {"step": 1, "time": 0, "rank": "all", "x": 2.0}, {"step": 2, "time": 0, "rank": "all", "x": 5.0}]


def test_reduced_metrics_written_by_rank_zero(tmp_path):
    w = make_run(tmp_path / "r", rank=0, world_size=2)
    w.log(1, {"loss/total": 1.0})
    w.log_reduced(1, {"loss/total": 1.5})
    w.close()
    run = Run(tmp_path / "r")
    assert run.metrics()[0]["loss/total"] == 1.5 and run.metrics()[0]["rank"] == "all"


def test_tail_while_a_writer_is_writing(tmp_path):
    w = make_run(tmp_path / "r")
    run = Run(tmp_path / "r")
    assert run.tail() == []
    w.log(1, {"loss/total": 1.0})
    assert [r["step"] for r in run.tail()] == [1]
    w.log(2, {"loss/total": 2.0})
    w.log(3, {"loss/total": 3.0})
    assert [r["step"] for r in run.tail()] == [2, 3]
    assert run.status == "running"
    w.close()
    assert run.status == "finished" and run.tail() == []


def test_safe_run_path_resolution(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    assert resolve_run_path(root, "a") == (root / "a").resolve()
    for bad in ("../outside", "/etc", "", "a/../../outside", "x\x00y"):
        with pytest.raises(RunError, match="refused run id"):
            resolve_run_path(root, bad)
    os.symlink(tmp_path / "outside", root / "link")
    with pytest.raises(RunError, match="leaves the runs root"):
        resolve_run_path(root, "link")


def test_tensorboard_resume_purges_steps_written_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunWriter(tmp_path / "r", source="rlhf_core") as w:
        for step in (1, 2, 3):
            w.log(step, {"loss/total": float(step)})
    with RunWriter(tmp_path / "r", source="rlhf_core", resume=True, tb_purge_step=2) as w:
        w.log(2, {"loss/total": 20.0})
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(1, 1.0), (2, 20.0)]


def test_no_empty_traces_or_checkpoints_folders(tmp_path):
    """A run that wrote no trace and no checkpoint (most adapter runs) has neither folder."""
    with make_run(tmp_path / "r") as w:
        w.log(1, {"loss/total": 0.5})
    assert not (tmp_path / "r" / "traces").exists() and not (tmp_path / "r" / "checkpoints").exists()
    assert Run(tmp_path / "r").traces() == [] and Run(tmp_path / "r").checkpoints() == []


def test_each_key_declares_how_it_combines():
    from rlhf_core.runformat.keys import reduce_values, reduction

    assert [reduction(k) for k in ("policy/ratio_max", "reward/min", "throughput/tokens_per_s", "loss/total",
                                   "mem/update_peak_bytes", "skipped", "rollout/logprob_diff_max")] == \
        ["max", "min", "sum", "mean", "max", "max", "max"]
    assert reduce_values("policy/ratio_max", [1.0, 3.0, 2.0]) == 3.0
    assert reduce_values("reward/min", [1.0, -3.0]) == -3.0
    assert reduce_values("loss/total", [1.0, 2.0]) == 1.5
    assert reduce_values("throughput/tokens_per_s", [10.0, 5.0]) == 15.0
    assert math.isnan(reduce_values("policy/ratio_max", [1.0, float("nan")]))  # NaN is never hidden
    assert math.isnan(reduce_values("reward/min", [float("nan"), 1.0]))
