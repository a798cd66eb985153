"""Every train flag: accepted values land in TrainConfig, wrong ones are a one-line argparse error."""
import json
import subprocess
import sys

import pytest

from rlhf_core.train.config import TrainConfig, build_parser, parse_args
from rlhf_core.train.prompts import BUILTIN_PROMPTS, PromptError, load_prompts

BAD = [
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "two"], "--batch_size"),
    (["--device", "tpu"], "--device"),
    (["--threads", "0"], "--threads"),
    (["--reward", "nope"], "--reward"),
    (["--reward", "no_such_module_xyz:fn"], "--reward"),
    (["--reward", "math:pi"], "--reward"),
    (["--prompts", "missing.json"], "--prompts"),
    (["--epochs", "-1"], "--epochs"),
    (["--steps_per_epoch", "0"], "--steps_per_epoch"),
    (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--kl_coef", "-0.1"], "--kl_coef"),
    (["--temperature", "0"], "--temperature"),
    (["--top_k", "-1"], "--top_k"),
    (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"),
    (["--gamma", "1.1"], "--gamma"),
    (["--lam", "-0.5"], "--lam"),
    (["--cliprange", "0"], "--cliprange"),
    (["--cliprange_value", "-1"], "--cliprange_value"),
    (["--vf_coef", "-1"], "--vf_coef"),
    (["--ent_coef", "-1"], "--ent_coef"),
    (["--max_grad_norm", "0"], "--max_grad_norm"),
    (["--ppo_epochs", "0"], "--ppo_epochs"),
    (["--mini_batch_size", "3", "--batch_size", "4"], "--mini_batch_size"),
    (["--mini_batch_size", "0"], "--mini_batch_size"),
    (["--rollout_batch_size", "0"], "--rollout_batch_size"),
    (["--kl_target", "0"], "--kl_target"),
    (["--kl_horizon", "0"], "--kl_horizon"),
    (["--kl_budget", "-1"], "--kl_budget"),
    (["--save_every", "-2"], "--save_every"),
    (["--sample_interval", "-1"], "--sample_interval"),
    (["--profile_wait", "-1"], "--profile_wait"),
    (["--profile_warmup", "x"], "--profile_warmup"),
    (["--profile_active", "0"], "--profile_active"),
    (["--profile_repeat", "-1"], "--profile_repeat"),
    (["--logprob_impl", "cuda"], "--logprob_impl"),
    (["--dtype", "fp16"], "--dtype"),
    (["--ref_device", "gpu"], "--ref_device"),
    (["--inject_nan_step", "0"], "--inject_nan_step"),
    (["--debug_slow_rank", "-1"], "--debug_slow_rank"),
    (["--debug_slow_seconds", "1"], "--debug_slow_seconds"),
    (["--debug_slow_seconds", "-1", "--debug_slow_rank", "0"], "--debug_slow_seconds"),
    (["--debug_slow_from_step", "3"], "--debug_slow_from_step"),
    (["--debug_slow_from_step", "0", "--debug_slow_rank", "0"], "--debug_slow_from_step"),
    (["--resume", "not_a_dir_xyz"], "--resume"),
    (["--no_such_flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_errors(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and flag in last, last


@pytest.mark.parametrize("argv,message", [(["--device", "cuda"], "no CUDA device"),
                                          (["--logprob_impl", "triton"], "triton needs a CUDA device")])
def test_cuda_and_triton_need_a_gpu(capsys, argv, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_existing_run_dir_needs_overwrite_or_resume(tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--run_dir", str(tmp_path)])
    assert "--overwrite" in capsys.readouterr().err
    assert parse_args(["--run_dir", str(tmp_path), "--overwrite"]).overwrite
    with pytest.raises(SystemExit):
        parse_args(["--run_dir", str(tmp_path / "meta.json")])
    assert "not a directory" in capsys.readouterr().err


def test_good_values_land_in_the_config(tmp_path):
    argv = ["--seed", "3", "--device", "cpu", "--threads", "2", "--epochs", "2", "--steps_per_epoch", "5",
            "--batch_size", "8", "--max_new_tokens", "9", "--learning_rate", "3e-4", "--kl_coef", "0.05", "--reward",
            "mix", "--run_dir", str(tmp_path / "r"), "--save_every", "4", "--temperature", "0.7", "--top_k", "20",
            "--top_p", "0.9", "--gamma", "0.99", "--lam", "0.9", "--cliprange", "0.1", "--cliprange_value", "0.3",
            "--vf_coef", "0.5", "--ent_coef", "0.01", "--max_grad_norm", "0.5", "--ppo_epochs", "2",
            "--mini_batch_size", "4", "--adaptive_kl", "--kl_target", "3", "--kl_horizon", "500", "--kl_budget", "2",
            "--no_tensorboard", "--sample_interval", "0", "--profile", "--profile_wait", "0", "--profile_warmup", "2",
            "--profile_active", "3", "--profile_repeat", "2", "--logprob_impl", "chunked", "--gradient_checkpointing",
            "--dtype", "bf16", "--ref_device", "cpu", "--rollout_batch_size", "2", "--debug_slow_rank", "1",
            "--debug_slow_seconds", "0.5", "--inject_nan_step", "3", "--model", "tiny"]
    cfg = parse_args(argv)
    assert cfg == TrainConfig(
        seed=3, device="cpu", threads=2, epochs=2, steps_per_epoch=5, batch_size=8, max_new_tokens=9,
        learning_rate=3e-4, kl_coef=0.05, reward="mix", run_dir=str(tmp_path / "r"), save_every=4, temperature=0.7,
        top_k=20, top_p=0.9, gamma=0.99, lam=0.9, cliprange=0.1, cliprange_value=0.3, vf_coef=0.5, ent_coef=0.01,
        max_grad_norm=0.5, ppo_epochs=2, mini_batch_size=4, adaptive_kl=True, kl_target=3.0, kl_horizon=500,
        kl_budget=2.0, no_tensorboard=True, sample_interval=0.0, profile=True, profile_wait=0,
        profile_warmup=2, profile_active=3, profile_repeat=2, logprob_impl="chunked",
        gradient_checkpointing=True, dtype="bf16", ref_device="cpu", rollout_batch_size=2, debug_slow_rank=1,
        debug_slow_seconds=0.5, inject_nan_step=3, model="tiny",
    )
    assert cfg.total_steps == 10 and cfg.effective_mini_batch_size == 4


def test_defaults_match_the_documented_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_args([])
    assert (cfg.seed, cfg.device, cfg.epochs, cfg.steps_per_epoch, cfg.batch_size, cfg.max_new_tokens,
            cfg.learning_rate, cfg.kl_coef, cfg.reward) == (42, "auto", 3, 8, 4, 15, 1e-5, 0.1, "sentiment")
    assert cfg.run_dir.startswith("runs/")
    assert cfg.effective_rollout_batch_size == 4 and cfg.sample_interval == 1.0


def test_every_config_field_has_a_flag():
    dests = {a.dest for a in build_parser()._actions}
    fields = set(TrainConfig.__dataclass_fields__) - {"extra"}
    assert fields <= dests, fields - dests


def test_train_py_prints_no_traceback(repo_root):
    out = subprocess.run([sys.executable, str(repo_root / "train.py"), "--batch_size", "0"],
                         capture_output=True, text=True, cwd=repo_root, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("train.py: error: argument --batch_size")


@pytest.mark.parametrize("fmt", ["json", "json_objects", "jsonl", "text"])
def test_prompt_file_formats(tmp_path, fmt):
    path = tmp_path / "p"
    prompts = ["The movie was", "Honestly the food"]
    if fmt == "json":
        path.write_text(json.dumps(prompts))
    elif fmt == "json_objects":
        path.write_text(json.dumps([{"prompt": p} for p in prompts]))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)) + "\n\n")
    else:
        path.write_text("The movie was\n\n  Honestly the food  \n")
    assert load_prompts(path) == prompts
    assert parse_args(["--prompts", str(path), "--run_dir", str(tmp_path / "r")]).prompts == str(path)


@pytest.mark.parametrize("content,message", [
    ("", "empty"), ("[1, 2]", "item 0"), ("[\"a\",", "malformed JSON"), ('{"prompt": "a"}\n{"x": 1}\n', ":2:"),
    ('{"prompt": "a"}\n{bad\n', ":2: malformed"), ("{}", "no non-empty"),
])
def test_bad_prompt_files(tmp_path, capsys, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(PromptError, match=message):
        load_prompts(path)
    with pytest.raises(SystemExit):
        parse_args(["--prompts", str(path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: argument --prompts:") and message in last


def test_builtin_prompts_are_there():
    assert len(BUILTIN_PROMPTS) >= 16 and len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)
