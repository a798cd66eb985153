"""Runner vs TRL's GRPOTrainer: completion tokens per second doing the same work on this CPU, in one run.

Both sides: the same tiny GPT-2 folder (``from_pretrained``), the built-in prompts, the sentiment reward,
8 completions per optimizer step, 16 sampled tokens per completion, one optimisation pass per batch, a KL
term against a frozen reference (PPO ``kl_coef`` / GRPO ``beta`` = 0.04), AdamW at a constant 1e-5, fp32,
and 1 torch thread each (the tiny model's ops are too small to gain from a second thread, and one thread
keeps the comparison stable on a shared CPU). TRL is forced to sample exactly 16 tokens
(``min_new_tokens``); the runner stops only at EOS, so tokens are counted from each side's own records
(``response/length_mean``, ``completions/mean_length``).

Throughput = completion tokens of the timed steps / wall time between the end of the last warm-up step and
the end of the last step (so start-up, model loading and warm-up are excluded, and everything a training
step costs inside the loop, logging included, is counted). The same steps are also measured in process CPU
time, which other jobs on a shared CPU barely disturb. Each side runs in its own process; the repeats
alternate runner, TRL, runner, TRL… so both see the same machine load, and ratios are taken pairwise.

``python benchmarks/bench_vs_trl.py`` (``--worker runner|trl OUT.json`` is the internal one-run mode).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMPLETIONS_PER_STEP = 8
NUM_GENERATIONS = 2          # GRPO needs >= 2 completions per prompt: 4 prompts x 2 completions
NEW_TOKENS = 16
STEPS = 40
WARMUP_STEPS = 2
REPEATS = 10
THREADS = 1
KL_COEF = 0.04
LEARNING_RATE = 1e-5
SEED = 0
TARGET_RATIO = 3.0


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))


def _throughput(clock: list[list[float]], step_tokens: list[float]) -> dict[str, float]:
    """Tokens per wall second and per CPU second over the steps after the warm-up ones.

    ``clock`` holds (perf_counter, process_time) at the end of every step. With one thread, CPU time is the
    work the process did; it barely moves when other jobs share the CPU, so it is the stable number here.
    """
    if len(clock) != STEPS or len(step_tokens) != STEPS:
        raise SystemExit(f"expected {STEPS} steps, got {len(clock)} timestamps and {len(step_tokens)} counts")
    walls = [c[0] for c in clock]
    wall = walls[-1] - walls[WARMUP_STEPS - 1]
    cpu = clock[-1][1] - clock[WARMUP_STEPS - 1][1]
    tokens = sum(step_tokens[WARMUP_STEPS:])
    intervals = [b - a for a, b in zip(walls[WARMUP_STEPS - 1:], walls[WARMUP_STEPS:])]
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu, "median_step_s": statistics.median(intervals),
            "mean_tokens_per_completion": tokens / (COMPLETIONS_PER_STEP * (STEPS - WARMUP_STEPS))}


def _stamp() -> list[float]:
    return [time.perf_counter(), time.process_time()]


# ------------------------------------------------------------------------------------------------ runner side
def runner_worker(out_path: Path) -> None:
    """One runner run through ``train.py``'s entry point in this process; the step clock is read when the
    runner writes each step's record (``RunWriter.log``, the end of the step)."""
    from rlhf_core.cli.train import main as train_main
    from rlhf_core.runformat import run_writer

    clock: list[list[float]] = []
    log = run_writer.RunWriter.log

    def timed_log(self, step, metrics):
        record = log(self, step, metrics)
        clock.append(_stamp())
        return record

    run_writer.RunWriter.log = timed_log
    with tempfile.TemporaryDirectory(prefix="bench_runner_") as tmp:
        run_dir = Path(tmp) / "run"
        rc = train_main([
            "--epochs", "1", "--steps_per_epoch", str(STEPS), "--batch_size", str(COMPLETIONS_PER_STEP),
            "--max_new_tokens", str(NEW_TOKENS), "--ppo_epochs", "1", "--kl_coef", str(KL_COEF),
            "--learning_rate", str(LEARNING_RATE), "--max_grad_norm", "1.0", "--reward", "sentiment",
            "--seed", str(SEED), "--threads", str(THREADS), "--no_tensorboard", "--sample_interval", "0",
            "--run_dir", str(run_dir)])
        if rc:
            raise SystemExit(f"runner exited with {rc}")
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out_path.write_text(json.dumps({
        "clock": clock, "tokens": [r["response/length_mean"] * COMPLETIONS_PER_STEP for r in recs],
        "eos_rate": sum(r["response/eos_rate"] for r in recs) / len(recs)}))


