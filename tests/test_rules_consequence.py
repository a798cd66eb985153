"""``loss_spike``, ``grad_explosion`` and ``ppo_ratio_extreme`` when clipping bounded the update.

A loss spike on a clipped gradient spike and a short burst of clipped large norms are judged like a clipped
``grad_spike``, by one shared consequence test (:class:`~rlhf_core.stability.rules.numeric.Consequence`): an
``info`` note unless KL, entropy, the loss or the PPO ratio moves within 3 records (then a warning dated at the
event); unclipped, a warning at once. Extreme single-token PPO ratios are critical only when the clip fraction
says the bulk of the batch is past the clip (docs/diagnose.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlhf_core.runformat.run_reader import Run
from rlhf_core.stability.analysis import rule_config
from rlhf_core.stability.detectors import Diagnoser
from rlhf_core.stability.rules import is_alerting
from rlhf_core.stability.rules.numeric import Consequence, GradExplosion, Spike

AT = 61  # the event's first step in every series below (60 calm steps before it)
FIXTURES = Path(__file__).parent / "fixtures" / "real_runs"


def calm(n: int = 90, seed: int = 0, clipped: float | None = 0.0) -> list[dict]:
    """Noisy calm records shaped like the runner's: mean pre-clip norm, clipped fraction, threshold 5, KL k3,
    entropy, loss, PPO ratio (mean, extremes) and clip fraction."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z = rng.standard_normal(8)
        rec = {"step": i + 1, "policy/entropy": 6.0 * (1 + 0.005 * z[0]), "loss/total": -0.03 + 0.004 * z[1],
               "kl/ref_k3": 0.3 * (1 + 0.1 * z[2]), "grad/norm": 1.0 * np.exp(0.1 * z[3]), "grad/max_norm": 5.0,
               "policy/ratio_mean": 1.0 + 0.01 * z[4], "policy/ratio_max": 1.8 * np.exp(0.1 * z[5]),
               "policy/ratio_min": 0.4 * np.exp(0.1 * z[6]), "policy/clipfrac": 0.1 * np.exp(0.2 * z[7])}
        if clipped is not None:
            rec["grad/clipped"] = clipped
        out.append(rec)
    return out


def feed(recs: list[dict], rule: str, cfg: dict | None = None) -> list[tuple[str, int, int]]:
    """(severity, alert step, step of the record that raised it) of every alert of ``rule``, fed live."""
    d = Diagnoser(cfg)
    return [(a.severity, a.step, int(r["step"])) for r in recs for a in d.update([r]) if a.rule == rule]


def alerting(recs: list[dict]) -> list[tuple[str, str, int]]:
    d = Diagnoser()
    return [(a.rule, a.severity, a.step) for r in recs for a in d.update([r]) if is_alerting(a.severity)]


# ---------------------------------------------------------------- one shared consequence test


def test_the_three_gradient_rules_share_one_consequence_test():
    """Not a copy per rule: grad_spike, loss_spike and grad_explosion each hold a Consequence."""
    d = Diagnoser()
    rules = {r.name: r for r in d.rules}
    for name in ("grad_spike", "loss_spike"):
        assert isinstance(rules[name], Spike) and isinstance(rules[name].consequence, Consequence)
    assert isinstance(rules["grad_explosion"], GradExplosion)
    assert isinstance(rules["grad_explosion"].consequence, Consequence)
    assert not any(hasattr(r, "_moved") for r in d.rules)  # the move test lives only in Consequence


# ---------------------------------------------------------------- loss_spike


def loss_spiked(clipped: float | None = 0.5, norm: float = 8.0, **after: dict) -> list[dict]:
    """A loss jump on a gradient spike (``norm`` x, clipped fraction ``clipped``), then ``after[k]`` merged
    into record AT + k."""
    recs = calm(clipped=0.0 if clipped is not None else None)
    recs[AT - 1]["loss/total"] = 0.05
    recs[AT - 1]["grad/norm"] *= norm
    if clipped is not None:
        recs[AT - 1]["grad/clipped"] = clipped
    for k, extra in after.items():
        recs[AT - 1 + int(k[1:])].update(extra)
    return recs


def test_loss_spike_on_a_clipped_gradient_spike_without_consequence_is_a_note():
    """Seed 40 of the second spike check in small: the loss 7.6 sigma up on a step whose norm was 8x its median
    and clipped (grad/clipped 0.5), KL and entropy steady after it."""
    assert feed(loss_spiked(), "loss_spike") == [("info", AT, AT)]
    assert alerting(loss_spiked()) == []


@pytest.mark.parametrize("after,moved", [
    ({"k1": {"kl/ref_k3": 0.9}}, "KL"),
    ({"k2": {"policy/entropy": 3.5}}, "entropy"),
    ({"k3": {"policy/ratio_mean": 1.6}}, "mean PPO ratio"),
])
def test_loss_spike_becomes_a_warning_dated_at_the_spike_when_the_policy_moved(after, moved):
    k = int(next(iter(after))[1:])
    got = feed(loss_spiked(**after), "loss_spike")
    assert got == [("info", AT, AT), ("warning", AT, AT + k)]
    d = Diagnoser()
    warn = [a for r in loss_spiked(**after) for a in d.update([r])
            if a.rule == "loss_spike" and a.severity == "warning"]
    assert moved in warn[0].message and warn[0].evidence["moved_at"] == AT + k


