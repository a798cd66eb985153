"""Training-side reliability: the weight guard, runs that fail or die say so and resume exactly, resume refuses a
changed computation, flags have upper bounds. The full kill test (≥ 20 moments) is benchmarks/bench_kill_resume.py;
a short chain of it runs here."""
from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.cli.train import main
from rlhf_core.runformat.run_reader import Run
from rlhf_core.train.checkpoint import (
    clean_partial_writes,
    list_checkpoints,
    prepare_resume,
    save_checkpoint,
    truncate_after_time,
)
from rlhf_core.train.config import TrainConfig
from rlhf_core.train.finite_guard import MAX_NONFINITE_UPDATES, WeightGuard
from rlhf_core.train.runner import RunnerError, train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_kill_resume import ARGS, Kill, differences, trial  # noqa: E402

SMALL = ["--batch_size", "2", "--max_new_tokens", "5", "--steps_per_epoch", "2", "--sample_interval", "0",
         "--no_tensorboard", "--ppo_epochs", "2"]


def small_cfg(run_dir: Path, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), epochs=1, steps_per_epoch=3, batch_size=2, max_new_tokens=5, ppo_epochs=2,
                sample_interval=0, no_tensorboard=True, save_every=1)
    return TrainConfig(**{**base, **kw})


def meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "meta.json").read_text())


def last_err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and not any("Traceback" in line for line in lines), lines
    return lines[-1]


# ---------------------------------------------------------------------------------------------- weight guard
def test_weight_guard_restores_parameters_and_optimizer_state_bit_for_bit():
    torch.manual_seed(0)
    buffer = torch.nn.Parameter(torch.randn(64))
    opt = torch.optim.AdamW([buffer], lr=1e-2)
    guard = WeightGuard(buffer, opt)
    guard.save()  # before the first step: no optimizer state yet
    buffer.grad = torch.randn(64)
    opt.step()
    guard.restore()
    assert not opt.state.get(buffer)  # AdamW starts afresh, as it would have
    buffer.grad = torch.randn(64)
    opt.step()
    before = buffer.detach().clone(), {k: v.clone() for k, v in opt.state[buffer].items()}
    guard.save()
    opt.param_groups[0]["lr"] = 1e308
    opt.step()
    assert not guard.finite()
    guard.restore()
    assert guard.finite() and torch.equal(buffer.detach(), before[0])
    assert all(torch.equal(opt.state[buffer][k], v) for k, v in before[1].items())


