"""`rlhfkit import openrlhf|tensorboard|verl`: event files and JSONL written the way those tools write them."""
import json
import math
import os
import threading
import time

import pytest

from adapters.importers import main
from rlhf_core.runformat.run_reader import Run

TRAIN_KEYS = ("policy_loss", "critic_loss", "kl", "reward", "return", "response_length", "total_length",
              "actor_grad_norm", "critic_grad_norm", "ppo_clip_ratio", "ppo_kl", "entropy_loss", "actor_lr",
              "values", "timing/generation", "timing/make_experience", "timing/ppo_train", "timing/broadcast",
              "timing/step_total", "rollout/reward_mean", "rollout/reward_std", "rollout/response_length_mean",
              "rollout/truncated_rate")


def _openrlhf_logs(step):
    logs = {k: 0.01 * (i + 1) * step for i, k in enumerate(TRAIN_KEYS)}
    logs["generated_samples"] = ("the movie was great", 0.5)
    return logs


class OpenRLHFTensorboardLogger:
    """OpenRLHF 0.11's ``openrlhf.utils.logging_utils.TensorboardLogger``, reproduced: the package itself
    imports deepspeed at ``openrlhf.utils`` and cannot be imported here."""

    def __init__(self, tensorboard_dir, run_name):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(tensorboard_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=os.path.join(tensorboard_dir, run_name))

    def log_train(self, global_step, logs_dict):
        for k, v in logs_dict.items():
            if k == "generated_samples" and v is not None:
                text, reward = v
                self.writer.add_text("train/generated_samples", f"Sample:\\n{text}\\n\\nReward: {reward:.4f}",
                                     global_step)
            elif v is not None:
                self.writer.add_scalar(f"train/{k}", v, global_step)

    def log_eval(self, global_step, logs_dict):
        for k, v in logs_dict.items():
            if v is not None:
                self.writer.add_scalar(f"eval/{k}", v, global_step)


