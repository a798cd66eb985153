"""TrainConfig's fields are the one source of the flags, their --help groups, their checks and --config files."""
import dataclasses
import json

import pytest

from rlhf_core.train.config import TrainConfig, build_parser, parse_args, settings, validate


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_every_field_but_extra_is_a_setting_with_help_and_group():
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra"]
    assert [s.name for s in settings()] == names
    for s in settings():
        assert s.help and s.group, s.name
        assert s.default == getattr(TrainConfig(), s.name), s.name


def test_help_shows_each_flag_in_its_group_with_its_metadata_help():
    parser = build_parser()
    groups = {g.title: g for g in parser._action_groups}
    for s in settings():
        [action] = [a for a in groups[s.group]._group_actions if a.dest == s.name]
        assert action.help == s.help.replace("%", "%%")
        if s.choices:
            assert tuple(action.choices) == s.choices
    for title in {s.group for s in settings()}:
        assert groups[title]._group_actions, title
    text = parser.format_help()
    sched = text.index("\nschedule:\n")
    assert sched < text.index("--batch_size", sched) < text.index("\nmodel and data:\n")
    assert "(default: None)" not in text and "(default: 4)" in text


def test_bounds_come_from_the_metadata():
    by_name = {s.name: s for s in settings()}
    assert by_name["top_p"].parse("1") == 1.0
    for name, text in [("top_p", "0"), ("top_p", "1.01"), ("gamma", "-0.1"), ("learning_rate", "inf"),
                       ("batch_size", "0"), ("batch_size", "1.5"), ("save_every", "-1")]:
        with pytest.raises(ValueError, match="expected"):
            by_name[name].parse(text)
    assert by_name["top_p"].expected() == "a number in (0, 1]"
    assert by_name["save_every"].expected() == "an integer >= 0"


def test_a_config_built_in_python_gets_the_same_checks(capsys):
    with pytest.raises(SystemExit):
        validate(build_parser(), TrainConfig(batch_size=0))
    assert _last_error(capsys) == "train.py: error: argument --batch_size: expected a positive integer, got 0"
    with pytest.raises(SystemExit):
        validate(build_parser(), TrainConfig(dtype="fp16"))
    assert "argument --dtype: expected one of fp32, bf16" in _last_error(capsys)


def test_mini_batch_larger_than_batch_is_the_divide_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--batch_size", "4", "--mini_batch_size", "8", "--run_dir", str(tmp_path / "r")])
    assert "must divide --batch_size 4" in _last_error(capsys)


def test_yaml_config_file_with_flags_overriding_it(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("batch_size: 8\nlearning_rate: 1e-4\nadaptive_kl: true\nkl_budget: 2\ndtype: bf16\n"
                    f"run_dir: {tmp_path / 'r'}\nmodel: tiny\n")
    cfg = parse_args(["--config", str(path), "--batch_size", "2"])
    assert cfg.batch_size == 2  # the flag wins
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.adaptive_kl is True and cfg.kl_budget == 2.0 and cfg.dtype == "bf16"
    assert cfg.run_dir == str(tmp_path / "r") and cfg.epochs == TrainConfig().epochs
    assert "config" not in cfg.to_dict()


def test_json_config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"epochs": 2, "top_k": 5, "run_dir": str(tmp_path / "r")}))
    cfg = parse_args(["--config", str(path)])
    assert (cfg.epochs, cfg.top_k) == (2, 5)


@pytest.mark.parametrize("content,message", [
    ("batchsize: 8\n", "unknown key 'batchsize' in {path}; did you mean 'batch_size'?"),
    ("zzz_qqq: 1\n", "unknown key 'zzz_qqq' in {path}"),
    ("extra: {}\n", "unknown key 'extra'"),
    ("batch_size: 0\n", "argument --batch_size (from {path}): expected a positive integer, got 0"),
    ("batch_size: 2.5\n", "argument --batch_size (from {path}): expected a positive integer, got 2.5"),
    ("top_p: 0\n", "argument --top_p (from {path}): expected a number in (0, 1]"),
    ("device: tpu\n", "argument --device (from {path}): expected one of auto, cpu, cuda, got 'tpu'"),
    ("overwrite: 1\n", "argument --overwrite (from {path}): expected true or false"),
    ("- batch_size\n", "must hold a mapping of settings, not a list"),
    ("batch_size: [1\n", "is not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", str(path), "--run_dir", str(tmp_path / "r")])
    assert exc.value.code == 2
    last = _last_error(capsys)
    assert last.startswith("train.py: error:") and message.format(path=path) in last, last


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert "argument --config: cannot read" in _last_error(capsys)


def test_heldout_reward_is_checked_like_reward(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--heldout_reward", "nope", "--run_dir", str(tmp_path / "r")])
    assert "argument --heldout_reward: unknown reward 'nope'" in _last_error(capsys)
    assert parse_args(["--heldout_reward", "length", "--run_dir", str(tmp_path / "r")]).heldout_reward == "length"
