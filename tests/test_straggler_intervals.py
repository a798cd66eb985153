"""The straggler rule on phase intervals (``ActorStraggler``): a process of a run of different roles (Ray actors)
that became slower than its own earlier steps and made the others wait is named, dated at the step it began,
with who waited; a healthy run whose generation dominates the step, a slow phase nobody waited for, and runs of
one role (left to the cross-rank rule) stay silent.

The steps are laid out as the runner's ``--engine ray`` synchronous step: the trainer (rank 0) waits in
``actor_wait`` while the rollout actor (1) syncs weights and generates, then the reference (2) and reward (3)
actors score the samples side by side; then the trainer updates.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.runformat.timeline import Process, StepSpan, analyse_step, timeline_file
from rlhf_core.stability.analysis import RunAnalysis, diagnose_run
from rlhf_core.stability.detectors import Alert, DetectorConfig, Diagnoser

MS = 1_000_000
ROLES = {0: "trainer", 1: "rollout", 2: "reference", 3: "reward"}
PROCESSES = {r: Process(r, role, waits=frozenset({"actor_wait"}) if r == 0 else frozenset())
             for r, role in ROLES.items()}
NORMAL = {"rollout": 60.0, "ref_logprobs": 8.0, "reward": 2.0, "update": 20.0}  # ms: generation dominates


def ray_step(step: int, ms: dict[str, float]) -> dict[int, StepSpan]:
    """One synchronous Ray step with these phase durations (ms), on one clock; steps 1 s apart."""
    t0 = step * 1000 * MS
    sync, gen = int(1 * MS), int(ms["rollout"] * MS)
    gen_end = t0 + sync + gen
    ref_end, rew_end = gen_end + int(ms["ref_logprobs"] * MS), gen_end + int(ms["reward"] * MS)
    wait_end = max(ref_end, rew_end) + MS // 2  # the trainer's ray.get returns just after the later one
    upd = int(ms["update"] * MS)
    return {
        0: StepSpan(step, t0, wait_end + upd - t0, [("actor_wait", t0, wait_end - t0), ("update", wait_end, upd)]),
        1: StepSpan(step, t0, sync + gen, [("weight_sync", t0, sync), ("rollout", t0 + sync, gen)]),
        2: StepSpan(step, gen_end, ref_end - gen_end, [("ref_logprobs", gen_end, ref_end - gen_end)]),
        3: StepSpan(step, gen_end, rew_end - gen_end, [("reward", gen_end, rew_end - gen_end)]),
    }


def series(n: int, seed: int = 0, slow: dict[str, float] | None = None, at: int = 1, until: int | None = None,
           jitter: float = 0.2) -> list[dict[str, float]]:
    """Per step the phase durations (ms), each within ±``jitter`` of normal; ``slow`` phases multiplied from ``at``."""
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        ms = {k: v * (1 + rng.uniform(-jitter, jitter)) for k, v in NORMAL.items()}
        if slow and at <= step and (until is None or step < until):
            ms.update({k: ms[k] * f for k, f in slow.items()})
        out.append(ms)
    return out


def feed(steps: list[dict[str, float]], cfg: dict | None = None,
         processes: dict[int, Process] = PROCESSES) -> list[Alert]:
    d = Diagnoser(cfg)
    for step, ms in enumerate(steps, 1):
        spans = {r: s for r, s in ray_step(step, ms).items() if r in processes}
        d.update_intervals(step, analyse_step(step, spans, frozenset(), waits=frozenset({"actor_wait"})), processes)
    return d.alerts


def test_a_slowed_actor_is_named_dated_and_the_trainers_wait_is_its_evidence() -> None:
    alerts = feed(series(30, slow={"rollout": 4.0}, at=12))
    assert [(a.rule, a.step, a.rank, a.evidence["role"], a.evidence["phase"]) for a in alerts] == [
        ("straggler", 12, 1, "rollout", "rollout")]
    ev = alerts[0].evidence
    assert ev["time_s"] > 3 * ev["baseline_s"] and 0.048 < ev["baseline_s"] < 0.072
    assert ev["critical_s"] == pytest.approx(ev["time_s"])  # the whole slow rollout held up the step
    # the trainer waited in actor_wait through each of the 3 slow rollouts (>= 3 x 4 x 48 ms)
    assert [w["rank"] for w in ev["waited"]] == [0] and ev["waited"][0]["role"] == "trainer"
    assert 3 * 4 * 0.048 <= ev["waited"][0]["seconds"] <= 3 * 4 * 0.072
    assert "rank 1 (rollout) became slow in phase rollout" in alerts[0].message
    assert "rank 0 (trainer) waited" in alerts[0].message and "from step 12" in alerts[0].message


def test_the_reward_actor_beside_the_reference_is_named_once_it_is_the_later_one() -> None:
    alerts = feed(series(30, slow={"reward": 20.0}, at=8))  # 2 ms -> 40 ms: now after the 8 ms reference
    assert [(a.step, a.rank, a.evidence["phase"]) for a in alerts] == []  # 40 ms: under the 50 ms gap
    alerts = feed(series(30, slow={"reward": 50.0}, at=8))  # 100 ms
    assert [(a.step, a.rank, a.evidence["phase"]) for a in alerts] == [(8, 3, "reward")]
    assert alerts[0].evidence["waited"][0]["rank"] == 0


@pytest.mark.parametrize("seed", range(5))
def test_a_healthy_run_whose_generation_dominates_is_silent(seed: int) -> None:
    steps = series(300, seed, jitter=0.3)
    for i in (50, 120, 121):  # a one-step and a two-step hiccup of the rollout actor (GC, a busy host)
        steps[i]["rollout"] *= 5
    assert feed(steps) == []
    assert feed(series(40, seed, slow={"rollout": 4.0}, at=1)) == []  # slow from its first step: no baseline


def test_a_slow_phase_the_step_did_not_wait_for_is_not_a_straggler() -> None:
    steps = series(30, slow={"ref_logprobs": 30.0}, at=5)  # the reference now takes ~240 ms ...
    for ms in steps[4:]:
        ms["reward"] = 300.0  # ... but the reward actor beside it takes longer every step
    alerts = feed(steps)
    assert all(a.rank == 3 for a in alerts)  # the reward actor (it became slow too), never the reference
    assert [a.evidence["phase"] for a in alerts] == ["reward"]


def test_a_slowed_trainer_is_named_without_a_measured_wait() -> None:
    alerts = feed(series(30, slow={"update": 6.0}, at=10))
    assert [(a.step, a.rank, a.evidence["role"], a.evidence["phase"]) for a in alerts] == [
        (10, 0, "trainer", "update")]
    assert alerts[0].evidence["waited"] == [] and "critical path" in alerts[0].message


def test_it_recovers_and_fires_again_only_after_rearm_steps() -> None:
    steps = series(120, slow={"rollout": 4.0}, at=10, until=20)
    steps[29:] = series(91, seed=1, slow={"rollout": 4.0}, at=50)  # slow again from step 79
    assert [a.step for a in feed(steps, {"rearm_steps": 20})] == [10, 79]
    assert [a.step for a in feed(steps, {"rearm_steps": 200})] == [10]


def test_runs_of_one_role_are_left_to_the_cross_rank_rule() -> None:
    slow = series(30, slow={"rollout": 4.0}, at=12)
    same_role = {r: Process(r, "runner") for r in (0, 1)}
    assert feed(slow, processes=same_role) == []  # two torchrun ranks: Straggler compares them with each other
    assert feed(slow, processes={1: PROCESSES[1]}) == []  # a single process: nobody waited for it


def test_its_settings_and_switch() -> None:
    assert feed(series(30, slow={"rollout": 4.0}, at=12), {"disabled_rules": ["straggler"]}) == []
    assert feed(series(30, slow={"rollout": 4.0}, at=12), {"straggler_baseline_factor": 6.0}) == []
    assert [a.step for a in feed(series(30, slow={"rollout": 4.0}, at=12), {"straggler_steps": 5})] == [12]
    with pytest.raises(ValueError, match="straggler_critical_frac: expected a fraction"):
        DetectorConfig(straggler_critical_frac=2.0)
    with pytest.raises(ValueError, match="straggler_baseline_window: expected a whole number"):
        DetectorConfig.from_any({"straggler_baseline_window": 0})


# ------------------------------------------------------------------------------------ from a run directory
def write_timeline(run_dir: Path, steps: list[dict[str, float]], first: int = 1) -> None:
    """Append the steps to the run's ``timeline.rank<N>.jsonl`` files (docs/timeline.md), headers first."""
    for rank, role in ROLES.items():
        path = run_dir / timeline_file(rank)
        lines = []
        if not path.exists():
            head = {"format": 1, "rank": rank, "world_size": 4, "role": role, "host": "vm", "pid": 100 + rank,
                    "source": "rlhf_core", "clock": {"offset_ns": 0, "uncertainty_ns": 0}, "collective": [],
                    "waits": ["actor_wait"] if rank == 0 else []}
            lines.append(json.dumps({"process": head, "time_ns": 0}))
        for step, ms in enumerate(steps, first):
            span = ray_step(step, ms)[rank]
            ph = [[n, (s - span.t0) // 1000, d // 1000] for n, s, d in span.phases]
            lines.append(json.dumps({"step": step, "t0": span.t0, "dur": span.dur // 1000, "ph": ph},
                                    separators=(",", ":")))
        with open(path, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def test_diagnose_of_a_ray_run_directory_reads_the_intervals(tmp_path: Path) -> None:
    steps = series(12, slow={"reward": 60.0}, at=6)
    w = RunWriter(tmp_path / "ray", source="rlhf_core", tensorboard=False)
    for step, ms in enumerate(steps, 1):
        w.log(step, {f"time/{k}": v / 1e3 for k, v in ms.items()})
    write_timeline(tmp_path / "ray", steps)
    w.close()
    alerts = diagnose_run(tmp_path / "ray")
    assert [(a.rule, a.step, a.rank, a.evidence["phase"], a.run) for a in alerts] == [
        ("straggler", 6, 3, "reward", "ray")]


def test_a_live_run_is_judged_on_complete_steps_only_and_alerts_once(tmp_path: Path) -> None:
    steps = series(12, slow={"rollout": 4.0}, at=6)
    w = RunWriter(tmp_path / "live", source="rlhf_core", tensorboard=False)  # left running: status "running"
    write_timeline(tmp_path / "live", steps[:7])
    analysis = RunAnalysis(tmp_path / "live")
    assert analysis.alerts() == []  # steps 6 and 7 are slow; the newest (7) is not judged while the run writes
    write_timeline(tmp_path / "live", steps[7:9], first=8)
    assert [(a.step, a.rank) for a in analysis.alerts()] == [(6, 1)]  # judged through step 8: 6, 7, 8 slow
    write_timeline(tmp_path / "live", steps[9:], first=10)
    w.close()
    assert [(a.step, a.rank) for a in analysis.alerts()] == [(6, 1)]  # the later steps add no second alert


def test_a_bad_timeline_line_is_reported_and_the_rest_still_judged(tmp_path: Path) -> None:
    steps = series(12, slow={"rollout": 4.0}, at=6)
    w = RunWriter(tmp_path / "bad", source="rlhf_core", tensorboard=False)
    write_timeline(tmp_path / "bad", steps[:3])
    with open(tmp_path / "bad" / timeline_file(2), "a") as fh:
        fh.write('{"step":4,"t0":"soon"}\nnot json\n')
    write_timeline(tmp_path / "bad", steps[3:], first=4)
    w.close()
    analysis = RunAnalysis(tmp_path / "bad")
    assert [(a.step, a.rank) for a in analysis.alerts()] == [(6, 1)]
    problems = [p for p in analysis.problems() if timeline_file(2) in p]
    assert len(problems) == 2 and "not a step record" in problems[0] and "malformed JSON" in problems[1]
