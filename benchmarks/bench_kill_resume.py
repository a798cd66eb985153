"""Kill test: SIGKILL a real ``python train.py`` at random moments, recover, and compare with an uninterrupted run.

Each trial trains one run directory through a chain of sessions: every session but the last is killed with
SIGKILL, either after a random delay (anywhere: start-up, a step, a metrics write, a checkpoint, a resume's
cleanup) or at a named point too short to hit by timing (``RLHFKIT_KILL_AT``: ``checkpoint:state`` = the
state file written but the checkpoint not complete, ``checkpoint:info`` = complete but not yet renamed into
place, ``resume:cleaned`` = a resume's files cut but nothing trained). Recovery is what a user does:
``train.py --resume RUN_DIR`` when the folder has a ``meta.json``, else the original command again. The run
must then equal the uninterrupted one: every metric value but times and machine readings, the logged
completions (``samples.jsonl``), every tensor of the final checkpoint (weights, AdamW state, RNG, KL
controller), ``status: finished``, no partial files, and no problem the reader reports (a torn line in any
file).

``python benchmarks/bench_kill_resume.py [--kills 20] [--seed 0]`` writes ``results/kill_resume.json``; a
disk-full trial on a real 1 MiB-free tmpfs (root only; skipped elsewhere) goes with it. ``tests/
test_runner_reliability.py`` runs a short chain of this harness in ``make test``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# 6 steps, a checkpoint every 2, the system sampler on (its file must be cut too), TensorBoard off (speed)
ARGS = ["--epochs", "2", "--steps_per_epoch", "3", "--batch_size", "2", "--max_new_tokens", "5", "--ppo_epochs", "2",
        "--save_every", "2", "--sample_interval", "0.2", "--no_tensorboard", "--seed", "3", "--adaptive_kl",
        "--kl_target", "0.01"]
VOLATILE = ("time/", "mem/", "sys/", "throughput/", "wait/")


@dataclass
class Kill:
    """One planned kill: at the named ``point``; or ``delay`` seconds after the session's ``records``-th new
    step record (``records`` 0: after its launch). Counting records makes a kill land inside training
    whatever the machine's load does to start-up and step times."""

    delay: float = 0.0
    point: str | None = None
    records: int = 0

    def describe(self) -> str:
        if self.point:
            return f"at {self.point}"
        return f"{self.delay:.2f} s after " + (f"step record {self.records}" if self.records else "launch")


def _env(point: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RLHFKIT_KILL_AT", None)
    if point:
        env["RLHFKIT_KILL_AT"] = point
    return env


def session_command(run_dir: Path, args: list[str] = ARGS) -> list[str]:
    """The recovery rule: resume a folder that is a run, else start the original command again."""
    if (run_dir / "meta.json").exists():
        return [sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir)]
    return [sys.executable, str(ROOT / "train.py"), *args, "--run_dir", str(run_dir)]


def _kept_records(run_dir: Path, before: int) -> int:
    """Step records a session keeps from the ``before`` there are (a resume keeps one per step up to the
    newest complete checkpoint): a killed session that got past them had trained."""
    from rlhf_core.train.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir)
    return min(before, found[0] if found else 0)