def test_a_move_four_records_later_is_not_the_spikes_consequence():
    assert feed(loss_spiked(k4={"kl/ref_k3": 0.9}), "loss_spike") == [("info", AT, AT)]


def test_loss_spike_on_an_unclipped_gradient_spike_is_a_warning_at_once():
    assert feed(loss_spiked(clipped=0.0), "loss_spike") == [("warning", AT, AT)]


def test_loss_spike_without_clip_information_falls_back_to_the_threshold():
    """No grad/clipped: a norm of 8 above grad/max_norm 5 was clipped (a note); a felt norm of 4.5 under the
    threshold was not (a warning at once, here with the felt bar lowered to 4x so that 4.5 counts)."""
    assert feed(loss_spiked(clipped=None), "loss_spike") == [("info", AT, AT)]
    unclipped = loss_spiked(clipped=None, norm=4.5)
    assert feed(unclipped, "loss_spike") == [("info", AT, AT)]  # 4.5x its median: under the 5x bar, not felt
    assert feed(unclipped, "loss_spike", {"spike_loss_grad_ratio": 4.0}) == [("warning", AT, AT)]


def test_loss_spike_the_gradient_did_not_feel_stays_a_note_and_opens_no_watch():
    recs = loss_spiked(norm=1.0, k1={"kl/ref_k3": 0.9})
    assert feed(recs, "loss_spike") == [("info", AT, AT)]


def test_huge_clipped_loss_spike_and_nan_burst_after_it():
    """A 1e8 loss with a 1e6x norm, clipped, then NaN KL and entropy for 3 records: the NaNs are nonfinite's,
    not a consequence (no crash, the loss_spike stays a note)."""
    recs = loss_spiked(norm=1e6)
    recs[AT - 1]["loss/total"] = 1e8
    for r in recs[AT:AT + 3]:
        r["kl/ref_k3"], r["policy/entropy"] = float("nan"), float("inf")
    assert feed(recs, "loss_spike") == [("info", AT, AT)]
    assert {rule for rule, _, _ in alerting(recs)} == {"nonfinite"}


# ---------------------------------------------------------------- grad_explosion


def burst(norms: tuple[float, ...] = (15.7, 5.2, 5.5), clipped: float = 0.25, n: int = 90) -> list[dict]:
    """Seed 29 of the second spike check in small: norms 15.7, 5.2, 5.5 x the median on 3 steps running, each
    with some minibatch updates clipped."""
    recs = calm(n)
    for k, factor in enumerate(norms):
        recs[AT - 1 + k]["grad/norm"] = factor
        recs[AT - 1 + k]["grad/clipped"] = clipped
    return recs


def test_a_clipped_burst_without_consequence_is_a_note():
    assert feed(burst(), "grad_explosion") == [("info", AT, AT + 2)]
    assert alerting(burst()) == []


def test_an_unclipped_burst_is_a_warning_at_once():
    assert feed(burst(clipped=0.0), "grad_explosion") == [("warning", AT, AT + 2)]


def test_one_unclipped_step_in_the_burst_makes_it_a_warning():
    recs = burst()
    recs[AT]["grad/clipped"] = 0.0
    got = feed(recs, "grad_explosion")
    assert got == [("warning", AT, AT + 2)]


def test_a_burst_after_which_entropy_fell_is_a_warning_dated_at_its_start():
    recs = burst()
    recs[AT + 4]["policy/entropy"] = 3.9  # 2 records after the burst's last step (AT + 2)
    assert feed(recs, "grad_explosion") == [("info", AT, AT + 2), ("warning", AT, AT + 4 + 1)]


def test_a_move_during_the_burst_is_its_consequence():
    """The burst's second record already shows KL at 3x: the policy moved under the first clipped update."""
    recs = burst()
    recs[AT]["kl/ref_k3"] = 0.9
    assert feed(recs, "grad_explosion") == [("warning", AT, AT + 2)]


def test_the_watch_stays_open_while_the_burst_goes_on():
    """Six clipped large norms: a move 2 records after the sixth still counts; 4 after does not."""
    norms = (15.7, 8.0, 9.0, 7.0, 8.0, 6.0)
    late = burst(norms)
    late[AT - 1 + 6 + 1]["kl/ref_k3"] = 0.9
    assert feed(late, "grad_explosion") == [("info", AT, AT + 2), ("warning", AT, AT + 7)]
    too_late = burst(norms)
    too_late[AT - 1 + 6 + 3]["kl/ref_k3"] = 0.9
    assert feed(too_late, "grad_explosion") == [("info", AT, AT + 2)]


