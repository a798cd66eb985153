"""``make corpus``: run the grid (grid.py) with real trainers, label every run (labels.py), write
``runs/<name>/`` + ``runs/labels.json``, the committed archive ``corpus.tar.xz`` and the test fixtures.

    python -m benchmarks.corpus.generate [--jobs 2] [--only SUBSTRING] [--no-archive] [--label-only] [--runs DIR]
    python -m benchmarks.corpus.generate --spike-check [--seeds 8,9]   # the spike check: runs/spike_check/
    python -m benchmarks.corpus.generate --spike-check2                # the second one: runs/spike_check2/
    python -m benchmarks.corpus.generate --spike-check3                # the third one: runs/spike_check3/

Each run is its own process (a crash or a NaN stays in that run; two run at a time on this 2-core machine);
its console output goes to ``runs/_logs/<name>.log``. Only ``metrics.jsonl``, ``meta.json`` and
``events.jsonl`` are kept: checkpoints, traces and TensorBoard files are deleted after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"
ARCHIVE = HERE / "corpus.tar.xz"
SPIKE_RUNS = RUNS / "spike_check"
# The spike check's runs are not archived (60 runner runs: 1.4 MiB of xz even without clocks and memory counters,
# on top of the corpus's 3.3 MiB); their labels are kept here and their scores in benchmarks/results/corpus.json
SPIKE_LABELS = HERE / "spike_check_labels.json"
SPIKE2_RUNS = RUNS / "spike_check2"
SPIKE2_LABELS = HERE / "spike_check2_labels.json"
SPIKE3_RUNS = RUNS / "spike_check3"
SPIKE3_LABELS = HERE / "spike_check3_labels.json"
FIXTURES = ROOT / "tests" / "fixtures" / "real_runs"
KEEP = ("metrics.jsonl", "meta.json", "events.jsonl")
HELDOUT_REWARD = "benchmarks.corpus.textstats:word_variety_reward"


def runner_argv(spec: dict[str, Any], run_dir: Path) -> list[str]:
    """``train.py`` flags of a runner spec: 8 prompts a step, 16 new tokens, default PPO settings otherwise."""
    return [sys.executable, str(ROOT / "train.py"), "--epochs", "1", "--steps_per_epoch", str(spec["steps"]),
            "--batch_size", "8", "--max_new_tokens", str(spec["max_new_tokens"]), "--seed", str(spec["seed"]),
            "--learning_rate", str(spec["lr"]), "--kl_coef", str(spec["kl_coef"]), "--reward", spec["reward"],
            "--heldout_reward", HELDOUT_REWARD, "--max_grad_norm", str(spec["max_grad_norm"]),
            "--run_dir", str(run_dir), "--overwrite", "--no_tensorboard", "--sample_interval", "0"]


def produce(spec: dict[str, Any]) -> None:
    """Run one spec in this process (called in the child by ``--one``; ``spec["run_dir"]`` says where)."""
    run_dir = Path(spec["run_dir"])
    if spec["trainer"] in ("grpo", "rloo"):
        from .trl_runs import run_online

        run_online(spec, run_dir)
    elif spec["trainer"] == "dpo":
        from .trl_runs import run_dpo

        run_dpo(spec, run_dir)
    elif spec["trainer"] == "reinforce":
        from .generic_runs import run_reinforce

        run_reinforce(spec, run_dir)
    else:
        raise ValueError(f"unknown trainer {spec['trainer']!r}")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_one(spec: dict[str, Any], runs: Path = RUNS) -> dict[str, Any]:
    """Launch one run in a child process; returns its name, exit status and wall time."""
    run_dir = runs / spec["name"]
    log_path = runs / "_logs" / f"{spec['name']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if spec["trainer"] == "runner":
        argv = runner_argv(spec, run_dir)
    else:
        argv = [sys.executable, "-m", "benchmarks.corpus.generate", "--one",
                json.dumps({**spec, "run_dir": str(run_dir)})]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.call(argv, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    prune(run_dir, spec, runs)
    return {"name": spec["name"], "rc": rc, "seconds": round(seconds, 1)}


def prune(run_dir: Path, spec: dict[str, Any], runs: Path = RUNS) -> None:
    """Keep only the small files of a run and drop TRL's scratch output folder. Live alerts are dropped from
    ``events.jsonl`` too (the TRL and generic producers run without them): they would record whichever rules
    were in the tree when the run was made, and the benchmark recomputes alerts anyway. Other events stay."""
    shutil.rmtree(runs / f"_trl_{spec['name']}", ignore_errors=True)
    if not run_dir.is_dir():
        return
    for child in run_dir.iterdir():
        if child.name not in KEEP:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    events = run_dir / "events.jsonl"
    if events.exists():
        kept = [ln for ln in events.read_text().splitlines() if ln.strip() and json.loads(ln).get("kind") != "alert"]
        if kept:
            events.write_text("".join(f"{ln}\n" for ln in kept))
        else:
            events.unlink()


def write_archive(names: list[str]) -> Path:
    """``corpus.tar.xz``: the kept files of the labelled runs and labels.json (a few MB at most)."""
    with tarfile.open(ARCHIVE, "w:xz", preset=9) as tar:
        tar.add(RUNS / "labels.json", arcname="runs/labels.json")
        for run_dir in (RUNS / n for n in sorted(names)):
            for name in KEEP:
                if (run_dir / name).exists():
                    tar.add(run_dir / name, arcname=f"runs/{run_dir.name}/{name}")
    return ARCHIVE


def extract_archive() -> None:
    """Unpack the committed corpus into ``runs/`` (what the benchmark does when the runs are absent)."""
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        tar.extractall(HERE, filter="data")


# fixture name → (run name, steps kept, key prefixes dropped): one healthy and one unstable run of each kind,
# and a healthy learning runner run whose clipped gradient-norm spikes (steps 111 and 115) must stay notes;
# it keeps 116 steps, so its clocks, memory counters and per-block gradient norms (no rule reads them) go
FIXTURE_PICKS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "trl_grpo_healthy": ("grpo_lr1e-5_beta0.1_sentiment_s0", 30, ()),
    "trl_grpo_kl_explosion": ("grpo_lr5e-2_beta0.1_sentiment_s0", 30, ()),
    "runner_healthy": ("runner_lr1e-5_kl0.1_sentiment_s0", 30, ()),
    "runner_unstable": ("runner_lr3e-2_kl0.1_sentiment_s0", 30, ()),
    "runner_spiky_healthy": ("runner_lr1e-3_kl0.05_sentiment_s4", 116,
                             ("time/", "mem/", "throughput/", "grad/layer/")),
    # spike check, seed 12: its first large norm (9.2x the median at step 104, one of 4 updates clipped) with KL
    # and entropy flat after it; a false grad_spike warning under the rule before the consequence test
    "runner_first_spike_healthy": ("spike_check/runner_lr1e-3_kl0.05_sentiment_s12", 110,
                                   ("time/", "mem/", "throughput/", "grad/layer/")),
    # second spike check, three healthy runs whose warnings came from rules that ignored clipping: seed 29's
    # clipped 3-step burst of large norms (grad_explosion), seed 40's loss jump on a clipped gradient spike
    # (loss_spike), seed 38's extreme single-token ratios on 4 steps under a normal clip fraction
    # (ppo_ratio_extreme); nothing moved after any of them
    "runner_clipped_burst_healthy": ("spike_check2/runner_lr1e-3_kl0.05_sentiment_s29", 106,
                                     ("time/", "mem/", "throughput/", "grad/layer/", "drift/layer/")),
    "runner_clipped_loss_spike_healthy": ("spike_check2/runner_lr1e-3_kl0.05_sentiment_s40", 118,
                                          ("time/", "mem/", "throughput/", "grad/layer/", "drift/layer/")),
    "runner_tail_ratios_healthy": ("spike_check2/runner_lr1e-3_kl0.05_sentiment_s38", 50,
                                   ("time/", "mem/", "throughput/", "grad/layer/", "drift/layer/")),
}


def write_fixtures(labels: dict[str, Any]) -> None:
    """Copy a few short recorded runs (first N steps, their events and meta) into tests/fixtures/real_runs."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    index = {}
    check_labels = {check: json.loads(path.read_text())["runs"] if path.exists() else {}
                    for check, path in (("spike_check", SPIKE_LABELS), ("spike_check2", SPIKE2_LABELS))}
    for fixture, (name, keep, drop) in FIXTURE_PICKS.items():
        src = RUNS / name
        run_labels = check_labels.get(name.split("/")[0], {}) if "/" in name else labels["runs"]
        name = name.split("/")[-1]
        if not (src / "metrics.jsonl").exists() or name not in run_labels:
            continue
        dst = FIXTURES / fixture
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        lines = src.joinpath("metrics.jsonl").read_text().splitlines()[:keep]
        if drop:
            lines = [json.dumps({k: v for k, v in json.loads(ln).items() if not k.startswith(drop)},
                                separators=(",", ":")) for ln in lines]
        dst.joinpath("metrics.jsonl").write_text("\n".join(lines) + "\n")
        shutil.copy(src / "meta.json", dst / "meta.json")
        if (src / "events.jsonl").exists():
            kept = [ln for ln in src.joinpath("events.jsonl").read_text().splitlines()
                    if (json.loads(ln).get("step") or 0) <= keep]
            dst.joinpath("events.jsonl").write_text("".join(f"{ln}\n" for ln in kept))
        entry = dict(run_labels[name])
        entry["source_run"], entry["steps_kept"] = name, keep
        index[fixture] = entry
    (FIXTURES / "labels.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (this machine has 2 cores)")
    ap.add_argument("--only", default=None, help="run only specs whose name contains this")
    ap.add_argument("--seeds", default=None, help="run only these seeds (comma-separated, e.g. 4,5)")
    ap.add_argument("--no-archive", action="store_true", help="skip corpus.tar.xz and the fixtures")
    ap.add_argument("--spike-check", action="store_true",
                    help="run the spike check (grid.SPIKE_CHECK_SEEDS of the runner settings) instead of the grid")
    ap.add_argument("--spike-check2", action="store_true",
                    help="run the second spike check (grid.SPIKE_CHECK2_SEEDS, the same runner settings) instead")
    ap.add_argument("--spike-check3", action="store_true",
                    help="run the third spike check (grid.SPIKE_CHECK3_SEEDS, the same runner settings) instead")
    ap.add_argument("--label-only", action="store_true", help="relabel the existing runs, run nothing")
    ap.add_argument("--runs", type=Path, default=None,
                    help="where the runs go (default runs/, runs/spike_check/ with --spike-check); the archive, "
                         "fixtures and spike_check_labels.json are written only for the defaults")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        produce(json.loads(args.one))
        return 0
    from tqdm import tqdm

    from .grid import specs
    from .labels import write_labels

    seeds = None if args.seeds is None else {int(x) for x in args.seeds.split(",")}
    check = ("spike_check3" if args.spike_check3 else "spike_check2" if args.spike_check2
             else "spike_check" if args.spike_check else None)
    grid = specs(spike_check=check or False)
    todo = [s for s in grid if (args.only is None or args.only in s["name"])
            and (seeds is None or s["seed"] in seeds)]
    default_runs = {"spike_check": SPIKE_RUNS, "spike_check2": SPIKE2_RUNS,
                    "spike_check3": SPIKE3_RUNS}.get(check or "", RUNS)
    runs: Path = (args.runs or default_runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    if args.label_only:  # bring runs made by an older generator to today's pruning
        for spec in todo:
            prune(runs / spec["name"], spec, runs)
    else:
        # longest first, so the two workers finish together
        todo.sort(key=lambda s: -s["steps"] * (2.0 if s["trainer"] in ("grpo", "rloo") else 1.0))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool, \
                tqdm(total=len(todo), desc="corpus", unit="run") as bar:
            futures = [pool.submit(run_one, s, runs) for s in todo]
            for fut in as_completed(futures):
                res = fut.result()
                results.append(res)
                if res["rc"]:
                    bar.write(f"{res['name']}: exit {res['rc']} (see {runs}/_logs/{res['name']}.log)")
                bar.set_postfix_str(f"{res['name']} {res['seconds']:.0f}s")
                bar.update(1)
    labels = write_labels(runs, grid, generation={
        "only": args.only, "seeds": args.seeds, "jobs": args.jobs, "wall_s": round(time.perf_counter() - t0, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": sorted(results, key=lambda r: r["name"])}
        if results else None)
    counts: dict[str, int] = {}
    for entry in labels["runs"].values():
        key = f"{entry['trainer']}/{entry['label']}"
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(labels['runs'])} runs labelled in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if not args.no_archive and args.only is None and runs == default_runs:
        if check is not None:
            path = {"spike_check2": SPIKE2_LABELS, "spike_check3": SPIKE3_LABELS}.get(check, SPIKE_LABELS)
            shutil.copy(runs / "labels.json", path)
        else:
            path = write_archive(list(labels["runs"]))
            write_fixtures(labels)
        also = "" if check is not None else f" and {FIXTURES}"
        print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB){also}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
