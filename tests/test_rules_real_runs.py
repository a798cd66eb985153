"""The rules' defaults on short real runs recorded by the corpus (tests/fixtures/real_runs, written by
``python -m benchmarks.corpus.generate``; development-split runs only): healthy runs get no warning or
critical alert, unstable ones a correctly named alert no later than 3 steps after their outcome step, and
the suggestion in the producer's words."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_corpus import ACCEPTED, GRACE  # outcome kind -> the rule names that name it
from rlhf_core.runformat.run_reader import Run
from rlhf_core.stability.analysis import rule_config
from rlhf_core.stability.detectors import Diagnoser
from rlhf_core.stability.rules import is_alerting

FIXTURES = Path(__file__).parent / "fixtures" / "real_runs"
INDEX = json.loads((FIXTURES / "labels.json").read_text()) if (FIXTURES / "labels.json").exists() else {}

pytestmark = pytest.mark.skipif(not INDEX, reason="no recorded fixtures (python -m benchmarks.corpus.generate)")


def alerts_of(fixture: str) -> list[tuple[object, int]]:
    """(alert, step of the record that raised it) fed live, one record at a time, with the run's own settings."""
    run_dir = FIXTURES / fixture
    meta = json.loads((run_dir / "meta.json").read_text())
    diagnoser = Diagnoser(rule_config(meta))
    return [(a, int(rec["step"])) for rec in Run(run_dir).metrics() for a in diagnoser.update([rec])]


@pytest.mark.parametrize("fixture", sorted(INDEX))
def test_defaults_on_a_recorded_run(fixture):
    entry = INDEX[fixture]
    alerts = [(a, at) for a, at in alerts_of(fixture) if is_alerting(a.severity)]
    if entry["label"] == "healthy":
        assert alerts == [], [(a.rule, a.severity, a.step) for a, _ in alerts]
        return
    named = set().union(*(ACCEPTED[k] for k in entry["outcome_kinds"]))
    outcome = entry["outcome_step"]
    good = [(a, at) for a, at in alerts if a.rule in named and at <= outcome + GRACE]
    assert good, (entry["outcome_kinds"], outcome, [(a.rule, a.severity, a.step, at) for a, at in alerts])


def _needs(fixture: str) -> None:
    if fixture not in INDEX:
        pytest.skip(f"fixture {fixture} not recorded")


def test_trl_grpo_blowup_names_kl_early_in_trl_words():
    _needs("trl_grpo_kl_explosion")
    kl = [(a, at) for a, at in alerts_of("trl_grpo_kl_explosion") if a.rule in ("kl_budget", "kl_explosion")]
    assert kl and min(at for _, at in kl) <= 7
    assert all("beta" in a.suggestion and "kl_coef" not in a.suggestion for a, _ in kl)


def test_runner_blowup_names_kl_in_runner_flags():
    _needs("runner_unstable")
    kl = [a for a, _ in alerts_of("runner_unstable") if a.rule in ("kl_budget", "kl_explosion")]
    assert kl and all("--kl_coef" in a.suggestion for a in kl)


def test_clipped_gradient_spikes_of_a_healthy_learning_run_are_notes():
    """Runner lr 1e-3, seed 4: the pre-clip norm spikes to 6.9 and 19.2 (median ~1; clip norm 5) while KL and
    entropy stay flat; it used to be a false grad_spike warning."""
    _needs("runner_spiky_healthy")
    spikes = [a for a, _ in alerts_of("runner_spiky_healthy") if a.rule == "grad_spike"]
    assert spikes and all(a.severity == "info" for a in spikes), [(a.severity, a.step) for a in spikes]
    assert spikes[0].evidence["clipped_frac"] > 0 and "moved" not in spikes[0].evidence


def test_a_first_clipped_spike_without_consequence_is_a_note():
    """Spike check, runner lr 1e-3, seed 12: its first large norm (9.2x the median at step 104, one of 4
    updates clipped), KL and entropy within their usual wobble after it; a false warning under the rule that
    wanted spikes to be routine before they were notes."""
    _needs("runner_first_spike_healthy")
    spikes = [(a, at) for a, at in alerts_of("runner_first_spike_healthy") if a.rule == "grad_spike"]
    assert [(a.severity, a.step, at) for a, at in spikes] == [("info", 104, 104)]
    assert spikes[0][0].evidence["clipped_frac"] == 0.25


def test_the_same_run_with_its_kl_jumping_after_the_spike_gets_a_warning():
    """The recorded run of seed 12 with the KL of the step after its spike tripled: the consequence turns
    the note into a warning dated at the spike, raised by that next record."""
    _needs("runner_first_spike_healthy")
    run_dir = FIXTURES / "runner_first_spike_healthy"
    diagnoser = Diagnoser(rule_config(json.loads((run_dir / "meta.json").read_text())))
    got = []
    for rec in Run(run_dir).metrics():
        if rec["step"] == 105:
            rec = {**rec, "kl/ref_k3": 3 * rec["kl/ref_k3"], "kl/ref_k1": 3 * rec["kl/ref_k1"]}
        got += [(a.severity, a.step, int(rec["step"])) for a in diagnoser.update([rec]) if a.rule == "grad_spike"]
    assert got == [("info", 104, 104), ("warning", 104, 105)]
