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
    # rows with measured lengths get one verdict each, never "depends on lengths"
    measured = [r for r in det["rows"] if r.get("lengths") == "measured"]
    assert measured and all(r["planner"] in ("fits", "oom") for r in measured)
    assert {r["id"] for r in measured} == {r["id"] for r in ROWS if r.get("lengths_from")}


def test_measured_lengths_come_from_the_named_run_of_the_same_model():
    """A veRL LoRA row is planned at the step-1 mean lengths of veRL's own log of the same model on the same data
    (memory/measured_runs.json); nothing is fitted on the rows."""
    from benchmarks.bench_memory_published import measured_lengths

    runs = {r["id"]: r for r in json.loads((ROOT / "memory/measured_runs.json").read_text())["runs"]}
    lora = [r for r in ROWS if r["family"] == "verl-lora"]
    assert lora and all(r.get("lengths_from") in runs for r in lora)
    for r in lora:
        run = runs[r["lengths_from"]]
        assert run["model"] in r["input"]  # e.g. Qwen2.5-7B in .../Qwen2.5-7B-Instruct
        p, q = measured_lengths(r)
        assert (p, q) == (round(run["prompt_length_mean"]), round(run["response_length_mean"]))
        dep = deployment(r)
        assert (dep.prompt_len, dep.response_len) == (p, q)
    assert measured_lengths({"id": "x"}) is None


def test_boundaries_are_reported_per_script_with_their_parallel_layout():
    from benchmarks.bench_memory_published import missing_at_boundaries

    out = {m["script"]: m for m in missing_at_boundaries(ROWS)}
    assert "verl-Qwen2.5-7B-Instruct-lora-1xH100" in out
    for m in out.values():
        assert m["missing_bytes_low"] <= m["missing_bytes_high"]
        assert (m["gpus"] > 1) == (m["sequence_parallel"] == 2)  # the published scripts: SP 2 exactly when multi-GPU


def test_the_known_verl_lora_gap_is_the_published_one_and_reported_where_it_applies():
    """memory.deploy.VERL_LORA_TP_GAP_GIB is what the published boundaries say (kept in step), and the report
    warns on a fitting veRL LoRA plan with vLLM TP > 1 within that margin, and nowhere else."""
    from benchmarks.bench_memory_published import missing_at_boundaries
    from memory.deploy import VERL_LORA_TP_GAP_GIB, known_gap_note
    from memory.deploy_cli import report

    multi = [m for m in missing_at_boundaries(ROWS) if m["gpus"] > 1]
    low = min(m["missing_bytes_low"] for m in multi) / 2**30
    high = max(m["missing_bytes_high"] for m in multi) / 2**30
    assert (round(low, 1), round(high, 1)) == VERL_LORA_TP_GAP_GIB

    rows = {r["id"]: r for r in ROWS}
    fits = deployment(rows["verl-Qwen2.5-14B-Instruct-lora-2xH100-b58"])  # published fit, 15 GiB left by the plan
    plan = plan_deployment(fits)
    note = known_gap_note(plan, plan.groups[0].name)
    assert note and "ran out of memory" in note
    assert note in report(fits)["groups"][plan.groups[0].name]["notes"]
    small = fits.with_(micro_batch=8)  # far from the boundary: more headroom than the gap
    assert known_gap_note(plan_deployment(small), plan.groups[0].name) is None
    single = deployment(rows["verl-Qwen2.5-7B-Instruct-lora-1xH100-b100"])  # one GPU, TP 1: not the case seen
    assert known_gap_note(plan_deployment(single), "all") is None
    trl = fits.with_(framework="trl")
    assert known_gap_note(plan_deployment(trl), plan.groups[0].name) is None
