"""rlhfkit memory plan's deployment arguments: counts below one are a one-line error (0 used to be taken as "not
given" and silently become the default, or to drop the command back to the single-device planner), and a built-in
deployment model alone is planned as a deployment."""
import pytest

from memory.cli import main


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be >= 1; got 0"),
    (["--gpus_per_node", "0"], "--gpus_per_node must be >= 1; got 0"),
    (["--nodes", "-2"], "--nodes must be >= 1; got -2"),
    (["--engine_tp", "0"], "--engine_tp must be >= 1; got 0"),
    (["--engine_gpus", "-1"], "--engine_gpus must be >= 0; got -1"),
])
def test_counts_below_one_are_one_line_errors(args, message, capsys):
    rc = main(["plan", "--model", "Qwen2.5-7B", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith(message) and len(err.splitlines()) == 1


def test_a_builtin_deployment_model_alone_is_planned_as_a_deployment(capsys):
    assert main(["plan", "--model", "Qwen2.5-7B"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("group train: 8 GPU(s)") and "fewest GPUs that fit" in out
    assert main(["plan", "--model", "gpt2"]) == 0  # the single-device planner's preset stays there
    assert "group train" not in capsys.readouterr().out
