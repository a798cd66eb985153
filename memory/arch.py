"""Architecture of any causal LM for memory planning: sizes, exact parameter counts, saved activations.

Why a second shape type next to :class:`memory.estimator.ModelShape`: real deployments use grouped-query
attention (fewer KV heads, which sets the KV cache), gated MLPs (three matrices), untied embeddings and
RMSNorm computed in fp32; all of them change the bytes by tens of percent. Parameter counts are analytic per
family (so planning a 70B model needs no torch import) and are checked against the model built on the meta
device in tests/test_memory_arch.py; unknown families fall back to the meta-device count.

Saved activations per token and layer are written per family from what autograd saves for backward (listed
with ``torch.autograd.graph.saved_tensors_hooks`` on small real models of each family, transformers 5):
elements kept in the compute dtype, and elements kept in fp32 (RMSNorm upcasts its input, softmax
statistics). ``attn``: ``flash`` = flash-attention / SDPA without a mask (q, k, v at KV-head width, output,
log-sum-exp); ``sdpa`` = SDPA with a padding mask, where transformers repeats K and V to all heads first;
``eager`` = matmul + softmax, which also keeps the ``a·s`` probabilities per token in fp32 and the dtype.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIGS_FILE = Path(__file__).with_name("model_configs.json")
LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = LLAMA_LIKE + ("gemma2", "gpt2", "opt")
ATTN_IMPLS = ("flash", "sdpa", "eager")


@dataclass(frozen=True)
class Arch:
    """A causal LM's memory-relevant shape. ``params`` is exact (tied embeddings counted once)."""

    name: str
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool
    params: int
    layer_params: int          # one decoder layer (the unit ZeRO-3/FSDP gathers)
    embed_params: int          # input embedding (+ positions)
    head_params: int           # untied LM head (0 when tied)
    largest_param: int         # largest single tensor
    max_positions: int = 2048

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, LM head)."""
        return self.params - self.layers * self.layer_params

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token (the unit of every KV cache and vLLM/SGLang pool)."""
        return 2 * self.layers * self.kv_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is None:
        raise ValueError(f"model config has none of {names}; cannot plan its memory")
    return default


def count_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Exact parameter counts of a known family from its config fields (no torch)."""
    mt = cfg.get("model_type")
    if mt in LLAMA_LIKE or mt == "gemma2":
        h, L, V = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
        a = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or a)
        d = int(cfg.get("head_dim") or h // a)
        i = int(cfg["intermediate_size"])
        qkv_bias = mt == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = mt != "qwen2" and bool(cfg.get("attention_bias", False))
        attn = h * a * d + 2 * h * kv * d + a * d * h
        attn += (a * d + 2 * kv * d if qkv_bias else 0) + (h if o_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if cfg.get("mlp_bias") else 0)
        norms = (4 if mt == "gemma2" else 2) * h
        layer = attn + mlp + norms
        tied = bool(cfg.get("tie_word_embeddings", mt == "gemma2"))
        embed = V * h
        head = 0 if tied else V * h
        total = L * layer + embed + h + head
        largest = max(V * h, h * i, h * a * d)
    elif mt == "gpt2":
        h, V = int(_get(cfg, "n_embd", "hidden_size")), int(cfg["vocab_size"])
        L = int(_get(cfg, "n_layer", "num_hidden_layers"))
        i = int(cfg.get("n_inner") or 4 * h)
        pos = int(_get(cfg, "n_positions", "max_position_embeddings", default=1024))  # GPT2Config maps the second
        layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
        embed = V * h + pos * h
        head, tied = 0, True
        total = L * layer + embed + 2 * h
        largest = max(V * h, h * i)
    elif mt == "opt":
        h, L, V = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
        i = int(cfg["ffn_dim"])
        p = int(cfg.get("word_embed_proj_dim") or h)
        pos = int(cfg.get("max_position_embeddings", 2048)) + 2  # OPT's learned positions have an offset of 2
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        final_ln = 2 * h if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm") else 0
        proj = 2 * h * p if p != h else 0
        embed = V * p + pos * h
        head, tied = 0, True
        total = L * layer + embed + proj + final_ln
        largest = max(V * p, h * i)
    else:
        raise KeyError(mt)
    return {"params": total, "layer_params": layer, "embed_params": embed, "head_params": head,
            "largest_param": largest, "tied": tied}


def meta_count(cfg: dict[str, Any]) -> tuple[int, int]:
    """(distinct parameters, largest tensor) of the transformers model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    hf = AutoConfig.for_model(cfg["model_type"], **rest)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    sizes = {id(p): p.numel() for p in model.parameters()}
    return sum(sizes.values()), max(sizes.values())


