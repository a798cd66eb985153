"""Predict the memory of one RLHF step, per component and per phase, from a model config and the run's knobs.

Components: ``weights``, ``gradients``, ``optimizer`` (state, plus the fp32 master copy in mixed precision),
``activations`` (saved for backward in the update; transient per-layer buffers in no-grad forwards),
``logits`` (logits, log-softmax and their gradients, or one chunk of them on the chunked path) and
``kv_cache`` (generation). Phases: ``rollout`` (generation), ``scoring`` (reference, old log-probs, values,
reward model: no gradients), ``update`` (forward + backward + optimizer step of one train micro-batch). A
peak happens inside one phase, so the prediction is per phase and the step's peak is the largest phase.

The shape of every term is analytic (docs/design.md, "Memory"); the per-element constants of the activation,
logits and generation terms were calibrated against measured CPU peaks of a real step
(:mod:`memory.probe_step`, ``python -m memory.calibrate``), see ``CALIBRATION``. Torch is imported only to
count the parameters of arbitrary ``transformers`` configs (on the meta device: no memory, no download).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .chunking import default_chunk_size

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
OPTIMIZERS = {"adamw": 2.0, "adam": 2.0, "sgd": 0.0, "momentum": 1.0, "adam8bit": 0.5}  # states per param
PHASES = ("rollout", "scoring", "update")
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache")
LOGPROB_IMPLS = ("torch", "chunked", "triton")
# The runner's phases (rlhf_core.runformat.keys.PHASES) mapped onto the estimator's three.
PHASE_MAP = {
    "rollout": "rollout",
    "reward": "scoring",
    "ref_logprobs": "scoring",
    "old_logprobs": "scoring",
    "values": "scoring",
    "advantages": "scoring",
    "update": "update",
    "optimizer": "update",
}

# Per-element constants of the transient terms, fitted by ``python -m memory.calibrate`` (non-negative least
# squares on measured CPU peaks of memory/probe_step.py, fp32, SDPA attention, dropout off) and stored in
# memory/calibration.json; these defaults are used only when that file is missing. Each multiplies one
# feature of :func:`features` (elements; the dtype's bytes are applied by the feature).
DEFAULT_CALIBRATION: dict[str, float] = {
    "gen_kv": 1.0, "gen_vocab": 4.0, "gen_cat": 1.0, "gen_h": 6.0, "gen_i": 2.0,
    "score_keep": 1.0, "score_h": 8.0, "score_i": 2.0, "score_logits": 2.0, "score_chunk": 2.0,
    "act_lh": 18.0, "act_li": 4.0, "act_las": 0.0, "act_h": 6.0,
    "ckpt_lh": 1.0, "ckpt_block": 2.0,
    "upd_logits": 5.0, "upd_chunk": 3.0,
    "step_largest": 1.0,
}
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


def load_calibration(path: Path = CALIBRATION_FILE) -> dict[str, float]:
    """Fitted constants (defaults for any the file lacks); a bad file is reported, never fatal."""
    coef = dict(DEFAULT_CALIBRATION)
    if path.exists():
        try:
            data = json.loads(path.read_text())
            coef.update({k: float(v) for k, v in data.get("coefficients", {}).items() if k in coef})
        except (OSError, ValueError, AttributeError) as err:
            warnings.warn(f"{path}: unreadable calibration ({err}); using built-in defaults", stacklevel=2)
    return coef


CALIBRATION = load_calibration()


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs of a model: sizes, and exact parameter counts."""

    layers: int
    hidden: int
    heads: int
    vocab_size: int
    intermediate: int
    n_positions: int = 1024
    params: int = 0  # distinct parameters of the LM (tied embeddings once); 0: GPT-2 formula
    largest_param: int = 0
    name: str = "gpt2"

    def __post_init__(self):
        for f in ("layers", "hidden", "heads", "vocab_size", "intermediate"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"model {f} must be >= 1; got {getattr(self, f)}")
        if not self.params:
            object.__setattr__(self, "params", gpt2_params(self))
        if not self.largest_param:
            object.__setattr__(self, "largest_param", self.vocab_size * self.hidden)


