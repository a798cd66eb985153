"""``--engine ray``: the runner's step split over Ray actors, as OpenRLHF and veRL place RLHF roles.

Four actors on a local Ray cluster that :func:`train_ray` starts and stops (or on the cluster the caller already
connected to, or the one ``RAY_ADDRESS`` names), each a process of its own with its own phase timer and timeline
file:

===========  ====  ====================================================================================
actor        rank  what it does each step
===========  ====  ====================================================================================
trainer      0     the :class:`~rlhf_core.train.runner.PPORunner` (writer, checkpoints, alerts): old
                   log-probs, values, advantages, update, optimizer; then ``weight_sync``: its updated
                   weights into Ray's object store for the rollout actor
rollout      1     ``weight_sync`` (fetches the newest weights and copies them into its model in one op),
                   then ``rollout``: samples the step's prompts
reference    2     ``ref_logprobs``: the frozen reference's log-probs of the samples
reward       3     ``reward``: decodes and scores the samples
===========  ====  ====================================================================================

The trainer drives the step (a single controller in the trainer's process): it submits generation, then
reference and reward on the generation's result (Ray hands the samples from actor to actor without the trainer),
and waits for the three. All stages run the functions the local runner runs (:mod:`rlhf_core.train.experience`)
with the same seeds, so with ``--off_policy_steps 0`` a run's metrics equal the local runner's.
``--off_policy_steps 1`` submits the generation of step t+1 before training step t, so sampling overlaps the
update, from weights one update old (OpenRLHF's ``--async_train``, veRL's one-step-off-policy recipe).

Each actor's timeline header carries its role, pid, host and its clock offset to the trainer, measured
NTP-style over actor calls, so ``rlhfkit timeline RUN`` shows one process per actor on one clock.

Stopping: Ctrl-C or SIGTERM in the driver asks the trainer to stop before its next step (the run closes as
``interrupted``); an actor that dies fails the run with a reason naming it. If the trainer itself is gone the
driver writes the status into ``meta.json``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from profiler.phases import PhaseTimer
from profiler.timeline import TimelineRecorder
from rlhf_core.runformat.clock import ClockOffset, ntp_offset, wall_ns
from rlhf_core.runformat.run_writer import write_json_atomic
from rlhf_core.tiny_model import resolve_model_path
from rlhf_core.train import distributed as dist_utils
from rlhf_core.train.config import TrainConfig
from rlhf_core.train.experience import (
    RunnerError,
    Samples,
    Scores,
    generate_samples,
    reference_logp,
    score_samples,
)
from rlhf_core.train.policy import load_causal_lm, load_tokenizer, make_reference
from rlhf_core.train.prompts import get_prompts
from rlhf_core.train.rewards import RewardFn, get_reward
from rlhf_core.train.runner import PPORunner, RunResult, Terminated, configure_threads, print_summary, resolve_device

NUM_CPUS = 2  # logical CPUs of the cluster the run starts: the four actors share them (placement groups)
ROLES = ("trainer", "rollout", "reference", "reward")  # timeline rank = index
WAIT_PHASE = "actor_wait"  # the trainer's wait for its actors' results: a wait phase of the timeline
CLOCK_ROUNDS = 8
STOP_WAIT_S = 60.0  # after a stop request, how long the driver waits for the trainer to close the run
POLL_S = 0.2  # the trainer's wait for its actors checks for a stop request this often


class EngineError(RunnerError):
    """An actor of the Ray engine died or could not start: one line; the run is marked failed."""


def _cause(err: BaseException) -> BaseException:
    """The exception an actor raised, without Ray's wrapper (whose text holds the remote traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------------ actors
class _StageActor:
    """What the rollout, reference and reward actors share: the config, a phase timer and a timeline."""

    RANK = 0

    def __init__(self, cfg_dict: dict[str, Any], run_dir: str):
        self.cfg = TrainConfig.from_dict(cfg_dict)
        self.run_dir = run_dir
        configure_threads(self.cfg)
        self.device = resolve_device(self.cfg.device)
        self.timer: Any = None

    def ready(self) -> int:
        return os.getpid()

    def wall(self) -> int:
        """This process's wall clock, for the trainer's offset measurement."""
        return wall_ns()

    def open_timeline(self, clock: dict[str, Any]) -> None:
        """Start recording phases into ``timeline.rank<RANK>.jsonl`` with the measured offset to the trainer."""
        recorder = TimelineRecorder(self.run_dir, rank=self.RANK, world_size=len(ROLES), role=ROLES[self.RANK],
                                    clock=ClockOffset(**clock), source="rlhf_core",
                                    name=f"{type(self).__name__} ({ROLES[self.RANK]} actor)")
        self.timer = PhaseTimer(self.device, timeline=recorder)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()