def _records(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def run_session(run_dir: Path, kill: Kill | None, args: list[str] = ARGS, timeout: float = 600) -> dict[str, Any]:
    """One ``train.py`` process; returns its exit code, whether the kill landed, where (``stage``: ``start-up``
    before the session's first step record, ``training`` after it or with a checkpoint half written,
    ``teardown`` once the run was marked finished) and the last stderr line."""
    cmd = session_command(run_dir, args)
    resumed = "--resume" in cmd
    records_before = _records(run_dir)
    kept = _kept_records(run_dir, records_before)
    t0 = time.perf_counter()
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(kill.point if kill else None), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed = False
    low = records_before  # a resume first cuts the file: count the new records from its shortest length
    if kill is not None and kill.point is None:
        while kill.records and proc.poll() is None:
            n = _records(run_dir)
            low = min(low, n)
            if n >= low + kill.records:
                break
            time.sleep(0.002)
        try:
            proc.wait(timeout=kill.delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            killed = True
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    killed = killed or proc.returncode == -signal.SIGKILL
    lines = [line for line in err.splitlines() if line.strip()]
    partial = [p.name for p in (run_dir / "checkpoints").glob(".step_*.tmp")
               if p.stat().st_mtime >= launched] if killed else []  # half written by this session
    stage = None
    if killed:
        metrics = run_dir / "metrics.jsonl"
        wrote = metrics.is_file() and metrics.stat().st_mtime >= launched and _records(run_dir) > kept
        stage = "training" if partial or wrote else "start-up"
        if _finished(run_dir):
            stage = "teardown"  # the run had written its status: the kill hit the process's exit
    return {"resume": resumed, "kill": kill.describe() if kill else None, "killed": killed, "stage": stage,
            "partial_checkpoint": partial, "rc": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 2), "launched": launched,
            "last_line": lines[-1] if lines else ""}


def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "time" and not k.startswith(VOLATILE)}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _same_tree(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return _same_value(a, b)


def _samples(run_dir: Path) -> list[dict[str, Any]]:
    """The completions logged to ``samples.jsonl``, without their write time."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def differences(reference: Path, run_dir: Path) -> list[str]:
    """Why ``run_dir`` is not the uninterrupted ``reference`` (empty when it is)."""
    import torch

    from rlhf_core.runformat.run_reader import Run
    from rlhf_core.train.checkpoint import latest_checkpoint

    out: list[str] = []
    ref, run = Run(reference), Run(run_dir)
    a, b = ref.metrics(), run.metrics()
    if [r["step"] for r in a] != [r["step"] for r in b]:
        out.append(f"steps {[r['step'] for r in b]} instead of {[r['step'] for r in a]}")
    for ra, rb in zip(a, b):
        ca, cb = comparable(ra), comparable(rb)
        bad = sorted(k for k in ca.keys() | cb.keys() if not _same_value(ca.get(k), cb.get(k)))
        if bad:
            out.append(f"step {ra['step']}: {len(bad)} metric(s) differ, e.g. {bad[0]}: {ca.get(bad[0])} vs "
                       f"{cb.get(bad[0])}")
    sa_, sb_ = _samples(reference), _samples(run_dir)
    if sa_ != sb_:
        out.append(f"samples.jsonl: {len(sb_)} records, {sum(x != y for x, y in zip(sa_, sb_))} differing, "
                   f"instead of {len(sa_)}")
    fa, fb = latest_checkpoint(reference), latest_checkpoint(run_dir)
    if fb is None or fa is None or fa[0] != fb[0]:
        out.append(f"final checkpoint {fb and fb[0]} instead of {fa and fa[0]}")
    else:
        sa = torch.load(fa[1] / "state.pt", weights_only=True)
        sb = torch.load(fb[1] / "state.pt", weights_only=True)
        for key in sorted(sa.keys() | sb.keys()):
            if not _same_tree(sa.get(key), sb.get(key)):
                out.append(f"final checkpoint: {key} differs")
    status = run.meta.get("status")
    if status != "finished":
        out.append(f"status {status!r}")
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    if leftovers:
        out.append(f"partial files left: {leftovers}")
    run.events(), run.system()  # read every file the resume cuts, so a torn or repeated line is reported
    problems = [str(p) for p in run.problems()]
    if problems:
        out.append(f"reader problems: {problems[:3]}")
    return out


def reference_run(run_dir: Path, args: list[str] = ARGS) -> tuple[float, float]:
    """The uninterrupted run, as a subprocess like the others; returns (seconds to its ``meta.json``: the
    start-up, seconds in all)."""
    info = run_session(run_dir, None, args)
    if info["rc"] != 0:
        raise SystemExit(f"reference run failed (exit {info['rc']}): {info['last_line']}")
    start = json.loads((run_dir / "meta.json").read_text())["start_time"] - info["launched"]
    return max(start, 0.0), info["seconds"]


def _finished(run_dir: Path) -> bool:
    meta = run_dir / "meta.json"
    return meta.exists() and json.loads(meta.read_text()).get("status") == "finished"


def trial(run_dir: Path, kills: list[Kill], reference: Path, args: list[str] = ARGS,
          max_tail: int = 3) -> dict[str, Any]:
    """Sessions with ``kills`` (one each, until one finishes the run: the kills left are returned unused),
    then sessions without until the run finishes; the comparison."""
    sessions = []
    for kill in kills:
        sessions.append(run_session(run_dir, kill, args))
        if _finished(run_dir):
            break
    unused = kills[len(sessions):]
    for _ in range(max_tail):
        if _finished(run_dir):
            break
        sessions.append(run_session(run_dir, None, args))
    diffs = differences(reference, run_dir)
    return {"sessions": sessions, "kills_landed": sum(s["killed"] and s["stage"] != "teardown" for s in sessions),
            "kills_in_teardown": sum(s["stage"] == "teardown" for s in sessions), "differences": diffs,
            "identical": not diffs, "unused": unused}


def random_kill(rng: random.Random, startup: float, step_s: float) -> Kill:
    """A third of the kills in start-up (a delay up to the reference run's start-up: imports, model build, a
    resume's cleanup), the rest inside training: after the session's first or second new step record, by up
    to one step's time of the reference run (rollout, update, a metrics write, a checkpoint save)."""
    if rng.random() < 1 / 3:
        return Kill(delay=rng.uniform(0.2, max(startup, 0.5)))
    return Kill(delay=rng.uniform(0.0, step_s), records=rng.choice((1, 2)))


def next_kills(rng: random.Random, i: int, startup: float, step_s: float) -> list[Kill]:
    """The kills of trial ``i``: two (the second lands in a resume session); every third trial starts in the
    first checkpoint save of a fresh run, the next one's resume is killed at ``resume:cleaned`` or between a
    complete checkpoint and its rename, in turn."""
    if i % 3 == 0:
        return [Kill(point="checkpoint:state"), random_kill(rng, startup, step_s)]
    if i % 3 == 1:
        return [random_kill(rng, startup, step_s), Kill(point=("resume:cleaned", "checkpoint:info")[(i // 3) % 2])]
    return [random_kill(rng, startup, step_s), random_kill(rng, startup, step_s)]


def disk_full_trial(work: Path, reference: Path, size: str, args: list[str] = ARGS) -> dict[str, Any]:
    """A run on a tmpfs of ``size`` (a checkpoint is 1.9 MB: 1m fills at the first checkpoint, 3m at the
    second): it must fail in one line with ``failed`` and the reason in meta.json, then resume, once the disk
    is grown, to the uninterrupted result."""
    mount = work / f"tmpfs_{size}"
    mount.mkdir()
    first = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if first.returncode != 0:
        return {"size": size, "skipped": f"cannot mount a tmpfs ({first.stderr.decode().strip() or 'not root'})"}
    try:
        run_dir = mount / "run"
        info = run_session(run_dir, None, args)
        meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
        failed_ok = (info["rc"] != 0 and meta.get("status") == "failed" and "No space left" in str(meta.get("reason"))
                     and "Traceback" not in info["last_line"] and "No space left" in info["last_line"])
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = run_session(run_dir, None, args)
        diffs = differences(reference, run_dir)
        return {"size": size, "first": info, "meta_status": meta.get("status"), "meta_reason": meta.get("reason"),
                "failed_in_one_line": failed_ok, "resumed": resumed, "differences": diffs, "identical": not diffs}
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kills to land at least (default 20)")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    from benchmarks.common import row, write_result

    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory(prefix="bench_kill_") as tmp:
        work = Path(tmp)
        reference = work / "reference"
        startup, span = reference_run(reference)
        from rlhf_core.runformat.run_reader import Run

        step_s = statistics.median(r["time/step"] for r in Run(reference).metrics())
        print(f"uninterrupted run: {span:.1f} s, {startup:.1f} s of it start-up, steps of {step_s:.3f} s")
        results: list[dict[str, Any]] = []
        landed = 0
        while landed < opts.kills:  # a kill that came after its run had finished (teardown) does not count
            i = len(results)
            res = trial(work / f"trial{i}", next_kills(rng, i, startup, step_s), reference)
            res["unused"] = [k.describe() for k in res["unused"]]
            results.append(res)
            landed += res["kills_landed"]
            print(f"trial {i}: {[(s['kill'], s['stage']) for s in res['sessions']]} -> landed "
                  f"{res['kills_landed']}, {'identical' if res['identical'] else res['differences']}", flush=True)
        full = [disk_full_trial(work, reference, size) for size in ("1m", "3m")]
        print(f"disk full: {full}", flush=True)
    recovered = sum(r["identical"] for r in results)
    at_points = sum(1 for r in results for s in r["sessions"] if s["killed"] and s["kill"].startswith("at "))
    in_resume = sum(1 for r in results for s in r["sessions"]
                    if s["killed"] and s["resume"] and s["stage"] != "teardown")
    in_training = sum(1 for r in results for s in r["sessions"] if s["stage"] == "training")
    teardown = sum(r["kills_in_teardown"] for r in results)
    mid_checkpoint = sum(1 for r in results for s in r["sessions"] if s["partial_checkpoint"])
    rows = [
        row("kill -9 moments recovered to identical metrics and weights", f"{recovered}/{len(results)} trials, "
            f"{landed} kills", target="all", met=recovered == len(results),
            notes=f"{at_points} at named points (mid checkpoint, mid resume cleanup), {in_resume} in a resume "
                  f"session, {in_training} after the session's first step record, {mid_checkpoint} with a "
                  f"checkpoint half written; {teardown} more hit a finished run's exit (not counted)"),
    ]
    ran = [f for f in full if "skipped" not in f]
    if ran:
        failed = sum(f["failed_in_one_line"] for f in ran)
        same = sum(f["identical"] for f in ran)
        rows.append(row("disk full (tmpfs of 1 and 3 MiB): one-line failure with 'failed' in meta.json; resumed "
                        "identical", f"{failed}/{len(ran)}, {same}/{len(ran)}", target="all",
                        met=failed == same == len(ran),
                        notes="1 MiB: the first checkpoint does not fit (resume from step 0); 3 MiB: the second"))
    write_result("kill_resume", rows, {"args": ARGS, "seed": opts.seed, "uninterrupted_s": span, "step_s": step_s,
                                       "startup_s": startup, "trials": results, "disk_full": full})
    return 0 if recovered == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
