"""The PPO loop, CleanRL style: one step reads top to bottom, every PPO detail in plain sight.

A step: sample responses (rollout) → score them (reward) → log-probs of the frozen reference
(ref_logprobs) and of the policy before the update (old_logprobs), values → per-token KL-penalised rewards,
GAE, whitened advantages (advantages) → ``ppo_epochs`` passes over minibatches of clipped-surrogate +
clipped-value loss (update) with gradient clipping and AdamW (optimizer) → probes and the record (logging).
Each phase is timed by ``profiler.phases.PhaseTimer`` and the step is written through ``RunWriter``.

Multi-process (torchrun): prompts are sharded by rank, the policy+value module is wrapped in
DistributedDataParallel (gloo on the CPU), each rank writes ``metrics.rank<k>.jsonl`` and rank 0 the
reduced ``metrics.jsonl``, checkpoints and meta. Skips for non-finite values are decided jointly.
"""
from __future__ import annotations

import gc
import json
import math
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from memory.run_memory import write_run_memory
from profiler import tracing
from profiler.phases import PhaseTimer
from profiler.sampler import SystemSampler
from profiler.timeline import TimelineRecorder
from rlhf_core.runformat.keys import PHASES
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.analysis import LiveAlerts
from rlhf_core.stability.rules.base import is_alerting
from rlhf_core.tiny_model import is_tiny, resolve_model_path
from rlhf_core.train import distributed as dist_utils
from rlhf_core.train import ppo
from rlhf_core.train.checkpoint import (
    clean_partial_writes,
    kill_point,
    list_checkpoints,
    load_checkpoint,
    own_storage,
    prepare_resume,
    save_checkpoint,
)
from rlhf_core.train.config import TrainConfig, computation_changes
from rlhf_core.train.experience import (
    Experience,
    RunnerError,
    Samples,
    Scores,
    UpdateStats,
    generate_samples,
    reference_logp,
    score_samples,
    step_seed,
)
from rlhf_core.train.finite_guard import MAX_NONFINITE_UPDATES, WeightGuard
from rlhf_core.train.flat_params import FlatParams
from rlhf_core.train.limits import step_memory_problem
from rlhf_core.train.policy import (
    PolicyWithValue,
    load_causal_lm,
    load_tokenizer,
    make_reference,
    response_hidden,
    score_tokens,
)
from rlhf_core.train.probes import kl_estimates, layer_metrics, rollout_mismatch
from rlhf_core.train.prompts import get_prompts
from rlhf_core.train.rewards import RewardFn, get_reward

