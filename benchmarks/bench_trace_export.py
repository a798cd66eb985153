"""What one trace window costs a TRL GRPO run at the end of the window: the export, artefact by artefact.

A tiny GPT-2 GRPO run (CPU, ``STEPS`` steps) with ``profile_trainer(..., trace_steps=ACTIVE)`` exports one
window (wait 1, warm-up 1, ``ACTIVE`` recorded steps). Each repeat runs it twice in alternating order: once
with the adapter's default ``trace_options`` and once with every artefact (``with_stack``, ``profile_memory``,
``record_shapes``, ``memory_timeline``: the defaults before the cheaper ones). The export of a window blocks
the step that closes it, so its seconds are training time lost; the per-artefact seconds come from the
``<stem>.export.json`` sidecar the window leaves in ``traces/`` (what ``rlhfkit report`` shows).
``--repeats N`` sets the number of pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RLHFKIT_HOME", str(ROOT / ".cache" / "rlhfkit"))

from benchmarks.common import row, spread, write_result  # noqa: E402

STEPS, ACTIVE = 5, 2
FULL = {"with_stack": True, "profile_memory": True, "record_shapes": True, "memory_timeline": True}


def _one(model_dir: str, tok: Any, options: dict[str, Any] | None, out: Path) -> dict[str, Any]:
    """One GRPO run with one trace window; its export seconds (total, per artefact) and artefact bytes."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from adapters.trl import profile_trainer

    prompts = Dataset.from_list([{"prompt": f"the {s} was {w}"} for s in ("movie", "food", "trip", "game")
                                 for w in ("good", "bad", "okay", "long")])
    args = GRPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=12, max_steps=STEPS, beta=0.1, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model_dir, args=args, train_dataset=prompts, processing_class=tok,
                          reward_funcs=lambda completions, **kw: [len(c) / 10.0 for c in completions])
    trainer.remove_callback(PrinterCallback)
    extra = {} if options is None else {"trace_options": options}
    profile_trainer(trainer, run_dir=out / "run", trace_steps=ACTIVE, system_interval_s=None, **extra)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    sidecars = sorted((out / "run" / "traces").glob("*.export.json"))
    if len(sidecars) != 1:
        raise RuntimeError(f"expected one trace window, found {len(sidecars)} export sidecars")
    info = json.loads(sidecars[0].read_text())
    return {"export_s": info["total_s"], "parts_s": info["export_s"], "bytes": info["bytes"], "train_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args(argv)
    import torch
    import transformers
    from transformers import AutoTokenizer

    from rlhf_core.tiny_model import tiny_model_path

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    model_dir = str(tiny_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    got: dict[str, list[dict[str, Any]]] = {"default": [], "full": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _one(model_dir, tok, None, tmp / "warmup")  # first-use imports and caches
        for r in range(opts.repeats):
            order = ("default", "full") if r % 2 == 0 else ("full", "default")
            for name in order:
                res = _one(model_dir, tok, None if name == "default" else FULL, tmp / f"{name}{r}")
                got[name].append(res)
                parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["parts_s"].items(), key=lambda kv: -kv[1]))
                print(f"repeat {r} {name}: export {res['export_s']:.2f} s ({parts}); "
                      f"{sum(res['bytes'].values()) / 2**20:.1f} MiB", flush=True)
    summary: dict[str, Any] = {}
    for name, results in got.items():
        kinds = sorted({k for res in results for k in res["parts_s"]})
        summary[name] = {
            "export_s": spread([res["export_s"] for res in results]),
            "parts_s": {k: spread([res["parts_s"].get(k, 0.0) for res in results]) for k in kinds},
            "mib": spread([sum(res["bytes"].values()) / 2**20 for res in results]),
            "train_s": spread([res["train_s"] for res in results]),
        }
    d_, f_ = summary["default"], summary["full"]
    load = os.getloadavg()[0]

    def band(sp: dict[str, float]) -> str:
        return f"min {sp['min']:.1f}, max {sp['max']:.1f}, n {sp['n']}"

    rows = [
        row("TRL trace window export, all artefacts (before: the old default)", round(f_["export_s"]["median"], 1),
            "s", notes=f"{band(f_['export_s'])}; {f_['mib']['median']:.1f} MiB written; tiny GPT-2 GRPO, CPU"),
        row("TRL trace window export, default trace options", round(d_["export_s"]["median"], 1), "s",
            notes=f"{band(d_['export_s'])}; {d_['mib']['median']:.1f} MiB written; load avg {load:.1f}"),
    ]
    write_result("trace_export", rows, {"steps": STEPS, "active": ACTIVE, "full_options": FULL, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