# ------------------------------------------------------------------------------------------------ TRL side
def trl_worker(out_path: Path) -> None:
    """One GRPOTrainer run in this process; the step clock is read in ``on_step_end``."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_core.tiny_model import tiny_model_path
    from rlhf_core.train.prompts import BUILTIN_PROMPTS
    from rlhf_core.train.rewards import sentiment_reward

    torch.set_num_threads(THREADS)

    def sentiment(prompts, completions, **_):
        return sentiment_reward(prompts, completions)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.clock: list[list[float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.append(_stamp())

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        cfg = GRPOConfig(
            output_dir=tmp, report_to=[], use_cpu=True, seed=SEED, max_steps=STEPS,
            per_device_train_batch_size=COMPLETIONS_PER_STEP, num_generations=NUM_GENERATIONS,
            gradient_accumulation_steps=1, num_iterations=1, max_completion_length=NEW_TOKENS,
            generation_kwargs={"min_new_tokens": NEW_TOKENS}, beta=KL_COEF, learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0,
            logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=str(tiny_model_path()), reward_funcs=sentiment, args=cfg,
            train_dataset=Dataset.from_list([{"prompt": p} for p in BUILTIN_PROMPTS]), callbacks=[clock],
        )
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    out_path.write_text(json.dumps({
        "clock": clock.clock, "tokens": [h["completions/mean_length"] * COMPLETIONS_PER_STEP for h in logs],
        "clipped_ratio": [h.get("completions/clipped_ratio") for h in logs]}))


WORKERS = {"runner": runner_worker, "trl": trl_worker}


def measure(side: str, tmp: Path) -> dict[str, float]:
    """Run one side in a fresh process (start-up is not timed) and summarise its step clock."""
    out = tmp / f"{side}.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side, str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    data = json.loads(out.read_text())
    result = _throughput(data["clock"], data["tokens"])
    if "eos_rate" in data:
        result["eos_rate"] = data["eos_rate"]
    return result


# ------------------------------------------------------------------------------------------------ driver
def main() -> int:
    from benchmarks.common import pairwise, row, spread, write_result

    runs: dict[str, list[dict[str, float]]] = {"runner": [], "trl": []}
    for i in range(REPEATS):
        with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
            for side in runs:
                runs[side].append(measure(side, Path(tmp)))
        print(f"repeat {i + 1}: " + ", ".join(
            f"{side} {r[-1]['tokens_per_s']:.0f} tok/s ({r[-1]['tokens_per_cpu_s']:.0f} per CPU-s)"
            for side, r in runs.items()), flush=True)
    stats, rows = {}, []
    work = (f"{COMPLETIONS_PER_STEP} completions x {NEW_TOKENS} tokens per step, {STEPS - WARMUP_STEPS} timed "
            f"steps, {THREADS} thread")
    for metric, unit, label in (("tokens_per_s", "tokens/s", "wall"), ("tokens_per_cpu_s", "tokens/CPU-s", "CPU")):
        r = [x[metric] for x in runs["runner"]]
        t = [x[metric] for x in runs["trl"]]
        ratios, qs = pairwise(r, t)
        rs, ts = spread(r), spread(t)
        stats[metric] = {"runner": rs, "trl": ts, "ratio": qs, "ratios": ratios}
        print(f"{label}: runner {rs['median']:.0f} [{rs['min']:.0f}-{rs['max']:.0f}], TRL {ts['median']:.0f} "
              f"[{ts['min']:.0f}-{ts['max']:.0f}] {unit}; ratio {qs['median']:.2f}x [{qs['min']:.2f}-{qs['max']:.2f}]")
        rows += [
            row(f"runner throughput ({label} time)", round(rs["median"], 1), unit,
                notes=f"median of {rs['n']}, range {rs['min']:.0f}-{rs['max']:.0f}; {work}"),
            row(f"TRL GRPOTrainer throughput ({label} time)", round(ts["median"], 1), unit,
                notes=f"median of {ts['n']}, range {ts['min']:.0f}-{ts['max']:.0f}; same work"),
            row(f"runner / TRL ({label} time)", round(qs["median"], 2), "x", f">= {TARGET_RATIO:.0f}x",
                qs["median"] >= TARGET_RATIO, f"pairwise ratios {qs['min']:.2f}-{qs['max']:.2f}"),
        ]
    details = {
        "setup": {"completions_per_step": COMPLETIONS_PER_STEP, "grpo_num_generations": NUM_GENERATIONS,
                  "new_tokens": NEW_TOKENS, "steps": STEPS, "warmup_steps": WARMUP_STEPS, "threads": THREADS,
                  "kl_coef_beta": KL_COEF, "learning_rate": LEARNING_RATE, "reward": "sentiment",
                  "prompts": "rlhf_core.train.prompts.BUILTIN_PROMPTS", "model": "rlhf_core.tiny_model"},
        "runs": runs, "stats": stats,
    }
    write_result("vs_trl", rows, details)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker" and sys.argv[2] in WORKERS:
        WORKERS[sys.argv[2]](Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
