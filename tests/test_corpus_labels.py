"""The corpus outcome labels (benchmarks/corpus/labels.py) on small hand-made series, and the committed real-run
fixtures read back through the run reader."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.corpus import labels as L
from rlhf_core.runformat.run_reader import Run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real_runs"


def recs(n: int, **cols) -> list[dict]:
    """``n`` records, step 1..n; each keyword is a column (a list of n values, or one value for every step)."""
    out = []
    for i in range(n):
        rec = {"step": i + 1}
        for key, col in cols.items():
            rec[key.replace("__", "/")] = col[i] if isinstance(col, list) else col
        out.append(rec)
    return out


def test_healthy_series_gets_no_outcome():
    rs = recs(30, kl__ref_k3=[0.01 * i for i in range(30)], policy__entropy=[6.0 - 0.02 * i for i in range(30)],
              reward__mean=[0.01 * i for i in range(30)], reward__heldout=0.9,
              src__text__distinct2=0.95, src__text__identical_frac=0.125)
    got = L.label_records(rs)
    assert got["label"] == "healthy" and got["outcome_step"] is None and got["outcome_kinds"] == []


def test_kl_outcome_step_is_first_step_above_limit():
    kl = [0.1] * 10 + [0.9, 1.2, 0.8, 3.0]
    o = L.kl_outcome(recs(len(kl), kl__ref_k3=kl))
    assert (o.kind, o.step, o.value) == ("kl", 12, 1.2)


def test_kl_falls_back_to_k1_then_probe():
    assert L.kl_outcome(recs(3, kl__ref_k1=[0.1, 2.0, 0.1])).step == 2
    o = L.kl_outcome(recs(3, src__probe__kl_exact=[0.1, 0.2, 1.5]))
    assert o.step == 3 and o.detail == "src/probe/kl_exact"
    assert L.kl_outcome(recs(3, policy__entropy=1.0)) is None  # no KL logged: criterion not applicable


def test_entropy_outcome_uses_median_of_first_three_steps():
    # an early dip at step 2 does not lower the start (median of 6, 3, 6 = 6): the limit is 3
    ent = [6.0, 3.0, 6.0, 5.0, 3.5, 2.9, 1.0]
    o = L.entropy_outcome(recs(len(ent), policy__entropy=ent))
    assert o.step == 6 and o.threshold == pytest.approx(3.0)
    assert L.entropy_outcome(recs(5, policy__entropy=[6.0, 5.8, 5.9, 5.5, 3.1])) is None


def test_nonfinite_outcome_ignores_clocks():
    rs = recs(5, loss__total=1.0)
    rs[1]["time/step"] = math.inf
    rs[3]["loss/total"] = None
    rs[3]["nonfinite"] = ["loss/total"]
    o = L.nonfinite_outcome(rs)
    assert o.step == 4 and "loss/total" in o.detail
    rs2 = recs(3, grad__norm=[1.0, math.nan, 1.0])  # as the reader returns it: NaN restored
    assert L.nonfinite_outcome(rs2).step == 2


def test_reward_hacking_needs_reward_up_and_heldout_down():
    n = 20
    reward = [0.0] * 5 + [0.1 * i for i in range(1, n - 4)]
    held = [0.9] * 8 + [0.9 - 0.05 * i for i in range(1, n - 7)]
    o = L.hacking_outcome(recs(n, reward__mean=reward, reward__heldout=held))
    # first step whose trailing 5-step means show gain >= 0.25 and drop >= 0.15
    expect = next(i + 1 for i in range(9, n)
                  if sum(reward[i - 4:i + 1]) / 5 >= 0.25 and 0.9 - sum(held[i - 4:i + 1]) / 5 >= 0.15)
    assert o is not None and o.step == expect
    # the same reward rise with a steady held-out reward is not hacking; TRL's key is read too
    assert L.hacking_outcome(recs(n, reward__mean=reward, reward__heldout=0.9)) is None
    assert L.hacking_outcome(recs(n, reward__mean=reward, **{"reward__heldout__mean": held})).step == expect


def test_reward_hacking_waits_for_a_full_window_after_the_start():
    # a jump at step 6: the trailing windows of steps 8 and 9 already show it, but they overlap the start window;
    # the first window after it ends at step 10
    reward = [0.0] * 5 + [1.0] * 10
    held = [0.9] * 5 + [0.5] * 10
    assert L.hacking_outcome(recs(15, reward__mean=reward, reward__heldout=held)).step == 10
    assert L.hacking_outcome(recs(9, reward__mean=reward[:9], reward__heldout=held[:9])) is None  # too short


def test_text_collapse_on_identical_or_repetitive_batches():
    same = [0.125] * 6 + [0.5]
    assert L.text_outcome(recs(7, src__text__identical_frac=same, src__text__distinct2=0.9)).step == 7
    d2 = [0.95, 0.9, 0.3, 0.2]
    o = L.text_outcome(recs(4, src__text__identical_frac=0.125, src__text__distinct2=d2))
    assert o.step == 4 and o.detail == "src/" + L.DISTINCT2_KEY  # the name the (older) run holds


def test_run_outcome_step_is_the_earliest_kind():
    rs = recs(10, kl__ref_k3=[0.1] * 6 + [2.0] * 4, policy__entropy=[6.0] * 3 + [2.0] * 7)
    got = L.label_records(rs)
    assert got["label"] == "unstable" and got["outcome_step"] == 4 and got["outcome_kinds"] == ["entropy", "kl"]


def test_committed_fixtures_read_back_and_keep_their_labels():
    index = json.loads((FIXTURES / "labels.json").read_text())
    assert {"trl_grpo_healthy", "trl_grpo_kl_explosion", "runner_healthy", "runner_unstable"} <= set(index)
    for name, entry in index.items():
        run = Run(FIXTURES / name)
        records = list(run.metrics())
        assert len(records) == entry["steps_kept"] and run.meta["source"] in ("trl", "rlhf_core")
        got = L.label_records(records)
        assert got["label"] == entry["label"], name
        if entry["label"] == "unstable":  # the outcome lies inside the kept steps
            assert got["outcome_step"] == entry["outcome_step"] <= entry["steps_kept"], name
