"""TRL / transformers adapter: one callback writes a kit run directory from any ``transformers.Trainer``.

    trainer = GRPOTrainer(..., callbacks=[RLHFKitCallback("runs/grpo")])   # or
    profile_trainer(trainer, run_dir="runs/grpo")

Works with TRL's GRPO, RLOO, DPO, Reward and SFT trainers and a plain ``Trainer``. It only reads: the
trainer's logs (mapped to canonical keys, the rest kept as ``src/<name>``), gradients before clipping,
weights (drift against the starting point; PEFT models: the trainable parameters), TRL's ``ProfilingContext``
timings and the callback hooks' clocks. Training is unchanged; the one setting it touches,
``logging_nan_inf_filter``, only decides whether TRL's *logged* loss hides NaN. Under several processes each
rank writes ``metrics.rank<k>.jsonl`` and rank 0 alone writes meta, events and the system file.

``tensorboard`` (the kit's own ``tb/`` copy of the scalars) is off by default here: the writer flushes it on
every step, which measured ~25 ms/step on the CPU (most of the adapter's cost), and TRL already writes
TensorBoard itself with ``report_to=["tensorboard"]``.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from memory.planner import human
from profiler.phases import PhaseTimer
from profiler.timeline import TimelineRecorder
from rlhf_core.runformat.keys import CumulativeRate, sanitize, to_number
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.runformat.samples import SAMPLE_CHARS, SAMPLES_PER_STEP, text_of, text_stats
from rlhf_core.stability.analysis import LiveAlerts
from rlhf_core.train.probes import block_drift, block_grad_norms, layer_metrics, param_snapshot

from . import trl_memory, trl_profiling
from .extras import Extras, TraceSpec, trace_schedule
from .generic import _clock_of
from .mapping import TRL_SUMMARY_MARKERS, map_trl

log = logging.getLogger(__name__)


def _find_trainer(max_depth: int = 8):
    """The ``Trainer`` whose callback handler is calling us (callbacks are not given the trainer)."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
    finally:
        del frame
    return None


def producer_of(trainer: Any) -> str:
    """``meta.source`` for a trainer: ``trl`` for TRL's trainers (and subclasses of them), ``transformers`` for a
    plain ``transformers.Trainer``, whose settings and logs are not TRL's (the report names each one's knobs)."""
    if trainer is None:
        return "transformers"
    return "trl" if any(c.__module__.split(".")[0] == "trl" for c in type(trainer).__mro__) else "transformers"


def _peft_config(model) -> Any:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    return {name: (c.to_dict() if hasattr(c, "to_dict") else str(c)) for name, c in dict(cfg).items()}


def _unpatch(patched: tuple[Any, Any] | None, name: str) -> None:
    """Remove the instance attribute ``name`` we set on ``patched[0]``, if it is still our ``patched[1]`` (someone
    who patched it after us keeps theirs); the class's own method shows through again."""
    if patched is not None and patched[0].__dict__.get(name) is patched[1]:
        delattr(patched[0], name)