class RolloutActor(_StageActor):
    """The generation engine: its own copy of the policy's language model, refreshed from the trainer."""

    RANK = 1

    def __init__(self, cfg_dict: dict[str, Any], run_dir: str):
        super().__init__(cfg_dict, run_dir)
        path = resolve_model_path(self.cfg.model)
        self.tokenizer = load_tokenizer(path)
        torch.manual_seed(self.cfg.seed)
        self.model = load_causal_lm(path, self.cfg.dtype, self.device)
        self.model.requires_grad_(False)
        self.prompts = get_prompts(self.cfg.prompts)
        self.flat: torch.Tensor | None = None

    def _load(self, weights: torch.Tensor, layout: Sequence[tuple[str, int, int]]) -> None:
        """Copy the trainer's weights in; the first time, lay the model's parameters out as views of one buffer
        in the trainer's order, so every later sync is one copy."""
        if self.flat is None:
            self.flat = torch.empty_like(weights, device=self.device)
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, start, size in layout:
                    p = params[name]
                    p.data = self.flat[start: start + size].view_as(p)
        with torch.no_grad():
            self.flat.copy_(weights)

    @ray.method(num_returns=2)
    def generate(self, step: int, weights: list[Any], layout: Sequence[tuple[str, int, int]],
                 with_logprobs: bool) -> tuple[Samples, dict[str, float]]:
        """``weights``: ``[ObjectRef]`` of the trainer's newest weights (in a list, so that Ray leaves the fetch
        to this method and it is timed as ``weight_sync``)."""
        timer = self.timer
        timer.start_step(step)
        with timer.phase("weight_sync"):
            self._load(ray.get(weights[0]), layout)
        with timer.phase("rollout"):
            samples = generate_samples(self.cfg, self.model, self.tokenizer, self.prompts, step, 0, self.device,
                                       with_logprobs=with_logprobs)
            if with_logprobs:  # the trainer recomputes the old log-probs: the sampler's hidden states are not sent
                samples.rollout.hidden = None
            self.cfg.debug_sleep(self.RANK, step)
        return samples, timer.end_step(step)


class ReferenceActor(_StageActor):
    """The frozen initial policy: the KL anchor."""

    RANK = 2

    def __init__(self, cfg_dict: dict[str, Any], run_dir: str):
        super().__init__(cfg_dict, run_dir)
        ref_device = torch.device("cpu") if self.cfg.ref_device == "cpu" else self.device
        torch.manual_seed(self.cfg.seed)
        model = load_causal_lm(resolve_model_path(self.cfg.model), self.cfg.dtype, ref_device)
        self.ref = make_reference(model, ref_device)
        del model

    def logprobs(self, samples: Samples) -> tuple[torch.Tensor, dict[str, float]]:
        timer = self.timer
        timer.start_step(samples.step)
        with timer.phase("ref_logprobs"):
            out = reference_logp(self.cfg, self.ref, samples, torch.device("cpu"))
            self.cfg.debug_sleep(self.RANK, samples.step)
        return out, timer.end_step(samples.step)


class RewardActor(_StageActor):
    """Decodes and scores the completions (the reward function runs here, as a reward model would)."""

    RANK = 3

    def __init__(self, cfg_dict: dict[str, Any], run_dir: str, reward_fn: RewardFn | None):
        super().__init__(cfg_dict, run_dir)
        self.tokenizer = load_tokenizer(resolve_model_path(self.cfg.model))
        self.reward_fn = reward_fn or get_reward(self.cfg.reward)
        self.heldout_fn = get_reward(self.cfg.heldout_reward) if self.cfg.heldout_reward else None

    def score(self, samples: Samples) -> tuple[Scores, dict[str, float]]:
        timer = self.timer
        timer.start_step(samples.step)
        with timer.phase("reward"):
            out = score_samples(self.cfg, samples, self.tokenizer, self.reward_fn, self.heldout_fn)
            self.cfg.debug_sleep(self.RANK, samples.step)
        return out, timer.end_step(samples.step)


# ------------------------------------------------------------------------------------------------ trainer
def _merge_times(record: dict[str, float], times: dict[str, float]) -> None:
    """Another actor's phase times into the step's: times of a phase add up, memory peaks keep the largest."""
    for key, value in times.items():
        if key == "time/step" or key.startswith("wait/"):
            continue
        if key.startswith("time/"):
            record[key] = record.get(key, 0.0) + value
        elif key.startswith("mem/"):
            record[key] = max(record.get(key, value), value)


