"""`rlhfkit import verl` on veRL's console output: the lines its ``console`` logger prints, as Ray relays them."""
import json
import math
import numbers
import pprint

import numpy as np
import pytest

from adapters.importers import main
from adapters.mapping import map_verl
from rlhf_core.runformat.run_reader import Run

RAY = "\x1b[36m(TaskRunner pid=4242)\x1b[0m "  # how Ray prefixes a remote actor's stdout


def concat_dict_to_str(data: dict, step: int, new: bool = True) -> str:
    """veRL's ``verl/utils/logger/aggregate_logger.concat_dict_to_str``: ``pprint.pformat`` of each value since
    2025-07 (numpy scalars print as ``np.float64(...)``), ``%.3f`` before."""
    out = [f"step:{step}"]
    for k, v in data.items():
        if isinstance(v, numbers.Number):
            out.append(f"{k}:{pprint.pformat(v)}" if new else f"{k}:{v:.3f}")
    return " - ".join(out)


CONFIG_DUMP = [  # the head of what main_ppo's pprint of the resolved config prints (sorted keys)
    "{'actor_rollout_ref': {'actor': {'clip_ratio': 0.2,",
    "                                 'grad_clip': 0.5,",
    "                                 'kl_loss_type': 'kl',",
    "                                 'use_kl_loss': True},",
    " 'algorithm': {'adv_estimator': 'grpo', 'kl_penalty': 'kl'},",
    " 'critic': {'grad_clip': 1.0}}",
]


def _log(tmp_path, lines, name="run.log"):
    src = tmp_path / name
    src.write_text("\n".join(lines) + "\n")
    return src


def _import(tmp_path, src, *extra):
    out = tmp_path / "run"
    assert main(["verl", str(src), "--out", str(out), "--no-alerts", *extra]) == 0
    return Run(out)


def test_console_log_with_ray_prefixes_config_dump_and_both_value_formats(tmp_path, capsys):
    steps = [
        RAY + concat_dict_to_str({"val-core/openai/gsm8k/reward/mean@1": np.float64(0.25)}, 0),
        RAY + "Training Progress:   0%|          | 0/3 [00:00<?, ?it/s]",
        RAY + concat_dict_to_str({"actor/pg_loss": np.float32(-0.5), "actor/kl_loss": np.float64(0.002),
                                  "actor/grad_norm": 3.0, "actor/entropy": 0.61, "critic/score/mean": 0.1,
                                  "timing_s/gen": 12.5, "response_length/mean": 210.0,
                                  "perf/max_memory_allocated_gb": 40.0, "training/global_step": 1}, 1),
        "WARNING: some library line with step:abc in it",
        '{"note": "a JSON object another library printed"}',
        "Epoch 1/1:  99%|#########9| 2/3 [0:01:11<01:11, 71.47s/it]"  # a tqdm bar left on the line
        + concat_dict_to_str({"actor/pg_loss": float("nan"), "actor/kl_loss": 0.004, "training/global_step": 2,
                              "actor/grad_norm": float("inf"), "critic/score/mean": True}, 2),
    ]
    run = _import(tmp_path, _log(tmp_path, CONFIG_DUMP + steps))
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "console" and summary["bad_lines"] == 0 and summary["steps"] == 3
    assert summary["kl_loss_type"] == "kl" and summary["grad_clip"] == "0.5"  # the actor's, not the critic's
    recs = run.metrics()
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[0]["src/val-core/openai/gsm8k/reward/mean@1"] == 0.25
    one = recs[1]
    assert one["loss/policy"] == -0.5 and one["kl/ref_k1"] == 0.002  # kl_loss_type 'kl' = k1
    assert one["grad/norm"] == 3.0 and one["grad/max_norm"] == 0.5 and one["policy/entropy"] == 0.61
    assert one["time/rollout"] == 12.5 and one["response/length_mean"] == 210.0
    assert one["mem/peak_bytes"] == 40 * 2**30
    assert math.isnan(recs[2]["loss/policy"]) and not math.isfinite(recs[2]["grad/norm"])  # null in the run
    assert recs[2]["reward/mean"] == 1.0


def test_old_console_format_and_old_metric_names(tmp_path, capsys):
    """veRL of 2024-12 (``%.3f`` values, ``timing/*``, ``critic/kl``, ``actor/entropy_loss``), PPO."""
    old = {"timing/gen": 48.956, "timing/ref": 12.07, "timing/update_actor": 37.47, "critic/kl": 0.021,
           "critic/kl_coeff": 0.001, "actor/entropy_loss": 0.419, "actor/pg_loss": -0.025, "actor/grad_norm": 2.105,
           "critic/vf_loss": 1.319, "critic/score/mean": 0.416}
    lines = ["\x1b[2m\x1b[36m(main_task pid=64899)\x1b[0m " + concat_dict_to_str(d, s, new=False)
             for s, d in ((0, {"test_score/openai/gsm8k": 0.521}), (0, old), (1, old))]
    run = _import(tmp_path, _log(tmp_path, lines))
    assert json.loads(capsys.readouterr().out)["kl_penalty"] == "kl"
    recs = run.metrics()
    assert [r["step"] for r in recs] == [0, 1]  # the validation line and the first training line are one step
    first = recs[0]
    assert first["src/test_score/openai/gsm8k"] == 0.521 and first["time/rollout"] == 48.956
    assert first["time/ref_logprobs"] == 12.07 and first["time/update"] == 37.47
    assert first["kl/ref_k1"] == 0.021 and first["kl/coef"] == 0.001 and first["policy/entropy"] == 0.419
    assert first["grad/max_norm"] == 1.0  # veRL's default grad_clip: the log printed none