class RLHFKitCallback(TrainerCallback):
    """Writes a run directory (``source``: ``trl``, or ``transformers`` for a plain ``Trainer``) while a
    ``transformers.Trainer`` trains."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        trainer=None,
        run_id: str | None = None,
        overwrite: bool = False,
        resume: bool = False,
        probe_every: int = 1,
        grad_norms: bool = True,
        drift: bool = True,
        system_interval_s: float | None = 1.0,
        trace_steps: int | TraceSpec | None = None,
        trace_options: Mapping[str, Any] | None = None,
        alerts: bool = True,
        diagnoser_config: Mapping[str, Any] | None = None,
        kl_budget: float | None = None,
        show_nan: bool = True,
        tensorboard: bool = False,
        samples_per_step: int = SAMPLES_PER_STEP,
        sample_chars: int = SAMPLE_CHARS,
        memory: bool = True,
        device_memory: int | str | None = None,
        memory_prompt_len: int | None = None,
    ):
        if probe_every < 1:
            raise ValueError("probe_every must be >= 1")
        self.run_dir = Path(run_dir)
        self.trainer = trainer
        self.run_id, self.overwrite, self.resume = run_id, overwrite, resume
        self.probe_every, self.grad_norms, self.drift = probe_every, grad_norms, drift
        self.system_interval_s = system_interval_s
        self.trace = trace_schedule(trace_steps) if trace_steps is not None else None
        self.trace_options = dict(trace_options or {})
        self.alerts, self.diagnoser_config, self.kl_budget = alerts, diagnoser_config, kl_budget
        self.show_nan, self.tensorboard = show_nan, tensorboard
        self.samples_per_step, self.sample_chars = samples_per_step, sample_chars
        self.memory, self.device_memory, self.memory_prompt_len = memory, device_memory, memory_prompt_len
        self.writer: RunWriter | None = None
        self._model: Any = None  # the trainer's model: a transformers or peft module
        self._reset_state()

    def _reset_state(self) -> None:
        self._start_params: dict | None = None
        self._timer: PhaseTimer | None = None
        self._spans: list[trl_profiling.Span] = []
        self._optim_phase: contextlib.ExitStack | None = None
        self._t_begin: float | None = None
        self._t_pre: float | None = None
        self._grad_stash: tuple[float, dict[str, float]] | None = None
        self._grad_post_clip = False
        self._due = True
        self._pending: dict[str, Any] | None = None
        self._pending_step: int | None = None
        self._extras: Extras | None = None
        self._live: LiveAlerts | None = None
        self._clip_patched: tuple[Any, Any] | None = None
        self._samples_seen: tuple | None = None
        self._last_completions: list[Any] = []
        self._pairs: dict[str, Any] | None = None
        self._pairs_patched: tuple[Any, Any] | None = None
        self._tokens = CumulativeRate()
        self._mem_report: dict[str, Any] | None = None
        self._mem_peaks: trl_memory.PhasePeaks | None = None

    # ------------------------------------------------------------------ setup and teardown
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainer = self.trainer or _find_trainer()
        self._model = model if model is not None else getattr(self.trainer, "model", None)
        rank, world = int(args.process_index), int(args.world_size)
        if args.logging_nan_inf_filter:
            if self.show_nan:
                args.logging_nan_inf_filter = False
                if rank == 0:
                    log.warning("rlhfkit: set logging_nan_inf_filter=False so NaN/Inf losses are logged, not hidden "
                                "(training itself is unchanged)")
            elif rank == 0:
                log.warning("rlhfkit: logging_nan_inf_filter=True hides NaN/Inf losses from the logs")
        config = {
            "trainer": type(self.trainer).__name__ if self.trainer is not None else None,
            "args_class": type(args).__name__,
            "args": args.to_dict(),
            "model": getattr(getattr(self._model, "config", None), "_name_or_path", None),
            "peft": _peft_config(self._model),
        }
        from accelerate import PartialState

        with PartialState().main_process_first():  # rank 0 creates (or clears) the folder before others write
            self.writer = RunWriter(
                self.run_dir, source=producer_of(self.trainer), config=config, run_id=self.run_id, rank=rank,
                world_size=world, device=str(args.device), tensorboard=self.tensorboard, resume=self.resume,
                overwrite=self.overwrite,
                extra_meta={"adapter": {"name": "adapters.trl", "probe_every": self.probe_every,
                                        "trace": self.trace}},
            )
            self.writer.samples_per_step, self.writer.sample_chars = self.samples_per_step, self.sample_chars

        clock, group = _clock_of(rank, world)
        self._timer = PhaseTimer(args.device, timeline=TimelineRecorder(
            self.writer.run_dir, rank=rank, world_size=world, role="trainer", clock=clock, group=group,
            collective=("update",) if world > 1 else (), source="trl"))  # DDP all-reduces in the backward
        if self.drift and self._model is not None:
            self._start_params = param_snapshot(self._model, trainable_only=True)
        trl_profiling.add_listener(self._on_span)
        if self.grad_norms:
            self._patch_clip()
        if self.writer.is_main:
            self._patch_pairs()
        if self.alerts and self.writer.is_main:
            overrides = dict(self.diagnoser_config or {})
            if self.kl_budget is not None:
                overrides["kl_budget"] = self.kl_budget
            self._live = LiveAlerts(self.writer, overrides, rank=rank if world > 1 else None)
        # TRL's num_tokens counts from 0 in a fresh run; a resumed one starts from a count we have not seen
        self._tokens = CumulativeRate(start=0.0 if int(state.global_step) == 0 else None)
        self._extras = Extras(self.writer, interval_s=self.system_interval_s, schedule=self.trace,
                              device=str(args.device), step_offset=int(state.global_step) + 1,
                              trace_options=self.trace_options)
        if self.memory:
            self._predict_memory(args)

    def _predict_memory(self, args) -> None:
        """Predicted per-GPU memory to ``memory.json`` and one warning when it exceeds the device (rank 0);
        on CUDA, per-phase peaks are recorded for the end of training. Any failure is one warning line."""
        device = str(args.device)
        try:
            name = type(self.trainer).__name__ if self.trainer is not None else type(args).__name__
            report = trl_memory.predict_trainer(args, self._model, name, device, self.device_memory,
                                                self.memory_prompt_len)
        except Exception as err:  # noqa: BLE001 - a prediction must never stop training
            if self.writer is not None and self.writer.is_main:
                log.warning("rlhfkit: memory prediction skipped (%s: %s)", type(err).__name__, str(err)[:200])
            return
        self._mem_report = report
        if device.startswith("cuda"):
            self._mem_peaks = trl_memory.PhasePeaks.cuda(device)
        if self.writer is None or not self.writer.is_main:
            return
        self.writer.write_memory(report)
        if not report["fits_device"]:

            log.warning("rlhfkit: predicted peak %s per GPU (%s) exceeds the device's %s (%s); see %s",
                        human(report["prediction"]["peak_bytes"]), report["prediction"]["peak_phase"],
                        human(report["device_memory_bytes"]), report["device_memory_source"],
                        self.writer.memory_path)

    def _phase_peak(self, phase: str) -> None:
        """CUDA: this phase's peak since the previous mark (the spans marked so far attributed first)."""
        if self._mem_peaks is not None:
            self._mem_peaks.fold()
            self._mem_peaks.add(phase, self._mem_peaks.mark())

    def _patch_clip(self) -> None:
        """Per-block norms before clipping: wrap the trainer's ``accelerator.clip_grad_norm_`` (read-only)."""
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None or self._model is None:
            return
        original = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            if self._due and self._grad_stash is None:
                self._grad_stash = block_grad_norms(self._model)
            return original(parameters, max_norm, *args, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_
        self._clip_patched = (accelerator, clip_grad_norm_)

    def _unpatch_clip(self) -> None:
        _unpatch(self._clip_patched, "clip_grad_norm_")
        self._clip_patched = None

    def on_train_end(self, args, state, control, **kwargs):
        self.finish("finished")

    def finish(self, status: str = "finished") -> None:
        """Flush the last step, stop the sampler and tracer, record the final status (idempotent)."""
        if self.writer is None:
            return
        try:
            self._flush()
            if self._mem_report is not None and self._mem_peaks is not None:
                self.writer.write_memory(trl_memory.with_measured(self._mem_report, self._mem_peaks))
        finally:
            trl_profiling.remove_listener(self._on_span)
            self._unpatch_clip()
            self._unpatch_pairs()
            if self._optim_phase is not None:
                self._optim_phase.close()
            if self._extras is not None:
                self._extras.close()
            if self._timer is not None:
                self._timer.close()
            self.writer.close(status)
            self.writer = None
            self._reset_state()

    # ------------------------------------------------------------------ per step
    def _on_span(self, name: str, start: float, end: float) -> None:
        if self._t_begin is not None:
            self._spans.append(trl_profiling.Span(name, start, end))
            if self._mem_peaks is not None:
                self._mem_peaks.span_ended(self._spans[-1])

    def _step_timer(self) -> PhaseTimer:
        """The phase timer; ``on_train_begin`` makes it before any step hook runs."""
        if self._timer is None:
            raise RuntimeError("a training step began before on_train_begin set up the run")
        return self._timer

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()
        self._spans = []
        self._grad_stash = None
        self._grad_post_clip = False
        self._due = (state.global_step + 1) % self.probe_every == 0
        self._step_timer().start_step(int(state.global_step) + 1)
        if self._mem_peaks is not None:
            self._mem_peaks.mark()
        self._t_begin = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._t_pre = time.perf_counter()
        self._phase_peak("update")
        if self.grad_norms and self._grad_stash is None and self._model is not None and self._due:
            self._grad_stash = block_grad_norms(self._model)  # no clip hook reached: these are post-clip
            self._grad_post_clip = args.max_grad_norm > 0
        self._optim_phase = contextlib.ExitStack()
        self._optim_phase.enter_context(self._step_timer().phase("optimizer"))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._optim_phase is not None:
            self._optim_phase.close()
            self._optim_phase = None
        self._phase_peak("optimizer")

    def _timeline_spans(self) -> None:
        """TRL's own phase spans (outermost ones; a log-prob pass inside ``compute_loss`` is part of the update)
        and the update (after the last input preparation, up to the optimizer step) as timeline intervals."""
        kept: list[trl_profiling.Span] = []
        losses = [s for s in self._spans if s.short == "compute_loss"]
        prepared = self._t_begin
        if prepared is None:  # on_step_end returns before this when no step began
            return
        timer = self._step_timer()
        for span in sorted(self._spans, key=lambda s: (s.start, -s.end)):
            if span.short == "_prepare_inputs":
                prepared = max(prepared, span.end)
                continue
            phase = trl_profiling.trl_profile_phase(span.name)
            if phase is None or any(span.inside(k) for k in kept) or any(span.inside(k) for k in losses):
                continue
            kept.append(span)
            timer.add_span(phase, span.start, span.end)
        if self._t_pre is not None and self._t_pre > prepared:
            timer.add_span("update", prepared, self._t_pre)

    def on_step_end(self, args, state, control, **kwargs):
        if self._t_begin is None:
            return
        self._timeline_spans()
        record = self._step_timer().end_step(int(state.global_step))
        phases, prepare, raw = trl_profiling.phase_times(self._spans)
        if self._t_pre is not None:
            record["time/update"] = max(0.0, self._t_pre - self._t_begin - prepare)
        record.update({f"time/{k}": v for k, v in phases.items()})
        record.update({f"src/profiling/{k}": v for k, v in raw.items()})
        if self._grad_stash is not None:
            total, per_block = self._grad_stash
            record["grad/norm"] = total
            record.update(layer_metrics("grad", per_block))
            if args.max_grad_norm > 0:
                record["grad/max_norm"] = float(args.max_grad_norm)
                if not self._grad_post_clip:
                    record["grad/clipped"] = float(total > args.max_grad_norm)
            if self._grad_post_clip:
                record["src/grad_layer_post_clip"] = 1.0
        if self._start_params is not None and self._due:
            rel, per_block = block_drift(self._model, self._start_params)
            record["drift/rel"] = rel
            record.update(layer_metrics("drift", per_block))
        self._tokens.add_time(float(record.get("time/step", 0.0)))
        if self._extras is not None:  # made by on_train_begin
            self._extras.step()
        self._pending, self._pending_step = record, int(state.global_step)
        self._t_begin = self._t_pre = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is None or not logs:
            return
        if TRL_SUMMARY_MARKERS & set(logs):
            clean, nonfinite = sanitize(logs)
            self.writer.update_meta(trl_summary=dict(clean, nonfinite=nonfinite) if nonfinite else clean)
            return
        mapped = map_trl(logs, trainer=type(self.trainer).__name__ if self.trainer is not None else None)
        self._throughput(logs, mapped)
        if not any(k.startswith("eval_") for k in logs):
            for key, value in self._log_samples(int(state.global_step)).items():
                mapped.setdefault(key, value)  # a reward function's own log_metric of the key wins
        if self._pending is not None and self._pending_step == state.global_step:
            # TRL's pre-clip norm is the same number as ours; keep TRL's when both exist
            self._pending.update(mapped)
            # write now (live), unless an evaluation of this step is about to log into the same record
            if not control.should_evaluate or any(k.startswith("eval_") for k in logs):
                self._flush()
        else:
            self._write(int(state.global_step), mapped)

    def _throughput(self, logs: Mapping[str, Any], mapped: dict[str, Any]) -> None:
        """``throughput/tokens_per_s`` from TRL's cumulative ``num_tokens`` (GRPO/RLOO: prompt + completion
        tokens of all processes; DPO/SFT: attention-mask tokens), or a plain ``Trainer``'s
        ``num_input_tokens_seen`` (``include_num_input_tokens_seen``), over the step time since it last grew,
        so the report, dashboard and rules see one throughput key whatever the producer."""
        count = to_number(logs.get("num_tokens", logs.get("num_input_tokens_seen")))
        if count is None or "throughput/tokens_per_s" in mapped:
            return
        rate = self._tokens.update(count)
        if rate is not None:
            mapped["throughput/tokens_per_s"] = rate

    def _log_samples(self, step: int) -> dict[str, float]:
        """A bounded sample of this step's text to ``samples.jsonl``: GRPO/RLOO's completions, or DPO's pairs.
        Returns the canonical ``text/*`` signals of a new generation batch (all its completions, not only the
        sample kept), so the collapse rules see the same keys as on a runner run; {} for DPO pairs (data, not
        generations) or when nothing new was generated."""
        if self.writer is None:
            return {}
        generated = self._generation_samples()
        samples = generated or self._pair_samples()
        if samples:
            self.writer.log_samples(step, samples)
        if not generated:
            return {}
        return text_stats([text_of(c) for c in self._last_completions])

    def _generation_samples(self) -> list[dict[str, Any]]:
        """GRPO/RLOO keep the latest generation batch's prompts, completions and per-function rewards in
        ``trainer._logs`` (what their ``log_completions`` prints); taken once per generation batch."""
        logs = getattr(self.trainer, "_logs", None)
        if not isinstance(logs, Mapping) or not logs.get("completion"):
            return []
        prompts, completions = list(logs.get("prompt", [])), list(logs["completion"])
        seen = (len(completions), str(completions[0])[:200], str(completions[-1])[:200])
        if seen == self._samples_seen:
            return []  # no new generation since the last log
        self._samples_seen = seen
        self._last_completions = completions
        components = {str(name): list(values) for name, values in (logs.get("rewards") or {}).items()}
        names = list(components)
        weights: Any = getattr(self.trainer, "reward_weights", None)
        weights = [float(w) for w in weights.tolist()] if hasattr(weights, "tolist") and len(weights) == len(names) \
            else [1.0] * len(names)
        advantages = list(logs.get("advantages", []))
        tokenizer = getattr(self.trainer, "processing_class", None)
        samples = []
        for i, completion in enumerate(completions):
            parts = {n: components[n][i] for n in names if i < len(components[n])}
            finite = [(weights[j], parts[n]) for j, n in enumerate(names) if isinstance(parts.get(n), (int, float))]
            sample: dict[str, Any] = {"prompt": prompts[i] if i < len(prompts) else "", "completion": completion,
                                      "reward": sum(w * v for w, v in finite) if finite else None, "rewards": parts,
                                      "length": _token_length(tokenizer, completion)}
            if i < len(advantages):
                sample["advantage"] = advantages[i]
            samples.append(sample)
        return samples

    def _patch_pairs(self) -> None:
        """DPO: keep the token ids of the first pairs of each training batch (``compute_loss`` sees them; the
        callback does not), decoded into prompt/chosen/rejected samples when the step is logged."""
        trainer = self.trainer
        if trainer is None or self.samples_per_step <= 0 or not hasattr(trainer, "compute_loss") \
                or "DPO" not in type(trainer).__name__:
            return
        original = trainer.compute_loss
        keep = self.samples_per_step

        def compute_loss(model, inputs, *args, **kwargs):
            if getattr(model, "training", False) and isinstance(inputs, Mapping) and "completion_mask" in inputs:
                ids = inputs["input_ids"]
                half = ids.shape[0] // 2  # the batch is [chosen..., rejected...]
                rows = list(range(min(keep, half))) + list(range(half, half + min(keep, half)))
                self._pairs = {k: inputs[k].detach()[rows].cpu() for k in ("input_ids", "completion_mask",
                                                                           "attention_mask") if k in inputs}
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        self._pairs_patched = (trainer, compute_loss)

    def _unpatch_pairs(self) -> None:
        _unpatch(self._pairs_patched, "compute_loss")
        self._pairs_patched = None

    def _pair_samples(self) -> list[dict[str, Any]]:
        """The pairs kept by :meth:`_patch_pairs` as samples (``chosen``/``rejected`` text, lengths in tokens)."""
        pairs, self._pairs = self._pairs, None
        tokenizer = getattr(self.trainer, "processing_class", None)
        decode = getattr(tokenizer, "decode", None) or getattr(getattr(tokenizer, "tokenizer", None), "decode", None)
        if not pairs or not callable(decode):
            return []
        ids, completion = pairs["input_ids"], pairs["completion_mask"].bool()
        attention = pairs.get("attention_mask")
        attention = attention.bool() if attention is not None else ids.new_ones(ids.shape, dtype=bool)
        n = ids.shape[0] // 2
        samples = []
        for i in range(n):
            chosen, rejected = ids[i][completion[i]], ids[n + i][completion[n + i]]
            prompt = ids[i][attention[i] & ~completion[i]]
            samples.append({"prompt": decode(prompt.tolist(), skip_special_tokens=True),
                            "chosen": decode(chosen.tolist(), skip_special_tokens=True),
                            "rejected": decode(rejected.tolist(), skip_special_tokens=True),
                            "length": int(chosen.numel()), "rejected_length": int(rejected.numel())})
        return samples

    def _flush(self) -> None:
        if self._pending is not None and self._pending_step is not None and self.writer is not None:
            self._write(self._pending_step, self._pending)
        self._pending, self._pending_step = None, None

    def _write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.writer is None:  # both callers check; kept for the type checker
            return
        record = self.writer.log(step, metrics)
        if self._live is not None:
            self._live.update([record])


def _token_length(tokenizer: Any, completion: Any) -> int:
    """Tokens of a completion (its words when there is no text tokenizer)."""
    text = text_of(completion)
    encode = getattr(tokenizer, "encode", None) or getattr(getattr(tokenizer, "tokenizer", None), "encode", None)
    if callable(encode):
        try:
            return len(encode(text, add_special_tokens=False))
        except (TypeError, ValueError):
            pass
    return len(text.split())


def profile_trainer(trainer, run_dir: str | os.PathLike, **options: Any) -> RLHFKitCallback:
    """The one-line change: ``profile_trainer(trainer, run_dir="runs/x")`` before ``trainer.train()``."""
    callback = RLHFKitCallback(run_dir, trainer=trainer, **options)
    trainer.add_callback(callback)
    original_train = trainer.train

    def train(*args: Any, **kwargs: Any):
        try:
            return original_train(*args, **kwargs)
        except KeyboardInterrupt:
            callback.finish("interrupted")
            raise
        except BaseException:
            callback.finish("failed")
            raise

    trainer.train = train  # only records a crash as status "failed"; the training call is the original
    return callback
