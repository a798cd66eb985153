"""The TRL adapter's phase intervals on a real (tiny, CPU) GRPO run, and its torch.profiler trace merged in."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoTokenizer

from adapters.trl import profile_trainer
from profiler.timeline_trace import main as timeline_main
from rlhf_core.runformat.timeline import read_timeline


@pytest.fixture(scope="module")
def grpo_run(tiny_model_dir, tmp_path_factory) -> Path:
    from trl import GRPOConfig, GRPOTrainer

    tmp = tmp_path_factory.mktemp("grpo_timeline")
    prompts = Dataset.from_list([{"prompt": f"the movie was {w}"} for w in ["good", "bad", "okay", "long"] * 2])
    args = GRPOConfig(output_dir=str(tmp / "trainer"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=2, beta=0.1, report_to=[], use_cpu=True,
                      save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=lambda completions, **kw: [len(c) / 10.0
                                                                                          for c in completions],
                          args=args, train_dataset=prompts, processing_class=tok)
    profile_trainer(trainer, run_dir=tmp / "run", trace_steps=(0, 0, 1), system_interval_s=None,
                    tensorboard=False, trace_options={"with_stack": False, "profile_memory": False})
    trainer.train()
    return tmp / "run"


def test_trl_steps_have_intervals_matching_their_phase_times(grpo_run: Path) -> None:
    tl = read_timeline(grpo_run)
    assert list(tl.processes) == [0] and tl.processes[0].role == "trainer" and tl.processes[0].source == "trl"
    records = {json.loads(x)["step"]: json.loads(x) for x in (grpo_run / "metrics.jsonl").read_text().splitlines()}
    assert sorted(tl.steps[0]) == sorted(records) == [1, 2]
    for step, span in tl.steps[0].items():
        names = [n for n, _, _ in span.phases]
        assert {"rollout", "reward", "update", "optimizer"} <= set(names), names
        assert names.index("rollout") < names.index("update") < names.index("optimizer")
        for a, b in zip(span.phases, span.phases[1:]):  # outermost spans only: nothing overlaps
            assert a[1] + a[2] <= b[1] + 1000, (a, b)
        for phase in ("rollout", "optimizer"):
            total = sum(d for n, _, d in span.phases if n == phase) / 1e9
            assert total == pytest.approx(records[step][f"time/{phase}"], abs=2e-3)
        assert span.t0 <= span.phases[0][1] and span.phases[-1][1] + span.phases[-1][2] <= span.end + 1000


def test_trl_profiler_trace_lands_on_its_optimizer_phase(grpo_run: Path, tmp_path: Path) -> None:
    traces = [p.name for p in (grpo_run / "traces").glob("*.pt.trace.json*")]
    assert traces == ["rank0_steps000001-000001.pt.trace.json.gz"]
    out = tmp_path / "t.json"
    assert timeline_main([str(grpo_run), "--out", str(out), "--json"]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    ours = [e for e in events if e.get("cat") == "phase" and e["name"] == "optimizer" and e["args"]["step"] == 1]
    kineto = [e for e in events if e.get("name") == "phase/optimizer" and e.get("ph") == "X"]
    assert len(ours) == 1 and kineto
    o = ours[0]  # µs: one of Kineto's optimizer ranges lies inside our optimizer slice
    assert any(o["ts"] - 2_000 <= k["ts"] and k["ts"] + k["dur"] <= o["ts"] + o["dur"] + 2_000 for k in kineto)


def test_trl_ranks_under_accelerate_share_one_clock(tmp_path: Path, repo_root: Path) -> None:
    """Two TRL ranks (``accelerate launch``, gloo; the script of test_adapters_ddp.py): both record their steps,
    rank 1 with a measured offset, and DDP's all-reduce makes them leave each update together."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(repo_root / "tests" / "test_adapters_ddp.py"), str(run_dir)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tl = read_timeline(run_dir)
    assert sorted(tl.processes) == [0, 1] and {p.role for p in tl.processes.values()} == {"trainer"}
    assert tl.processes[1].clock["method"] == "ntp-ping-pong" and tl.collective == frozenset({"update"})
    assert tl.processes[1].clock["uncertainty_ns"] < 50_000_000
    for step in (1, 2):
        ends = [next(s + d for n, s, d in tl.steps[r][step].phases if n == "update") for r in (0, 1)]
        assert abs(ends[0] - ends[1]) < 50_000_000, ends
