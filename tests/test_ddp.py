"""Two CPU ranks under torchrun (gloo): per-rank files, the reduced record, replicas in sync, resume.

One 3-step 2-rank run is shared by the checks; the resume test continues a copy of it. Each launch costs
~10-20 s of process start-up on a 2-core machine, so the file makes exactly two launches.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core.runformat.keys import reduction

ROOT = Path(__file__).resolve().parent.parent
RECORD_FIELDS = {"step", "time", "rank", "nonfinite"}
# The adaptive KL target is of the order of this seeded run's per-rank sequence KLs, so on some step the two
# ranks' own KLs would move the coefficient differently (checked below): the ranks must use the global mean.
KL_TARGET = 0.005
BASE_ARGS = ["--steps_per_epoch", "3", "--batch_size", "2", "--max_new_tokens", "6", "--no_tensorboard",
             "--sample_interval", "0", "--seed", "7", "--adaptive_kl", "--kl_target", str(KL_TARGET),
             "--kl_horizon", "10"]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N train.py ARGS`` with one thread per rank, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_of(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path)]


def local_kl_error(rec: dict) -> float:
    """The adaptive controller's clipped error had this rank used its own sequence KL (k1 x mean length)."""
    return min(max(rec["kl/ref_k1"] * rec["response/length_mean"] / KL_TARGET - 1.0, -0.2), 0.2)


def checkpoint_checksum(step_dir: Path) -> float:
    """Float64 sum of the saved policy weights; tied tensors (lm_head = wte) share storage and count once."""
    import torch

    state = torch.load(step_dir / "state.pt", map_location="cpu", weights_only=True)["policy"]
    seen, total = set(), 0.0
    for tensor in state.values():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += float(tensor.double().sum())
    return total


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun([*BASE_ARGS, "--epochs", "1", "--save_every", "2", "--run_dir", str(run_dir)])
    assert proc.returncode == 0, f"2-rank run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return run_dir


def test_per_rank_files_and_meta(ddp_run: Path) -> None:
    meta = json.loads((ddp_run / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["status"] == "finished"
    for name, rank in (("metrics.rank0.jsonl", 0), ("metrics.rank1.jsonl", 1), ("metrics.jsonl", "all")):
        recs = read_jsonl(ddp_run / name)
        assert [r["step"] for r in recs] == [1, 2, 3], name
        assert {r["rank"] for r in recs} == {rank}, name
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["step_2", "step_3"]


def test_ranks_see_different_prompts(ddp_run: Path) -> None:
    """Sharding really splits the work: the ranks' rewards or responses differ on some step."""
    r0, r1 = read_jsonl(ddp_run / "metrics.rank0.jsonl"), read_jsonl(ddp_run / "metrics.rank1.jsonl")
    keys = ("reward/mean", "kl/ref_k1", "policy/entropy", "value/mean")
    assert any(a[k] != b[k] for a, b in zip(r0, r1) for k in keys)


def test_reduced_record_combines_ranks_by_each_keys_reduction(ddp_run: Path) -> None:
    """Means stay means, but the run-level ratio_max / reward/max of a DDP run is the largest of its ranks',
    ratio_min / reward/min the smallest, and throughput the sum (keys.reduction)."""
    r0, r1 = read_jsonl(ddp_run / "metrics.rank0.jsonl"), read_jsonl(ddp_run / "metrics.rank1.jsonl")
    reduced = read_jsonl(ddp_run / "metrics.jsonl")
    combine = {"mean": lambda x, y: (x + y) / 2, "max": max, "min": min, "sum": lambda x, y: x + y}
    seen = set()
    for a, b, red in zip(r0, r1, reduced):
        keys = set(red) - RECORD_FIELDS
        assert keys == set(a) - RECORD_FIELDS == set(b) - RECORD_FIELDS, f"step {red['step']}: key sets differ"
        assert len(keys) > 30
        for key in sorted(keys):
            how = reduction(key)
            seen.add(how)
            expected = combine[how](a[key], b[key])
            assert math.isclose(red[key], expected, rel_tol=1e-9, abs_tol=1e-12), (red["step"], key, red[key], expected)
    assert seen == {"mean", "max", "min", "sum"}
    assert reduction("policy/ratio_max") == "max" and reduction("reward/min") == "min"


def test_replicas_identical_and_match_checkpoint(ddp_run: Path) -> None:
    r0, r1 = read_jsonl(ddp_run / "metrics.rank0.jsonl"), read_jsonl(ddp_run / "metrics.rank1.jsonl")
    sums0 = [r["src/param_checksum"] for r in r0]
    sums1 = [r["src/param_checksum"] for r in r1]
    assert sums0 == sums1, "the two ranks' weights diverged"
    assert len(set(sums0)) == 3, "weights did not change between steps: no training happened"
    assert checkpoint_checksum(ddp_run / "checkpoints" / "step_3") == pytest.approx(sums0[-1], rel=1e-12)


def test_resume_same_world_size_continues_without_duplicates(ddp_run: Path, tmp_path: Path) -> None:
    """A crash after step 3 was logged but before its checkpoint: resume redoes step 3 from step_2, then 4-6."""
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    shutil.rmtree(run / "checkpoints" / "step_3")
    original_step3 = [read_jsonl(run / f"metrics.rank{k}.jsonl")[2] for k in (0, 1)]

    proc = torchrun(["--resume", str(run), "--epochs", "2"])
    assert proc.returncode == 0, f"2-rank resume failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"

    for name in ("metrics.rank0.jsonl", "metrics.rank1.jsonl", "metrics.jsonl"):
        assert steps_of(run / name) == [1, 2, 3, 4, 5, 6], name
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["world_size"] == 2 and len(meta["resumed_at"]) == 1
    assert meta["config"]["epochs"] == 2
    r0, r1 = read_jsonl(run / "metrics.rank0.jsonl"), read_jsonl(run / "metrics.rank1.jsonl")
    assert [r["src/param_checksum"] for r in r0] == [r["src/param_checksum"] for r in r1]
    coefs = [r["kl/coef"] for r in r0]
    assert coefs == [r["kl/coef"] for r in r1], "ranks disagree on the adaptive KL coefficient"
    assert len(set(coefs)) == 6, "the adaptive KL coefficient did not move"
    assert any(local_kl_error(a) != local_kl_error(b) for a, b in zip(r0[:-1], r1[:-1])), (
        "no step where rank-local KLs would move the coefficient differently, so this run no longer tests the "
        "global-KL update: pick a KL_TARGET near the ranks' sequence KLs")
    # the redone step 3 is the same step: same samples, same update, same weights as before the "crash"
    for k, before in enumerate(original_step3):
        after = (r0, r1)[k][2]
        for key in ("src/param_checksum", "reward/mean", "loss/total", "kl/ref_k3"):
            assert after[key] == pytest.approx(before[key], rel=1e-9, abs=1e-12), (k, key)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