def arch_from_config(cfg: dict[str, Any], name: str = "") -> Arch:
    """An :class:`Arch` from a config.json dict of any causal LM (analytic for known families)."""
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    mt = str(cfg.get("model_type") or "")
    if not mt:
        raise ValueError("model config has no model_type; cannot plan its memory")
    h = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    a = int(_get(cfg, "num_attention_heads", "n_head"))
    L = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    V = int(_get(cfg, "vocab_size"))
    kv = int(cfg.get("num_key_value_heads") or a)
    d = int(cfg.get("head_dim") or h // a)
    i = int(_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
    try:
        c = count_params(cfg)
    except KeyError:  # unknown family: count on the meta device (imports torch/transformers)
        total, largest = meta_count(cfg)
        tied = bool(cfg.get("tie_word_embeddings", True))
        embed = V * h
        layer = (total - embed - (0 if tied else V * h)) // L
        c = {"params": total, "layer_params": layer, "embed_params": embed, "head_params": 0 if tied else V * h,
             "largest_param": largest, "tied": tied}
    gated = mt in LLAMA_LIKE or mt == "gemma2" or "gate_proj" in json.dumps(cfg)
    return Arch(name=name or str(cfg.get("_name_or_path") or mt), family=mt, layers=L, hidden=h, heads=a,
                kv_heads=kv, head_dim=d, intermediate=i, vocab=V, tied=bool(c["tied"]), gated_mlp=gated,
                params=int(c["params"]), layer_params=int(c["layer_params"]), embed_params=int(c["embed_params"]),
                head_params=int(c["head_params"]), largest_param=int(c["largest_param"]),
                max_positions=int(_get(cfg, "max_position_embeddings", "n_positions", default=2048)))


@lru_cache(maxsize=1)
def builtin_table() -> dict[str, Any]:
    return json.loads(CONFIGS_FILE.read_text())


def builtin_names() -> list[str]:
    return list(builtin_table()["models"])


def builtin_config(name: str) -> dict[str, Any] | None:
    t = builtin_table()
    key = t["aliases"].get(name, name)
    lower = {k.lower(): k for k in t["models"]}
    key = lower.get(key.lower(), key)
    entry = t["models"].get(key)
    return dict(entry["config"]) if entry else None


def load_arch(spec: str) -> Arch:
    """A built-in name, a config.json path or a model folder holding one (never downloads)."""
    cfg = builtin_config(spec)
    if cfg is not None:
        return arch_from_config(cfg, name=builtin_table()["aliases"].get(spec, spec))
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{spec}: unreadable config ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{spec}: config.json is not a JSON object")
        return arch_from_config(data, name=str(data.get("_name_or_path") or path.parent.name))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise ValueError(f"unknown model {spec!r}: not a built-in ({', '.join(builtin_names())}), "
                     "a config.json or a folder with one")


# ---- saved activations -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenBytes:
    """Bytes per token: kept in the compute dtype (``dt`` elements) and in fp32 (``f32`` elements)."""

    dt: float
    f32: float

    def bytes(self, dtype_bytes: int) -> float:
        return self.dt * dtype_bytes + self.f32 * 4


def layer_saved(arch: Arch, attn: str, seq: int, trained_norms: bool = True, autocast: bool = False) -> TokenBytes:
    """Elements one decoder layer saves for backward, per token (``seq``: the attended length, for eager).

    ``trained_norms=False`` (LoRA: the norm weights are frozen): an RMSNorm's ``weight * x`` no longer keeps
    ``x`` for the weight's gradient, so the normalized tensor is not saved (Llama-like: one dtype copy per
    norm; Gemma-2: its fp32 copy). LayerNorm (GPT-2, OPT) is one fused op that saves the same either way.

    ``autocast`` (Llama-like only; fp32 parameters under torch autocast): ``dt`` counts elements in autocast's
    16-bit dtype. The residual stream and the RMSNorms stay fp32 (each keeps its fp32 input, its normalized
    tensor and rsqrt), and every projection casts its fp32 input for itself (q, k, v and gate, up: five cast
    copies saved); the rest is as in a 16-bit model. Autocast's cast copies of the weights are not per token
    (``memory.deploy.autocast_casts``)."""
    if attn not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {attn!r}; choose from {', '.join(ATTN_IMPLS)}")
    h, q, kv, i, a = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate, arch.heads
    fam = arch.family
    if autocast and fam not in LLAMA_LIKE:
        raise ValueError(f"autocast activations are modelled for {', '.join(LLAMA_LIKE)} only, not {fam}")
    if fam in LLAMA_LIKE or fam == "gemma2" or fam not in ("gpt2", "opt"):
        # two RMSNorms: fp32 input + rsqrt (fp32), normalized in dtype + its output (the next matmul's input)
        norms = 4 if fam == "gemma2" else 2
        # gemma2 also keeps fp32 x·rsqrt for the weight's gradient
        norm_f32 = norms * (h + 1) + (norms * h if fam == "gemma2" and trained_norms else 0)
        norm_dt = (2 * 2 * h if trained_norms else 2 * h) if fam != "gemma2" else 2 * h
        mlp = 4 * i
        if autocast:
            norm_f32, norm_dt = 2 * ((2 * h if trained_norms else h) + 1), 5 * h
        if attn == "flash":
            att_dt, att_f32 = 2 * q + 2 * kv, a
        elif attn == "sdpa":
            att_dt, att_f32 = 4 * q, a
        else:  # eager: q, repeated k and v, o_proj input; probabilities in fp32 (softmax) and dtype (matmul)
            att_dt, att_f32 = 4 * q + a * seq * (1 + (1 if fam == "gemma2" else 0)), a * seq
        return TokenBytes(norm_dt + att_dt + mlp, norm_f32 + att_f32)
    if fam == "gpt2":  # LayerNorm keeps input + mean/rstd (dtype); fused qkv; gelu_new keeps 4 tensors of i
        ln_dt = 2 * (h + 2) + 2 * h
        # eager: q, k, v, the c_proj input and the probabilities (softmax in the dtype, no fp32 copy)
        att_dt = 3 * h + h if attn != "eager" else 4 * h + a * seq
        att_f32 = a if attn != "eager" else 0
        return TokenBytes(ln_dt + att_dt + 5 * i, att_f32)
    # opt: LayerNorms (input + stats) + their outputs, separate q/k/v, attention output, ReLU output
    ln_dt = 2 * (h + 2) + 2 * h
    att_dt = 3 * h + h if attn != "eager" else 4 * h + a * seq  # eager: fp32 softmax + its dtype copy
    att_f32 = a if attn != "eager" else a * seq
    return TokenBytes(ln_dt + att_dt + i, att_f32)


def final_norm_saved(arch: Arch, trained: bool = True) -> TokenBytes:
    """The final norm and the LM head's input, per token. ``trained=False`` (LoRA: norm and head frozen): the
    head needs only its weight for the input's gradient, and an RMSNorm keeps only what the input's gradient
    needs (fp32 input and rsqrt)."""
    h = arch.hidden
    if arch.family in ("gpt2", "opt"):
        return TokenBytes(2 * h + 2, 0) if trained else TokenBytes(h + 2, 0)
    if arch.family == "gemma2":
        return TokenBytes(h, 2 * h + 1) if trained else TokenBytes(0, h + 1)
    return TokenBytes(2 * h, h + 1) if trained else TokenBytes(0, h + 1)


def layer_transient(arch: Arch) -> TokenBytes:
    """Activations per token of one layer in a vLLM/SGLang profile run (the residual stream, the normed input and
    the MLP's gate/up/activation outputs): an estimate for engines whose fused kernels are not HF's layers and
    are not measured here. HF forwards (scoring, ``generate``) use :func:`nograd_layer_bytes`."""
    h, i = arch.hidden, arch.intermediate
    if arch.gated_mlp:
        return TokenBytes(2 * h + 3 * i, 0)
    return TokenBytes(2 * h + 2 * i, 0)


def nograd_layer_bytes(arch: Arch, attn: str, attended: int, dtype_bytes: int, lora: bool = False) -> int:
    """Peak bytes per token inside one no-grad decoder layer forward (scoring, ``generate``'s prefill), beyond
    the one hidden state the caller counts (the model's input embeddings, kept by its forward to the end).

    Read from transformers 5's layers and checked allocation by allocation on real tensors
    (``tests/test_memory_small_real.py``): the model's loop keeps the layer's input, and eager's mask lives for
    the whole forward (two for Gemma-2: sliding and full). The layer peaks at one of two moments:
    - attention: the normed input, the rotated queries, K and V repeated to every head (eager, and ``sdpa`` as
      this module means it: with a padding mask) and, eager, at the softmax the scores, their fp32 copy (none in
      fp32) and the fp32 softmax;
    - MLP: the residual, the normed input (kept by the caller's ``hidden_states``; OPT rebinds it, so it dies at
      fc1), the activations (LoRA: the adapter's output and its scaled copy beside the base's) and, eager, the
      probabilities, which the layer keeps in a local (``hidden_states, _ = self.self_attn(...)``).
    """
    if attn not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {attn!r}; choose from {', '.join(ATTN_IMPLS)}")
    h, q, i, a, db = arch.hidden, arch.q_dim, arch.intermediate, arch.heads, dtype_bytes
    fam, eager = arch.family, attn == "eager"
    learned_positions = fam in ("gpt2", "opt")  # the position embeddings stay referenced beside the sum
    held = h * db * (2 if learned_positions else 1)
    held += (2 if fam == "gemma2" else 1) * attended * db if eager else 0
    held += 2 * arch.head_dim * db if not learned_positions else 0  # rotary cos and sin
    if fam == "gpt2":  # fused c_attn (q, k, v are views of it); softmax in the dtype next to its input
        att = h * db + 3 * h * db + (a * attended * 2 * db if eager else 0)
    else:
        rep = 2 * q * db if attn != "flash" and arch.kv_heads < a else 0  # repeat_kv: eager, or SDPA with a mask
        att = h * db + q * db + rep + (a * attended * (db + 4 + (4 if db != 4 else 0)) if eager else 0)
    probs = a * attended * db if eager else 0
    if fam == "gpt2":  # the attention output stays in a local; gelu_new keeps its input and three temporaries
        mlp = 3 * h * db + 4 * i * db
    elif arch.gated_mlp:
        mlp = 2 * h * db + (4 if lora else 3) * i * db
    elif lora:  # fc1 with its adapter beside the normed input, or fc2's three outputs beside the activation
        mlp = h * db + max(h + 3 * i, i + 3 * h) * db
    else:
        mlp = h * db + max(h + i, 2 * i) * db
    return int(held + max(att, mlp + probs))
