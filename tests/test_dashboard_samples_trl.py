"""Samples of a real TRL GRPO run (the adapter keeps its prompts, completions and reward components) and the
Samples tab in headless Chromium showing the completions of a runner run and of that GRPO run."""
from __future__ import annotations

import shutil

import pytest

from rlhf_core.runformat.run_reader import Run

trl = pytest.importorskip("trl")
from test_adapters_trl import grpo_run, prompts, tok  # noqa: E402,F401 - fixtures of a real tiny GRPO run


def test_trl_grpo_run_keeps_prompts_completions_and_reward_components(grpo_run):  # noqa: F811
    run_dir, _ = grpo_run
    samples = Run(run_dir).samples()
    assert samples, "the GRPO run wrote no samples.jsonl"
    steps = {r["step"] for r in samples}
    assert steps <= {r["step"] for r in Run(run_dir).metrics()}
    for rec in samples:
        assert rec["prompt"].startswith("the movie was") and isinstance(rec["completion"], str)
        assert set(rec["rewards"]) == {"_reward_len"}
        assert rec["reward"] == pytest.approx(rec["rewards"]["_reward_len"])
        assert rec["reward"] == pytest.approx(len(rec["completion"]) / 10.0)  # the reward function's own value
        assert isinstance(rec["length"], int) and "advantage" in rec
    assert max(len(Run(run_dir).samples(s)) for s in steps) <= 4
    # the canonical text signals of each generation batch, logged at the step its samples were kept (issue 15)
    rows = {r["step"]: r for r in Run(run_dir).metrics()}
    for step in steps:
        for key in ("text/distinct2", "text/identical_frac", "text/repeated_ngram_frac"):
            assert 0.0 <= rows[step][key] <= 1.0, (step, key)
        assert not any(k.startswith("src/text/") for k in rows[step])


def test_samples_tab_shows_the_runner_and_grpo_completions(smoke_run_dir, grpo_run, tmp_path):  # noqa: F811
    from test_dashboard_browser import Page, _require_browser

    from dashboard.app import create_app
    from devtools.headless import ServerThread, chromium

    _require_browser()
    root = tmp_path / "runs"
    shutil.copytree(smoke_run_dir, root / "runner", ignore=shutil.ignore_patterns("checkpoints", "tb", "traces"))
    shutil.copytree(grpo_run[0], root / "grpo", ignore=shutil.ignore_patterns("checkpoints", "tb", "traces"))
    with ServerThread(create_app(root).server) as server, chromium() as driver:
        page = Page(driver, server.url, root, "runner", {}, tmp_path)
        for run in ("runner", "grpo"):
            page.open(f"?run={run}")
            page.wait_text("run-table", run)
            driver.find_element("xpath", "//*[text()='Samples']").click()
            page.wait_text("samples-summary", f"{run}: ")
            want = Run(root / run).samples()
            last = max(r["step"] for r in want)
            table = page.wait_text("samples-table-left", "completion")
            for rec in (r for r in want if r["step"] == last):
                assert rec["completion"].strip()[:30] in table.replace("\n", " ") or \
                    rec["completion"].strip()[:30] in table, (run, rec["completion"])
            assert f"step {last}" in page.text("samples-summary")
        box = driver.find_element("css selector", "#samples-filter")
        box.send_keys("zzz-no-such-text\n")
        page.wait_text("samples-summary", "0 of")
        page.screenshot("samples_tab.png")
        assert page.errors().strip() == ""


def test_trl_dpo_run_keeps_prompt_chosen_and_rejected(tiny_model_dir, tok, tmp_path):  # noqa: F811
    from datasets import Dataset
    from test_adapters_trl import COMMON
    from trl import DPOConfig, DPOTrainer

    from adapters.trl import RLHFKitCallback

    pairs = [{"prompt": "the movie was", "chosen": " great and fun.", "rejected": " bad and dull."},
             {"prompt": "the food is", "chosen": " wonderful.", "rejected": " awful."}] * 2
    callback = RLHFKitCallback(tmp_path / "dpo", system_interval_s=None, samples_per_step=1)
    dpo = DPOTrainer(model=str(tiny_model_dir), train_dataset=Dataset.from_list(pairs), processing_class=tok,
                     args=DPOConfig(output_dir=str(tmp_path / "out"), beta=0.1, max_length=32, max_steps=2,
                                    per_device_train_batch_size=2, **COMMON), callbacks=[callback])
    dpo.train()
    assert "compute_loss" not in dpo.__dict__  # the wrapper is removed when training ends
    samples = Run(tmp_path / "dpo").samples()
    assert sorted(r["step"] for r in samples) == [1, 2]  # one pair per step (samples_per_step=1)
    known = {(p["prompt"], p["chosen"].strip(), p["rejected"].strip()) for p in pairs}
    for rec in samples:
        assert (rec["prompt"].strip(), rec["chosen"].strip(), rec["rejected"].strip()) in known, rec
        assert rec["length"] > 0 and rec["rejected_length"] > 0 and "completion" not in rec