def test_command_line_settings_win_over_the_log_and_unknown_estimators_stay_src(tmp_path, capsys):
    line = RAY + concat_dict_to_str({"actor/kl_loss": 0.3, "actor/grad_norm": 2.0}, 1)
    src = _log(tmp_path, CONFIG_DUMP + [line])
    rec = _import(tmp_path, src, "--kl-loss-type", "low_var_kl", "--grad-clip", "5").metrics()[0]
    assert rec["kl/ref_k3"] == 0.3 and "kl/ref_k1" not in rec and rec["grad/max_norm"] == 5.0
    capsys.readouterr()
    rec = _import(tmp_path, src, "--kl-loss-type", "abs", "--overwrite").metrics()[0]
    assert rec["src/actor/kl_loss"] == 0.3 and not any(k.startswith("kl/ref") for k in rec)
    assert main(["verl", str(src), "--out", str(tmp_path / "r2"), "--grad-clip", "0"]) == 2
    assert "grad_clip must be a positive number" in capsys.readouterr().err


def test_a_current_and_an_older_name_for_the_same_quantity_keep_the_current_one():
    out = map_verl({"timing_s/gen": 4.0, "timing/gen": 3.0, "actor/entropy": 0.5, "actor/entropy_loss": 0.4,
                    "actor/reward_kl_penalty": 0.02, "actor/kl_loss": 0.03}, kl_loss_type="k1")
    assert out["time/rollout"] == 4.0 and out["src/timing/gen"] == 3.0
    assert out["policy/entropy"] == 0.5 and out["src/actor/entropy_loss"] == 0.4
    assert out["kl/ref_k1"] == 0.02 and out["src/actor/kl_loss"] == 0.03  # the reward penalty's KL comes first
    assert "grad/max_norm" not in out  # no gradient norm in the record


def test_unreadable_pairs_are_reported_and_the_rest_of_the_line_kept(tmp_path, capsys):
    lines = [RAY + "step:1 - actor/pg_loss:0.5 - actor/grad_norm:tensor(2.) - critic/score/mean:0.25",
             RAY + "step:2 - actor/pg_loss:0.4 - broken"]
    run = _import(tmp_path, _log(tmp_path, lines))
    cap = capsys.readouterr()
    assert json.loads(cap.out)["bad_lines"] == 2
    assert ":1: 1 unreadable key:value pair(s)" in cap.err and "'actor/grad_norm:tensor(2.)'" in cap.err
    recs = run.metrics()
    assert recs[0]["loss/policy"] == 0.5 and recs[0]["reward/mean"] == 0.25 and "grad/norm" not in recs[0]
    assert recs[1]["loss/policy"] == 0.4


@pytest.mark.parametrize("text, message", [
    ("just some output\nno metrics here\n", "console 'step:N - key:value - ...' lines"),
    ('{"step": "x"}\n', "JSONL lines) in 1"),
])
def test_a_log_without_records_is_a_one_line_error_naming_the_formats(tmp_path, capsys, text, message):
    src = tmp_path / "x.log"
    src.write_text(text)
    assert main(["verl", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not (tmp_path / "run").exists()


def test_following_a_console_log_holds_the_newest_step_until_its_lines_are_complete(tmp_path):
    from adapters.convert import StepSink
    from adapters.verl import _VerlPoll
    from rlhf_core.runformat.run_writer import RunWriter

    src = tmp_path / "live.log"
    src.write_text(RAY + concat_dict_to_str({"val-core/acc": 0.5}, 1) + "\n")
    with RunWriter(tmp_path / "run", source="verl", tensorboard=False) as writer:
        poll = _VerlPoll(src)
        poll.sink = StepSink(writer, map_verl)
        assert poll(False) == 0  # step 1 is held back: its training metrics may follow on the next line
        with src.open("a") as fh:
            fh.write(RAY + concat_dict_to_str({"actor/pg_loss": 0.1}, 1) + "\n")
            fh.write(RAY + concat_dict_to_str({"actor/pg_loss": 0.2}, 2) + "\n")
        assert poll(False) == 1
        poll(True)
    recs = Run(tmp_path / "run").metrics()
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["src/val-core/acc"] == 0.5 and recs[0]["loss/policy"] == 0.1 and recs[1]["loss/policy"] == 0.2
