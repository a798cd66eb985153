"""veRL's log-prob head measured on CPU: bytes per token and vocabulary entry, next to memory.deploy.VERL_HEAD.

    python benchmarks/bench_memory_verl_head.py [--out benchmarks/results/memory_verl_head.json]

Why: with a 152k vocabulary the head (logits, log-probs, entropy) is most of a micro-batch's activations, and
veRL's is not the planner's reference one (an fp32 log-softmax: 12 B per token and vocabulary entry with grad).
veRL's actor (``dp_actor.py _forward_micro_batch``, the same at 49b08e9 and b178a3c) divides the model-dtype
logits by the temperature in place, takes log-probs with flash-attn's Triton cross entropy (backward in place
unless the entropy is computed too) and the entropy with ``entropy_from_logits`` (``torch.compile``'d unless
``use_torch_compile=False``; under ``torch.utils.checkpoint`` with ``entropy_checkpointing``; in 2048-token fp32
chunks with ``entropy_from_logits_with_chunking``).

What runs, per mode and with and without grad: a bf16 LM head (``h @ W.T``), ``div_`` by the temperature,
flash-attn 2.7.4.post1's ``cross_entropy_loss`` (benchmarks/third_party, unmodified, under ``TRITON_INTERPRET=1``:
its kernels only write into tensors its wrapper allocates, so the wrapper's allocations are its footprint) and
veRL's two entropy functions as written there, with the fp32 casts CUDA ``autocast(bfloat16)`` inserts spelled
out (softmax and sum with ``dtype=float32``, logsumexp on an fp32 copy: CPU autocast casts differently); then the
backward. Each run is a fresh process. The peak (memory.measure, CPU allocator events) is taken at 4096 and 8192
tokens (two and four whole entropy chunks): the slope per token, divided by the vocabulary, is the head's bytes
per token and vocabulary entry; for the chunked eager entropy the intercept, per chunk token, is the chunk's.

Limits: Inductor's CPU code generator, not the CUDA one, compiles the entropy: on CPU it keeps one fp32
vocabulary-sized buffer (2 of the compiled modes' 8 B with grad, 4 of their 6 without) that a CUDA kernel may
fuse away; flash-attn's kernels run in Triton's interpreter, not on a GPU.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import head_row, out_or_work, two_point_fit, write_result  # noqa: E402

TOKENS = (4096, 8192)
VOCAB, HIDDEN, CHUNK = 2048, 16, 2048
# mode -> (entropy function, torch.compile'd, under torch.utils.checkpoint); None: no entropy
MODES: dict[str, tuple[str | None, bool, bool]] = {
    "none": (None, False, False),
    "compiled": ("plain", True, False),
    "checkpointed": ("plain", True, True),
    "eager": ("plain", False, False),
    "checkpointed_eager": ("plain", False, True),
    "chunked": ("chunking", True, False),
    "chunked_eager": ("chunking", False, False),
}


def _worker() -> None:
    """One measurement: MODE, GRAD, TOKENS in the environment; prints {"peaks": [...]} as one JSON line."""
    import contextlib

    import torch

    # flash-attn enters torch.cuda.device(logits.device.index) around each launch; on CPU there is none to enter
    torch.cuda.device = lambda index: contextlib.nullcontext()  # type: ignore[assignment,misc]
    sys.path.insert(0, str(ROOT / "benchmarks" / "third_party"))
    from flash_attn_cross_entropy import cross_entropy_loss

    from memory.measure import measure_peak

    def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
        pd = torch.nn.functional.softmax(logits, dim=-1, dtype=torch.float32)
        return torch.logsumexp(logits.float(), dim=-1) - torch.sum(pd * logits, dim=-1, dtype=torch.float32)

    def entropy_from_logits_with_chunking(logits: torch.Tensor,
                                          chunk_size: int = int(os.environ.get("CHUNK", CHUNK))) -> torch.Tensor:
        entropy = torch.zeros(logits.shape[0], device=logits.device)
        for i in range(0, logits.shape[0], chunk_size):
            logits_chunk = logits[i:i + chunk_size].float()
            pd_chunk = torch.nn.functional.softmax(logits_chunk, dim=-1)
            entropy_chunk = torch.logsumexp(logits_chunk, dim=-1) - torch.sum(pd_chunk * logits_chunk, dim=-1)
            entropy[i:i + chunk_size] = entropy_chunk
        return entropy

    fn_name, compiled, checkpointed = MODES[os.environ["MODE"]]
    grad = os.environ["GRAD"] == "1"
    fn = {"plain": entropy_from_logits, "chunking": entropy_from_logits_with_chunking, None: None}[fn_name]
    entropy = torch.compile(fn, dynamic=True) if fn is not None and compiled else fn
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16) * 0.05

    def step(tokens: int):
        labels = torch.randint(0, VOCAB, (tokens,))
        hidden = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, requires_grad=grad)

        def run() -> float:
            with torch.set_grad_enabled(grad):
                logits = hidden @ weight.t()
                logits.div_(1.0)  # veRL: logits_rmpad.div_(temperature)
                loss = cross_entropy_loss(logits, labels, inplace_backward=entropy is None)[0].mean()
                if entropy is not None:
                    ent = torch.utils.checkpoint.checkpoint(entropy, logits, use_reentrant=False) \
                        if checkpointed else entropy(logits)
                    loss = loss - 0.001 * ent.mean()
                del logits
                if grad:
                    loss.backward()
            return float(loss)
        return run

    sizes = [int(t) for t in os.environ["TOKENS"].split(",")]
    if compiled:
        for t in sizes:
            step(t)()  # compile outside the measured regions
    print(json.dumps({"peaks": [measure_peak(step(t))[1].delta_peak_bytes for t in sizes]}))


def measure(mode: str, grad: bool, tokens: tuple[int, int] = TOKENS, chunk: int = CHUNK) -> dict:
    """Peaks of one mode at two token counts (a fresh process each), and the fitted per-token-and-vocab slope
    and per-chunk-token intercept, in bytes. ``chunk``: the chunked entropy's chunk (veRL's 2048; the tests take
    a smaller one, and fewer tokens, since the per-chunk-token bytes do not depend on it)."""
    peaks, slope, intercept = two_point_fit(
        __file__, {"TRITON_INTERPRET": "1", "MODE": mode, "GRAD": "1" if grad else "0", "CHUNK": str(chunk),
                   "TOKENS": ",".join(map(str, tokens))}, tokens, f"{mode} (grad={grad})", timeout=1200)
    return {"mode": mode, "grad": grad, "tokens": list(tokens), "peaks": peaks,
            "per_token_vocab": slope / VOCAB, "per_chunk_token_vocab": intercept / (chunk * VOCAB)}


def main() -> None:
    out = out_or_work(__doc__, ROOT / "benchmarks/results/memory_verl_head.json", _worker)
    if out is None:
        return
    from memory.deploy import VERL_HEAD

    rows, details = [], []
    for mode in MODES:
        for grad in (True, False):
            m = measure(mode, grad)
            details.append({**m, "planned_per_token_vocab": VERL_HEAD[mode][0 if grad else 1],
                            "planned_per_chunk_token_vocab": VERL_HEAD[mode][2 if grad else 3]})
            rows.append(head_row(f"veRL head {mode}", m, VERL_HEAD[mode], grad, "chunk"))
    write_result("memory_verl_head", rows, details={"modes": details, "vocab": VOCAB, "hidden": HIDDEN,
                                                    "chunk": CHUNK}, path=out)


if __name__ == "__main__":
    main()
