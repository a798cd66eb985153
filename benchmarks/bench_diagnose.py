"""Detector cost and quality: a 100k-step run end to end, the per-record cost of a live update early and late
in a run (it must not grow with history), and detection rate / delay / false alerts on synthetic series."""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, spread, write_result
from devtools.synthetic import FAULTS, healthy_series, planted_series
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.stability.analysis import diagnose_run
from rlhf_core.stability.detectors import Diagnoser, diagnose

CFG = {"max_grad_norm": 1.0}
LONG = 100_000


def full_run_seconds(records: list[dict], repeats: int = 3) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        diagnose(records, CFG)
        out.append(time.perf_counter() - t0)
    return out


def per_record_us(records: list[dict], warm: int, calls: int = 2000) -> list[float]:
    """Microseconds per ``update([record])`` after ``warm`` records of history (5 blocks of ``calls``)."""
    d = Diagnoser(CFG)
    d.update(records[:warm])
    tail = records[warm: warm + 5 * calls]
    blocks = []
    for i in range(0, len(tail), calls):
        t0 = time.perf_counter()
        for rec in tail[i: i + calls]:
            d.update([rec])
        blocks.append((time.perf_counter() - t0) / calls * 1e6)
    return blocks


def read_and_diagnose_seconds(records: list[dict]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        with RunWriter(Path(tmp) / "run", source="generic", tensorboard=False) as w:
            for rec in records:
                w.log(rec["step"], {k: v for k, v in rec.items() if k != "step"})
        t0 = time.perf_counter()
        diagnose_run(Run(Path(tmp) / "run"), CFG)
        return time.perf_counter() - t0


def quality(seeds: int = 8) -> tuple[dict, int, int]:
    per_fault = {}
    for fault, (_, rule, severity, late) in FAULTS.items():
        at = 100 if fault == "entropy_collapse_early" else 300
        delays, hits = [], 0
        for seed in range(seeds):
            found = [a for a in diagnose(planted_series(fault, 600, at, seed), CFG)
                     if a.rule == rule and a.severity == severity and at - 20 <= a.step <= at + late]
            if found:
                hits += 1
                delays.append(found[0].step - at)
        per_fault[fault] = {"detected": hits, "of": seeds,
                            "delay_median": statistics.median(delays) if delays else None,
                            "delay_max": max(delays) if delays else None}
    false_alerts, healthy_steps = 0, 0
    for seed in range(seeds):
        false_alerts += len(diagnose(healthy_series(3000, seed), CFG))
        healthy_steps += 3000
    return per_fault, false_alerts, healthy_steps


def main() -> int:
    t0 = time.perf_counter()
    records = healthy_series(LONG, seed=0)
    gen_s = time.perf_counter() - t0
    full = full_run_seconds(records)
    early = per_record_us(records, warm=1_000)
    late = per_record_us(records, warm=LONG - 10_000)
    e2e = read_and_diagnose_seconds(records[:20_000])
    per_fault, false_alerts, healthy_steps = quality()
    detected = sum(v["detected"] for v in per_fault.values())
    total = sum(v["of"] for v in per_fault.values())
    ratio = statistics.median(late) / statistics.median(early)
    full_s = spread(full)
    rows = [
        row("diagnose 100k-step run (in memory)", round(full_s["median"], 2), "s",
            notes=f"min {full_s['min']:.2f} max {full_s['max']:.2f} n={full_s['n']}; "
                  f"{LONG / full_s['median']:.0f} records/s"),
        row("live update per record at 1k steps", round(statistics.median(early), 1), "us",
            notes=f"min {min(early):.1f} max {max(early):.1f} (5 blocks of 2000)"),
        row("live update per record at 90k steps", round(statistics.median(late), 1), "us",
            notes=f"min {min(late):.1f} max {max(late):.1f} (5 blocks of 2000)"),
        row("late/early per-record cost", round(ratio, 2), "x", target="<= 1.5", met=ratio <= 1.5,
            notes="bounded windows: cost does not grow with history"),
        row("read + diagnose 20k-step run dir", round(e2e, 2), "s", notes="RunWriter files, Run reader"),
        row("planted faults detected", f"{detected}/{total}", "", target="all", met=detected == total,
            notes=f"{len(per_fault)} fault kinds x 8 seeds; first step within [planted-20, planted+window]"),
        row("false alerts on healthy series", false_alerts, "", target="0", met=false_alerts == 0,
            notes=f"{healthy_steps} healthy steps, 8 seeds"),
    ]
    for r in rows:
        print(f"{r['metric']:40} {r['value']} {r['unit']}  {r['notes']}")
    write_result("diagnose", rows, {"full_run_s": full_s, "early_us": early, "late_us": late,
                                    "generate_100k_s": round(gen_s, 2), "per_fault": per_fault,
                                    "note": "shared 2-core machine, other jobs running: timings are noisy"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
