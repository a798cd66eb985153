"""memory/published.json: every row parses through its framework's reader and plans; rows counted apart say
why; the veRL reader's dynamic batch size (use_dynamic_bsz) as veRL packs it."""
import json
from pathlib import Path

import pytest

from benchmarks.bench_memory_published import READERS, apart, deployment
from memory.deploy import plan_deployment
from memory.inputs import from_verl

ROOT = Path(__file__).resolve().parents[1]
ROWS = json.loads((ROOT / "memory/published.json").read_text())["rows"]
FIELDS = ("id", "framework", "family", "source", "evidence", "published", "gpu_memory", "input", "assumptions")


def test_rows_are_unique_and_complete():
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    for r in ROWS:
        assert all(k in r for k in FIELDS), r["id"]
        assert r["published"] in ("fits", "oom"), r["id"]
        assert r["framework"] in READERS, r["id"]
        if "github.com" in r["source"] and "/blob/" in r["source"]:  # repo files are pinned to a commit
            ref = r["source"].split("/blob/", 1)[1].split("/", 1)[0]
            assert len(ref) == 40 and all(c in "0123456789abcdef" for c in ref), r["id"]


@pytest.mark.parametrize("row", [r for r in ROWS if not r.get("not_expressible")], ids=lambda r: r["id"])
def test_row_parses_and_plans(row):
    dep = deployment(row)
    plan = plan_deployment(dep)
    assert plan.peak_bytes > 0 and dep.total_gpus >= 1
    assert plan_deployment(dep.with_(prompt_len=1, response_len=1)).peak_bytes <= plan.peak_bytes


@pytest.mark.parametrize("row", [r for r in ROWS if apart(r)], ids=lambda r: r["id"])
def test_rows_counted_apart_say_why(row):
    assert len(str(row.get("not_expressible") or row.get("conflicting_sources"))) > 20


def test_verl_dynamic_bsz_packs_tokens_per_gpu():
    """veRL 49b08e9 dp_actor.py: with use_dynamic_bsz a rank's batch (ppo_mini_batch_size x n / dp for the update,
    train_batch_size x n / dp for log-probs) is cut into ceil(tokens / ppo_max_token_len_per_gpu) micro-batches;
    the micro-batch keys are ignored. Before the fix the reader fell back to one sequence per micro-batch."""
    cmd = ("actor_rollout_ref.model.path=Qwen/Qwen2.5-72B algorithm.adv_estimator=grpo data.train_batch_size=1024 "
           "data.max_prompt_length=512 data.max_response_length=512 actor_rollout_ref.actor.ppo_mini_batch_size=256 "
           "actor_rollout_ref.actor.use_dynamic_bsz=True actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24000 "
           "actor_rollout_ref.rollout.n=5 trainer.n_gpus_per_node=8 trainer.nnodes=4")
    dep = from_verl(cmd)
    # update: 256 x 5 / 32 = 40 sequences of 1024 tokens = 40960 tokens -> 2 micro-batches of 20 sequences;
    # log-probs: 1024 x 5 / 32 = 160 sequences = 163840 tokens -> 7 micro-batches of ceil(160 / 7) = 23
    assert (dep.micro_batch, dep.score_micro_batch) == (20, 23)
    # short sequences: the whole mini-batch in one micro-batch (40), log-probs in two (80)
    short = from_verl(cmd + " data.max_prompt_length=112 data.max_response_length=112")
    assert (short.micro_batch, short.score_micro_batch) == (40, 80)
    # log-probs can opt out; then the (deprecated global) log-prob micro-batch key counts again
    off = from_verl(cmd + " actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False "
                          "actor_rollout_ref.rollout.log_prob_micro_batch_size=64")
    assert (off.micro_batch, off.score_micro_batch) == (20, 2)
    # Ulysses SP 2: a group of 2 GPUs packs twice the budget and splits its tokens over both GPUs
    sp = from_verl(cmd + " actor_rollout_ref.actor.ulysses_sequence_parallel_size=2")
    # 80 sequences per group, 81920 tokens -> 2 micro-batches of 40 a group, each GPU holding 20 sequences' tokens
    assert (sp.micro_batch, sp.sequence_parallel) == (40, 2)
    # without use_dynamic_bsz nothing changes: the per-GPU micro-batch key decides
    static = from_verl(cmd.replace("use_dynamic_bsz=True", "use_dynamic_bsz=False")
                       + " actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4")
    assert static.micro_batch == 4


def test_bench_reports_families_and_explains_every_disagreement(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks.bench_memory_published import main

    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(out)])
    assert main() == 0
    res = json.loads(out.read_text())
    fam, det = res["details"]["families"], res["details"]
    assert sum(f["rows"] for f in fam.values()) == len(ROWS)
    assert {r["family"] for r in ROWS} == set(fam)
    assert det["overall_checked"] == sum(f["checked"] for f in fam.values())
    assert res["rows"][0]["value"] == f"{det['overall_agree']}/{det['overall_checked']}"
    assert all(d["explanation"] for d in det["disagreements"])
    # the veRL LoRA rows keep their own fitted-length verdicts, whatever else the file holds
    assert {c["id"] for c in det["calibrated"]} <= {r["id"] for r in ROWS if r["family"] == "verl-lora"}
    # the two readings of the multi-GPU gap are computed from the same plans: with nothing added the sweep refits
    # the same length and agrees with the same rows as the fitted-length verdicts
    from benchmarks.bench_memory_published import common_share, per_token_sweep

    (zero,) = per_token_sweep(ROWS, scales=(0,))
    assert zero["fitted_length"] == det["fitted_length"]
    assert zero["agree"] == det["calibrated_agree"] and zero["of"] == len(det["calibrated"])
    share = common_share(det["missing_at_boundaries"])
    for m in det["missing_at_boundaries"]:
        if m["gpus"] > 1 and share:
            w = m["engine_weights_bytes"]
            assert m["missing_bytes_low"] <= share[0] * w and share[1] * w <= m["missing_bytes_high"] + 1


def test_common_share_is_the_intersection_of_the_windows():
    from benchmarks.bench_memory_published import common_share

    def m(gpus, lo, hi):
        return {"gpus": gpus, "share_of_bf16_params_low": lo, "share_of_bf16_params_high": hi}

    assert common_share([m(1, -0.1, 0.0), m(2, 0.9, 0.95), m(4, 0.92, 1.0)]) == (0.92, 0.95)
    assert common_share([m(2, 0.9, 0.91), m(4, 0.92, 1.0)]) is None
    assert common_share([m(1, 0.0, 0.1)]) is None
