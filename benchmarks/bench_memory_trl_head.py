"""TRL's GRPO log-prob head measured on CPU: bytes per completion token and vocabulary entry, next to
memory.deploy.TRL_HEAD.

    python benchmarks/bench_memory_trl_head.py [--out benchmarks/results/memory_trl_head.json]

Why: with a 152k vocabulary the head is most of a GRPO micro-batch's activations, and TRL's is not the planner's
reference one (an fp32 log-softmax over every token: 12 B per token and vocabulary entry with grad). TRL's
``GRPOTrainer._get_per_token_logps`` (0.15 to 1.9) asks the model for the logits of the completion only
(``logits_to_keep + 1`` positions, in the model's dtype), drops the last position, divides by the temperature
(not at all in 0.15, a copy from 0.16, ``div_`` in place from 1.0) and takes ``selective_log_softmax``: for
16-bit logits one ``log_softmax`` per sequence (row), gathered at the labels.

What runs, with and without grad: a bf16 LM head (``h @ W.T``) over ``L + 1`` positions per sequence, the two
slices, the division (``none``, ``copy`` or ``inplace``), and TRL's own ``trl.trainer.utils.selective_log_softmax`` from
the installed TRL (its fused Triton kernel is for CUDA tensors only, so on CPU it runs the per-row path 0.18 has),
then the backward. Each run is a fresh process. The peak (memory.measure, CPU allocator events) is taken at 4 and
8 sequences of ``L`` completion tokens: the slope per completion token, divided by the vocabulary, is the head's
bytes per token and vocabulary entry; the intercept, per row token, is the one-row loop's.

Limits: CPU kernels (a bf16 log-softmax here may keep an fp32 temporary the CUDA kernel does not); TRL after 1.9
runs a fused Triton log-prob kernel on CUDA, which is not measured here (no GPU).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import head_row, out_or_work, two_point_fit, write_result  # noqa: E402

SEQS = (4, 8)
VOCAB, HIDDEN, LENGTH = 2048, 16, 512
DIVISIONS = ("none", "copy", "inplace")  # TRL 0.15, 0.16 to 0.29, 1.0 on


def _worker() -> None:
    """One measurement: DIVISION, GRAD, SEQS in the environment; prints {"peaks": [...]} as one JSON line."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    from memory.measure import measure_peak

    grad = os.environ["GRAD"] == "1"
    division = os.environ["DIVISION"]
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16) * 0.05

    def step(seqs: int):
        completion_ids = torch.randint(0, VOCAB, (seqs, LENGTH))
        hidden = torch.randn(seqs, LENGTH + 1, HIDDEN, dtype=torch.bfloat16, requires_grad=grad)

        def run() -> float:
            with torch.set_grad_enabled(grad):
                logits = hidden @ weight.t()  # the model's logits for logits_to_keep + 1 positions
                logits = logits[:, :-1, :]
                logits = logits[:, -LENGTH:]
                if division == "inplace":
                    logits.div_(0.7)
                elif division == "copy":
                    logits = logits / 0.7
                logps = selective_log_softmax(logits, completion_ids)
                del logits
                loss = logps.sum()
                if grad:
                    loss.backward()
            return float(loss)
        return run

    sizes = [int(s) for s in os.environ["SEQS"].split(",")]
    print(json.dumps({"peaks": [measure_peak(step(s))[1].delta_peak_bytes for s in sizes]}))


def measure(division: str, grad: bool, seqs: tuple[int, int] = SEQS) -> dict:
    """Peaks at two sequence counts (a fresh process each), and the fitted per-token-and-vocab slope and
    per-row-token intercept, in bytes."""
    peaks, slope, intercept = two_point_fit(
        __file__, {"DIVISION": division, "GRAD": "1" if grad else "0", "SEQS": ",".join(map(str, seqs))},
        [n * LENGTH for n in seqs], f"{division} (grad={grad})")
    return {"division": division, "grad": grad, "seqs": list(seqs), "length": LENGTH, "peaks": peaks,
            "per_token_vocab": slope / VOCAB, "per_row_token_vocab": intercept / (LENGTH * VOCAB)}


def main() -> None:
    out = out_or_work(__doc__, ROOT / "benchmarks/results/memory_trl_head.json", _worker)
    if out is None:
        return
    from memory.deploy import TRL_HEAD

    rows, details = [], []
    for division, head in zip(DIVISIONS, ("trl_nodiv", "trl_copy", "trl"), strict=True):
        for grad in (True, False):
            m = measure(division, grad)
            details.append({**m, "head": head, "planned_per_token_vocab": TRL_HEAD[head][0 if grad else 1],
                            "planned_per_row_token_vocab": TRL_HEAD[head][2 if grad else 3]})
            rows.append(head_row(f"TRL head {head} (division {division}), completion tokens", m, TRL_HEAD[head], grad,
                                 "row"))
    write_result("memory_trl_head", rows, details={"runs": details, "vocab": VOCAB, "hidden": HIDDEN,
                                                   "length": LENGTH}, path=out)


if __name__ == "__main__":
    main()
