"""Checkpoint files and the resume rule: what is kept and dropped after a crash."""
import json

import torch

from rlhf_core.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_resume,
    save_checkpoint,
    truncate_after,
)


def lines(path):
    return path.read_text().splitlines()


def test_truncate_after_drops_later_steps_and_crash_debris(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n{"step": 4, "ti\n{"step": 5}\n{"step": 6, "x')
    assert truncate_after(f, 2) == 4  # steps 3 and 5, the bad line after step 2, the torn last line
    assert lines(f) == ['{"step": 1}', "not json", '{"step": 2}']  # a bad line among kept records stays


def test_truncate_after_keeps_run_level_events_and_is_a_no_op_when_clean(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_text('{"step": null, "kind": "start"}\n{"step": 2, "kind": "alert"}\n')
    before = f.read_bytes()
    assert truncate_after(f, 2) == 0
    assert f.read_bytes() == before
    assert truncate_after(f, 1) == 1
    assert [json.loads(x)["kind"] for x in lines(f)] == ["start"]
    assert truncate_after(tmp_path / "missing.jsonl", 1) == 0


def test_incomplete_checkpoints_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2), "step": 2}, {"epoch": 1})
    save_checkpoint(tmp_path, 10, {"w": torch.zeros(2), "step": 10}, {"epoch": 2})
    (tmp_path / "checkpoints" / "step_12").mkdir()  # crashed before its files were complete
    (tmp_path / "checkpoints" / "step_12" / "state.pt").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "step_x").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10]
    step, path = latest_checkpoint(tmp_path)
    assert step == 10 and load_checkpoint(path)["w"].tolist() == [0.0, 0.0]
    info = json.loads((path / "checkpoint.json").read_text())
    assert info["step"] == 10 and info["epoch"] == 2


def test_prepare_resume_cleans_every_metrics_file(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1}, {})
    for name in ("metrics.jsonl", "metrics.rank0.jsonl", "metrics.rank1.jsonl", "events.jsonl"):
        (tmp_path / name).write_text('{"step": 1}\n{"step": 2}\n')
    step, _, dropped = prepare_resume(tmp_path)
    assert step == 1
    assert dropped == {"metrics.jsonl": 1, "metrics.rank0.jsonl": 1, "metrics.rank1.jsonl": 1, "events.jsonl": 1}
    assert lines(tmp_path / "metrics.rank1.jsonl") == ['{"step": 1}']
