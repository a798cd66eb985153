"""memory.json of a run (prediction + measured peaks from the records) and the ``rlhfkit memory`` commands."""
import json

from memory.cli import main
from memory.run_memory import write_run_memory
from rlhf_core.cli.main import main as rlhfkit
from rlhf_core.runformat.run_writer import RunWriter

CONFIG = {"batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 10, "dtype": "fp32", "device": "cpu",
          "logprob_impl": "auto", "gradient_checkpointing": False, "ref_device": "same", "model": "tiny"}


def _run(tmp_path, device="cpu"):
    run_dir = tmp_path / "run"
    w = RunWriter(run_dir, source="rlhf_core", config=CONFIG, device=device, tensorboard=False)
    w.log(1, {"mem/rollout_peak_bytes": 1000, "mem/ref_logprobs_peak_bytes": 3000, "mem/update_peak_bytes": 5000,
              "mem/optimizer_peak_bytes": 7000, "loss/total": 1.0})
    w.log(2, {"mem/rollout_peak_bytes": 2000, "mem/values_peak_bytes": float("nan"), "mem/update_peak_bytes": 4000})
    w.close("finished")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "mem/rollout_peak_by')  # torn last line: skipped, not fatal
    return run_dir


def test_write_run_memory_schema_and_phase_mapping(tmp_path):
    run_dir = _run(tmp_path)
    report = write_run_memory(run_dir, CONFIG, None)
    on_disk = json.loads((run_dir / "memory.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["format_version"] == 1 and report["device"] == "cpu"
    pred = report["prediction"]
    assert set(pred["phases"]) == {"rollout", "scoring", "update"}
    assert pred["peak_bytes"] == pred["phases"][pred["peak_phase"]]["total"]
    assert pred["inputs"]["logprob_impl"] == "chunked" and pred["inputs"]["train_batch_size"] == 2
    meas = report["measured"]
    assert meas["phases"] == {"rollout": 2000, "scoring": 3000, "update": 7000}
    assert meas["runner_phases"]["optimizer"] == 7000 and meas["peak_bytes"] == 7000
    assert meas["method"].startswith("rss") and report["comparable"] is False


def test_run_without_memory_records_has_null_measurement(tmp_path):
    run_dir = tmp_path / "bare"
    with RunWriter(run_dir, source="generic", config={}, tensorboard=False) as w:
        w.log(1, {"loss/total": 0.5})
    assert write_run_memory(run_dir, {}, None)["measured"] is None


def test_cli_measure_and_plan(tmp_path, capsys):
    run_dir = _run(tmp_path)
    assert rlhfkit(["memory", "measure", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "peak:" in out and "measured: rollout" in out and (run_dir / "memory.json").exists()
    dest = tmp_path / "plan.json"
    assert main(["plan", "--model", "tiny", "--budget", "64MiB", "--batch_size", "4", "--out", str(dest)]) == 0
    plan = json.loads(dest.read_text())
    assert plan["format_version"] == 1 and plan["measured"] is None
    assert plan["plan"]["max_train_batch"] >= 1 and plan["plan"]["suggestions"]
    assert "largest train micro-batch" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["measure", str(tmp_path / "missing")]) == 2
    assert main(["plan", "--budget", "lots"]) == 2
    assert main(["plan", "--batch_size", "0"]) == 2
    assert main(["plan", "--model", str(tmp_path / "nope")]) == 2
    assert main(["explain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("rlhfkit memory") for line in err)
    assert "Traceback" not in "".join(err)


def test_probe_replay_is_comparable_with_the_prediction(tmp_path):
    """On the CPU the records hold RSS; the probe replay measures tensor bytes of the run's shape."""
    report = write_run_memory(_run(tmp_path), CONFIG, None, probe=True)
    probe = report["measured_probe"]
    assert "torch.profiler" in probe["method"]
    for phase, value in probe["phases"].items():
        assert abs(report["prediction"]["phases"][phase]["total"] / value - 1) < 0.10, (phase, value)


def test_plan_writes_no_file_unless_told(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--model", "tiny", "--budget", "64MiB", "--batch_size", "4"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--budget", "64MiB", "--batch_size", "4", "--out", "-"]) == 0
    assert list(tmp_path.iterdir()) == []