class RayTrainer(PPORunner):
    WAIT_PHASES = (WAIT_PHASE,)
    """The runner in the trainer actor: generation, reference and reward come from the other actors."""

    ROLE = "trainer"
    announce = False

    def __init__(self, cfg: TrainConfig, actors: dict[str, Any], placement: dict[str, Any]):
        self.actors = actors
        super().__init__(cfg)
        self._stop: str | None = None
        self._pending: tuple[Any, ...] | None = None
        self._remote_times: list[dict[str, float]] = []
        self._sync_bytes = 0
        self.steps_done = self.start_step
        # the language model's parameters, as (name, offset, size) in the trainer's flat buffer: the rollout actor
        # lays its copy out the same way; the value head is not sent
        base = self.params.data.data_ptr()
        item = self.params.data.element_size()
        self.layout = [(name, (p.data_ptr() - base) // item, p.numel())
                       for name, p in self.policy.model.named_parameters()]
        if any(not p.requires_grad for p in self.policy.model.parameters()):
            raise RunnerError("--engine ray sends the trained parameters' buffer to the rollout actor; this model "
                              "has frozen parameters outside it")
        self.sync_numel = max(start + size for _, start, size in self.layout)
        self.clocks = {role: self._measure_clock(actor) for role, actor in actors.items()}
        ray.get([actor.open_timeline.remote(self.clocks[role].as_dict()) for role, actor in actors.items()])
        self._weights = self._put_weights()
        pids = dict(zip(actors, ray.get([a.ready.remote() for a in actors.values()])))
        self.writer.update_meta(ray={
            "placement": cfg.ray_placement, "off_policy_steps": cfg.off_policy_steps, **placement,
            "actors": {"trainer": {"rank": 0, "pid": os.getpid()},
                       **{role: {"rank": ROLES.index(role), "pid": pids[role],
                                 "clock_offset_ns": self.clocks[role].offset_ns,
                                 "clock_uncertainty_ns": self.clocks[role].uncertainty_ns} for role in actors}},
            "weight_sync_bytes": self._sync_bytes})

    def _timeline_processes(self) -> int:
        return len(ROLES)

    @staticmethod
    def _measure_clock(actor: Any) -> ClockOffset:
        """The actor's offset to this (rank 0) clock: the round trip with the least delay of a few actor calls."""
        best: tuple[int, int] | None = None
        for _ in range(CLOCK_ROUNDS):
            t1 = wall_ns()
            t2 = ray.get(actor.wall.remote())
            t4 = wall_ns()
            offset, unc = ntp_offset(t1, t2, t2, t4)  # the actor's clock minus ours
            if best is None or unc < best[1]:
                best = (-offset, unc)
        assert best is not None
        return ClockOffset(best[0], best[1], "ray-ping-pong", 0)

    def _put_weights(self) -> Any:
        """The language model's weights into the object store (one tensor: the prefix of the flat buffer)."""
        weights = self.params.data.detach()[: self.sync_numel]
        self._sync_bytes = weights.numel() * weights.element_size()
        return ray.put(weights)

    def request_stop(self, reason: str) -> None:
        self._stop = reason

    def _check_stop(self) -> None:
        if self._stop is not None:
            raise Terminated() if self._stop == "SIGTERM" else KeyboardInterrupt()

    def _submit(self, step: int) -> tuple[Any, ...]:
        """Generation of ``step`` with the newest weights, then reference and reward on its samples."""
        samples, gen_times = self.actors["rollout"].generate.remote(
            step, [self._weights], self.layout, self.cfg.off_policy_steps > 0)
        ref = self.actors["reference"].logprobs.remote(samples)
        scores = self.actors["reward"].score.remote(samples)
        return samples, gen_times, ref, scores

    def _wait(self, refs: list[Any]) -> list[Any]:
        """The actors' results; a stop request is honoured while waiting, an actor's error is raised as its own."""
        while True:
            self._check_stop()
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            if len(ready) == len(refs):
                break
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as err:
            role = next((r for r, a in self.actors.items() if getattr(err, "actor_id", None) == a._actor_id.hex()),
                        "an")
            raise EngineError(f"the {role} actor died ({_first_line(err)})") from None
        except ray.exceptions.RayTaskError as err:
            cause = _cause(err)
            if isinstance(cause, RunnerError):
                raise RunnerError(str(cause)) from None
            raise cause from None

    def _inputs(self, step: int) -> tuple[Samples, Scores, torch.Tensor]:
        self.steps_done = step - 1
        self._check_stop()
        pending = self._pending or self._submit(step)
        self._pending = None
        if self.cfg.off_policy_steps and step < self.cfg.total_steps:
            self._pending = self._submit(step + 1)  # sampled while this step trains
        waited = time.perf_counter()
        samples, gen_times, (ref_logp, ref_times), (scores, reward_times) = self._wait(list(pending))
        self.timer.add_span(WAIT_PHASE, waited, time.perf_counter())  # timeline only: all of it is waiting
        self._remote_times = [gen_times, ref_times, reward_times]
        return samples, scores, ref_logp.to(self.device)

    def _after_update(self, step: int) -> None:
        with self.timer.phase("weight_sync"):
            self._weights = self._put_weights()

    def _step_times(self, times: dict[str, float]) -> dict[str, float]:
        out = dict(times)
        for remote in self._remote_times:
            _merge_times(out, remote)
        peaks = [v for k, v in out.items() if k.startswith("mem/") and k.endswith("_peak_bytes")]
        if peaks:
            out["mem/peak_bytes"] = max(peaks)
        out["src/weight_sync_bytes"] = float(self._sync_bytes)
        return out

    def _finish(self, status: str, reason: str | None = None) -> None:
        """Flush the actors' timelines (a dead actor's are lost), then close the run as the local runner does."""
        self._pending = None
        waits = [actor.close.remote() for actor in self.actors.values()]
        try:
            ray.wait(waits, num_returns=len(waits), timeout=10.0)
        except ray.exceptions.RayError:
            pass
        super()._finish(status, reason)


class TrainerActor:
    """Hosts the :class:`RayTrainer`; ``max_concurrency=2`` lets :meth:`stop` run beside :meth:`run`."""

    def setup(self, cfg_dict: dict[str, Any], actors: dict[str, Any], placement: dict[str, Any]) -> int:
        self.runner = RayTrainer(TrainConfig.from_dict(cfg_dict), actors, placement)
        return os.getpid()

    def run(self) -> RunResult:
        """The run's result; a stop request ends it as ``interrupted`` (returned: Ray would turn a raised
        KeyboardInterrupt into a cancelled task)."""
        try:
            return self.runner.run()
        except KeyboardInterrupt:
            return RunResult(Path(self.runner.run_dir), self.runner.steps_done, None, "interrupted")

    def stop(self, reason: str) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.request_stop(reason)


# ------------------------------------------------------------------------------------------------ driver
def _init_ray(cfg: TrainConfig) -> bool:
    """Connect this process to a cluster unless it already is; True if connected here (the caller disconnects).

    With ``RAY_ADDRESS`` set (a cluster started with ``ray start``, or the driver of ``ray job submit``, which sets
    it) the run joins that cluster and leaves it running; otherwise it starts a quiet local one, which
    ``ray.shutdown`` stops again."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True,
                              "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except ConnectionError as err:
            raise RunnerError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({_first_line(err)})") from None
        return True
    num_gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else 0
    ray.init(num_cpus=NUM_CPUS, num_gpus=num_gpus, include_dashboard=False, **common)
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address that nothing listens on fails in seconds here, not after Ray's minutes of retries
    (``auto`` and ``ray://`` addresses are left to Ray)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()  # [::1]:6379 too
    except OSError as err:
        raise RunnerError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({err.strerror or err})") from None


def _placement(cfg: TrainConfig) -> tuple[Any, dict[str, dict[str, Any]], dict[str, Any]]:
    """A placement group and each role's actor options: one shared bundle (colocated) or a bundle per role."""
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.device in ("auto", "cuda") else 0
    share = 1.0 / len(ROLES)
    if cfg.ray_placement == "colocated":
        bundles = [{"CPU": 1.0, **({"GPU": 1.0} if gpus else {})}]
        pg = placement_group(bundles, strategy="PACK")
        opts = {role: {"num_cpus": share, "num_gpus": share if gpus else 0, "index": 0} for role in ROLES}
    else:
        if gpus and gpus < len(ROLES):
            raise RunnerError(f"--ray_placement separate needs {len(ROLES)} GPUs, the cluster has {gpus:g}")
        per = NUM_CPUS / len(ROLES)
        bundles = [{"CPU": per, **({"GPU": 1.0} if gpus else {})} for _ in ROLES]
        pg = placement_group(bundles, strategy="SPREAD")
        opts = {role: {"num_cpus": per, "num_gpus": 1.0 if gpus else 0, "index": i} for i, role in enumerate(ROLES)}
    try:
        ray.get(pg.ready(), timeout=60)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RunnerError(f"the Ray cluster cannot place the actors in 60 s (bundles {bundles}; it has "
                          f"{ray.available_resources()})") from None
    return pg, opts, {"bundles": bundles}


def _actor(cls: type, pg: Any, opt: dict[str, Any], **extra: Any) -> Any:
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=opt["index"])
    return ray.remote(cls).options(num_cpus=opt["num_cpus"], num_gpus=opt["num_gpus"],
                                   scheduling_strategy=strategy, **extra)


