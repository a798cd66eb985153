"""The TRL adapter's memory prediction against a real TRL GRPO run on the CPU, phase by phase.

    python benchmarks/bench_memory_trl_real.py [--out benchmarks/results/memory_trl_real.json]

TRL's own ``GRPOTrainer`` (the installed release: its ``generate`` call, its log-prob passes, its loss, its
optimizer) trains small models built locally (a Llama shape with grouped KV heads and a gated MLP, and the
project's tiny GPT-2), fp32 on the CPU, with a KL reference (``beta > 0``). The second step is measured with the
profiler's allocator replay (``memory.measure``): every tensor allocated or freed in the step, plus the bytes of the
model, the reference and the optimizer state alive when it starts. Each of TRL's calls is wrapped in a
``record_function`` range: ``generate`` (generation), ``_get_per_token_logps_and_entropies`` without grad
(scoring), ``compute_loss`` and the backward (update), the optimizer's ``step`` (optimizer step); a phase's peak is
the most bytes alive inside its ranges. The prediction is the one the adapter writes to ``memory.json`` at train
start (:func:`adapters.trl_memory.predict_trainer`), with the prompt length the run's prompts have. Prompts of one
token length and ``min_new_tokens`` make every sequence the planned length (no padding, no early stop). One fresh
process per configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.common import measure_each, row, write_result  # noqa: E402

PHASES = ("generation", "scoring", "update", "optimizer_step")
TARGET = 0.05
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 8,
         "num_key_value_heads": 2, "intermediate_size": 896, "tie_word_embeddings": False,
         "max_position_embeddings": 1024}
# name, model ("tiny": the project's tiny GPT-2; else a config built with the tiny tokenizer's vocabulary),
# per-device batch, generations per prompt, prompt words, completion tokens, gradient checkpointing, bf16 (the
# Trainer's autocast over the fp32 model, TRL's default on a GPU)
CONFIGS = [
    ("llama fp32 b8 g4 p48 c64", LLAMA, 8, 4, 48, 64, False, False),
    ("llama fp32 ckpt b8 g8 p96 c32", LLAMA, 8, 8, 96, 32, True, False),
    ("tiny gpt2 fp32 b16 g4 p32 c96", "tiny", 16, 4, 32, 96, False, False),
    ("llama fp32 + bf16 autocast b8 g4 p48 c64", LLAMA, 8, 4, 48, 64, False, True),
    ("llama fp32 + bf16 autocast ckpt b8 g8 p96 c32", LLAMA, 8, 8, 96, 32, True, True),
]


def _model_dir(spec: Any, tmp: Path) -> Path:
    """The project's tiny GPT-2, or a randomly initialised model of ``spec`` saved next to its tokenizer."""
    from rlhf_core.tiny_model import tiny_model_path

    tiny = Path(tiny_model_path())
    if spec == "tiny":
        return tiny
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = AutoConfig.for_model(**{**spec, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                  "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id})
    torch.manual_seed(0)
    out = tmp / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in tiny.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, out / f.name)
    return out


def _prompts(tok, words: int, n: int) -> list[str]:
    """``n`` prompts of exactly ``words`` tokens each (one token per word), so TRL pads none of them."""
    vocab = [w for w in ("good", "bad", "movie", "food", "game", "long", "okay", "trip", "day", "the")
             if len(tok(" " + w)["input_ids"]) == 1]
    prompts = ["".join(" " + vocab[(i + k) % len(vocab)] for k in range(words)) for i in range(n)]
    lengths = {len(tok(p)["input_ids"]) for p in prompts}
    if len(lengths) != 1:
        raise RuntimeError(f"prompts tokenize to different lengths {sorted(lengths)}")
    return prompts


def measure_one(spec: Any, batch: int, gens: int, words: int, completion: int, ckpt: bool, bf16: bool) -> dict:
    """One TRL GRPO run of two steps; the second measured phase by phase; the adapter's prediction beside it."""
    import torch
    import transformers
    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from adapters.trl_memory import predict_trainer
    from memory.measure import cpu_peaks_by_range, tensor_bytes
    from profiler.kineto_log import quiet_kineto

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = _model_dir(spec, tmp)
        tok = AutoTokenizer.from_pretrained(model_dir)
        texts = _prompts(tok, words, 4 * batch)
        prompt_len = len(tok(texts[0])["input_ids"])
        args = GRPOConfig(output_dir=str(tmp / "out"), per_device_train_batch_size=batch, num_generations=gens,
                          max_completion_length=completion, generation_kwargs={"min_new_tokens": completion},
                          max_steps=2, beta=0.04, gradient_checkpointing=ckpt, report_to=[], use_cpu=True,
                          bf16=bf16, save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1)
        ranges: list[str] = []

        def ranged(name: str, fn, when=lambda: True):
            def wrapper(*a, **kw):
                if not when():
                    return fn(*a, **kw)
                ranges.append(name)
                with record_function(f"phase:{name}"):
                    return fn(*a, **kw)
            return wrapper

        class Measure(TrainerCallback):
            """Wraps TRL's calls once the optimizer exists; profiles the second step."""

            def __init__(self):
                self.peaks: dict[str, int] = {}
                self.prof: Any = None

            def on_train_begin(self, args, state, control, **kw):
                trainer.model.generate = ranged("generation", trainer.model.generate)
                trainer._get_per_token_logps_and_entropies = ranged(
                    "scoring", trainer._get_per_token_logps_and_entropies, lambda: not torch.is_grad_enabled())
                trainer.compute_loss = ranged("update", trainer.compute_loss)
                trainer.accelerator.backward = ranged("update", trainer.accelerator.backward)
                trainer.optimizer.step = ranged("optimizer_step", trainer.optimizer.step)

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 1:
                    held = [trainer.model, trainer.optimizer.optimizer]
                    if trainer.ref_model is not None:
                        held.append(trainer.ref_model)
                    self.baseline = tensor_bytes(*held)
                    self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    with quiet_kineto():
                        self.prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if self.prof is not None:
                    with quiet_kineto():
                        self.prof.__exit__(None, None, None)
                    self.peaks = cpu_peaks_by_range(self.prof, "phase:", self.baseline)
                    self.prof = None

        measure = Measure()
        trainer = GRPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(
            [{"prompt": t} for t in texts]), processing_class=tok,
            reward_funcs=lambda completions, **kw: [len(c) / 10.0 for c in completions], callbacks=[measure])
        trainer.remove_callback(PrinterCallback)
        report = predict_trainer(trainer.args, trainer.model, type(trainer).__name__, "cpu", prompt_len=prompt_len)
        trainer.train()
    predicted = {ph: report["prediction"]["phases"][ph]["total"] for ph in PHASES}
    return {"measured": measure.peaks, "predicted": predicted, "prompt_len": prompt_len,
            "inputs": report["inputs"], "phases_seen": sorted(set(ranges))}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_trl_real.json"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(measure_one(*CONFIGS[a.one][1:])))
        return 0
    rows = []
    try:
        for name, got in measure_each(__file__, [c[0] for c in CONFIGS]):
            error = {ph: got["predicted"][ph] / got["measured"][ph] - 1 for ph in PHASES}
            rows.append({"name": name, **got, "error": error})
            print(f"{name:32s} " + "  ".join(f"{ph} {error[ph]:+.1%}" for ph in PHASES), flush=True)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    worst = max(abs(e) for r in rows for e in r["error"].values())
    summary = [row("TRL adapter's prediction vs a real TRL GRPO run on CPU (profiler replay), worst abs. error",
                   round(100 * worst, 2), "%", f"within ±{TARGET:.0%}", worst <= TARGET,
                   f"{len(rows)} runs x 4 phases of TRL's own GRPOTrainer (fp32, and bf16 autocast over fp32), "
                   "KL reference, HF generate")]
    write_result("memory_trl_real", summary, {"rows": rows}, path=Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