def test_a_burst_that_lasts_is_an_explosion_even_if_clipped():
    norms = tuple(10.0 + k for k in range(12))
    got = feed(burst(norms), "grad_explosion")
    assert got == [("info", AT, AT + 2), ("warning", AT, AT + 9)]  # the 10th step of the streak
    assert feed(burst(norms), "grad_explosion", {"grad_explosion_sustained_steps": 20}) == [("info", AT, AT + 2)]


def test_a_later_burst_in_a_noted_episode_still_warns_once():
    recs = burst(n=100)
    for k, factor in enumerate((12.0, 9.0, 8.0)):
        recs[AT + 19 + k]["grad/norm"] = factor
        recs[AT + 19 + k]["grad/clipped"] = 0.25
    recs[AT + 19 + 3]["kl/ref_k3"] = 0.9
    assert feed(recs, "grad_explosion") == [("info", AT, AT + 2), ("warning", AT + 20, AT + 23)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_grad_explosion_on_a_few_steps_and_constant_series(n):
    recs = calm(n)
    assert feed(recs, "grad_explosion") == []
    flat = [{"step": i + 1, "grad/norm": 1.0, "grad/clipped": 1.0, "kl/ref_k3": 0.0} for i in range(200)]
    assert feed(flat, "grad_explosion") == []


def test_level_shift_of_1e6_clipped_is_a_sustained_warning():
    """A norm that jumps a millionfold and stays there: clipped on every step, but not a burst."""
    recs = calm(90)
    for r in recs[AT - 1:]:
        r["grad/norm"] *= 1e6
        r["grad/clipped"] = 1.0
    assert feed(recs, "grad_explosion") == [("info", AT, AT + 2), ("warning", AT, AT + 9)]


# ---------------------------------------------------------------- ppo_ratio_extreme


def extremes(steps: int = 4, clipfrac: float | None = 0.12, at_clip: dict[int, float] | None = None) -> list[dict]:
    """Seed 38 of the second spike check in small: ratio_max 7.1, 13.3, 1.9 (min 0.013), 5.4 on 4 steps
    running, the clip fraction around 0.1 (``clipfrac`` None: not logged)."""
    recs = calm()
    highs = [7.1, 13.3, 1.9, 5.4, 8.0, 9.0, 6.0, 7.0]
    for k in range(steps):
        rec = recs[AT - 1 + k]
        rec["policy/ratio_max"] = highs[k % len(highs)]
        if k == 2:
            rec["policy/ratio_min"] = 0.013
        if clipfrac is None:
            rec.pop("policy/clipfrac", None)
        else:
            rec["policy/clipfrac"] = (at_clip or {}).get(k, clipfrac)
    if clipfrac is None:
        for rec in recs:
            rec.pop("policy/clipfrac", None)
    return recs


def test_tail_token_ratios_under_a_normal_clip_fraction_are_a_note():
    assert feed(extremes(), "ppo_ratio_extreme") == [("info", AT, AT + 3)]
    assert alerting(extremes()) == []


def test_extreme_ratios_with_the_bulk_past_the_clip_are_critical():
    assert feed(extremes(at_clip={1: 0.45}), "ppo_ratio_extreme") == [("critical", AT, AT + 3)]


def test_extreme_ratios_without_a_clip_fraction_stay_critical():
    """Nothing says the extremes are only a tail: judged as before."""
    assert feed(extremes(clipfrac=None), "ppo_ratio_extreme") == [("critical", AT, AT + 3)]


def test_a_noted_streak_whose_clip_fraction_follows_becomes_critical_once():
    recs = extremes(steps=7, at_clip={5: 0.5})
    assert feed(recs, "ppo_ratio_extreme") == [("info", AT, AT + 3), ("critical", AT, AT + 5)]


def test_three_extreme_steps_are_nothing():
    assert feed(extremes(steps=3, at_clip={1: 0.6}), "ppo_ratio_extreme") == []


# ---------------------------------------------------------------- the three healthy runs, recorded


@pytest.mark.parametrize("fixture,rule,expected", [
    ("runner_clipped_burst_healthy", "grad_explosion", [("info", 97, 99)]),
    ("runner_clipped_loss_spike_healthy", "loss_spike", [("info", 111, 111)]),
    ("runner_tail_ratios_healthy", "ppo_ratio_extreme", [("info", 39, 42)]),
])
def test_second_spike_checks_false_alarms_are_notes(fixture, rule, expected):
    """The three healthy runs of the second spike check that got a warning: each is now a note, and the run
    gets no warning or critical alert at all."""
    run_dir = FIXTURES / fixture
    if not (run_dir / "metrics.jsonl").exists():
        pytest.skip(f"fixture {fixture} not recorded")
    d = Diagnoser(rule_config(json.loads((run_dir / "meta.json").read_text())))
    got = [(a, int(r["step"])) for r in Run(run_dir).metrics() for a in d.update([r])]
    assert [(a.severity, a.step, at) for a, at in got if a.rule == rule] == expected
    assert [(a.rule, a.step) for a, _ in got if is_alerting(a.severity)] == []
