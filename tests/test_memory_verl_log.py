"""`rlhfkit memory plan --from_verl_log LOG`: the resolved config a veRL run printed, read back and planned."""
import json
import pprint
import shlex

import pytest

from memory.cli import main
from memory.verl_log import config_dump, overrides, overrides_from_log

CONFIG = {  # the shape of main_ppo's resolved config (a subset; pprint sorts the keys as main_ppo prints them)
    "actor_rollout_ref": {
        "actor": {"fsdp_config": {"optimizer_offload": False, "param_offload": False,
                                  "wrap_policy": {"min_num_params": 0}},
                  "grad_clip": 1.0, "optim": {"lr": 1e-06, "min_lr_ratio": None, "warmup_style": "constant"},
                  "ppo_micro_batch_size": None, "ppo_micro_batch_size_per_gpu": 4, "ppo_mini_batch_size": 64,
                  "strategy": "fsdp", "use_dynamic_bsz": False, "use_kl_loss": True},
        "hybrid_engine": True,
        "model": {"enable_gradient_checkpointing": True, "external_lib": None, "override_config": {},
                  "path": "Qwen/Qwen2.5-7B-Instruct", "use_remove_padding": True},
        "ref": {"fsdp_config": {"param_offload": True}, "log_prob_micro_batch_size_per_gpu": 8},
        "rollout": {"gpu_memory_utilization": 0.5, "log_prob_micro_batch_size_per_gpu": 8, "n": 5,
                    "name": "vllm", "tensor_model_parallel_size": 2, "val_kwargs": {"do_sample": False}},
    },
    "algorithm": {"adv_estimator": "grpo", "kl_ctrl": {"kl_coef": 0.001, "type": "fixed"}, "kl_penalty": "kl"},
    "data": {"max_prompt_length": 512, "max_response_length": 1024, "train_batch_size": 256,
             "train_files": "/home/user/data/gsm8k/train.parquet"},
    "trainer": {"logger": ["console", "wandb"], "n_gpus_per_node": 8, "nnodes": 1,
                "project_name": "verl_grpo_example_gsm8k_with_a_rather_long_name_that_pprint_has_to_wrap_x"},
}
RAY = "\x1b[36m(TaskRunner pid=3165)\x1b[0m "


def _dump_lines(prefix: str = RAY) -> list[str]:
    return [prefix + line for line in pprint.pformat(CONFIG).split("\n")]


def _flat(d: dict, p: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{p}{k}.") if isinstance(v, dict) else {f"{p}{k}": v})
    return out


def test_a_dump_behind_ray_prefixes_reads_back_every_setting():
    lines = ["2025-06-01 10:00:00,000 INFO worker.py:1888 -- Started a local Ray instance."] + _dump_lines()
    assert config_dump(lines) == _flat(CONFIG)


def test_other_processes_lines_and_a_lost_line_cost_only_that_lines_keys():
    lines = _dump_lines()
    lost = next(i for i, line in enumerate(lines) if "'tensor_model_parallel_size': 2" in line)
    noisy = (lines[:5] + ["\x1b[36m(WorkerDict_0:0 WorkerDict pid=77, ip=10.0.0.2)\x1b[0m 'n': 99,",
                          "Loading checkpoint shards:  33%|###3      | 1/3", "commit:", ""]
             + lines[5:lost] + lines[lost + 1:])
    got = config_dump(noisy)
    want = _flat(CONFIG)
    del want["actor_rollout_ref.rollout.tensor_model_parallel_size"]
    assert got == want


def test_a_dump_without_ray_and_the_overrides_leave_out_unset_values_and_lists():
    got = config_dump(_dump_lines(prefix=""))
    assert got == _flat(CONFIG)
    kv = overrides(got)
    assert kv["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"] == "4"
    assert kv["actor_rollout_ref.hybrid_engine"] == "True" and kv["algorithm.kl_ctrl.kl_coef"] == "0.001"
    assert "actor_rollout_ref.actor.ppo_micro_batch_size" not in kv and "trainer.logger" not in kv


def test_plan_from_a_log_is_the_plan_of_its_settings(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("\n".join(["+ python3 -m verl.trainer.main_ppo ..."] + _dump_lines()
                             + [RAY + "step:1 - actor/pg_loss:0.1"]) + "\n")
    assert main(["plan", "--from_verl_log", str(log), "--json"]) == 0
    from_log = json.loads(capsys.readouterr().out)
    cmd = " ".join(shlex.quote(f"{k}={v}") for k, v in overrides(_flat(CONFIG)).items())
    assert cmd == overrides_from_log(log)
    assert main(["plan", "--from_verl", cmd, "--json"]) == 0
    from_cmd = json.loads(capsys.readouterr().out)
    from_log.pop("seconds"), from_cmd.pop("seconds")
    assert from_cmd == from_log
    assert from_log["total_gpus"] == 8 and from_log["engine"]["tp"] == 2


@pytest.mark.parametrize("text, message", [
    ("step:1 - actor/pg_loss:0.1\n", "no config dump found"),
    ("{'actor_rollout_ref': {'actor': \x00\x00 garbage\n", "no config dump found"),
])
def test_a_log_without_a_dump_is_a_one_line_error(tmp_path, capsys, text, message):
    log = tmp_path / "run.log"
    log.write_text(text)
    assert main(["plan", "--from_verl_log", str(log)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert main(["plan", "--from_verl_log", str(tmp_path / "missing.log")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_a_dump_without_the_reward_loop_key_is_an_older_veRL_whose_reward_model_ran_in_fsdp(tmp_path, capsys):
    old = dict(CONFIG, reward_model={"enable": True, "micro_batch_size_per_gpu": 8,
                                     "model": {"path": "Qwen/Qwen2.5-1.5B"}})
    log = tmp_path / "run.log"
    log.write_text(pprint.pformat(old) + "\n")
    assert "reward_model.use_reward_loop=False" in overrides_from_log(log)
    assert main(["plan", "--from_verl_log", str(log), "--json"]) == 0
    roles = json.dumps(json.loads(capsys.readouterr().out)["groups"])
    assert "reward" in roles
    new = dict(old, reward_model=dict(old["reward_model"], use_reward_loop=True))
    log.write_text(pprint.pformat(new) + "\n")
    assert main(["plan", "--from_verl_log", str(log)]) == 2  # the reward loop's engine is not modelled: refused
    assert "use_reward_loop" in capsys.readouterr().err