def gpt2_params(m: ModelShape) -> int:
    """Parameters of a GPT-2 LM head model with tied embeddings."""
    h, i = m.hidden, m.intermediate
    block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
    return m.vocab_size * h + m.n_positions * h + m.layers * block + 2 * h


def shape_from_config(config: Any, count_params: bool = True) -> ModelShape:
    """A :class:`ModelShape` from any ``transformers`` config (or a dict of one)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)

    def first(*names, default=None):
        for n in names:
            v = get(n)
            if v is not None:
                return v
        if default is None:
            raise ValueError(f"model config has none of {names}; cannot estimate its memory")
        return default

    hidden = int(first("n_embd", "hidden_size", "d_model"))
    shape: dict[str, Any] = dict(
        layers=int(first("n_layer", "num_hidden_layers", "num_layers")),
        hidden=hidden,
        heads=int(first("n_head", "num_attention_heads")),
        vocab_size=int(first("vocab_size")),
        intermediate=int(first("n_inner", "intermediate_size", "ffn_dim", default=4 * hidden) or 4 * hidden),
        n_positions=int(first("n_positions", "max_position_embeddings", default=1024)),
        name=str(first("model_type", default="gpt2")),
    )
    if count_params and shape["name"] != "gpt2":
        if isinstance(config, dict):
            from transformers import AutoConfig

            rest = {k: v for k, v in config.items() if k != "model_type"}
            try:
                config = AutoConfig.for_model(shape["name"], **rest)
            except ValueError:
                raise ValueError(f"unknown model_type {shape['name']!r} in the model config") from None
        shape["params"], shape["largest_param"] = count_parameters(config)
    return ModelShape(**shape)


def count_parameters(config: Any) -> tuple[int, int]:
    """(distinct parameters, largest parameter) of a causal LM built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}
    return sum(params.values()), max(params.values())


@dataclass(frozen=True)
class StepSpec:
    """Everything that decides the memory of one RLHF step."""

    model: ModelShape
    batch_size: int = 8                 # prompts per step (scored together)
    rollout_batch_size: int | None = None  # prompts generated together (default batch_size)
    train_batch_size: int | None = None    # train micro-batch of the update (default batch_size)
    prompt_len: int = 32
    gen_len: int = 32
    dtype: str = "fp32"
    optimizer: str = "adamw"
    master_weights: bool = False        # mixed precision: fp32 master copy of trained params
    policy_training: str = "full"       # full | lora
    lora_rank: int = 8
    value: str = "head"                 # head | critic | none
    reference: bool = True
    ref_device: str = "same"            # same | cpu
    share_reference: bool = False       # LoRA: the reference is the base model with adapters off
    reward_model: bool = False          # a separate reward model (same shape as the policy)
    reward_device: str = "same"
    gradient_checkpointing: bool = False
    logprob_impl: str = "torch"         # torch | chunked | triton
    chunk_size: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        for name in ("batch_size", "prompt_len", "gen_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from fp32, bf16, fp16")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.policy_training not in ("full", "lora"):
            raise ValueError(f"policy_training must be full or lora; got {self.policy_training!r}")
        if self.value not in ("head", "critic", "none"):
            raise ValueError(f"value must be head, critic or none; got {self.value!r}")
        if self.logprob_impl == "auto":
            object.__setattr__(self, "logprob_impl", "triton" if self.device == "cuda" else "chunked")
        if self.logprob_impl not in LOGPROB_IMPLS:
            raise ValueError(f"unknown logprob_impl {self.logprob_impl!r}; choose from auto, torch, chunked, triton")
        if self.share_reference and self.policy_training != "lora":
            raise ValueError("share_reference needs policy_training='lora' (the reference is the frozen base)")
        for name in ("rollout_batch_size", "train_batch_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
            object.__setattr__(self, name, self.batch_size if v is None else min(v, self.batch_size))

    # conveniences used by the probe step
    @property
    def hidden(self) -> int:
        return self.model.hidden

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    def hf_config(self):
        """A random-init GPT-2 config of this shape with dropout off (RLHF policies train without it)."""
        from transformers import GPT2Config

        m = self.model
        return GPT2Config(n_layer=m.layers, n_embd=m.hidden, n_head=m.heads, vocab_size=m.vocab_size,
                          n_inner=m.intermediate, n_positions=max(m.n_positions, self.seq_len),
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                          pad_token_id=0)

    def with_(self, **changes: Any) -> StepSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prediction:
    phases: dict[str, dict[str, int]]
    peak_phase: str
    peak_bytes: int
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"phases": self.phases, "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes,
                "inputs": self.inputs, "notes": self.notes}


