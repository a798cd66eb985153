"""``grad_spike`` judged by its consequence: a spike that clipping bounded is an ``info`` note unless KL,
entropy, the loss or the PPO ratio jumps within the next 3 records (then a warning dated at the spike, seen
at the jump); an unclipped spike is a warning at once. Series shaped like the runner's, TRL's and a generic
loop's records (docs/diagnose.md, "A clipped spike is a note unless the policy moved")."""
from __future__ import annotations

import numpy as np
import pytest

from rlhf_core.stability.detectors import Diagnoser
from rlhf_core.stability.rules import DetectorConfig, is_alerting

SPIKE = 61  # the step of the spike in every series below (60 calm steps before it)


def series(n: int = 80, producer: str = "generic", seed: int = 0) -> list[dict]:
    """Noisy calm records in one producer's keys: the runner (mean pre-clip norm of its updates, their clipped
    fraction, PPO ratio), TRL (pre-clip norm above max_grad_norm 1 on every step, grad/clipped 1, k1 KL as RLOO
    logs it, no ratio) or a generic loop (norm and threshold only)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z = rng.standard_normal(5)
        rec: dict = {"step": i + 1, "policy/entropy": 6.0 * (1 + 0.005 * z[0]), "loss/total": -0.03 + 0.004 * z[1]}
        if producer == "trl":
            rec.update({"kl/ref_k1": 0.02 * (1 + 0.1 * z[2]), "grad/norm": 1.4 * np.exp(0.1 * z[3]),
                        "grad/max_norm": 1.0, "grad/clipped": 1.0})
        else:
            rec.update({"kl/ref_k3": 0.3 * (1 + 0.1 * z[2]), "grad/norm": 1.0 * np.exp(0.1 * z[3]),
                        "grad/max_norm": 5.0})
        if producer == "runner":
            rec.update({"policy/ratio_mean": 1.0 + 0.01 * z[4], "grad/clipped": 0.0})
        out.append(rec)
    return out


def spiked(producer: str = "generic", factor: float = 10.0, **at_spike: float) -> list[dict]:
    recs = series(producer=producer)
    recs[SPIKE - 1]["grad/norm"] *= factor
    if producer == "runner":
        recs[SPIKE - 1]["grad/clipped"] = 0.25  # one of its 4 minibatch updates clipped
    recs[SPIKE - 1].update(at_spike)
    return recs


def spike_alerts(recs: list[dict], cfg: dict | None = None) -> list[tuple[str, int, int]]:
    """(severity, alert step, step of the record that raised it) of every grad_spike alert, fed live."""
    d = Diagnoser(cfg)
    return [(a.severity, a.step, int(rec["step"])) for rec in recs for a in d.update([rec]) if a.rule == "grad_spike"]


def others_alerting(recs: list[dict]) -> list[tuple[str, str, int]]:
    d = Diagnoser()
    return [(a.rule, a.severity, a.step) for rec in recs for a in d.update([rec])
            if is_alerting(a.severity) and a.rule != "grad_spike"]


@pytest.mark.parametrize("producer", ["generic", "runner", "trl"])
def test_clipped_spike_without_consequence_is_a_note(producer):
    recs = spiked(producer)
    d = Diagnoser()
    alerts = [a for rec in recs for a in d.update([rec])]
    spikes = [a for a in alerts if a.rule == "grad_spike"]
    assert [(a.severity, a.step) for a in spikes] == [("info", SPIKE)]
    assert "bounded the update" in spikes[0].message and "moved" not in spikes[0].evidence
    assert not [a for a in alerts if is_alerting(a.severity)]


def test_runner_spike_under_the_threshold_is_clipped_per_its_clipped_fraction():
    """The runner logs the mean pre-clip norm of its 4 updates (here 6 under a clip norm of 30) while one
    of them was clipped: its grad/clipped fraction says so."""
    recs = spiked("runner", factor=8.0)
    for rec in recs:
        rec["grad/max_norm"] = 30.0
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE)]


# key -> value on the record that shows the consequence (calm: KL 0.3, entropy 6.0, loss -0.03, ratio 1.0).
# Each spread is floored at 5% of the median, so entropy must fall by more than 6 x 5% = 30% and the ratio
# move more than 0.3 from its median (docs/diagnose.md)
MOVES = {"kl/ref_k3": 0.9, "policy/entropy": 3.5, "loss/total": 0.5, "policy/ratio_mean": 1.5}


@pytest.mark.parametrize("key", sorted(MOVES))
@pytest.mark.parametrize("after", [1, 2, 3])
def test_clipped_spike_with_a_consequence_is_a_warning_within_3_steps(key, after):
    recs = spiked("runner")
    recs[SPIKE - 1 + after][key] = MOVES[key]
    got = spike_alerts(recs)
    assert got == [("info", SPIKE, SPIKE), ("warning", SPIKE, SPIKE + after)], got


def test_the_warning_says_what_moved():
    recs = spiked("runner")
    recs[SPIKE]["kl/ref_k3"] = 0.9
    d = Diagnoser({"producer": "rlhf_core"})
    [warning] = [a for rec in recs for a in d.update([rec]) if a.rule == "grad_spike" and is_alerting(a.severity)]
    assert warning.evidence["moved_at"] == SPIKE + 1 and "KL 0.9" in warning.message
    assert "policy moved" in warning.message and "--learning_rate" in warning.suggestion


def test_a_consequence_after_the_watch_is_not_the_spikes():
    recs = spiked("runner")
    recs[SPIKE - 1 + 4]["kl/ref_k3"] = 0.9  # 4 records later: past the 3-step watch
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE)]


def test_a_jump_on_the_spike_record_itself_is_not_a_consequence():
    """KL and entropy of a record are measured before its update; a same-step loss jump is loss_spike's."""
    recs = spiked("runner", **{"kl/ref_k3": 0.9, "policy/entropy": 3.5})
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE)]


