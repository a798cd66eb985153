"""How long the deployment planner takes: a whole 70B answer (plan, fewest GPUs, largest batches, ranked
suggestions), in process and as the ``rlhfkit memory plan`` command a user runs, and one what-if re-plan of the
dashboard's memory tab.

    python benchmarks/bench_memory_plan_time.py [--out benchmarks/results/memory_plan_time.json]

The 70B deployment is Llama-3-70B PPO (actor, critic and reference of that size) on 16 GPUs, ZeRO-3, a colocated
vLLM at TP 8, micro-batch 8 of 4096 + 4096 tokens without checkpointing: it does not fit, so the answer runs every
search (fewest GPUs up to 1024, largest batches, each suggestion re-planned) - the slowest kind of answer. Timed as
the report ``rlhfkit memory plan`` prints (memory.deploy_cli.report) and as that command's whole process.
The what-if is Qwen2.5-7B GRPO on 8 GPUs re-planned with other GPUs, ZeRO stage,
micro-batch and engine share (dashboard.whatif.what_if). Wall seconds, ``REPEATS`` calls each after one warm-up,
median with spread; the targets are the issue's (70B under 2 s) and an interactive control's (under 0.5 s).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import row, spread, write_result  # noqa: E402

REPEATS = 7


def _times(fn, repeats: int = REPEATS) -> list[float]:
    fn()  # warm-up: imports and the built-in config table
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    from adapters.trl_memory import deployment_report
    from dashboard.whatif import what_if
    from memory.arch import load_arch
    from memory.deploy import Deployment, Engine, Role, Sharding
    from memory.deploy_cli import report

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_plan_time.json"))
    a = p.parse_args()
    big = load_arch("Llama-3-70B")
    dep70 = Deployment(actor=Role("actor", big, trained=True), reference=Role("reference", big),
                       critic=Role("critic", big, trained=True, value_head=True), groups={"all": 16},
                       sharding=Sharding("zero3"), engine=Engine("vllm", group="all", tp=8, gpu_memory_utilization=0.5),
                       micro_batch=8, prompt_len=4096, response_len=4096, gradient_checkpointing=False)
    cli = [sys.executable, "-m", "rlhf_core.cli.main", "memory", "plan", "--model", "Llama-3-70B", "--nodes", "2",
           "--zero", "3", "--engine", "vllm", "--engine_tp", "8", "--algorithm", "ppo", "--prompt_len", "4096",
           "--max_new_tokens", "4096", "--mini_batch_size", "8"]
    q7 = load_arch("Qwen2.5-7B")
    dep7 = Deployment(actor=Role("actor", q7, trained=True, group="train"), reference=Role("reference", q7,
                      group="train"), groups={"train": 8}, sharding=Sharding("zero2"),
                      engine=Engine("vllm", group="train", gpu_memory_utilization=0.5), micro_batch=4,
                      prompt_len=512, response_len=1024)
    stored = deployment_report(dep7, {"model": q7.name}, "cuda", "bench")
    report70 = report(dep70)
    assert not report70["fits"] and report70["suggestions"], "the timed answer must be one that runs every search"
    plan70 = spread(_times(lambda: report(dep70)))
    command = spread(_times(lambda: subprocess.run(cli, cwd=ROOT, check=True, capture_output=True)))
    whatif = spread(_times(lambda: what_if(stored, gpus=16, zero=3, micro_batch=2, engine_util=0.3)))
    timed = (("70B answer in process", plan70), ("70B rlhfkit memory plan command", command),
             ("what-if re-plan", whatif))
    for name, s in timed:
        print(f"{name}: median {1e3 * s['median']:.1f} ms (min {1e3 * s['min']:.1f}, max {1e3 * s['max']:.1f}, "
              f"n {s['n']})")

    def notes(s: dict, what: str) -> str:
        return f"{what}; median of {s['n']} (min {1e3 * s['min']:.1f}, max {1e3 * s['max']:.1f} ms)"

    rows = [row("plan a 70B deployment: rlhfkit memory plan, whole process", round(command["median"], 3), "s",
                "< 2 s", command["median"] < 2.0,
                notes(command, "Llama-3-70B PPO on 16 GPUs, does not fit: every search runs; "
                               f"in process {1e3 * plan70['median']:.1f} ms")),
            row("dashboard what-if re-plan", round(1e3 * whatif["median"], 2), "ms", "< 500 ms",
                whatif["median"] < 0.5, notes(whatif, "Qwen2.5-7B GRPO on 8 GPUs with 4 knobs changed"))]
    write_result("memory_plan_time", rows, {"plan_70b_seconds": plan70, "command_seconds": command,
                                            "whatif_seconds": whatif}, path=Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
