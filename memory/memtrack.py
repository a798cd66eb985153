"""Measure the scoring and update peaks of a real-size model on the CPU without its memory.

torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``) counts every storage the step creates, by
category (parameters, gradients, optimizer state, activations, temporaries), while ``FakeTensorMode`` makes
those storages free: an 8B model's training step is measured in about a minute and well under 1 GiB of RSS.
This is the ground truth the deployment planner (:mod:`memory.deploy`) is checked against at real scale.

The measured step is the kit's reference RLHF step for one rank: ``scoring`` = a no-grad forward of the frozen
model to per-token log-probs (logits -> fp32 log-softmax -> gather); ``update`` = the same with gradients,
a policy-gradient loss, backward, and one AdamW step (single-tensor, states in the parameter dtype), with
optimizer state already present (a steady-state step). Dropout is off, as RLHF trainers run it. Attention is
``sdpa`` as transformers runs it here (under FakeTensorMode it builds a boolean causal mask, so SDPA gets the
mask and GQA's KV heads repeated to the query heads), ``flash`` (SDPA called as flash attention runs: causal,
no mask, KV heads unrepeated; the planner's ``flash``), or ``eager``. The update is measured in two regions,
forward+backward (``update``) and the optimizer step (``optimizer_step``).
"""
from __future__ import annotations

import resource
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class TrackSpec:
    """One measured configuration (a transformers config dict plus the step's knobs)."""

    config: dict[str, Any]
    batch: int = 1
    seq: int = 1024
    gradient_checkpointing: bool = False
    lora_rank: int = 0                 # 0: full fine-tuning
    attn: str = "sdpa"                 # sdpa | eager | flash (see the module docstring)
    dtype: str = "bf16"
    name: str = ""
    phases: tuple[str, ...] = ("scoring", "update")
    sequence_parallel: int = 1         # Ulysses degree: one rank of the group is measured (see measure)


@dataclass
class TrackResult:
    peaks: dict[str, int]
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    max_rss_bytes: int = 0