def test_a_healthy_wobble_after_a_clipped_spike_stays_a_note():
    """What the healthy runner runs at lr 1e-3 showed after their clipped spikes: KL up to 1.8x its median,
    entropy 4% down, the loss 3.7 robust sigma off, the mean ratio 0.06 from 1."""
    recs = spiked("runner")
    loss = [r["loss/total"] for r in recs[SPIKE - 21:SPIKE - 1]]
    q1, median, q3 = np.quantile(loss, [0.25, 0.5, 0.75])
    kl = float(np.median([r["kl/ref_k3"] for r in recs[SPIKE - 21:SPIKE - 1]]))
    recs[SPIKE].update({"kl/ref_k3": 1.8 * kl, "policy/entropy": 5.76})
    recs[SPIKE + 1].update({"loss/total": median + 3.7 * (q3 - q1) / 1.349, "policy/ratio_mean": 1.06})
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE)]
    assert others_alerting(recs) == []


@pytest.mark.parametrize("case", ["no threshold", "threshold not reached", "producer did not clip"])
def test_unclipped_spike_is_a_warning_at_once(case):
    recs = spiked("generic")
    for rec in recs:
        if case == "no threshold":
            del rec["grad/max_norm"]
        elif case == "threshold not reached":
            rec["grad/max_norm"] = 50.0
        else:  # the norm is above grad/max_norm, but the producer reports that it clipped nothing
            rec["grad/clipped"] = 0.0
    d = Diagnoser()
    alerts = [(a, int(rec["step"])) for rec in recs for a in d.update([rec]) if a.rule == "grad_spike"]
    assert [(a.severity, a.step, at) for a, at in alerts] == [("warning", SPIKE, SPIKE)]
    assert "no clipping bounded it" in alerts[0][0].message


def test_a_clip_threshold_from_the_config_counts_when_the_record_has_none():
    recs = spiked("generic")
    for rec in recs:
        del rec["grad/max_norm"]
    assert spike_alerts(recs, {"max_grad_norm": 5.0}) == [("info", SPIKE, SPIKE)]


def test_trl_spike_followed_by_a_kl_blowup_is_a_warning_next_step():
    """TRL GRPO at lr 5e-2 (corpus): a clipped 9x norm, then KL up a hundredfold on the next step."""
    recs = spiked("trl", factor=9.0)
    recs[SPIKE]["kl/ref_k1"] = 2.0
    recs[SPIKE]["loss/total"] = 0.2
    assert spike_alerts(recs, {"producer": "trl"}) == [("info", SPIKE, SPIKE), ("warning", SPIKE, SPIKE + 1)]


def test_a_note_does_not_hide_a_later_unclipped_spike():
    """The once-per-episode trigger would stay quiet for 50 steps after the note; a spike that clipping did
    not bound (the threshold raised to 100) is still reported, once."""
    recs = spiked("generic")
    for rec in recs[SPIKE + 5:]:
        rec["grad/max_norm"] = 100.0
    recs[SPIKE + 7]["grad/norm"] = 30.0
    recs[SPIKE + 9]["grad/norm"] = 40.0
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE), ("warning", SPIKE + 8, SPIKE + 8)]


def test_a_later_clipped_spike_of_a_noted_episode_is_watched_too():
    recs = spiked("generic")
    recs[SPIKE + 8]["grad/norm"] = 12.0
    recs[SPIKE + 9]["policy/entropy"] = 3.5
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE), ("warning", SPIKE + 9, SPIKE + 10)]


def test_a_warning_ends_the_watch_and_the_episode():
    recs = spiked("runner")
    recs[SPIKE]["kl/ref_k3"] = 0.9
    recs[SPIKE + 1]["policy/entropy"] = 3.5
    recs[SPIKE + 5]["grad/norm"] = 20.0
    assert spike_alerts(recs) == [("info", SPIKE, SPIKE), ("warning", SPIKE, SPIKE + 1)]


def test_no_watch_without_history_of_the_watched_keys():
    """Keys with fewer than spike_watch_min_history values have no baseline: nothing to compare with."""
    recs = spiked("generic")
    for rec in recs[:SPIKE - 3]:
        del rec["kl/ref_k3"]
    recs[SPIKE]["kl/ref_k3"] = 5.0
    got = [s for s in spike_alerts(recs, {"kl_budget": None}) if s[0] == "warning"]
    assert got == []


def test_watching_can_be_switched_off_and_is_checked():
    recs = spiked("runner")
    recs[SPIKE]["kl/ref_k3"] = 0.9
    assert spike_alerts(recs, {"spike_watch_steps": 1}) == [("info", SPIKE, SPIKE), ("warning", SPIKE, SPIKE + 1)]
    with pytest.raises(ValueError, match="spike_watch_entropy_drop"):
        DetectorConfig(spike_watch_entropy_drop=1.5)
