"""TRL adapter under ``accelerate launch --num_processes 2`` on the CPU: one run, one metrics file per rank, a
trace window per rank, the shared files from rank 0 alone (docs/distributed.md, "TRL under accelerate").

Run as a script (by the test, through accelerate) this file trains a tiny GRPO on each of the two processes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _train(run_dir: str) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from adapters.trl import profile_trainer
    from rlhf_core.tiny_model import tiny_model_path

    path = str(tiny_model_path())
    prompts = Dataset.from_list([{"prompt": f"the movie was {w}"} for w in ["good", "bad", "okay", "long"] * 2])
    args = GRPOConfig(output_dir=os.path.join(run_dir, "_trainer"), per_device_train_batch_size=2, num_generations=4,
                      max_completion_length=6, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", beta=0.05, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=path, reward_funcs=lambda completions, **kw: [len(c) / 10.0 for c in completions],
                          args=args, train_dataset=prompts, processing_class=AutoTokenizer.from_pretrained(path))
    profile_trainer(trainer, run_dir, system_interval_s=0.5, trace_steps=(0, 1, 1))
    trainer.train()


@pytest.mark.slow
def test_two_processes_write_one_run_with_rank_files(tmp_path, tiny_model_dir, repo_root):
    from rlhf_core.runformat.run_reader import Run

    run_dir = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    # accelerate's --cpu launcher starts one process unless MPI is set up; --multi_gpu uses torchrun, and
    # use_cpu=True in the trainer's config makes the two processes train on the CPU over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(run_dir)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = sorted(p.name for p in run_dir.glob("metrics*.jsonl"))
    assert names == ["metrics.rank0.jsonl", "metrics.rank1.jsonl"]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["source"] == "trl" and meta["status"] == "finished"
    assert meta["config"]["trainer"] == "GRPOTrainer"

    run = Run(run_dir)
    per_rank = run.rank_metrics()
    assert set(per_rank) == {0, 1}
    for rank, recs in per_rank.items():
        assert [r["step"] for r in recs] == [1, 2]
        assert all(r["rank"] == rank for r in recs)
        assert all("grad/norm" in r and "time/step" in r and "drift/rel" in r for r in recs)
    merged = run.metrics()  # no metrics.jsonl: the reader merges the rank files
    assert [r["step"] for r in merged] == [1, 2] and merged[0]["rank"] == "all"
    assert "loss/total" in merged[0] and "kl/ref_k3" in merged[0]
    # after the gradient all-reduce both ranks hold the same gradients
    assert per_rank[0][0]["grad/norm"] == pytest.approx(per_rank[1][0]["grad/norm"], rel=1e-5)
    # TRL's num_tokens counts both processes' tokens, so each rank's rate is the job's
    assert all(r["throughput/tokens_per_s"] > 0 for recs in per_rank.values() for r in recs)
    # each rank traces its own window (step 2) and says what its export cost; the sampler is rank 0's alone
    for rank in (0, 1):
        stem = run_dir / "traces" / f"rank{rank}_steps000002-000002"
        assert Path(f"{stem}.pt.trace.json.gz").exists()
        assert json.loads(Path(f"{stem}.export.json").read_text())["rank"] == rank
    assert {r["rank"] for r in run.system()} == {0}
    assert not [e for e in run.events() if e["kind"] == "trace"]


if __name__ == "__main__":
    _train(sys.argv[1])