# the phases one step of this runner times, in order: every phase of the run format but the weight sync, which a
# runner that samples with the trained model itself does not have (the Ray engine adds it)
LOCAL_PHASES = tuple(p for p in PHASES if p != "weight_sync")
# phases holding a collective every rank enters (the non-finite checks, DDP's gradient all-reduce): where a rank
# waits for a slower one (rlhf_core.runformat.timeline); "logging" too when the adaptive KL all-reduces the KL
COLLECTIVE_PHASES = ("advantages", "update", "optimizer")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the run closes as ``interrupted`` (the default handler would end
    the process with ``meta.json`` still saying ``running``)."""


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line, capped: the ``reason`` of a failed run in ``meta.json``."""
    text = " ".join(str(err).split())
    return (f"{type(err).__name__}: {text}" if text else type(err).__name__)[:500]


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    last_record: dict[str, Any] | None
    status: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(cfg: TrainConfig) -> int:
    """Set torch's CPU threads: ``--threads``, else 1 for the built-in tiny model (its matmuls are so small that a
    second thread only adds synchronisation, which turns into milliseconds per op on a busy machine)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif is_tiny(cfg.model):
        torch.set_num_threads(1)
    return torch.get_num_threads()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class PPORunner:
    """Builds everything a run needs from a TrainConfig, then :meth:`run` trains and writes the run dir."""

    ROLE = "runner"  # the process's role in the run's timeline
    WAIT_PHASES: tuple[str, ...] = ()  # its phases that are all waiting for other processes (timeline)
    announce = True  # console lines (the Ray engine's trainer actor leaves them to the driver)

    def __init__(self, cfg: TrainConfig, reward_fn: RewardFn | None = None):
        self.cfg = cfg
        if cfg.run_dir is None:  # parse_args gives it a default (runs/<date-time>); a TrainConfig made by hand may not
            raise RunnerError("the config names no run_dir")
        self.run_dir: str = cfg.run_dir
        self.device = resolve_device(cfg.device)
        self._threads_before = torch.get_num_threads()
        self.threads = configure_threads(cfg)
        self.info = dist_utils.init_distributed(self.device)
        self.clock = dist_utils.measure_clock_offset(self.info)  # every rank, before any rank-specific work
        if self.device.type == "cuda" and self.info.enabled:
            self.device = torch.device("cuda", self.info.local_rank)
        self.reward_fn = reward_fn or get_reward(cfg.reward)
        self.heldout_fn = get_reward(cfg.heldout_reward) if cfg.heldout_reward else None  # logged, not optimised
        self.prompts = dist_utils.shard(get_prompts(cfg.prompts), self.info)
        if not self.prompts:
            raise RunnerError(f"rank {self.info.rank} got no prompts: fewer prompts than processes")
        problem = step_memory_problem(cfg, self.device)  # before the models: an oversized batch fails in a line
        if problem:
            raise RunnerError(problem)
        self._build_models()
        self._check_context()
        # fused, over the one flat buffer: a single kernel for the whole model; no decay of biases and norms
        self.optimizer = self.params.adamw(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else ppo.FixedKLController(cfg.kl_coef))
        self.guard = WeightGuard(self.params.data, self.optimizer, keep=cfg.weight_guard == "restore")
        self._nonfinite_streak = 0  # consecutive optimizer steps undone by the weight guard
        self._restores = 0  # all optimizer steps it undid in this run (every session)
        self.start_step = 0
        if cfg.resume:
            self._resume()
        self.writer = RunWriter(
            self.run_dir, source="rlhf_core", config=cfg.to_dict(), rank=self.info.rank,
            world_size=self.info.world_size, device=str(self.device), tensorboard=not cfg.no_tensorboard,
            resume=bool(cfg.resume), overwrite=cfg.overwrite,
            extra_meta={"torch_threads": self.threads, "engine": cfg.engine},
            tb_purge_step=self.start_step + 1 if cfg.resume else None,
        )
        if cfg.resume:
            self._record_resume()
        self.live = LiveAlerts(self.writer)  # the rules read the KL budget and clip norm from the run's meta
        if cfg.resume and self.info.is_main:
            self._replay_history()
        collective = COLLECTIVE_PHASES + (("logging",) if cfg.adaptive_kl else ())
        self.timeline = TimelineRecorder(
            self.writer.run_dir, rank=self.info.rank, world_size=self._timeline_processes(), role=self.ROLE,
            clock=self.clock, collective=collective, waits=self.WAIT_PHASES, exchange_waits=self.info.enabled,
            group=dist_utils.host_group(self.info), source="rlhf_core")
        self.timer = PhaseTimer(self.device, timeline=self.timeline)

    def _timeline_processes(self) -> int:
        """How many processes write this run's timeline (the Ray engine: its actors)."""
        return self.info.world_size

    # ---------------------------------------------------------------- setup
    def _build_models(self) -> None:
        cfg = self.cfg
        path = resolve_model_path(cfg.model)
        try:
            self.tokenizer = load_tokenizer(path)
            torch.manual_seed(cfg.seed)
            model = load_causal_lm(path, cfg.dtype, self.device)
        except (OSError, ValueError) as err:
            raise RunnerError(f"cannot load model {cfg.model!r}: {str(err).splitlines()[0]}") from None
        ref_device = torch.device("cpu") if cfg.ref_device == "cpu" else self.device
        self.ref = make_reference(model, ref_device)
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name; the old one warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.policy = PolicyWithValue(model, cfg.logprob_impl, cfg.temperature)
        try:  # before DDP wraps the module: its hooks must see the final parameter storage
            self.params = FlatParams(self.policy, {f"model.{n}": p for n, p in self.ref.named_parameters()})
        except ValueError as err:
            raise RunnerError(f"cannot train {cfg.model!r}: {err}") from None
        self.trained: torch.nn.Module = self.policy
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.policy, device_ids=ids)

    def _check_context(self) -> None:
        """Refuse, in one line, prompts that cannot fit the model's context together with the response."""
        limit = getattr(self.policy.model.config, "max_position_embeddings", None)
        if limit is None:
            return
        longest = max(len(ids) for ids in self.tokenizer(self.prompts)["input_ids"])
        if longest + self.cfg.max_new_tokens > limit:
            raise RunnerError(f"the longest prompt has {longest} tokens; with --max_new_tokens "
                              f"{self.cfg.max_new_tokens} that exceeds the model's context of {limit} tokens")

    def _resume(self) -> None:
        """Clean up after the interrupted session, cut its files at the newest complete checkpoint and load it;
        with no complete checkpoint, start again from step 0 in the same run (nothing to load: the models were
        just built from the same seed, as a fresh run builds them)."""
        if self.info.is_main:
            for removed in clean_partial_writes(self.run_dir):
                print(f"resume: removed partial write {removed}", file=sys.stderr)
            step, path, dropped = prepare_resume(self.run_dir)
            if path is None:
                print("resume: no complete checkpoint; starting again from step 0", file=sys.stderr)
            for name, n in dropped.items():
                print(f"resume: dropped {n} record(s) after step {step} from {name}", file=sys.stderr)
            restores = self._count_weight_restores()
            kill_point("resume:cleaned")
        dist_utils.barrier(self.info)
        shared = dist_utils.broadcast_object(
            (step, None if path is None else str(path), restores) if self.info.is_main else None, self.info)
        assert shared is not None  # rank 0 sent it
        step, saved, self._restores = shared
        if saved is None:
            return
        path = Path(saved)
        try:
            state = load_checkpoint(path, map_location=self.device)
        except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike: the file is damaged
            raise RunnerError(f"checkpoint {path} is unreadable ({_one_line(err)}); remove that folder to "
                              "resume from the one before") from None
        if int(state["world_size"]) != self.info.world_size:
            raise RunnerError(f"checkpoint {path} was written by {state['world_size']} process(es); "
                              f"resume with the same number (now {self.info.world_size})")
        self.policy.load_state_dict(state["policy"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:  # e.g. a checkpoint from before the parameters were kept in one flat buffer
            raise RunnerError(f"checkpoint {path}: optimizer state does not fit this runner ({err})") from None
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.start_step = int(state["step"])

    def _record_resume(self) -> None:
        """``meta.json`` of a resumed run: the config now in force, and where this session took over from
        (the status and reason the run had; ``running`` there means its process died without closing it) and
        the settings ``--resume_override`` let change."""
        previous = self.writer.previous or {}
        reason = previous.get("reason")
        if previous.get("status") == "running":
            reason = "the previous process ended without closing the run (killed, or the machine went down)"
        saved = self.writer.meta.get("config")
        changed = computation_changes(saved, self.cfg) if isinstance(saved, dict) else {}
        entry = {"step": self.start_step, "time": time.time(), "previous_status": previous.get("status"),
                 "previous_reason": reason}
        if changed:
            entry["changed"] = {k: list(v) for k, v in changed.items()}
        self.writer.update_meta(config=self.cfg.to_dict(),
                                resumed_from=self.writer.meta.get("resumed_from", []) + [entry])

    def _replay_history(self) -> None:
        """Feed the kept records to the rules without writing their alerts again (events.jsonl has them)."""
        self.live.replay(Run(self.run_dir).metrics())

    # ---------------------------------------------------------------- one step
    def _samples(self, step: int) -> Samples:
        samples = generate_samples(self.cfg, self.policy.model, self.tokenizer, self.prompts, step, self.info.rank,
                                   self.device)
        self.cfg.debug_sleep(self.info.rank, step)
        return samples

    def _inputs(self, step: int) -> tuple[Samples, Scores, torch.Tensor]:
        """Generation, reward and reference log-probs of the step, each in its phase (the Ray engine runs them
        in its actors instead)."""
        timer = self.timer
        with timer.phase("rollout"):
            samples = self._samples(step)
        with timer.phase("reward"):
            scores = score_samples(self.cfg, samples, self.tokenizer, self.reward_fn, self.heldout_fn)
        with timer.phase("ref_logprobs"):
            ref_logp = reference_logp(self.cfg, self.ref, samples, self.device)
        return samples, scores, ref_logp

    def _any_nonfinite(self, value: float) -> bool:
        return dist_utils.any_nonfinite(value, self.info, self.device)

    def _experience(self, samples: Samples, scores: Scores, ref_logp: torch.Tensor) -> Experience:
        """Old-policy log-probs and values, KL-penalised rewards, GAE: the batch the update trains on."""
        cfg, timer, policy, roll, mask = self.cfg, self.timer, self.policy, samples.rollout, samples.mask
        with timer.phase("old_logprobs"), torch.no_grad():
            # CleanRL-style: the policy's log-probs and values at sampling time; the sampler kept the hidden
            # states, so only the head runs here (a fresh forward where it did not, or --old_logprobs recompute,
            # or when the sampler returned its own log-probs: the trainer's log-probs of the sampled tokens, to
            # set against the sampler's)
            hidden = roll.hidden if cfg.old_logprobs_from_rollout and roll.logprobs is None else None
            if hidden is None:
                hidden = response_hidden(policy.model, roll.input_ids, roll.attention_mask, roll.prompt_len)
            old_logp, entropy = score_tokens(policy.model, hidden, roll.response_ids, impl=cfg.logprob_impl,
                                             temperature=cfg.temperature, with_entropy=True)
            assert entropy is not None  # asked for

        with timer.phase("values"), torch.no_grad():
            old_values = policy.values_from_hidden(hidden) * mask
            del hidden

        with timer.phase("advantages"):
            kl_coef = self.kl_ctl.value
            reward_bad = self._any_nonfinite(sum(scores.rewards))
            rewards_t = torch.tensor(scores.rewards, dtype=torch.float32, device=self.device)
            token_rewards, kl_tok = ppo.kl_penalised_rewards(rewards_t, old_logp, ref_logp, mask, kl_coef)
            advantages, returns = ppo.gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv_mean = ppo.masked_mean(advantages, mask).item()
            adv_std = ppo.masked_var(advantages, mask).sqrt().item()
            advantages = ppo.masked_whiten(advantages, mask)
        return Experience(samples, scores, ref_logp, old_logp, entropy, old_values, kl_coef, kl_tok, advantages,
                          returns, adv_mean, adv_std, reward_finite=not reward_bad)

    def train_step(self, step: int) -> dict[str, Any]:
        """One PPO iteration; returns this rank's metrics (times included)."""
        cfg, timer = self.cfg, self.timer
        timer.start_step(step)
        samples, scores, ref_logp = self._inputs(step)
        exp = self._experience(samples, scores, ref_logp)
        if exp.reward_finite:
            stats = self._ppo_update(step, exp)
        else:
            with timer.phase("update"):
                stats = UpdateStats(skipped=cfg.ppo_epochs * (cfg.batch_size // cfg.effective_mini_batch_size))
                self.writer.event(step, "skip", severity="warning", rule="nonfinite",
                                  message=f"non-finite reward at step {step}: PPO update skipped",
                                  data={"reward_sum": sum(scores.rewards), "skipped_updates": stats.skipped})
        self._after_update(step)

        with timer.phase("logging"):
            record = self._step_metrics(step, exp, stats)
            self._log_samples(exp)
            seq_kl = (exp.kl_tok.sum(-1).mean().item())
            if cfg.adaptive_kl:  # every rank must move the coefficient by the same, global KL
                seq_kl = dist_utils.all_reduce_metrics({"kl": seq_kl}, self.info, self.device)["kl"]
            self.kl_ctl.update(seq_kl, cfg.batch_size * self.info.world_size)
            tokens = float(exp.mask.sum().item())
        record.update(self._step_times(timer.end_step()))
        record["throughput/tokens_per_s"] = tokens / max(record["time/step"], 1e-9)
        return record

    def _after_update(self, step: int) -> None:
        """After the update, before the record: where the Ray engine sends the new weights to its sampler."""

    def _step_times(self, times: dict[str, float]) -> dict[str, float]:
        """This process's phase times of the step (the Ray engine adds its actors')."""
        return times

    def _ppo_update(self, step: int, exp: Experience) -> UpdateStats:
        """``ppo_epochs`` passes over shuffled minibatches; returns their statistics and how many optimizer
        steps were skipped.

        All work, bookkeeping included, sits inside the ``update`` and ``optimizer`` phases, so the phase
        times add up to the step time.
        """
        cfg, timer, roll, mask = self.cfg, self.timer, exp.rollout, exp.mask
        shuffle = torch.Generator().manual_seed(step_seed(cfg.seed, "shuffle", step, self.info.rank))
        mb, stats = cfg.effective_mini_batch_size, UpdateStats()
        for epoch in range(cfg.ppo_epochs):
            for start in range(0, cfg.batch_size, mb):
                last = epoch == cfg.ppo_epochs - 1 and start + mb >= cfg.batch_size
                with timer.phase("update"):
                    if start == 0:
                        order = torch.randperm(cfg.batch_size, generator=shuffle).to(self.device)
                    idx = order[start: start + mb]
                    m = mask[idx]
                    out = self.trained(roll.input_ids[idx], roll.attention_mask[idx], roll.prompt_len,
                                       with_entropy=cfg.ent_coef > 0)
                    pl = ppo.policy_loss(out.logp, exp.old_logp[idx], exp.advantages[idx], m, cfg.cliprange)
                    vl, v_clipfrac = ppo.value_loss(out.values, exp.old_values[idx], exp.returns[idx], m,
                                                    cfg.cliprange_value)
                    ent_term = (-cfg.ent_coef * ppo.masked_mean(out.entropy, m) if cfg.ent_coef > 0
                                else pl.loss.new_zeros(()))
                    loss = pl.loss + cfg.vf_coef * vl + ent_term
                    loss_bad = self._any_nonfinite(loss.item())
                    if not loss_bad:
                        self.params.zero_grads()
                        loss.backward()
                with timer.phase("optimizer"):
                    # Per-block norms (the probe) once a step, on its last optimizer step, before clipping; their
                    # total is the clipping norm then. Other optimizer steps take it from the clipping, as any loop.
                    total, per_block = self.params.grad_norms() if last and not loss_bad else (None, {})
                    grad_norm = math.nan if loss_bad else self.params.clip_grads(cfg.max_grad_norm, total)
                    if loss_bad or self._any_nonfinite(grad_norm):
                        stats.skipped += 1
                        self.writer.event(step, "skip", severity="warning", rule="nonfinite",
                                          message=f"non-finite loss or gradient at step {step}: optimizer step skipped",
                                          data={"loss": loss.item(), "grad_norm": grad_norm})
                        continue
                    self.guard.save()
                    self.optimizer.step()
                    if self._any_nonfinite(0.0 if self.guard.finite() else math.nan):
                        stats.skipped += 1
                        self._undo_nonfinite_update(step, grad_norm)
                        continue
                    self._nonfinite_streak = 0
                    stats.add({
                        "loss/total": loss.item(), "loss/policy": pl.loss.item(), "loss/value": vl.item(),
                        "loss/entropy": float(ent_term.item()), "policy/approx_kl": pl.approx_kl.item(),
                        "policy/clipfrac": pl.clipfrac.item(), "policy/ratio_mean": pl.ratio_mean.item(),
                        "policy/ratio_min": pl.ratio_min.item(), "policy/ratio_max": pl.ratio_max.item(),
                        "value/clipfrac": v_clipfrac.item(), "grad/norm": grad_norm,
                        "grad/clipped": float(grad_norm > cfg.max_grad_norm)})
                    if per_block:
                        stats.layer_norms = per_block
        self.params.release_grads()
        return stats

    def _undo_nonfinite_update(self, step: int, grad_norm: float) -> None:
        """The weights went non-finite in an optimizer step: restore them and the optimizer state from before
        it, record the skip, and stop the run after ``MAX_NONFINITE_UPDATES`` such steps in a row
        (``--weight_guard check`` keeps no copy: the run stops at once)."""
        if not self.guard.keep:
            raise RunnerError(f"step {step}: the weights went non-finite in an optimizer step (learning rate "
                              f"{self.optimizer.param_groups[0]['lr']:g} too high?); --weight_guard check cannot "
                              "undo it: resume from the newest checkpoint")
        self.guard.restore()
        self._nonfinite_streak += 1
        self._restores += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.writer.event(step, "skip", severity="warning", rule="nonfinite",
                          message=f"non-finite weights after an optimizer step at step {step}: weights and "
                                  "optimizer state restored, optimizer step skipped",
                          data={"what": "weights", "lr": lr, "grad_norm": grad_norm,
                                "consecutive": self._nonfinite_streak})
        if self._nonfinite_streak >= MAX_NONFINITE_UPDATES:
            raise RunnerError(f"step {step}: the weights went non-finite in {self._nonfinite_streak} optimizer "
                              f"steps in a row (each undone; learning rate {lr:g} too high?); the last finite "
                              "weights are those of the newest checkpoint")

    def _log_samples(self, exp: Experience) -> None:
        """A bounded sample of this step's completions to ``samples.jsonl`` (rank 0): the text shows reward
        hacking and collapse before the scalars do. ``kl`` is the sequence's summed per-token KL penalty term."""
        if not self.info.is_main:
            return
        kl = exp.kl_tok.sum(-1).tolist()
        lengths = exp.mask.sum(-1).long().tolist()
        self.writer.log_samples(exp.samples.step, [
            {"prompt": p, "completion": t, "reward": r, "kl": k, "length": n}
            for p, t, r, k, n in zip(exp.samples.prompts, exp.scores.texts, exp.scores.rewards, kl, lengths)])

    def _step_metrics(self, step: int, exp: Experience, stats: UpdateStats) -> dict[str, Any]:
        """The step's record: the update's statistics, reduced as each key declares, and the batch's probes."""
        cfg, mask = self.cfg, exp.mask
        record: dict[str, Any] = {"epoch": (step - 1) // cfg.steps_per_epoch + 1}
        record.update(stats.reduced())
        record.update(layer_metrics("grad", stats.layer_norms))  # the step's last update
        record.update(exp.scores.reward_stats())
        record.update(kl_estimates(exp.old_logp, exp.ref_logp, mask))
        record["kl/coef"] = exp.kl_coef
        record["policy/entropy"] = ppo.masked_mean(exp.entropy, mask).item()
        record["value/explained_var"] = ppo.explained_variance(exp.old_values, exp.returns, mask)
        record["value/mean"] = ppo.masked_mean(exp.old_values, mask).item()
        record["adv/mean"], record["adv/std"] = exp.adv_mean, exp.adv_std
        record["grad/max_norm"] = cfg.max_grad_norm
        drift, per_block = self.params.drift()
        record["drift/rel"] = drift
        record.update(layer_metrics("drift", per_block))
        record["response/length_mean"] = mask.sum(-1).mean().item()
        record["response/eos_rate"] = exp.rollout.eos.float().mean().item()
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["skipped"] = stats.skipped
        if self.info.enabled:
            record["src/param_checksum"] = dist_utils.param_checksum(self.policy)
        record.update(exp.scores.side)
        if exp.rollout.logprobs is not None:  # the sampler's log-probs vs the trainer's (rollout/*)
            record.update(rollout_mismatch(exp.old_logp, exp.rollout.logprobs, mask))
        return record

    # ---------------------------------------------------------------- the loop
    def _log(self, step: int, record: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Write this rank's record (rank 0 also the run-level one).

        Returns (the run-level record as written, on rank 0 only; the run-level values for the console).
        """
        written = self.writer.log(step, record)
        if not self.info.enabled:
            return written, record
        reduced = dist_utils.all_reduce_metrics(record, self.info, self.device)
        per_rank = dist_utils.all_gather_object(written, self.info)
        if not self.info.is_main:
            return None, reduced
        run_record = self.writer.log_reduced(step, reduced)
        for alert in self.live.update_ranks(step, dict(enumerate(per_rank))):
            self._announce(alert)
        return run_record, reduced

    def _announce(self, alert) -> None:
        """One console line per warning or critical alert (every alert, info too, is already an event)."""
        if not is_alerting(alert.severity):
            return
        self._print(f"{alert.severity.upper()} [{alert.rule}] step {alert.step}: {alert.message} "
                    f"(suggestion: {alert.suggestion})")

    def _print(self, line: str) -> None:
        """One console line. Around the progress bar (stderr) only when both share a terminal: clearing and
        redrawing the bar for every line costs ~0.2 ms a step, and in a log file it only adds noise."""
        if not self.info.is_main or not self.announce:
            return
        if _isatty(sys.stdout) and _isatty(sys.stderr):
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    def _checkpoint(self, step: int) -> None:
        if self.info.is_main:
            state = {
                "policy": own_storage(self.policy.state_dict()), "optimizer": self.optimizer.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "torch_rng": torch.get_rng_state(),
                "step": step, "world_size": self.info.world_size,
            }
            save_checkpoint(self.run_dir, step, state, {"epoch": (step - 1) // self.cfg.steps_per_epoch + 1,
                                                           "world_size": self.info.world_size})
        dist_utils.barrier(self.info)

    def _export_model(self) -> None:
        """``--save_model``: the trained policy as a ``save_pretrained`` folder, ``<run_dir>/model``, with its
        tokenizer, for the user's next stage (``state.pt`` only resumes this runner); the value head beside it in
        ``value_head.pt`` (``{"weight", "bias"}`` of a ``Linear(hidden, 1)``)."""
        if self.info.is_main:
            out = Path(self.run_dir) / "model"
            # own storage: the parameters are views of one flat buffer, which safetensors refuses to save
            self.policy.model.save_pretrained(out, state_dict=own_storage(self.policy.model.state_dict()))
            self.tokenizer.save_pretrained(out)
            torch.save(own_storage(self.policy.v_head.state_dict()), out / "value_head.pt")
        dist_utils.barrier(self.info)

    def _trace_session(self):
        cfg = self.cfg
        if not cfg.profile:
            return nullcontext()
        return tracing.TraceSession(self.writer.traces_dir, wait=cfg.profile_wait, warmup=cfg.profile_warmup,
                            active=cfg.profile_active, repeat=cfg.profile_repeat, device=self.device,
                            rank=self.info.rank, step_offset=self.start_step + 1, with_stack=cfg.profile_full,
                            memory_timeline=cfg.profile_full, writer=self.writer)

    def run(self) -> RunResult:
        from tqdm import tqdm

        cfg = self.cfg
        total = cfg.total_steps
        sampler = None
        status, reason, last, step = "failed", None, None, self.start_step
        old_term = self._catch_sigterm()
        try:
            if cfg.sample_interval > 0:
                sampler = SystemSampler(self.writer, cfg.sample_interval)
                sampler.start()
            with ExitStack() as stack:
                tracer = stack.enter_context(self._trace_session())
                bar = stack.enter_context(tqdm(total=total, initial=self.start_step, desc="PPO", unit="step",
                                               disable=not (self.info.is_main and self.announce), file=sys.stderr,
                                               leave=False))
                for step in range(self.start_step + 1, total + 1):
                    record = self.train_step(step)
                    run_record, shown = self._log(step, record)
                    if run_record is not None:
                        for alert in self.live.update([run_record]):
                            self._announce(alert)
                        last = run_record
                    epoch, i = divmod(step - 1, cfg.steps_per_epoch)
                    self._print(f"Epoch {epoch + 1}, Step {i}: Loss={shown.get('loss/total', math.nan):.4f} "
                                f"Reward={shown['reward/mean']:.4f} KL={shown['kl/ref_k3']:.4f}")
                    if tracer is not None:
                        tracer.step()
                    if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                        self._checkpoint(step)
                    bar.update(1)
            if self._restores:
                raise RunnerError(f"the weights went non-finite in {self._restores} optimizer step(s), each undone "
                                  "and skipped (events.jsonl); the run is not marked finished")
            if cfg.save_model:
                self._export_model()
            status = "finished"
        except KeyboardInterrupt as err:
            status, reason = "interrupted", "SIGTERM" if isinstance(err, Terminated) else "KeyboardInterrupt"
            raise
        except BaseException as err:
            reason = _one_line(err)
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            if sampler is not None:
                sampler.stop()
            self._finish(status, reason)
        return RunResult(Path(self.run_dir), step, last, status)

    @staticmethod
    def _catch_sigterm() -> Any:
        """Turn SIGTERM into :class:`Terminated` for the run (main thread only); returns the old handler."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            raise Terminated()

        return signal.signal(signal.SIGTERM, handler)

    def _count_weight_restores(self) -> int:
        """Optimizer steps the weight guard undid in the sessions before this one (rank 0, from
        ``events.jsonl`` already cut at the resumed checkpoint)."""
        path = Path(self.run_dir) / "events.jsonl"
        if not path.is_file():
            return 0
        n = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            data = rec.get("data") if isinstance(rec, dict) else None
            n += isinstance(data, dict) and rec.get("kind") == "skip" and data.get("what") == "weights"
        return n

    def _finish(self, status: str, reason: str | None = None) -> None:
        """End of a run: close the writer with its status and print where everything is (rank 0).

        The memory report (``memory.json``) hooks in here, before the writer closes.
        """
        if self.info.is_main:
            try:
                write_run_memory(self.writer.run_dir, self.cfg.to_dict(), self.policy.model.config)
            except Exception as err:  # noqa: BLE001 - a failed report must not fail the run
                print(f"memory.json not written: {type(err).__name__}: {err}", file=sys.stderr)
        try:
            self.timer.close()
        except OSError as err:  # a full disk: the timeline's last lines are lost, the status must still go out
            print(f"timeline not flushed: {err}", file=sys.stderr)
        try:
            self.writer.close(status, reason)
        except OSError as err:  # not even an in-place rewrite of meta.json fit: say so, keep the run's own error
            print(f"meta.json not updated to {status!r}: {err}", file=sys.stderr)
        torch.set_num_threads(self._threads_before)
        if self.info.is_main and self.announce:
            print_summary(Path(self.run_dir), status, self.cfg)
        if self.info.enabled:
            # DDP's reducer keeps the gloo process group and its last async work (with tensors) alive; freed at
            # interpreter teardown they abort the process ("terminate called without an active exception").
            self.trained = self.policy
            gc.collect()
            if status == "finished":
                dist_utils.barrier(self.info)
        dist_utils.shutdown()


def print_summary(run: Path, status: str, cfg: TrainConfig) -> None:
    """Where everything of a finished (or stopped) run is: the console's last lines."""
    ckpts = [path for _, path in list_checkpoints(run)]
    print(f"\nRun {status}: {run}")
    print(f"  metrics:     {run / 'metrics.jsonl'}")
    events = run / "events.jsonl"
    n_events = sum(1 for _ in events.open()) if events.exists() else 0
    print(f"  events:      {events} ({n_events} event(s))" if n_events else "  events:      (none)")
    print(f"  tensorboard: {run / 'tb' if not cfg.no_tensorboard else '(off)'}")
    print(f"  checkpoints: {', '.join(str(p) for p in ckpts) or '(none)'}")
    if cfg.save_model and status == "finished":
        print(f"  model:       {run / 'model'} (save_pretrained)")


def train(cfg: TrainConfig, reward_fn: RewardFn | None = None) -> RunResult:
    """Train with ``cfg`` (and optionally any Python callable as the reward); returns where the run went.
    ``--engine ray`` runs the same step in Ray actors (:mod:`rlhf_core.train.ray_engine`, imported only then)."""
    if cfg.engine == "ray":
        from rlhf_core.train.ray_engine import train_ray  # lazy: ray is an optional extra

        return train_ray(cfg, reward_fn)
    return PPORunner(cfg, reward_fn).run()