def lora_params(m: ModelShape, rank: int) -> int:
    """LoRA on the attention (qkv, out) and MLP matrices of every block."""
    h, i = m.hidden, m.intermediate
    per_block = rank * (h + 3 * h) + rank * (h + h) + rank * (h + i) + rank * (i + h)
    return m.layers * per_block


def _persistent(spec: StepSpec) -> tuple[int, int, int, int]:
    """(weights, optimizer state, gradients, trained params) in bytes on the training device."""
    m = spec.model
    wb = DTYPE_BYTES[spec.dtype]
    lora = spec.policy_training == "lora"
    value_params = m.hidden + 1 if spec.value == "head" else (m.params if spec.value == "critic" else 0)
    trained = (lora_params(m, spec.lora_rank) if lora else m.params) + value_params
    resident = lambda where: where == "same" or spec.device == "cpu"  # noqa: E731
    weights = (m.params + value_params + (trained - value_params if lora else 0)) * wb
    if spec.reference and not spec.share_reference and resident(spec.ref_device):
        weights += m.params * wb
    if spec.reward_model and resident(spec.reward_device):
        weights += (m.params + m.hidden + 1) * wb
    state_bytes = 1 if spec.optimizer == "adam8bit" else (4 if spec.master_weights else wb)
    optimizer = int(OPTIMIZERS[spec.optimizer] * trained * state_bytes) + (trained * 4 if spec.master_weights else 0)
    gradients = trained * (4 if spec.master_weights else wb)
    return weights, optimizer, gradients, trained


def features(spec: StepSpec) -> dict[str, dict[str, dict[str, float]]]:
    """Bytes of each transient term per unit coefficient: ``{candidate: {component: {feature: bytes}}}``.

    Candidates are the moments a phase can peak: ``rollout`` (last decode step) and ``prefill`` (after the
    prompt's forward); ``scoring`` (its ``body`` entry competes with its ``logits``); ``update`` (start of
    backward) and ``step`` (optimizer step, on top of all gradients). :func:`predict` takes the larger.
    """
    m = spec.model
    wb = DTYPE_BYTES[spec.dtype]
    h, i, L, V, a = m.hidden, m.intermediate, m.layers, m.vocab_size, m.heads
    s, p, g = spec.seq_len, spec.prompt_len, spec.gen_len
    br, bs, bt = spec.rollout_batch_size, spec.batch_size, spec.train_batch_size
    assert br is not None and bt is not None  # set by StepSpec.__post_init__
    chunked = spec.logprob_impl != "torch"
    chunk = spec.chunk_size or default_chunk_size(V)
    score_tokens, upd_tokens = bs * g, bt * g
    lora_act = L * bt * s * spec.lora_rank * 4 * wb if spec.policy_training == "lora" else 0
    if spec.gradient_checkpointing:
        acts = {"ckpt_lh": L * bt * s * h * wb, "act_h": bt * s * h * wb}
    else:
        acts = {"act_lh": L * bt * s * h * wb, "act_li": L * bt * s * i * wb, "act_las": L * bt * a * s * s * wb,
                "act_h": bt * s * h * wb}
    upd_logits: dict[str, float] = (
        {"upd_chunk": min(upd_tokens, chunk) * V * 4, "vh_fp32": V * h * 4} if chunked
        else {"upd_logits": upd_tokens * V * 4})
    return {
        # rollout peaks after the prompt's forward (prompt KV + its block buffers) or at the last decode step
        # (full KV cache + the copy one layer's cache update makes); the sampling step's vocab tensors in both
        "rollout": {"kv_cache": {"gen_kv": 2 * L * br * s * h * wb}, "logits": {"gen_vocab": br * V * 4},
                    "activations": {"gen_cat": 2 * br * s * h * wb}},
        "prefill": {"kv_cache": {"gen_kv": 2 * L * br * p * h * wb}, "logits": {"gen_vocab": br * V * 4},
                    "activations": {"gen_h": br * p * h * wb, "gen_i": br * p * i * wb}},
        # scoring: the last hidden states stay while either one block's buffers or the head are alive
        "scoring": {"activations": {"score_keep": bs * s * h * wb},
                    "body": {"score_h": bs * s * h * wb, "score_i": bs * s * i * wb},
                    "logits": ({"score_chunk": min(score_tokens, chunk) * V * 4} if chunked
                               else {"score_logits": score_tokens * V * 4})},
        "update": {"activations": {**acts, "lora": lora_act}, "logits": upd_logits},
        "step": {"activations": {"step_largest": m.largest_param * wb}},
    }