def test_openrlhf_import_maps_keys_and_phases(tmp_path, capsys):
    tb = OpenRLHFTensorboardLogger(tmp_path / "tb", "ppo_1121T10:00")
    for step in range(1, 5):
        logs = _openrlhf_logs(step)
        if step == 3:
            logs["actor_grad_norm"] = float("nan")
        tb.log_train(step, logs)
    tb.log_eval(4, {"eval_pass1": 0.25})
    tb.writer.close()

    out = tmp_path / "run"
    assert main(["openrlhf", str(tmp_path / "tb"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 1

    run = Run(out)
    assert run.meta["source"] == "openrlhf" and run.meta["status"] == "finished"
    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    last = recs[-1]
    for key in ("loss/policy", "loss/value", "kl/ref_k1", "reward/mean", "response/length_mean", "grad/norm",
                "policy/clipfrac", "policy/approx_kl", "policy/entropy", "lr", "value/mean", "time/rollout",
                "time/update", "time/step", "reward/std", "response/eos_rate"):
        assert math.isfinite(last[key]), key
    assert last["time/rollout"] == pytest.approx(0.01 * (TRAIN_KEYS.index("timing/generation") + 1) * 4)
    assert last["src/return"] > 0 and last["eval/eval_pass1"] == pytest.approx(0.25)
    assert math.isnan(recs[2]["grad/norm"]) and "grad/norm" in recs[2]["nonfinite"]
    alerts = [e for e in run.events() if e["kind"] == "alert"]
    assert alerts and alerts[0]["rule"] == "nonfinite" and alerts[0]["step"] == 3


def test_openrlhf_follow_writes_each_step_once_and_stops_when_idle(tmp_path, capsys):
    tb_dir = tmp_path / "tb"
    tb = OpenRLHFTensorboardLogger(tb_dir, "live")

    def produce():
        for step in range(1, 7):
            tb.log_train(step, _openrlhf_logs(step))
            tb.writer.flush()
            time.sleep(0.15)
        tb.writer.close()

    writer_thread = threading.Thread(target=produce)
    writer_thread.start()
    out = tmp_path / "run"
    t0 = time.monotonic()
    rc = main(["openrlhf", str(tb_dir), "--out", str(out), "--follow", "--poll", "0.1", "--max-idle", "1.5"])
    writer_thread.join()
    assert rc == 0 and time.monotonic() - t0 < 30
    steps = [r["step"] for r in Run(out).metrics()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicates, none missing
    assert json.loads(capsys.readouterr().out)["skipped_steps"] == 0

    # --resume picks up after the last step written, again without duplicates
    tb2 = OpenRLHFTensorboardLogger(tb_dir, "live")
    tb2.log_train(7, _openrlhf_logs(7))
    tb2.writer.close()
    assert main(["openrlhf", str(tb_dir / "live"), "--out", str(out), "--resume"]) == 0
    assert [r["step"] for r in Run(out).metrics()] == [1, 2, 3, 4, 5, 6, 7]


def test_tensorboard_import_keeps_canonical_tags(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tb"))
    for step in range(3):
        w.add_scalar("loss/total", 1.0 / (step + 1), step)
        w.add_scalar("Accuracy", 0.5, step)
    w.close()
    assert main(["tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "run")]) == 0
    recs = Run(tmp_path / "run").metrics()
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[1]["loss/total"] == pytest.approx(0.5) and recs[1]["src/Accuracy"] == 0.5


def test_verl_import_reports_bad_lines_and_keeps_nan(tmp_path, capsys):
    src = tmp_path / "verl.jsonl"
    lines = [json.dumps({"step": 1, "data": {"actor/pg_loss": 0.1, "critic/score/mean": 0.5, "timing_s/gen": 1.0}}),
             "{not json",
             json.dumps({"step": 2, "data": {"actor/pg_loss": float("nan"), "critic/score/mean": 0.6}}),
             json.dumps({"step": 2, "data": {"actor/pg_loss": 0.3}}),
             json.dumps({"oops": 1}),
             json.dumps({"step": 3, "data": {"actor/grad_norm": 1.0}})]
    src.write_text("\n".join(lines) + "\n" + '{"step": 4, "da')
    assert main(["verl", str(src), "--out", str(tmp_path / "run")]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1 and summary["bad_lines"] == 2
    assert ":2: malformed JSON" in cap.err and ":5: not a veRL record" in cap.err and "torn last line" in cap.err
    run = Run(tmp_path / "run")
    assert run.meta["source"] == "verl"
    recs = run.metrics()
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["loss/policy"] == 0.1 and recs[0]["reward/mean"] == 0.5 and recs[0]["time/rollout"] == 1.0
    assert math.isnan(recs[1]["loss/policy"]) and recs[2]["grad/norm"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["openrlhf", "/nonexistent/tb"], "no TensorBoard event files"),
    (["verl", "/nonexistent/file.jsonl"], "no such file"),
])
def test_bad_sources_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_existing_output_and_ambiguous_folder_are_refused(tmp_path, capsys):
    for name in ("a", "b"):
        tb = OpenRLHFTensorboardLogger(tmp_path / "tb", name)
        tb.log_train(1, _openrlhf_logs(1))
        tb.writer.close()
    assert main(["openrlhf", str(tmp_path / "tb"), "--out", str(tmp_path / "run")]) == 2
    assert "holds 2 TensorBoard runs" in capsys.readouterr().err
    assert main(["openrlhf", str(tmp_path / "tb" / "a"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["openrlhf", str(tmp_path / "tb" / "a"), "--out", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert [r["step"] for r in Run(tmp_path / "run").metrics()] == [1]  # the first import is untouched


def test_value_for_an_already_written_step_becomes_a_late_values_event(tmp_path):
    from adapters.convert import StepSink
    from adapters.mapping import map_openrlhf
    from adapters.tb_events import _TensorBoardPoll
    from rlhf_core.runformat.run_writer import RunWriter

    tb = OpenRLHFTensorboardLogger(tmp_path / "tb", "r")
    for step in (1, 2):
        tb.log_train(step, {"reward": 0.1 * step})
    tb.writer.flush()
    with RunWriter(tmp_path / "run", source="openrlhf", tensorboard=False) as writer:
        poll = _TensorBoardPoll(tmp_path / "tb", StepSink(writer, map_openrlhf))
        assert poll(False) == 1  # step 2 is held back: its tags may still be arriving
        tb.log_eval(1, {"eval_pass1": 0.5})
        tb.log_train(3, {"reward": 0.3})
        tb.writer.close()
        poll(True)
    run = Run(tmp_path / "run")
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]
    late = [e for e in run.events() if e["kind"] == "late_values"]
    assert late and late[0]["step"] == 1 and late[0]["data"]["eval/eval_pass1"] == 0.5