def test_learning_rate_1e308_is_undone_and_fails_the_run(tmp_path):
    """Through the Python API (the flag is bounded): every update overflows; each is undone, 3 in a row fail."""
    run_dir = tmp_path / "lr"
    with pytest.raises(RunnerError, match="non-finite in 3 optimizer steps in a row"):
        train(small_cfg(run_dir, learning_rate=1e308))
    m = meta(run_dir)
    assert m["status"] == "failed" and "non-finite" in m["reason"]
    skips = [e for e in Run(run_dir).events() if e["kind"] == "skip" and e["data"].get("what") == "weights"]
    assert [e["data"]["consecutive"] for e in skips] == list(range(1, MAX_NONFINITE_UPDATES + 1))
    ckpts = list_checkpoints(run_dir)
    assert ckpts  # step 1 had 2 undone updates (fewer than 3 in a row), so it was logged and saved
    state = torch.load(ckpts[-1][1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["policy"].values())
    assert state["optimizer"]["state"] == {}  # both updates of step 1 undone: AdamW never took a step


def test_weight_guard_check_keeps_no_copy_and_fails_at_once(tmp_path):
    run_dir = tmp_path / "check"
    with pytest.raises(RunnerError, match="--weight_guard check cannot undo it"):
        train(small_cfg(run_dir, learning_rate=1e308, weight_guard="check"))
    assert meta(run_dir)["status"] == "failed" and list_checkpoints(run_dir) == []


def test_one_undone_update_trains_on_but_the_run_is_not_finished(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = WeightGuard.finite

    def finite_but_once(self):
        calls["n"] += 1
        return False if calls["n"] == 3 else real(self)

    monkeypatch.setattr(WeightGuard, "finite", finite_but_once)
    run_dir = tmp_path / "once"
    with pytest.raises(RunnerError, match="non-finite in 1 optimizer step"):
        train(small_cfg(run_dir))
    run = Run(run_dir)
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]
    assert [r["skipped"] for r in run.metrics()] == [0, 1, 0]
    assert run.meta["status"] == "failed" and "not marked finished" in run.meta["reason"]


def test_learning_rate_flag_has_an_upper_bound(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--learning_rate", "1e308"])
    assert exc.value.code == 2
    assert last_err_line(capsys) == "train.py: error: argument --learning_rate: expected a number in (0, 1], got 1e308"


# ---------------------------------------------------------------------------------------------- flag bounds
@pytest.mark.parametrize("flags, flag", [
    (["--seed", str(10 ** 30)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--ppo_epochs", "100000000"], "--ppo_epochs"),
    (["--batch_size", "100000000"], "--batch_size"),
    (["--epochs", "10000000"], "--epochs"),
    (["--max_new_tokens", "10000000"], "--max_new_tokens"),
    (["--prompts", "/dev/null"], "--prompts"),
    (["--prompts", "FOLDER"], "--prompts"),
    (["--prompts", "NESTED"], "--prompts"),
    (["--model", ""], "--model"),
    (["--resume_override"], "--resume_override"),
])
def test_rejected_flags_get_one_line_naming_the_flag(tmp_path, capsys, flags, flag):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    flags = [str(tmp_path) if f == "FOLDER" else str(nested) if f == "NESTED" else f for f in flags]
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--run_dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert last_err_line(capsys).startswith(f"train.py: error: argument {flag}: ")
    assert not (tmp_path / "run").exists()


def test_a_reward_of_strings_is_one_line(tmp_path, capsys):
    assert main([*SMALL, "--epochs", "1", "--reward", "builtins:max", "--run_dir", str(tmp_path / "r")]) == 2
    assert "reward did not return a sequence of numbers" in last_err_line(capsys)
    assert meta(tmp_path / "r")["status"] == "failed"


def test_a_batch_too_large_for_the_machine_is_refused_before_the_models(tmp_path, capsys, monkeypatch):
    import rlhf_core.train.limits as limits
    from rlhf_core.train import policy

    monkeypatch.setattr(limits, "available_bytes", lambda device: 2 ** 20)
    monkeypatch.setattr(policy, "load_causal_lm", lambda *a, **k: pytest.fail("model built"))
    assert main([*SMALL, "--run_dir", str(tmp_path / "big")]) == 2
    line = last_err_line(capsys)
    assert "--batch_size 2 with --max_new_tokens 5 needs an estimated" in line and "1.0 MiB" not in line
    assert limits.step_memory_problem(TrainConfig(), torch.device("cpu"), available=2 ** 40) is None


# ---------------------------------------------------------------------------------------------- resume config
def test_resume_refuses_a_changed_computation_unless_overridden(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*SMALL, "--epochs", "1", "--run_dir", str(run_dir)]) == 0
    with pytest.raises(SystemExit):
        main(["--resume", str(run_dir), "--batch_size", "4", "--seed", "7", "--epochs", "2"])
    line = last_err_line(capsys)
    assert line.startswith("train.py: error: argument --resume: 2 setting(s) differ") and "--resume_override" in line
    assert "seed 42 -> 7" in line and "batch_size 2 -> 4" in line
    with pytest.raises(SystemExit):
        main(["--resume", str(run_dir), "--epochs", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--resume", str(run_dir), "--steps_per_epoch", "1", "--resume_override"])
    assert "fewer than the 2 the run has done" in last_err_line(capsys)
    with pytest.raises(SystemExit):
        main(["--resume", str(run_dir), "--run_dir", str(tmp_path / "elsewhere")])
    assert last_err_line(capsys).startswith("train.py: error: argument --run_dir:")
    assert main(["--resume", str(run_dir), "--epochs", "2", "--max_new_tokens", "6", "--resume_override"]) == 0
    m = meta(run_dir)
    assert m["status"] == "finished" and m["config"]["max_new_tokens"] == 6 and m["config"]["resume_override"]
    assert m["resumed_from"][-1]["changed"] == {"max_new_tokens": [5, 6]}
    # the override is not inherited: the next resume compares against the config now saved
    assert main(["--resume", str(run_dir), "--epochs", "3"]) == 0


def test_resume_of_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*SMALL, "--epochs", "1", "--run_dir", str(run_dir)]) == 0
    (run_dir / "checkpoints" / "step_2" / "state.pt").write_bytes(b"\x00garbage" * 100)
    assert main(["--resume", str(run_dir), "--epochs", "2"]) == 2
    line = last_err_line(capsys)
    assert "checkpoints/step_2 is unreadable" in line and "remove that folder" in line


# ---------------------------------------------------------------------------------------------- crash, disk full
def _reference(tmp_path: Path) -> Path:
    ref = tmp_path / "reference"
    assert main([*SMALL, "--epochs", "2", "--save_every", "2", "--run_dir", str(ref)]) == 0
    return ref


def _identical(reference: Path, run_dir: Path) -> None:
    assert differences(reference, run_dir) == []


def test_disk_full_in_the_first_checkpoint_fails_then_resumes_from_step_0(tmp_path, capsys, monkeypatch):
    import rlhf_core.train.checkpoint as ckpt

    real = ckpt._WholeWrites.write
    state = {"fail": True}

    def full_disk(self, data):
        if state["fail"]:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real(self, data)

    monkeypatch.setattr(ckpt._WholeWrites, "write", full_disk)
    run_dir = tmp_path / "run"
    assert main([*SMALL, "--epochs", "2", "--save_every", "2", "--run_dir", str(run_dir)]) == 2
    line = last_err_line(capsys)
    assert "No space left on device" in line and ".step_2.tmp/state.pt" in line
    m = meta(run_dir)
    assert m["status"] == "failed" and "No space left on device" in m["reason"] and "state.pt" in m["reason"]
    assert not list((run_dir / "checkpoints").iterdir())  # the partial checkpoint folder went at once
    state["fail"] = False
    assert main(["--resume", str(run_dir)]) == 0
    assert "no complete checkpoint; starting again from step 0" in capsys.readouterr().err
    assert meta(run_dir)["resumed_from"][0] == {"step": 0, "time": meta(run_dir)["resumed_from"][0]["time"],
                                                "previous_status": "failed", "previous_reason": m["reason"]}
    _identical(_reference(tmp_path), run_dir)


def test_disk_full_in_a_metrics_write_fails_then_resumes_exactly(tmp_path, capsys, monkeypatch):
    from rlhf_core.runformat import run_writer

    real = run_writer.JsonlAppender.append
    seen = {"n": 0, "fail": True}

    def full_disk(self, record):
        if self.path.name == "metrics.jsonl":
            seen["n"] += 1
            if seen["fail"] and seen["n"] == 4:
                with open(self.path, "a") as fh:  # the disk took half a line
                    fh.write('{"step": 4, "ti')
                raise OSError(errno.ENOSPC, f"cannot write: {os.strerror(errno.ENOSPC)}", str(self.path))
        return real(self, record)

    monkeypatch.setattr(run_writer.JsonlAppender, "append", full_disk)
    run_dir = tmp_path / "run"
    assert main([*SMALL, "--epochs", "2", "--save_every", "2", "--run_dir", str(run_dir)]) == 2
    assert "metrics.jsonl" in last_err_line(capsys)
    m = meta(run_dir)
    assert m["status"] == "failed" and "metrics.jsonl" in m["reason"]
    seen["fail"] = False
    assert main(["--resume", str(run_dir)]) == 0
    _identical(_reference(tmp_path), run_dir)


def test_sigterm_marks_the_run_interrupted(tmp_path):
    def reward(prompts, responses):
        if reward.calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        reward.calls += 1
        return [0.0] * len(responses)

    reward.calls = 0
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tmp_path / "run"), reward_fn=reward)
    m = meta(tmp_path / "run")
    assert m["status"] == "interrupted" and m["reason"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ---------------------------------------------------------------------------------------------- files
def test_a_checkpoint_is_renamed_into_place_and_partial_writes_are_cleaned(tmp_path):
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {})
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_2"]
    (root / ".step_4.tmp").mkdir()
    (root / ".step_4.tmp" / "state.pt").write_bytes(b"half")
    (root / "step_6").mkdir()  # an older layout's incomplete folder
    (tmp_path / ".meta.json.123.tmp").write_text("{")
    (root / "step_2" / ".state.pt.tmp").write_bytes(b"x")
    removed = {p.name for p in clean_partial_writes(tmp_path)}
    assert removed == {".step_4.tmp", "step_6", ".meta.json.123.tmp", ".state.pt.tmp"}
    assert sorted(p.name for p in root.iterdir()) == ["step_2"] and list_checkpoints(tmp_path)[0][0] == 2


def test_resume_cuts_system_and_timeline_at_the_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 2, {"step": 2}, {})
    t = json.loads((tmp_path / "checkpoints" / "step_2" / "checkpoint.json").read_text())["time"]
    (tmp_path / "system.jsonl").write_text(
        f'{{"time": {t - 1}}}\n{{"time": {t + 1}}}\nnot json\n{{"time": {t - 0.5}, "cpu": 1}}\n{{"time": 1, "x')
    (tmp_path / "timeline.rank0.jsonl").write_text('{"process": {}}\n{"step": 2}\n{"step": 3}\n{"step": 4, "t')
    step, path, dropped = prepare_resume(tmp_path)
    assert step == 2 and dropped == {"system.jsonl": 3, "timeline.rank0.jsonl": 2}
    assert (tmp_path / "system.jsonl").read_text().count("\n") == 2
    assert truncate_after_time(tmp_path / "system.jsonl", t) == 0
    other = tmp_path / "none"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    (other / "system.jsonl").write_text('{"time": 1}\n')
    assert prepare_resume(other) == (0, None, {"metrics.jsonl": 1, "system.jsonl": 1})


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_sigkill_at_four_moments_recovers_to_the_uninterrupted_run(tmp_path):
    """A real ``python train.py`` killed with SIGKILL in its first checkpoint save, in the resume's cleanup,
    at a random moment of its training and between a complete checkpoint and its rename; then resumed."""
    reference = tmp_path / "reference"
    assert main([*ARGS, "--run_dir", str(reference)]) == 0
    delay = random.Random(os.environ.get("KILL_SEED", "0")).uniform(0.0, 0.05)  # inside the next step or two
    kills = [Kill(point="checkpoint:state"), Kill(point="resume:cleaned"), Kill(delay=delay, records=1),
             Kill(point="checkpoint:info")]
    res = trial(tmp_path / "run", kills, reference)
    sessions = res["sessions"]
    assert not sessions[0]["resume"] and sessions[0]["killed"] and sessions[1]["killed"]
    assert res["kills_landed"] == 4, sessions
    assert res["differences"] == [], sessions
    assert sessions[-1]["rc"] == 0 and not math.isnan(sessions[-1]["seconds"])