def _apply(feats: dict[str, dict[str, float]], coef: dict[str, float]) -> dict[str, float]:
    return {comp: sum(v * coef.get(k, 1.0) for k, v in terms.items()) for comp, terms in feats.items()}


def predict(spec: StepSpec, calibration: dict[str, float] | None = None) -> Prediction:
    """Bytes per component and phase on the training device (models offloaded to the CPU are not counted)."""
    coef = calibration or CALIBRATION
    weights, optimizer, gradients, _ = _persistent(spec)
    feats = features(spec)
    base = {"weights": weights, "gradients": 0, "optimizer": optimizer, "activations": 0, "logits": 0,
            "kv_cache": 0}
    decode, prefill = _apply(feats["rollout"], coef), _apply(feats["prefill"], coef)
    rollout = {**base, **(decode if sum(decode.values()) >= sum(prefill.values()) else prefill)}
    sc = _apply(feats["scoring"], coef)
    body = sc.pop("body")
    if body > sc["logits"]:
        sc["activations"] += body
        sc["logits"] = 0
    scoring = {**base, **sc}
    backward = {**base, **_apply(feats["update"], coef)}
    if spec.gradient_checkpointing:  # the head's backward and the recomputed blocks come one after the other
        m, bt = spec.model, spec.train_batch_size
        assert bt is not None  # set by StepSpec.__post_init__
        per_token = coef["act_lh"] * m.hidden + coef["act_li"] * m.intermediate
        block = bt * spec.seq_len * DTYPE_BYTES[spec.dtype] * per_token
        recompute = coef["ckpt_block"] * block  # one block recomputed in backward, with its backward buffers
        if recompute > backward["logits"]:
            backward["activations"] += recompute
            backward["logits"] = 0
    step = {**base, "gradients": gradients, **_apply(feats["step"], coef)}
    notes = []
    if sum(step.values()) > sum(backward.values()):
        update = step
        notes.append("update peaks at the optimizer step (all gradients alive), not at the start of backward")
    else:
        update = backward
        notes.append("update peaks at the start of backward (saved activations and the log-prob head alive)")
    phases: dict[str, dict[str, int]] = {}
    for name, comp in (("rollout", rollout), ("scoring", scoring), ("update", update)):
        rounded = {k: int(math.ceil(v)) for k, v in comp.items()}
        rounded["total"] = sum(rounded.values())
        phases[name] = rounded
    peak_phase = max(phases, key=lambda ph: phases[ph]["total"])
    inputs = spec.to_dict()
    inputs["params"] = spec.model.params
    return Prediction(phases, peak_phase, phases[peak_phase]["total"], inputs, notes)


def accelerate_rule(spec: StepSpec) -> int:
    """``accelerate estimate-memory``'s weights-only rule: 16 bytes per trained parameter, 4 per frozen one."""
    m = spec.model
    lora = spec.policy_training == "lora"
    trained = lora_params(m, spec.lora_rank) if lora else m.params
    if spec.value == "head":
        trained += m.hidden + 1
    elif spec.value == "critic":
        trained += m.params
    frozen = m.params if lora else 0
    if spec.reference and not spec.share_reference:
        frozen += m.params
    if spec.reward_model:
        frozen += m.params
    return 16 * trained + 4 * frozen