def _mark(run_dir: Path, status: str, reason: str) -> None:
    """The driver's last word on a run whose trainer is gone: ``meta.json`` still saying ``running`` is wrong."""
    path = run_dir / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if meta.get("status") == "running":
        meta.update(status=status, reason=reason, end_time=time.time())
        write_json_atomic(path, meta)


def train_ray(cfg: TrainConfig, reward_fn: RewardFn | None = None) -> RunResult:
    """Run ``cfg`` on Ray actors; stops what it started (actors, placement group, a local cluster) on every exit."""
    if dist_utils.launched_by_torchrun():
        raise RunnerError("--engine ray runs its own processes; start it with python, not torchrun")
    assert cfg.run_dir is not None
    run_dir = Path(cfg.run_dir)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.getsignal(signal.SIGTERM) if main_thread else None  # ray.init replaces it: put it back
    connected = _init_ray(cfg)
    pg = None
    handles: list[Any] = []
    # Ray's get turns any exception a signal handler raises into a plain KeyboardInterrupt: the handler notes
    # which signal it was here
    signals: list[str] = []
    if main_thread:
        def on_term(signum: int, frame: Any) -> None:
            signals.append("SIGTERM")
            raise Terminated()

        signal.signal(signal.SIGTERM, on_term)
    try:
        pg, opts, placement = _placement(cfg)
        cfg_dict = cfg.to_dict()
        actors = {
            "rollout": _actor(RolloutActor, pg, opts["rollout"]).remote(cfg_dict, str(run_dir)),
            "reference": _actor(ReferenceActor, pg, opts["reference"]).remote(cfg_dict, str(run_dir)),
            "reward": _actor(RewardActor, pg, opts["reward"]).remote(cfg_dict, str(run_dir), reward_fn),
        }
        trainer = _actor(TrainerActor, pg, opts["trainer"], max_concurrency=2).remote()
        handles = [trainer, *actors.values()]
        try:
            ray.get([a.ready.remote() for a in actors.values()])
            ray.get(trainer.setup.remote(cfg_dict, actors, placement))
        except ray.exceptions.RayTaskError as err:
            cause = _cause(err)
            raise (RunnerError(str(cause)) if isinstance(cause, RunnerError) else cause) from None
        except ray.exceptions.RayActorError as err:
            raise EngineError(f"an actor could not start ({_first_line(err)})") from None
        result = _run(trainer, run_dir, cfg, signals)
        print_summary(run_dir, result.status, cfg)
        if result.status == "interrupted":  # the trainer's process got the signal itself (a terminal's Ctrl-C)
            raise KeyboardInterrupt
        return result
    finally:
        for handle in handles:
            ray.kill(handle)
        if pg is not None:
            remove_placement_group(pg)
        if connected:  # stops the local cluster it started; from a RAY_ADDRESS cluster it only disconnects
            ray.shutdown()
        if main_thread and old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _run(trainer: Any, run_dir: Path, cfg: TrainConfig, signals: list[str]) -> RunResult:
    """Wait for the trainer; on Ctrl-C/SIGTERM ask it to close the run as interrupted, and wait for that."""
    done = trainer.run.remote()
    try:
        return _result(done, run_dir)
    except KeyboardInterrupt as err:
        reason = "SIGTERM" if isinstance(err, Terminated) or signals else "KeyboardInterrupt"
        trainer.stop.remote(reason)
        try:
            ray.wait([done], timeout=STOP_WAIT_S)
        finally:
            _mark(run_dir, "interrupted", reason)
            print_summary(run_dir, "interrupted", cfg)
        raise


def _result(done: Any, run_dir: Path) -> RunResult:
    try:
        return ray.get(done)
    except ray.exceptions.RayActorError as err:
        reason = f"the trainer actor died ({_first_line(err)})"
        _mark(run_dir, "failed", reason)
        raise EngineError(reason) from None
    except ray.exceptions.RayTaskError as err:
        cause = _cause(err)
        if isinstance(cause, RunnerError):
            raise type(cause)(str(cause)) from None
        raise cause from None