def _build(spec: TrackSpec):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec.config)
    model_type = cfg.pop("model_type")
    for k in ("dropout", "attention_dropout", "activation_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if k in cfg or model_type in ("gpt2", "opt"):
            cfg[k] = 0.0
    hf = AutoConfig.for_model(model_type, **cfg)
    hf.use_cache = False
    attn = spec.attn
    if spec.sequence_parallel > 1 and attn != "flash":
        raise ValueError("sequence_parallel > 1 is measured with attn='flash' only (veRL's Ulysses wraps flash)")
    if attn == "flash":
        attn = _register_flash_attention(spec.sequence_parallel)
    model = AutoModelForCausalLM.from_config(hf, dtype=getattr(torch, DTYPES[spec.dtype]),
                                             attn_implementation=attn)
    if spec.gradient_checkpointing:
        with warnings.catch_warnings():  # transformers 5 renames it; the behaviour measured is this one
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora_rank:
        add_lora(model, spec.lora_rank, getattr(torch, DTYPES[spec.dtype]))
    model.train()
    return model


def add_lora(model, rank: int, dtype) -> None:
    """Freeze the model and wrap every linear layer of the decoder blocks (peft's ``all-linear``, LM head
    excluded) with a rank-``rank`` adapter: ``y = base(x) + B(A(x)) * scale``. Written here because peft's
    injection moves adapters with ``.to()``, which fake tensors refuse; the forward is peft's (dropout 0)."""
    from torch import nn

    class LoraLinear(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base
            self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)
            self.scale = 2.0

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                setattr(parent, name, LoraLinear(child))


class _NoHook:
    def remove(self) -> None:
        pass


def _tracker(model, opt):
    """A MemTracker over the model and optimizer. Frozen parameters get a placeholder gradient hook: the
    tracker would otherwise try to hook them and fail (they never get gradients)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    for p in model.parameters():
        if not p.requires_grad:
            mt._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    mt.track_external(model, opt)
    return mt


def _logprobs(model, ids, position_ids=None):
    import torch

    logits = model(input_ids=ids, position_ids=position_ids).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _all_to_all(x, scatter_dim: int, gather_dim: int):
    """veRL's ``all_to_all_tensor`` (verl/utils/ulysses.py): contiguous chunks in, empty chunks out, one cat."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    inputs = [t.contiguous() for t in torch.tensor_split(x, n, scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(n)]
    dist.all_to_all(outputs, inputs)
    return torch.cat(outputs, dim=gather_dim).contiguous()


def _ulysses_functions():
    """The two autograd functions of veRL's Ulysses: ``SeqAllToAll`` (all-to-all forward, the inverse
    all-to-all backward) and ``Gather`` (all-gather of the per-token outputs, the rank's slice backward)."""
    import torch
    import torch.distributed as dist

    class SeqAllToAll(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scatter_dim: int, gather_dim: int):
            ctx.dims = scatter_dim, gather_dim
            return _all_to_all(x, scatter_dim, gather_dim)

        @staticmethod
        def backward(ctx, grad):
            scatter_dim, gather_dim = ctx.dims
            return _all_to_all(grad, gather_dim, scatter_dim), None, None

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dim: int):
            n = dist.get_world_size()
            ctx.dim, ctx.part, ctx.n = dim, x.size(dim), n
            out = torch.empty((x.size(0) * n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous())
            return torch.cat(out.split(x.size(0), dim=0), dim=dim)

        @staticmethod
        def backward(ctx, grad):
            return (grad * ctx.n).split(ctx.part, dim=ctx.dim)[dist.get_rank()].contiguous(), None

    return SeqAllToAll, Gather


def _register_flash_attention(sequence_parallel: int = 1) -> str:
    """Register SDPA called the way flash attention runs as a transformers attention implementation: causal,
    no mask, GQA heads unrepeated. With ``sequence_parallel`` > 1 it is veRL's Ulysses attention
    (``_ulysses_flash_attention_forward``): q, k, v of the rank's 1/sp of the tokens and all heads are exchanged
    for all tokens and 1/sp of the heads, and the output goes back."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = "kit_causal_sdpa" if sequence_parallel == 1 else f"kit_ulysses{sequence_parallel}_sdpa"
    seq_a2a = _ulysses_functions()[0] if sequence_parallel > 1 else None

    def attention(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        if seq_a2a is None:
            return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
        repeats = max(sequence_parallel // key.size(1), 1)  # veRL repeats KV heads only when fewer than sp
        key, value = (t.repeat_interleave(repeats, dim=1) if repeats > 1 else t for t in (key, value))
        # veRL's layout is (batch, seq, heads, dim): seq gathered, heads scattered
        q, k, v = (seq_a2a.apply(t.transpose(1, 2), 2, 1).transpose(1, 2) for t in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)
        return seq_a2a.apply(out, 1, 2), None

    def no_mask(*args, **kwargs):
        return None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, no_mask)
    return name


def _steady_optimizer(model):
    """Single-tensor AdamW over the trained parameters, stepped once on zero gradients: a steady-state step, with
    optimizer state present before the measured one."""
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-6, foreach=False, fused=False)
    for p in trained:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _peak(tracker: Any) -> dict[str, int]:
    """A tracker's peak snapshot of its one device, by category (FSDP's categories without their enum prefix)."""
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(k).replace("_FSDPRefType.", ""): int(v) for k, v in snap.items()}


def measure(spec: TrackSpec) -> TrackResult:
    """Peak bytes of the scoring and update phases, each measured by its own tracker on fake tensors.

    With ``sequence_parallel`` = sp > 1 the step is one rank of a Ulysses group as veRL runs it
    (``use_remove_padding``): the micro-batch's ``batch x seq`` tokens packed into one row, the rank holding
    1/sp of them, attention exchanged by all-to-all and the per-token log-probs all-gathered back to the whole
    row. A fake process group of sp ranks (created here when none exists) makes the collectives free while
    every buffer they need is allocated."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    sp = spec.sequence_parallel
    if sp > 1:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if not dist.is_initialized():
            dist.init_process_group("fake", rank=0, world_size=sp, store=FakeStore())
        if dist.get_world_size() != sp:
            raise ValueError(f"sequence_parallel={sp} needs a process group of {sp} ranks, "
                             f"not {dist.get_world_size()}")
        _, gather = _ulysses_functions()
    t0 = time.perf_counter()
    breakdown: dict[str, dict[str, int]] = {}
    with FakeTensorMode():
        model = _build(spec)
        vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else spec.config["vocab_size"]
        if sp > 1:
            local = -(-spec.batch * spec.seq // sp)
            ids, pos = torch.randint(0, vocab, (1, local)), torch.arange(local).unsqueeze(0)
            adv = torch.ones(1, local * sp)

            def logprobs():
                return gather.apply(_logprobs(model, ids, pos), 1)
        else:
            ids, adv = torch.randint(0, vocab, (spec.batch, spec.seq)), torch.ones(spec.batch, spec.seq)

            def logprobs():
                return _logprobs(model, ids)
        opt = _steady_optimizer(model)
        if "scoring" in spec.phases:
            mt = _tracker(model, opt)
            with mt, torch.no_grad():
                logprobs().sum()
            breakdown["scoring"] = _peak(mt)
        if "update" in spec.phases:
            mt = _tracker(model, opt)
            with mt:
                loss = -(logprobs() * adv).mean()
                fw = next(iter(mt.get_tracker_snapshot("current").values()))
                breakdown["after_forward"] = {str(k): int(v) for k, v in fw.items()}
                loss.backward()
                del loss
            breakdown["update"] = _peak(mt)
            mt = _tracker(model, opt)  # the optimizer step on top of all gradients, measured on its own
            with mt:
                opt.step()
                opt.zero_grad(set_to_none=True)
            breakdown["optimizer_step"] = _peak(mt)
    peaks: dict[str, int] = {ph: breakdown[ph]["Total"] for ph in ("scoring", "update", "optimizer_step")
                             if ph in breakdown}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TrackResult(peaks, breakdown, time.perf_counter() - t0, rss)


def measure_fsdp(spec: TrackSpec, world_size: int) -> TrackResult:
    """One rank's scoring, update and optimizer-step peaks of the same step sharded with FSDP2, measured by
    torch's ``FSDPMemTracker`` on a fake process group: ``fully_shard`` per decoder layer and on the root,
    fp32 sharded parameters computed in bf16 with fp32 gradient reduction (veRL's and accelerate's mixed
    precision). The fake backend's collectives do nothing but FSDP allocates their real-size buffers, so
    every byte of one rank is counted. The process group is created here when none exists."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    mesh = init_device_mesh("cpu", (world_size,))
    t0 = time.perf_counter()
    breakdown: dict[str, dict[str, int]] = {}

    with FakeTensorMode():
        model = _build(replace(spec, dtype="fp32"))
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, DTYPES[spec.dtype]), reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        ids = torch.randint(0, model.config.vocab_size, (spec.batch, spec.seq))
        adv = torch.ones(spec.batch, spec.seq)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-6, foreach=False, fused=False)

        def update() -> None:
            loss = -(_logprobs(model, ids) * adv).mean()
            loss.backward()

        update()  # steady state: optimizer state exists before the measured step
        opt.step()
        opt.zero_grad(set_to_none=True)
        fmt = FSDPMemTracker(model, opt)
        with fmt, torch.no_grad():
            _logprobs(model, ids).sum()
        breakdown["scoring"] = _peak(fmt)
        fmt = FSDPMemTracker(model, opt)
        with fmt:
            update()
        breakdown["update"] = _peak(fmt)
        fmt = FSDPMemTracker(model, opt)
        with fmt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        breakdown["optimizer_step"] = _peak(fmt)
    peaks = {ph: b["Total"] for ph, b in breakdown.items()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TrackResult(peaks, breakdown, time.perf_counter() - t0, rss)


def measure_real(spec: TrackSpec, prompt_len: int) -> TrackResult:
    """The same step on real tensors and real CPU kernels, with generation first, each phase measured by the
    profiler's allocator replay (:func:`memory.measure.track_peak`) instead of ``MemTracker``: a second instrument
    and no fake kernels between the planner and PyTorch. For small configs (every tensor is allocated).

    ``generation`` = ``generate`` of ``spec.batch`` sequences from ``prompt_len``-token prompts to ``spec.seq``
    tokens (KV cache, multinomial sampling, no early stop) with the model in eval mode, optimizer state present;
    then ``scoring``, ``update`` and ``optimizer_step`` on the generated sequences, as :func:`measure` runs them.
    The baseline of each phase is the bytes of the model, optimizer state and inputs alive at its start."""
    import torch

    from .measure import tensor_bytes, track_peak

    if spec.sequence_parallel > 1:
        raise ValueError("measure_real runs one process: sequence_parallel must be 1")
    if not 0 < prompt_len < spec.seq:
        raise ValueError(f"prompt_len must be in (0, seq={spec.seq}); got {prompt_len}")
    t0 = time.perf_counter()
    model = _build(spec)
    opt = _steady_optimizer(model)
    vocab = model.config.vocab_size
    prompts = torch.randint(1, vocab, (spec.batch, prompt_len))
    peaks: dict[str, int] = {}
    model.eval()  # generate keeps its KV cache only outside checkpointed training mode, as trainers run it
    with torch.no_grad(), track_peak("cpu", tensor_bytes(model, opt, prompts)) as res:
        ids = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=spec.seq - prompt_len,
                             min_new_tokens=spec.seq - prompt_len, do_sample=True, top_k=0, top_p=1.0,
                             use_cache=True, pad_token_id=0, eos_token_id=None)
    peaks["generation"] = res.peak_bytes
    model.train()
    adv = torch.ones(spec.batch, spec.seq)
    with torch.no_grad(), track_peak("cpu", tensor_bytes(model, opt, ids, adv)) as res:
        _logprobs(model, ids).sum()
    peaks["scoring"] = res.peak_bytes
    with track_peak("cpu", tensor_bytes(model, opt, ids, adv)) as res:
        loss = -(_logprobs(model, ids) * adv).mean()
        loss.backward()
        del loss
    peaks["update"] = res.peak_bytes
    with track_peak("cpu", tensor_bytes(model, opt, ids, adv)) as res:
        opt.step()
        opt.zero_grad(set_to_none=True)
    peaks["optimizer_step"] = res.peak_bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TrackResult(peaks, {}, time.perf_counter() - t0, rss)
