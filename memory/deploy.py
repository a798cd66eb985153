"""Memory of a multi-GPU RLHF deployment: roles, placement, ZeRO/FSDP sharding, generation engine.

Why per GPU group and per phase: in real deployments the question is "which GPU runs out, and when". Actor,
critic, reference and reward model each have their own model and precision; they are placed on GPU groups
(all colocated as in veRL's hybrid engine or OpenRLHF's ``--colocate_all_models``, or separate groups as with
OpenRLHF's ``--actor_num_gpus_per_node`` / ``--ref_num_gpus_per_node``); a generation engine (HF generate,
vLLM, SGLang) shares a group or has its own. Each group's bytes per GPU are computed per component for the
phases of one step (generation, scoring, update, optimizer step, weight sync); the peak phase decides fit.

Per-token activation terms come from :mod:`memory.arch` (what autograd saves, per family) and were checked
against torch's MemTracker at real size (benchmarks/bench_memory_memtracker.py); model-state terms follow
DeepSpeed's own accounting (benchmarks/bench_memory_deepspeed.py); the engine KV pool follows the engines'
source (vLLM: ``total * gpu_memory_utilization - non-KV peak``; SGLang: ``free_at_start * mem_fraction_static
- weights``). Bytes are tensor bytes as ``torch.cuda.max_memory_allocated`` counts them; the CUDA context and
allocator fragmentation are outside them and covered by ``reserve_bytes``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .arch import LLAMA_LIKE, Arch, final_norm_saved, layer_saved, layer_transient, nograd_layer_bytes
from .planner import largest_fitting

PHASES = ("generation", "scoring", "update", "optimizer_step", "weight_sync")
ROLES = ("actor", "critic", "reference", "reward")
SHARDINGS = ("zero0", "zero1", "zero2", "zero3", "fsdp_full", "fsdp_grad_op")
ENGINES = ("hf", "vllm", "sglang")
OPTIMIZERS = {"adamw": 2, "adamw8bit": 2, "sgd": 0}
GiB = 2**30


@dataclass(frozen=True)
class Role:
    """One model of the RLHF loop. ``trained`` roles have gradients and optimizer state."""

    name: str
    arch: Arch
    trained: bool = False
    group: str = "all"
    dtype_bytes: int = 2               # compute / stored weights (bf16)
    lora_rank: int = 0                 # >0: only adapters are trained, the base is frozen
    load_in_4bit: bool = False         # QLoRA: frozen base stored in 4 bits
    offload: bool = False              # frozen role parked on the CPU outside its phase
    value_head: bool = False           # critic / reward model: scalar head instead of the LM head's logits
    storage_bytes: int | None = None   # bytes per stored parameter when not the compute dtype (veRL's fp32 actor)
    # LoRA that freezes only the wrapped linear weights: embeddings, biases and norms keep training (DeepSpeed-Chat
    # dschat/utils/module/lora.py LinearLayer_LoRA sets ``weight.requires_grad = False`` and nothing else unless
    # --only_optimize_lora runs only_optimize_lora_parameters)
    lora_trains_others: bool = False
    # launchers set ZeRO stage / FSDP and checkpointing per model (DeepSpeed-Chat --critic_zero_stage and
    # --critic_gradient_checkpointing, veRL's critic.model.*): None follows the deployment's (see role_sharding)
    sharding: Sharding | None = None
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        # a critic or reward model is the base model plus a (hidden x 1) value head, without the LM head (OpenRLHF
        # get_llm_for_sequence_regression on AutoModel, veRL's AutoModelForTokenClassification, DeepSpeed-Chat's
        # RewardModel v_head, TRL's sequence classification): an untied LM head's weights are not there
        a = self.arch
        if self.value_head and a.head_params:
            object.__setattr__(self, "arch", replace(a, params=a.params - a.head_params + a.hidden, head_params=0))

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of each attention and MLP projection of one decoder layer: what peft's ``all-linear`` wraps."""
        a = self.arch
        h, q, kv, i = a.hidden, a.q_dim, a.kv_dim, a.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h)] + ([(h, i), (h, i), (i, h)] if a.gated_mlp else [(h, i), (i, h)])

    def linear_weight_params(self) -> int:
        """Weights of the decoder layers' projections (what LoRA wraps), biases excluded."""
        return self.arch.layers * sum(n_in * n_out for n_in, n_out in self.projections())

    def lora_params(self) -> int:
        """LoRA on every projection: r·(in+out) per matrix (0 without LoRA)."""
        return self.arch.layers * self.lora_rank * sum(n_in + n_out for n_in, n_out in self.projections())

    @property
    def trained_params(self) -> int:
        if not self.trained:
            return 0
        if not self.lora_rank:
            return self.arch.params
        return self.lora_params() + (self.arch.params - self.linear_weight_params() if self.lora_trains_others else 0)

    def base_weight_bytes(self) -> int:
        """Stored weights of the (frozen or trained) base model on one replica, unsharded."""
        p = self.arch.params
        if self.load_in_4bit:  # bitsandbytes nf4: 0.5 B/param + one fp32 absmax per 64 (double quant ignored)
            return int(p * 0.5 + p / 64 * 4)
        return p * (self.storage_bytes or self.dtype_bytes)


@dataclass(frozen=True)
class Sharding:
    """Data-parallel sharding of trained roles (frozen roles follow ``frozen_zero3``)."""

    kind: str = "zero0"
    offload_optimizer: bool = False
    offload_params: bool = False
    mixed_precision: bool = True       # fp32 master weights + fp32 Adam states (DeepSpeed/FSDP); False: pure dtype
    reduce_bucket: int = 500_000_000   # DeepSpeed reduce_bucket_size (elements)
    allgather_bucket: int = 500_000_000
    prefetch_bucket: int = 50_000_000  # stage3_prefetch_bucket_size (elements)
    sub_group_size: int = 1_000_000_000  # ZeRO-3 steps the optimizer one sub-group at a time
    contiguous_gradients: bool = True  # DeepSpeed default: gradients are copied into reduce buckets
    overlap_comm: bool | None = None   # DeepSpeed default: on for ZeRO-3 only (two ZeRO-1/2 buckets when on)
    frozen_zero3: bool | None = None   # shard frozen roles too (OpenRLHF does when --zero_stage 3)

    def __post_init__(self):
        if self.kind not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.kind!r}; choose from {', '.join(SHARDINGS)}")

    @property
    def shards_params(self) -> bool:
        return self.kind in ("zero3", "fsdp_full", "fsdp_grad_op")


@dataclass(frozen=True)
class Engine:
    """The generation engine. ``gpu_memory_utilization`` is vLLM's (share of total) or SGLang's
    ``mem_fraction_static`` (share of free memory at start)."""

    kind: str = "hf"
    group: str = "all"
    tp: int = 1
    gpu_memory_utilization: float = 0.9
    sleep: bool = False                # vLLM sleep mode / SGLang release: weights and KV leave between generations
    enforce_eager: bool = False        # no CUDA graphs
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    cuda_graph_bytes: int = 0          # measured CUDA-graph pool, if known (the log line "Graph capturing ... took")

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"unknown engine {self.kind!r}; choose from {', '.join(ENGINES)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.tp < 1:
            raise ValueError(f"engine tensor-parallel size must be >= 1; got {self.tp}")


@dataclass(frozen=True)
class HybridEngine:
    """DeepSpeed's hybrid engine (DeepSpeed-HE): the trained actor's own DeepSpeedEngine generates with
    DeepSpeed-Inference kernels (deepspeed/runtime/hybrid_engine.py ``DeepSpeedHybridEngine``). Fields are the
    ``hybrid_engine`` section of the DeepSpeed config (deepspeed/runtime/config.py, defaults there); its
    ``pin_parameters`` is the deployment's ``gather_for_generation``. DeepSpeed-Chat writes the section in
    dschat/utils/ds_utils.py get_train_ds_config, with ``max_out_tokens = max_prompt_seq_len +
    max_answer_seq_len`` (rlhf_engine.py _init_actor). Set by ``memory.inputs.from_deepspeed_chat`` only."""

    tp: int = 1                        # inference_tp_size
    tp_gather_partition_size: int = 8  # layers gathered at once before slicing (ZeRO-3, tp > 1)
    release_inference_cache: bool = False  # free the inference workspace after each generate
    max_out_tokens: int = 512          # prompt + answer tokens the workspace is sized for

    def __post_init__(self):
        for name in ("tp", "tp_gather_partition_size", "max_out_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"hybrid engine {name} must be >= 1; got {getattr(self, name)}")


@dataclass(frozen=True)
class Deployment:
    """Everything that decides the per-GPU memory of an RLHF deployment."""

    actor: Role
    critic: Role | None = None
    reference: Role | None = None
    reward: Role | None = None
    groups: dict[str, int] = field(default_factory=lambda: {"all": 8})   # group -> GPUs
    gpus_per_node: int = 8
    gpu_memory: int = 80 * GiB
    reserve_bytes: int = 0             # CUDA context, NCCL, fragmentation: outside tensor bytes
    sharding: Sharding = Sharding()
    engine: Engine = Engine()
    optimizer: str = "adamw"
    optimizer_impl: str = "fused"      # fused (TRL's adamw_torch_fused, DeepSpeed FusedAdam) | foreach | single_tensor
    micro_batch: int = 1               # train micro-batch per GPU, or per sequence-parallel group (sequences)
    grad_accum: int = 1
    score_micro_batch: int | None = None
    prompt_len: int = 512
    response_len: int = 1024
    rollout_per_gpu: int = 64          # sequences generated together per engine replica (HF: per GPU)
    gradient_checkpointing: bool = True
    train_sleep: bool = False          # training states off the GPU while generating (--deepspeed_enable_sleep)
    # veRL's param_offload / optimizer_offload: states live on the CPU and are loaded for the phases that use
    # them (load_fsdp_model_to_gpu at compute_log_prob / update_actor / rollout_mode, optimizer at update_actor)
    phase_offload_params: bool = False
    phase_offload_optimizer: bool = False
    gather_for_generation: bool = True  # HF generate under ZeRO-3: whole model gathered (ds3_gather_for_generation)
    attn: str = "flash"
    logprob_head: str = "torch"        # torch: fp32 log-softmax over the full vocabulary; chunked: one chunk;
    # model_dtype: log-softmax on the 16-bit logits, which stay alive through backward (DeepSpeed-Chat);
    # verl: veRL's actor head, flash-attn cross entropy plus entropy_impl (see VERL_HEAD);
    # trl, trl_copy, trl_nodiv: TRL GRPO's, logits of the completion only, by TRL version (see TRL_HEAD);
    # trl_fused, trl_fused_torch: TRL 1.15+'s fused LM head, no logits (see TRL_FUSED)
    entropy_impl: str = "compiled"     # verl head: how veRL computes the entropy (a key of VERL_HEAD)
    entropy_in_update: bool = False    # verl head: the update computes the entropy (entropy_coeff != 0)
    framework: str = "trl"             # trl | openrlhf | openrlhf-dotted | verl | deepspeed-chat (suggestions' flags)
    # veRL's weight sync (see sync_terms): actor.strategy fsdp (FSDP1, 1) or fsdp2 (2), rollout.layered_summon
    fsdp_version: int = 2
    layered_summon: bool = False
    # DeepSpeed-HE generating for the actor (engine kind "hf"); None: plain HF generate (see HybridEngine)
    hybrid_engine: HybridEngine | None = None
    # an EMA copy of the actor (DeepSpeed-Chat --enable_ema, rlhf_engine.py _init_ema): frozen weights + adapters
    actor_ema: bool = False
    # micro-batches cut from a per-GPU token budget (veRL use_dynamic_bsz, OpenRLHF dynamic batching): the readers
    # turn the budget into micro_batch; a suggestion must name the budget, as the micro-batch flags are ignored
    token_budget_batching: bool = False
    # sequence parallelism in training (veRL Ulysses, OpenRLHF ring attention): each micro-batch belongs to a group
    # of this many GPUs, and each GPU holds 1/sp of its tokens (activations per token unchanged: Ulysses trades
    # tokens for heads in attention, ring attention runs flash attention over key blocks)
    sequence_parallel: int = 1
    # DeepSpeed AutoTP training (OpenRLHF --ds_tensor_parallel_size / --ds.tensor_parallel_size): every role's decoder
    # projections split over groups of this many GPUs that all see the same micro-batch, and ZeRO partitioning over
    # GPUs / tensor_parallel (see tp_local); tensor_parallel_head: the untied LM head split by vocabulary too
    # (DeepSpeed 0.19.5+ reading transformers' ``_tp_plan``, logits gathered whole)
    tensor_parallel: int = 1
    tensor_parallel_head: bool = False
    # torch autocast over wider stored parameters (AMP: TRL's bf16=True on an fp32 model): its compute dtype's
    # bytes. TRL's fused head computes in it; for Llama-like full fine-tuning under plain data parallelism the
    # update keeps what autocast saves and the weights' cast copies (autocast_modelled); no-grad forwards' and
    # other cases' activations stay in the stored dtype, an over-estimate (the plan notes it). Measured on CPU
    # against TRL's own trainer in benchmarks/bench_memory_trl_real.py
    autocast_bytes: int | None = None

    def __post_init__(self):
        if self.optimizer_impl not in ("fused", "foreach", "single_tensor"):
            raise ValueError(f"unknown optimizer_impl {self.optimizer_impl!r}; choose fused, foreach, single_tensor")
        if self.logprob_head not in ("torch", "chunked", "model_dtype", "verl", *TRL_HEAD, *TRL_FUSED):
            raise ValueError(f"unknown logprob_head {self.logprob_head!r}; choose torch, chunked, model_dtype, verl, "
                             f"{', '.join((*TRL_HEAD, *TRL_FUSED))}")
        if self.entropy_impl not in VERL_HEAD:
            raise ValueError(f"unknown entropy_impl {self.entropy_impl!r}; choose from {', '.join(VERL_HEAD)}")
        if self.fsdp_version not in (1, 2):
            raise ValueError(f"fsdp_version must be 1 or 2; got {self.fsdp_version}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        for role in self.roles():
            if role.group not in self.groups:
                raise ValueError(f"{role.name} is placed on group {role.group!r}, "
                                 f"which is not in {sorted(self.groups)}")
        if self.engine.group not in self.groups:
            raise ValueError(f"the engine is placed on group {self.engine.group!r}, not in {sorted(self.groups)}")
        if self.hybrid_engine is not None and (self.engine.kind != "hf" or self.engine.group != self.actor.group
                                               or not self.actor.trained):
            raise ValueError("the hybrid engine generates with the trained actor's own engine: it needs engine kind "
                             "'hf' on the actor's group")
        for name, v in (("micro_batch", self.micro_batch), ("sequence_parallel", self.sequence_parallel),
                        ("prompt_len", self.prompt_len),
                        ("response_len", self.response_len), ("rollout_per_gpu", self.rollout_per_gpu)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
        for g, n in self.groups.items():
            if n < 1:
                raise ValueError(f"group {g!r} needs at least one GPU; got {n}")
        if self.tensor_parallel != 1:
            self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        """What DeepSpeed AutoTP training and OpenRLHF's (dp, sp, tp) mesh accept, and what the plan models."""
        tp = self.tensor_parallel
        if tp < 1:
            raise ValueError(f"tensor_parallel must be >= 1; got {tp}")
        if self.sharding.kind.startswith("fsdp") or self.hybrid_engine is not None:
            raise ValueError("tensor_parallel is DeepSpeed AutoTP training: it needs ZeRO sharding, no hybrid engine")
        for role in self.roles():
            if role.sharding is not None and role.sharding.kind.startswith("fsdp"):
                raise ValueError(f"{role.name}: tensor_parallel is DeepSpeed AutoTP training, not FSDP")
            if role.lora_rank or role.load_in_4bit:
                raise ValueError(f"{role.name}: LoRA or 4-bit weights with tensor_parallel {tp} are not modelled")
            n = self.groups[role.group]
            if n % (tp * self.sequence_parallel):
                raise ValueError(f"{role.name}: its {n} GPUs do not split into tensor-parallel x sequence-parallel "
                                 f"groups of {tp} x {self.sequence_parallel} (init_device_mesh needs dp x sp x tp)")

    @property
    def seq(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def total_gpus(self) -> int:
        return sum(self.groups.values())

    def roles(self) -> list[Role]:
        return [r for r in (self.actor, self.critic, self.reference, self.reward) if r is not None]

    def with_(self, **changes: Any) -> Deployment:
        return replace(self, **changes)


def role_sharding(role: Role, dep: Deployment) -> Sharding:
    """The sharding of one role's own states, gathers and transients: its override (DeepSpeed-Chat's critic and
    reward model have their own ZeRO stage), else the deployment's. A frozen role's own sharding shards its
    weights when its kind shards parameters (``frozen_zero3`` unset)."""
    return role.sharding if role.sharding is not None else dep.sharding


def role_checkpointing(role: Role, dep: Deployment) -> bool:
    """Whether a role's update recomputes its layers: its override (DeepSpeed-Chat's
    --critic_gradient_checkpointing, veRL's critic.model.enable_gradient_checkpointing), else the deployment's."""
    return dep.gradient_checkpointing if role.gradient_checkpointing is None else role.gradient_checkpointing


def tp_local(role: Role, dep: Deployment) -> Role:
    """The share of ``role`` that one GPU of a tensor-parallel group holds, as a role of its own (unchanged at
    ``dep.tensor_parallel`` 1), so that every per-role term applies to it as it is: DeepSpeed AutoTP training.

    Why this works: AutoTP (deepspeed/module_inject/auto_tp.py, layers.py ``LinearLayer`` / ``LinearAllreduce``, at
    38327e07f and 0.19.5) splits each decoder layer's q/k/v and gate/up projections by output (column) and o/down
    by input (row); embeddings, norms and, up to DeepSpeed 0.19.1, the LM head stay whole on every rank (training
    mode skips ``set_lm_head``); 0.19.5 reads transformers' ``_tp_plan``, whose ``lm_head: colwise_gather_output``
    splits the head by vocabulary and gathers the logits (``dep.tensor_parallel_head``, untied heads here). So a
    rank holds the layers of a model with 1/tp of the heads, KV heads and intermediate width, and the same hidden
    size: its saved activations keep the hidden-width tensors (norms, residual, o/down outputs, checkpointed layer
    inputs) and divide the head- and intermediate-width ones, the logits stay whole. Splits are uneven at
    tp > KV heads (whole KV heads, queries with their KV head); this is rank 0, the largest share. Column-split
    biases (Qwen2's q/k/v) are counted whole (a few thousand parameters a layer).
    """
    tp = dep.tensor_parallel
    if tp == 1:
        return role
    a = role.arch
    kv = -(-a.kv_heads // tp)
    local = replace(a, kv_heads=kv, heads=a.heads // a.kv_heads * kv, intermediate=-(-a.intermediate // tp))
    cut = role.linear_weight_params() - replace(role, arch=local).linear_weight_params()
    split_head = dep.tensor_parallel_head and a.head_params  # a value-head role has none (Role.__post_init__)
    head = a.head_params - (-(-a.vocab // tp)) * a.hidden if split_head else 0
    largest_linear = a.hidden * max(a.intermediate, a.q_dim, a.kv_dim)
    largest = max(largest_linear // tp, min(a.largest_param, a.vocab * a.hidden))
    local = replace(local, params=a.params - cut - head, layer_params=a.layer_params - cut // max(a.layers, 1),
                    head_params=a.head_params - head, largest_param=largest)
    return replace(role, arch=local)


# ---- model states ---------------------------------------------------------------------------------------------

@dataclass
class States:
    """Per-GPU bytes of one trained role's model states, plus host bytes when offloaded."""

    weights: int = 0
    gradients: int = 0        # alive from backward to the optimizer step
    optimizer: int = 0
    step_extra: int = 0       # extra only during the step (fp32 gradient partition, update temporaries)
    buffers: int = 0          # gathered layer/unit (ZeRO-3), FSDP's root unit: alive during update
    layer_buffers: int = 0    # FSDP: alive only while a layer runs backward (gathered + prefetch + reduce input)
    bucket: int = 0           # DeepSpeed reduce (IPG) bucket: ZeRO-1/2 from backward to the step, ZeRO-3 always
    host: int = 0


def trained_states(role: Role, sh: Sharding, n: int, optimizer: str) -> States:
    """DeepSpeed/FSDP accounting of one trained role sharded over ``n`` GPUs (see module docstring).

    Full fine-tuning in mixed precision stores 2 B/param working weights, 2 B gradients and 12 B of fp32
    master + Adam moments (DeepSpeed counts 4 more for the fp32 gradient partition in its step: 18 B sharded).
    LoRA: the frozen base stays in its dtype (or 4 bits), only adapters have gradients and state.
    """
    a, P = role.arch, role.trained_params
    db = role.dtype_bytes
    lora = role.lora_rank > 0
    st = States()
    base = role.base_weight_bytes()
    n_states = OPTIMIZERS[optimizer]
    state_b = 1 if optimizer == "adamw8bit" else (4 if sh.mixed_precision else db)
    master = 4 if sh.mixed_precision else 0
    grad_f32 = 4 if sh.mixed_precision and sh.kind not in ("fsdp_full", "fsdp_grad_op") else 0
    opt_per = n_states * state_b + master
    kind = sh.kind
    fsdp = kind.startswith("fsdp")
    opt_div = 1 if kind == "zero0" else n
    grad_div = n if kind in ("zero2", "zero3") or fsdp else 1
    if lora and fsdp:  # adapters are sharded with the rest and kept in fp32 under mixed precision (measured)
        st.weights = base // n + role.lora_params() * (4 if sh.mixed_precision else db) // n
        master = 0
        opt_per = n_states * state_b
    elif lora:
        st.weights = (base // n if kind == "zero3" else base) + role.lora_params() * db  # others: in the base
    elif fsdp:  # FSDP keeps the sharded flat params in fp32 when mixed precision (veRL), casts per unit
        st.weights = P * (4 if sh.mixed_precision else db) // n
        master = 0
        opt_per = n_states * state_b
    else:
        st.weights = P * db // (n if kind == "zero3" else 1)
    grad_b = (4 if fsdp and sh.mixed_precision else db)
    st.gradients = P * grad_b // grad_div
    st.optimizer = P * opt_per // opt_div
    st.step_extra = P * grad_f32 // opt_div
    if kind == "zero3" and grad_f32:
        # stage3.py keeps the low-precision gradient partition (grad_partitions_flat_buffer) and builds the
        # fp32 gradient per optimizer sub-group (_prepare_fp32_grad_for_sub_group: flatten, then .to(fp32))
        st.step_extra = min(P // n, sh.sub_group_size) * grad_f32
    if sh.offload_optimizer:
        st.host += st.optimizer + st.step_extra + (P * grad_b // grad_div if kind in ("zero1", "zero2", "zero3") else 0)
        st.optimizer = 0
        st.step_extra = 0
        if kind in ("zero1", "zero2", "zero3"):
            st.gradients = 0  # DeepSpeed copies each reduced partition to the CPU
    if sh.offload_params and (kind == "zero3" or fsdp):
        st.host += st.weights
        st.weights = 0
    if sh.contiguous_gradients and kind in ("zero1", "zero2", "zero3") and P:
        # stage_1_and_2.py setup_buckets: reduce_bucket_size elements (x2 with overlap_comm) per backward;
        # stage3.py allocates one such bucket at init
        overlap = sh.overlap_comm if sh.overlap_comm is not None else kind == "zero3"
        st.bucket = sh.reduce_bucket * db * (2 if overlap and kind != "zero3" else 1)
    # buffers: ZeRO-3/FSDP gather one unit (layer) of full params and its full gradient at a time
    if kind == "zero3":
        st.buffers = a.largest_param * 2 * db if not lora else a.largest_param * db
    elif fsdp:
        # measured with FSDPMemTracker (fully_shard per decoder layer + root, benchmarks/bench_memory_fsdp.py):
        # the root unit (embeddings, head, final norm) stays gathered from forward through backward; a layer's
        # backward holds its gathered weights, the next layer's prefetch and the reduce-scatter input (grad_b)
        layer = a.layer_params
        st.buffers = a.root_params * db
        st.layer_buffers = 2 * layer * db + (layer * grad_b if not lora else 0)
        if kind == "fsdp_grad_op":
            st.buffers += a.params * db  # params stay unsharded between forward and backward
    return st


def deepspeed_terms(role: Role, sh: Sharding, n: int, optimizer: str = "adamw") -> dict[str, tuple[int, bool]]:
    """The planner's per-GPU model-state bytes split into the terms DeepSpeed's estimators name, each with
    whether ``estimate_zero{2,3}_model_states_mem_needs`` counts it (benchmarks/bench_memory_deepspeed.py).

    Why split: the estimators' multiplier 18 is ``2_grads_16bit + 4_grads_32bit + 4_params_32bit +
    8_optimizer_states_32bit`` (stage_1_and_2.py's comment; ZeRO-3 reuses it) plus, for ZeRO-2, ``2 *
    total_params`` of 16-bit weights and, for ZeRO-3, ``4 * largest_layer_params`` (one gathered layer's 16-bit
    weights and gradients). ZeRO-3's formula has no term for the 16-bit weight partition that stage3.py keeps
    (``lp_param_buffer``; its own offload branch counts it as ``2 * total_params / total_gpus``), so that
    term is reported here as not counted; the plan still holds it as ``<role>.weights``. Buffers outside model
    states (reduce bucket, the step's flattened 16-bit sub-group) are not terms at all here.
    """
    st = trained_states(role, sh, n, optimizer)
    zero3 = sh.kind == "zero3"
    return {
        "weights_16bit": (st.weights, not zero3 or sh.offload_optimizer),
        "gradients_16bit": (st.gradients, True),
        "master_and_optimizer_32bit": (st.optimizer, True),
        "gradients_32bit": (st.step_extra, True),   # ZeRO-3: one optimizer sub-group at a time (stage3.py)
        "gathered_layer": (st.buffers if zero3 else 0, True),
    }


def deepspeed_model_states(role: Role, sh: Sharding, n: int, optimizer: str = "adamw") -> int:
    """The planner's GPU model-state bytes over the terms DeepSpeed's estimator counts (see deepspeed_terms)."""
    return sum(b for b, counted in deepspeed_terms(role, sh, n, optimizer).values() if counted)


def frozen_weights(role: Role, sh: Sharding, n: int) -> int:
    shard = sh.frozen_zero3 if sh.frozen_zero3 is not None else sh.shards_params
    w = role.base_weight_bytes()
    return w // n if shard else w


def step_temporaries(role: Role, dep: Deployment, n: int) -> int:
    """Tensors the optimizer step allocates on the GPU: none for fused kernels; torch's single-tensor AdamW
    makes ``sqrt(v)`` and its quotient for one parameter at a time (2 x the largest); foreach makes them for
    a whole group (about one copy of the trained state shard)."""
    sh = role_sharding(role, dep)
    if sh.offload_optimizer or not role.trained_params:
        return 0
    if sh.kind == "zero3" and sh.mixed_precision:
        # stage3.py step(), one sub-group at a time, beside its fp32 gradient (step_extra): flatten's 16-bit copy
        # lives until .to(fp32) returns, then the optimizer's own temporaries of that flat fp32 tensor (single-tensor
        # AdamW: sqrt(v) and its quotient; foreach: one exp_avg_sq_sqrt); measured on DeepSpeed's ZeRO-3 optimizer,
        # benchmarks/bench_memory_ds_stage3.py
        sub = min(role.trained_params // n, sh.sub_group_size)
        return max(sub * role.dtype_bytes, sub * {"fused": 0, "foreach": 4, "single_tensor": 8}[dep.optimizer_impl])
    if dep.optimizer_impl == "fused":
        return 0
    sb = 4 if sh.mixed_precision else role.dtype_bytes
    if dep.optimizer_impl == "single_tensor":
        a = role.arch
        largest = a.largest_param if not role.lora_rank else role.lora_rank * max(a.intermediate, a.hidden, a.q_dim)
        if sh.kind.startswith("fsdp"):  # FSDP2 steps each parameter's own shard (measured)
            largest //= n
        return 2 * largest * sb
    div = 1 if sh.kind == "zero0" else n
    return role.trained_params * sb // div


# ---- transient terms ------------------------------------------------------------------------------------------

# veRL's actor head (dp_actor.py _forward_micro_batch, the same at 49b08e9 and b178a3c): logits in the model dtype,
# divided by the temperature in place; log-probs by flash-attn's Triton cross entropy, whose backward writes into the
# logits unless the entropy needs them too; the entropy by entropy_from_logits (the fp32 casts of CUDA autocast),
# torch.compile'd unless use_torch_compile=False, or under torch.utils.checkpoint (entropy_checkpointing), or in fp32
# chunks of 2048 tokens (entropy_from_logits_with_chunking). Bytes per token and vocabulary entry, (with grad,
# without), measured on CPU by benchmarks/bench_memory_verl_head.py; "none": no entropy.
VERL_HEAD: dict[str, tuple[float, float, float, float]] = {
    # mode: (with grad, without, and per token of one 2048-token entropy chunk: with grad, without)
    "none": (4.0, 2.0, 0.0, 0.0),
    "compiled": (8.0, 6.0, 0.0, 0.0),
    "checkpointed": (8.0, 6.0, 0.0, 0.0),
    "eager": (28.0, 14.0, 0.0, 0.0),
    "checkpointed_eager": (28.0, 14.0, 0.0, 0.0),
    "chunked": (8.0, 2.0, 0.0, 0.0),
    "chunked_eager": (10.0, 2.0, 20.0, 12.0),
}
VERL_ENTROPY_CHUNK = 2048  # entropy_from_logits_with_chunking's chunk_size


# TRL's GRPO head (GRPOTrainer._get_per_token_logps): the model returns the logits of the completion only
# (logits_to_keep + 1 positions) in its dtype and selective_log_softmax takes one log_softmax per sequence (TRL
# 0.15 on). The temperature division decides what autograd keeps: none before TRL 0.16 ("trl_nodiv"), a copy from
# 0.16 ("trl_copy"), in place from 1.0 ("trl": the rebased view keeps the model's logits and its gradients). Bytes
# per completion token and vocabulary entry (with grad, without) and per token of the one sequence in the loop
# (with grad, without), measured on CPU with TRL's own selective_log_softmax by
# benchmarks/bench_memory_trl_head.py.
TRL_HEAD: dict[str, tuple[float, float, float, float]] = {
    "trl_nodiv": (4.0, 2.0, 0.0, 4.0),
    "trl_copy": (4.0, 4.0, 0.0, 0.0),
    "trl": (8.0, 2.0, 0.0, 4.0),
}


# TRL's fused LM head (1.15 on: GRPOTrainer/RLOOTrainer patch the model with trl.trainer.utils.add_fused_lm_head
# and call it with ``fused_lm_head=True``): trl.kernels.chunked_logprob.ChunkedLogProbFunction projects the hidden
# states through the head in [4096 tokens x 32768 vocabulary] tiles of one preallocated buffer (``mm_buf``, in the
# compute dtype, sized 32768 wide even for a smaller vocabulary) and folds each tile into per-token statistics; no
# logits tensor exists. "trl_fused": Triton devices (CUDA, XPU), which score only the completion tokens
# (``hidden_states[mask]``) and fold in the kernel; "trl_fused_torch": other devices (TRL 1.16 on), which score
# every position and fold each tile with torch ops, whose temporaries are tile-sized fp32 tensors (3 in forward;
# 7 and a bool in backward, 8 when the compute dtype is not fp32). Backward accumulates the hidden states' and
# the head's gradients in fp32 and returns them in the model dtype. Read in TRL 1.15.0 and 1.16.0, measured on
# CPU against TRL 1.16's own GRPOTrainer (benchmarks/bench_memory_trl_real.py); the Triton path is not measured.
TRL_FUSED = ("trl_fused", "trl_fused_torch")
TRL_FUSED_TOKENS, TRL_FUSED_VOCAB = 4096, 32768   # TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE
TRL_FUSED_TILE_BYTES = {False: 12, True: 29}       # torch fold: bytes per tile element, forward / backward (fp32)


def trl_head(version: str | None, triton: bool = True) -> str:
    """The log-prob head of a TRL version ("0.18.0"); None: the newest modelled (1.15 on). ``triton``: the device
    runs TRL's Triton kernel (CUDA, XPU); TRL 1.15 has no other path, 1.16 folds tiles with torch elsewhere."""
    if not version:
        return "trl_fused" if triton else "trl_fused_torch"
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise ValueError(f"TRL version {version!r}: expected MAJOR.MINOR[.PATCH]") from None
    if major > 1 or (major == 1 and minor >= 15):
        return "trl_fused" if triton or (major, minor) == (1, 15) else "trl_fused_torch"
    if major == 1:
        return "trl"
    return "trl_copy" if minor >= 16 else "trl_nodiv"


def head_tokens(dep: Deployment, micro: int) -> int:
    """Tokens one GPU's head scores: every token of the micro-batch, the completions' only (TRL asks the model for
    ``logits_to_keep`` positions; its fused head on Triton devices keeps the labelled ones), or every position
    but the last (TRL's fused head folded with torch)."""
    if dep.logprob_head in TRL_HEAD or dep.logprob_head == "trl_fused":
        return micro * dep.response_len
    if dep.logprob_head == "trl_fused_torch":
        return micro * (dep.seq - 1)
    return micro_tokens(dep, micro)


def verl_head_mode(role: Role, dep: Deployment, grad: bool) -> str:
    """The VERL_HEAD row a role's pass uses: the actor's old-log-prob pass always computes the entropy
    (fsdp_workers.py compute_log_prob), the update when entropy_in_update, a separate reference never."""
    wants = dep.entropy_in_update if grad else role.name == "actor"
    return dep.entropy_impl if wants else "none"


def _head_bytes_per_token(role: Role, dep: Deployment, grad: bool) -> float:
    """Log-prob head per token: no-grad = the logits + their fp32 copy + fp32 log-softmax (10·V in bf16; fp32
    logits need no copy, ``.float()`` returns them: 8·V); with grad, the saved fp32 log-softmax plus two fp32
    vocab tensors in its backward (12·V). Value heads: a scalar.

    ``model_dtype``: log-softmax on the model-dtype logits of a shifted view, as DeepSpeed-Chat's
    gather_log_probs (dschat/rlhf/ppo_trainer.py) runs it: no-grad = logits + the kernel's contiguous copy of the
    view + log-softmax (3·db·V); with grad the logits stay referenced through backward (train_rlhf's
    ``actor_prob``) beside the saved log-softmax, gather's backward zeros and log-softmax's gradient (4·db·V).
    Measured on CPU in tests/test_memory_per_role.py, whose bf16/fp16 log-softmax backward also makes an fp32
    temporary before its output; the CUDA kernel accumulates in registers instead (not measured here: no GPU)."""
    if role.value_head:
        return 8.0
    V = role.arch.vocab
    if dep.logprob_head == "chunked":
        return 0.0  # see _chunk_head_bytes
    db = role.dtype_bytes
    if dep.logprob_head in TRL_FUSED:
        # the scored hidden states' copy (saved for backward) and the fp32 per-token statistics and outputs (12
        # vectors) with the int64 labels; backward adds the fp32 gradient of the hidden states
        h = role.arch.hidden
        return h * db + 56 + (4 * h + 16 if grad else 0)
    extra = 2 * V if role.arch.family == "gemma2" else 0  # final logit soft-capping keeps the logits
    if dep.logprob_head == "verl":
        return VERL_HEAD[verl_head_mode(role, dep, grad)][0 if grad else 1] * V + extra
    if dep.logprob_head in TRL_HEAD:
        return TRL_HEAD[dep.logprob_head][0 if grad else 1] * V + extra
    if dep.logprob_head == "model_dtype":
        return (4 * db * V + extra) if grad else 3 * db * V
    return (12 * V + extra) if grad else (db + (0 if db == 4 else 4) + 4) * V


def _chunk_head_bytes(role: Role, dep: Deployment, grad: bool, tokens: int = 0) -> int:
    """The head's bytes that do not grow with the micro-batch: one chunk's (chunked head, veRL's chunked eager
    entropy, whose chunk is 2048 of the micro-batch's ``tokens`` at most, TRL's one-sequence loop)."""
    if role.value_head:
        return 0
    if dep.logprob_head in TRL_HEAD:
        return int(TRL_HEAD[dep.logprob_head][2 if grad else 3] * role.arch.vocab * min(tokens, dep.response_len))
    if dep.logprob_head == "verl":
        per_row = VERL_HEAD[verl_head_mode(role, dep, grad)][2 if grad else 3]
        return int(per_row * role.arch.vocab * min(tokens, VERL_ENTROPY_CHUNK))
    if dep.logprob_head in TRL_FUSED:
        return _trl_fused_fixed(role, dep, grad, tokens)
    if dep.logprob_head != "chunked":
        return 0
    V = role.arch.vocab
    chunk_tokens = max(1, (1 << 21) // V)
    return int(chunk_tokens * V * 4 * (3 if grad else 2) + (role.arch.hidden * V * 4 if grad else 0))


def _trl_fused_fixed(role: Role, dep: Deployment, grad: bool, tokens: int) -> int:
    """TRL's fused head (TRL_FUSED) over ``tokens`` scored positions, beyond its per-token bytes: the tile buffer;
    the torch fold's tile temporaries; in backward the head's fp32 gradient (full fine-tuning: LoRA freezes the
    head) and, at its return, the model-dtype copies of both gradients (after the fold's temporaries are gone)."""
    a, db = role.arch, role.dtype_bytes
    cdb = dep.autocast_bytes or db  # the buffer's dtype: autocast's, else the hidden states'
    rows, cols = min(tokens, TRL_FUSED_TOKENS), min(a.vocab, TRL_FUSED_VOCAB)
    buf = rows * TRL_FUSED_VOCAB * cdb
    tiles = 0
    if dep.logprob_head == "trl_fused_torch":
        tiles = rows * cols * (TRL_FUSED_TILE_BYTES[grad] + (4 if grad and cdb != 4 else 0))
    if not grad:
        return buf + tiles
    head_grad = a.vocab * a.hidden if role.trained and not role.lora_rank else 0
    copies = (head_grad + tokens * a.hidden) * db if db != 4 else 0
    return buf + head_grad * 4 + max(tiles, copies)


def micro_tokens(dep: Deployment, micro: int) -> int:
    """Tokens one GPU holds of a micro-batch of ``micro`` sequences: all of them, or 1/sp of a sequence-parallel
    group's (rounded up: the group pads its packed tokens to a multiple of sp)."""
    return -(-micro * dep.seq // dep.sequence_parallel)


def scoring_transient(role: Role, dep: Deployment, n: int) -> int:
    """No-grad forward of one micro-batch to log-probs (or values): the head, or one layer's buffers."""
    micro = dep.score_micro_batch or dep.micro_batch
    tokens, htokens = micro_tokens(dep, micro), head_tokens(dep, micro)
    a = role.arch
    db = role.dtype_bytes
    head = htokens * _head_bytes_per_token(role, dep, grad=False) + _chunk_head_bytes(role, dep, False, htokens)
    body = tokens * nograd_layer_bytes(a, dep.attn, dep.seq, db, lora=bool(role.lora_rank))
    gathered = 0
    sh = role_sharding(role, dep)
    if sh.shards_params and (sh.frozen_zero3 is not False or role.trained):
        if sh.kind.startswith("fsdp"):
            # measured (FSDPMemTracker): the root unit stays gathered; a layer and its prefetch are gathered
            # only while the body runs, and are resharded before the head; at the start of the forward the
            # root's all-gather buffer and its copy-out coexist, next to the first layer's prefetch
            root, layer = a.root_params * db, a.layer_params * db
            return int(tokens * a.hidden * db + max(head, body + 2 * layer, root + layer) + root)
        gathered = 2 * a.largest_param * db  # ZeRO-3: the gathered unit and its prefetch
    # autocast caches the cast copy of every weight that needs a gradient until its context exits
    cache = autocast_casts(role, dep) if autocast_modelled(role, dep) else 0
    return int(tokens * a.hidden * db + max(head, body) + gathered + cache)


def autocast_modelled(role: Role, dep: Deployment) -> bool:
    """Whether the role's activations are planned as torch autocast keeps them (``Deployment.autocast_bytes``):
    measured for Llama-like full fine-tuning under plain data parallelism; other cases keep the parameters'
    dtype (an over-estimate of the activations; the plan notes it)."""
    return (bool(dep.autocast_bytes) and (dep.autocast_bytes or 0) < role.dtype_bytes and role.trained
            and role.arch.family in LLAMA_LIKE and not role.lora_rank and not role.load_in_4bit
            and role_sharding(role, dep).kind == "zero0")


def autocast_casts(role: Role, dep: Deployment) -> int:
    """Autocast's cast copies of the projection weights: each matmul casts its fp32 weight to the autocast dtype
    and autograd saves the copy for backward (autocast also caches the copies of weights that need a gradient
    until its context exits). Measured with ``test_layer_saved_under_autocast_matches_what_autograd_saves``."""
    return role.linear_weight_params() * (dep.autocast_bytes or 0)


def update_transient(role: Role, dep: Deployment) -> int:
    """Forward + backward of one train micro-batch: saved activations and the head's backward at its start;
    with checkpointing, the layer inputs plus one recomputed layer.

    Under autocast (:func:`autocast_modelled`) autograd also saves the weights' cast copies; with checkpointing
    those are dropped, but autocast's cache holds every copy until its context exits after the loss, and the
    recomputed layer casts its own again."""
    saved, head, layer = _update_terms(role, dep)
    if not autocast_modelled(role, dep):
        return saved + max(head, layer)
    casts = autocast_casts(role, dep)
    if not role_checkpointing(role, dep):
        return saved + casts + max(head, layer)
    htokens = head_tokens(dep, dep.micro_batch)
    head_forward = htokens * _head_bytes_per_token(role, dep, False) + _chunk_head_bytes(role, dep, False, htokens)
    return saved + max(head, layer + casts // role.arch.layers, casts + int(head_forward))


def head_slack(role: Role, dep: Deployment) -> int:
    """Bytes the head's backward frees before a layer's backward (less that layer's backward temporaries, or
    its recompute when checkpointed): room for the layer's FSDP buffers. Measured with FSDPMemTracker: of the
    head's vocabulary-sized tensors about 2 B per vocabulary entry and token stay through the layers' backward."""
    if role.value_head or dep.logprob_head == "chunked":
        return 0
    tokens, htokens = micro_tokens(dep, dep.micro_batch), head_tokens(dep, dep.micro_batch)
    if role_checkpointing(role, dep):
        _, head, layer = _update_terms(role, dep)
    else:
        head = int(htokens * _head_bytes_per_token(role, dep, grad=True))
        layer = int(tokens * layer_saved(role.arch, dep.attn, dep.seq, trained_norms=not role.lora_rank)
                    .bytes(role.dtype_bytes))
    # what the head leaves through the layers' backward: the logits' gradient, or the fused head's hidden states
    fused = dep.logprob_head in TRL_FUSED
    kept = htokens * (role.arch.hidden * role.dtype_bytes if fused else 2 * role.arch.vocab)
    return max(0, head - kept - layer)


def _update_terms(role: Role, dep: Deployment) -> tuple[int, int, int]:
    """(always alive, head backward, one layer's backward) of the update's activations."""
    a = role.arch
    tokens = micro_tokens(dep, dep.micro_batch)
    db = role.dtype_bytes
    frozen = bool(role.lora_rank)  # LoRA: norms and head frozen keep less (layer_saved, final_norm_saved)
    ac = autocast_modelled(role, dep)
    per_layer = layer_saved(a, dep.attn, dep.seq, trained_norms=not frozen, autocast=ac).bytes(
        (dep.autocast_bytes or db) if ac else db)
    n_proj = (7 if a.gated_mlp else 6) if a.family != "gpt2" else 4
    lora = tokens * role.lora_rank * db * n_proj  # each adapter keeps its rank-r intermediate (x is shared)
    htokens = head_tokens(dep, dep.micro_batch)
    head = htokens * _head_bytes_per_token(role, dep, grad=True) + tokens * final_norm_saved(a, not frozen).bytes(db)
    head += _chunk_head_bytes(role, dep, True, htokens)
    if role_checkpointing(role, dep):
        layers = a.layers * tokens * a.hidden * db
        recompute = tokens * per_layer * 2  # one layer's saved tensors plus its backward temporaries
        return int(layers), int(head), int(recompute)
    return int(a.layers * (tokens * per_layer + lora) + head), 0, 0


def sync_terms(role: Role, dep: Deployment, n: int, engine_weights: int) -> dict[str, int]:
    """Actor bytes on each GPU at the weight-sync peak besides its shards and the engine's woken weights.

    Why per framework: what the sync materialises decides whether it can run out of memory. Generic rule:
    one gathered unit and its prefetch. veRL with vLLM (verl/workers/sharding_manager/fsdp_vllm.py,
    ``FSDPVLLMShardingManager.__enter__``, read at 49b08e9) collects the actor's tensors *before*
    ``inference_engine.wake_up(tags=["weights"])``, loads them, ``del params``, offloads the actor and only
    then wakes the KV cache. A tensor freed before the wake-up is a separate, earlier peak; in a table whose
    phase total is a sum of rows, such a row carries only its excess over the engine's weights.
    """
    a = role.arch
    s = role.storage_bytes or role.dtype_bytes   # FSDP unshards for state_dict/summon in the stored dtype
    sh = role_sharding(role, dep)
    verl = dep.framework == "verl" and dep.engine.kind == "vllm" and sh.kind.startswith("fsdp")
    if dep.hybrid_engine is not None:
        return {}  # DeepSpeed-HE generates with the actor's own weights: its gather is a generation row
    if dep.tensor_parallel > 1 and dep.engine.kind != "hf":
        # OpenRLHF's weight sync (ppo_actor.py _gather_params_ctx) runs GatherReplacedLayerParams on one parameter at
        # a time: the whole parameter (of the actor itself, not this rank's share) and its copy for the engine
        return {"actor.gathered_for_sync": 2 * dep.actor.arch.largest_param * role.dtype_bytes}
    if not verl:
        return {"actor.gathered_for_sync": 2 * a.largest_param * role.dtype_bytes} if sh.shards_params else {}
    if role.lora_rank:
        # __collect_lora_params: layered_summon_lora_params (verl/utils/fsdp_utils.py) summons one decoder layer
        # at a time in full precision and copies its adapters to the CPU; without it
        # FSDP.summon_full_params(self.module) unshards every unit at once. Either is freed (empty_cache)
        # before vLLM wakes; the adapters then go in by add_lora from CPU tensors.
        per_layer = role.lora_params() // max(a.layers, 1)
        held = (a.layer_params + per_layer) * s if dep.layered_summon else (a.params + role.lora_params()) * s
        return {"actor.gathered_for_sync": max(0, held - engine_weights)}
    out: dict[str, int] = {}
    if dep.fsdp_version == 1:
        # FSDP1 state_dict() (SHARDED_STATE_DICT for n > 1, FULL_STATE_DICT for n == 1, set in the manager's
        # __init__) unshards each unit in full precision and clones this rank's chunk
        # (torch/distributed/fsdp/_shard_utils.py _create_chunk_dtensor; _full_post_state_dict_hook clones):
        # a second copy of the shards, alive until ``del params`` after load_weights
        out["actor.state_dict_copy"] = a.params * s // n
        # the root unit (embeddings, head) stays unsharded in full precision until its own post-hook, which
        # clones each full tensor before chunking it: measured on CPU ranks, peak = copy + root + largest
        # (benchmarks/bench_memory_fsdp1_verl.py)
        before_wake = (a.root_params + a.largest_param) * s if n > 1 else 0
    else:
        before_wake = 0  # FSDP2 state_dict() returns the sharded DTensors themselves
    # update_params: model.load_weights(param.full_tensor() ...) gathers one full parameter at a time (n > 1)
    after_wake = a.largest_param * s if n > 1 else 0
    out["actor.gathered_for_sync"] = max(after_wake, before_wake - engine_weights)
    return out


# ---- engines --------------------------------------------------------------------------------------------------

@dataclass
class EngineMemory:
    weights: int
    kv_pool: int
    overhead: int            # activations of the profile run + CUDA graphs
    footprint: int           # what the engine holds on each of its GPUs while awake
    kv_tokens: int
    max_seqs: int            # concurrent sequences of prompt+response length
    rule: str


def _hybrid_tp_gather(dep: Deployment) -> bool:
    """DeepSpeedHybridEngine.generate takes its TP branch only under ZeRO-3 with pinned parameters."""
    he = dep.hybrid_engine
    return he is not None and he.tp > 1 and role_sharding(dep.actor, dep).kind == "zero3" and dep.gather_for_generation


def hybrid_generation_batch(dep: Deployment) -> int:
    """Sequences each GPU generates: at TP > 1 generate all-gathers the prompts of its TP group
    (``dist.all_gather_into_tensor(output, input_cont, group=self.mp_group)``) and keeps its own slice after."""
    return dep.rollout_per_gpu * (dep.hybrid_engine.tp if dep.hybrid_engine and _hybrid_tp_gather(dep) else 1)


def hybrid_workspace_bytes(dep: Deployment) -> int:
    """The DeepSpeed-Inference workspace of the hybrid engine: one cudaMalloc holding the KV cache of every layer,
    the kernels' activations and the attention scores, sized by ``InferenceContext::GenWorkSpace``
    (csrc/transformer/inference/includes/inference_context.h, same formula at v0.9.0 0b5252b and master
    38327e0), called once from the first layer's first forward (deepspeed/model_implementations/transformers/
    ds_transformer.py ``DeepSpeedTransformerInference.forward`` / ``allocate_workspace``) with the batch of that
    generate call, ``mp_size = inference_tp_size`` and ``max_out_tokens = min_out_tokens =
    hybrid_engine.max_out_tokens`` (hybrid_engine.py new_inference_container), so it is that size or
    GenWorkSpace raises. Head size is padded to 32/64/128 for flash attention (heads over 128 are not padded):

        activation = 10 * heads * padded_head * batch;  temp = batch * (heads / mp) * max_out_tokens
        cache = layers * batch * (heads * padded_head / mp) * 2
        bytes = (activation + temp + cache) * max_out_tokens * dtype_bytes
    """
    he, a = dep.hybrid_engine, dep.actor.arch
    if he is None:
        return 0
    batch, mp = hybrid_generation_batch(dep), he.tp
    head = a.hidden // a.heads
    padded = head if head > 128 else (32 if head <= 32 else (64 if head <= 64 else 128))
    hid = a.heads * padded
    activation = 10 * hid * batch
    temp = batch * (a.heads // mp) * he.max_out_tokens
    cache = a.layers * batch * (hid // mp) * 2
    return (activation + temp + cache) * he.max_out_tokens * dep.actor.dtype_bytes


def hybrid_generation_weights(role: Role, dep: Deployment) -> int:
    """Actor weights the hybrid engine materialises for generation besides its ZeRO shards
    (deepspeed/runtime/hybrid_engine.py ``generate``, same branches at v0.9.0 and master 38327e0).

    ZeRO-0/1/2: none (the weights are resident; LoRA is fused in place, ``fuse_lora_weight``). ZeRO-3:
    - pinned (``pin_parameters``), inference TP 1: ``GatheredParameters`` over ``all_layers_params`` (every
      parameter of the module, adapters included) for the whole generate call: a full-size copy next to the shards.
    - pinned, TP > 1: ``tp_gather_partition_size`` layers (and their adapters) are gathered at a time, LoRA is
      fused and ``apply_tensor_parallelism`` copies each layer's 1/TP slices of the projection weights
      (containers/base.py); the gathered layers are freed, then the non-sliced parameters (embeddings, positions,
      norms, biases here; ``_other_layers`` and ``layer_params[:4]`` in the source) are gathered for the generate
      call; the slices are freed after it (``release_memory``). Held: the slices plus the larger of the gathered
      group (while slicing) and the non-sliced parameters (while generating).
    - unpinned (``--unpin_actor_parameters``): ``_zero3_forward`` gathers one layer and its adapters per forward;
      the embeddings are fetched by ZeRO-3's own hooks: the larger of a layer and the largest tensor.
    The TP branch is modelled as v0.9.0/0.9.1 run it. DeepSpeed-Chat passes no mpu: at v0.9.2
    create_inference_module calls a method of ``self.mpu`` (None) at TP > 1, and from v0.9.3 (1824cb5) generate
    slices only ``if self.mpu is not None`` (DeepSpeed issue #4080), so no slices are made there.
    """
    if role_sharding(role, dep).kind != "zero3" or dep.hybrid_engine is None:
        return 0
    a, db = role.arch, role.dtype_bytes
    lora = role.lora_params()
    lora_layer = lora // max(a.layers, 1)
    if not dep.gather_for_generation:
        return max(a.layer_params + lora_layer, a.largest_param) * db
    he = dep.hybrid_engine
    if he.tp == 1:
        return (a.params + lora) * db
    linear = role.linear_weight_params()
    slices = linear * db // he.tp
    group = min(he.tp_gather_partition_size, a.layers) * (a.layer_params + lora_layer) * db
    return slices + max((a.params - linear) * db, group)


def engine_memory(dep: Deployment, free_at_start: int | None = None) -> EngineMemory:
    """Per-GPU memory of the generation engine and its KV capacity.

    vLLM (>= 0.7, V1 worker): the engine takes ``total * gpu_memory_utilization``; the KV pool is that minus
    the non-KV peak of its profile run (weights at TP degree, activations of ``max_num_batched_tokens``).
    SGLang: ``rest = free_after_load - free_at_start * (1 - mem_fraction_static)``, i.e. weights + KV pool =
    ``mem_fraction_static`` of the memory free when it starts (other tenants' bytes are excluded).
    HF generate: the actor's own weights; the KV cache grows with the batch (no pool).
    """
    e, a = dep.engine, dep.actor.arch
    db = dep.actor.dtype_bytes
    weights = a.params * db // e.tp
    per_token_kv = a.kv_bytes_per_token(db) // e.tp if a.kv_heads >= e.tp else a.kv_bytes_per_token(db) // a.kv_heads
    if e.kind == "hf" and dep.hybrid_engine is not None:
        # the KV cache lives in the inference workspace (ds_softmax_context's prev_key/prev_value are views of it)
        b = hybrid_generation_batch(dep)
        return EngineMemory(0, hybrid_workspace_bytes(dep), b * a.vocab * 4, 0, b * dep.hybrid_engine.max_out_tokens,
                            b, "DeepSpeed-HE: inference workspace (KV cache + kernel activations) = "
                               "InferenceContext::GenWorkSpace for batch x max_out_tokens")
    if e.kind == "hf":
        local, b = tp_local(dep.actor, dep).arch, dep.rollout_per_gpu
        kv_token = local.kv_bytes_per_token(db)
        kv = b * dep.seq * kv_token
        # prefill: the prompt's no-grad forward, one layer's tensors at a time, beside the prompt's KV only (its
        # head runs on the last position only, logits_to_keep=1); nothing of sampling exists yet
        body = nograd_layer_bytes(local, dep.attn, dep.prompt_len, db, lora=bool(dep.actor.lora_rank))
        prefill = b * dep.prompt_len * (local.hidden * db + body) - b * dep.response_len * kv_token
        # decode: generate's loop keeps the last step's fp32 logits and probabilities in locals through the next
        # forward (a temperature or top-k/p warper keeps one more, not counted: b·V·4 bytes); in that forward the
        # cache grows by torch.cat, so one layer's keys (then values) exist twice for a moment, and then the new
        # last-position logits and their fp32 copy join the old pair
        held = 2 * b * a.vocab * 4
        decode = held + max(b * dep.seq * local.kv_dim * db, b * a.vocab * (db + 4))
        return EngineMemory(0, kv, max(prefill, decode, 0), 0, b * dep.seq, b,
                            "hf generate: KV cache = sequences x length x 2·L·kv_dim·bytes")
    act_tokens = e.max_num_batched_tokens
    act = int(act_tokens * layer_transient(a).bytes(db) // e.tp) + min(e.max_num_seqs, act_tokens) * a.vocab * 4
    overhead = act + e.cuda_graph_bytes
    if e.kind == "vllm":
        budget = int(dep.gpu_memory * e.gpu_memory_utilization)
        kv = budget - weights - act
        footprint = budget + e.cuda_graph_bytes
        rule = "vLLM: KV pool = total x gpu_memory_utilization - (weights/TP + profile activations)"
    else:
        free = dep.gpu_memory if free_at_start is None else free_at_start
        kv = int(free * e.gpu_memory_utilization) - weights
        footprint = weights + max(kv, 0) + overhead
        rule = "SGLang: weights/TP + KV pool = free memory at start x mem_fraction_static"
    kv = max(kv, 0)
    tokens = kv // per_token_kv if per_token_kv else 0
    return EngineMemory(weights, kv, overhead, footprint, int(tokens), int(tokens // dep.seq), rule)


# ---- the plan -------------------------------------------------------------------------------------------------

@dataclass
class GroupPlan:
    name: str
    gpus: int
    roles: list[str]
    table: dict[str, dict[str, int]]      # component -> phase -> bytes per GPU
    totals: dict[str, int]                # phase -> bytes per GPU
    peak_phase: str
    peak_bytes: int
    host_bytes: int                       # per node share of offloaded state (per GPU x GPUs on the group)
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeploymentPlan:
    deployment: Deployment
    groups: list[GroupPlan]
    engine: EngineMemory
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.groups) and self.engine_ok

    @property
    def engine_ok(self) -> bool:
        return self.deployment.engine.kind == "hf" or self.engine.max_seqs >= 1

    @property
    def peak_bytes(self) -> int:
        return max(g.peak_bytes for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "peak_bytes": self.peak_bytes,
                "groups": {g.name: g.to_dict() for g in self.groups},
                "engine": asdict(self.engine), "notes": self.notes}


def _add(table: dict[str, dict[str, int]], comp: str, phases: tuple[str, ...] | str, nbytes: float) -> None:
    if isinstance(phases, str):
        phases = (phases,)
    row = table.setdefault(comp, {ph: 0 for ph in PHASES})
    for ph in phases:
        row[ph] += int(nbytes)


TRANSIENT = ("activations", "gradients", "step", "buffers")


def _one_forward_at_a_time(table: dict[str, dict[str, int]]) -> None:
    """Roles on one group score, update and step one after another (actor, then critic), so in those phases
    only the role with the largest transient bytes (activations, gradients, step temporaries, gathered units)
    counts; the other roles' transient rows are zeroed there. Weights and optimizer state stay summed."""
    roles = sorted({k.split(".")[0] for k in table if k.split(".")[-1] in TRANSIENT})
    if len(roles) < 2:
        return
    for ph in ("scoring", "update", "optimizer_step"):
        size = {r: sum(table[f"{r}.{c}"][ph] for c in TRANSIENT if f"{r}.{c}" in table) for r in roles}
        keep = max(roles, key=lambda r: size[r])
        for r in roles:
            if r != keep:
                for c in TRANSIENT:
                    if f"{r}.{c}" in table:
                        table[f"{r}.{c}"][ph] = 0


def plan_group(dep: Deployment, name: str, engine: EngineMemory) -> GroupPlan:
    gpus = dep.groups[name]
    n = gpus // dep.tensor_parallel  # ZeRO partitions over the data-parallel GPUs (DeepSpeed's TP mesh, tp_local)
    roles = [r for r in dep.roles() if r.group == name]
    table: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    host = 0
    sleep_train = dep.train_sleep and dep.engine.kind != "hf" and dep.engine.group == name
    for role in roles:
        role = tp_local(role, dep)
        tag = role.name
        sh = role_sharding(role, dep)  # engine, sleep and veRL's phase offload stay deployment-wide
        if role.trained:
            st = trained_states(role, sh, n, dep.optimizer)
            host += st.host
            off_w = sleep_train or dep.phase_offload_params
            off_o = sleep_train or dep.phase_offload_optimizer
            resident = ("scoring", "update", "optimizer_step", "weight_sync") if off_w else PHASES
            _add(table, f"{tag}.weights", resident, st.weights)
            _add(table, f"{tag}.optimizer", ("update", "optimizer_step") if off_o else PHASES, st.optimizer)
            host += (st.weights if dep.phase_offload_params else 0) + \
                (st.optimizer if dep.phase_offload_optimizer else 0)
            # backward peaks either at its start (all saved activations and the head's backward, no gradient
            # yet) or at its end (every gradient, activations gone); accumulated gradients are always there
            acts = update_transient(role, dep)
            start_of_backward = acts + (st.gradients if dep.grad_accum > 1 else 0)
            end_of_backward = st.gradients
            if end_of_backward > start_of_backward:
                acts = 0
            _add(table, f"{tag}.gradients", "optimizer_step", st.gradients)
            if dep.grad_accum > 1 or end_of_backward > start_of_backward:
                _add(table, f"{tag}.gradients", "update", st.gradients)
            _add(table, f"{tag}.step", "optimizer_step", st.step_extra + step_temporaries(role, dep, n))
            _add(table, f"{tag}.buffers", ("update",), st.buffers + max(0, st.layer_buffers - head_slack(role, dep)))
            _add(table, f"{tag}.reduce_bucket", PHASES if sh.kind == "zero3" else ("update",), st.bucket)
            _add(table, f"{tag}.activations", "update", acts)
            _add(table, f"{tag}.activations", "scoring", scoring_transient(role, dep, n))
            if role.name == "actor" and dep.hybrid_engine is not None:
                _add(table, "actor.gathered_for_generation", "generation", hybrid_generation_weights(role, dep))
            elif role.name == "actor" and dep.engine.kind == "hf":
                full = role.arch.params * role.dtype_bytes
                unit = 2 * role.arch.largest_param * role.dtype_bytes  # else one layer at a time (slow)
                gen_w = ((full - st.weights) if dep.gather_for_generation else unit) \
                    if sh.shards_params and not role.lora_rank else 0
                _add(table, "actor.gathered_for_generation", "generation", max(gen_w, 0))
            if role.name == "actor" and dep.actor_ema:
                # rlhf_engine.py _init_ema: the actor model (+ its LoRA adapters) under get_eval_ds_config with the
                # actor's stage if 3 else 0 and offload_param = --offload_reference_model (honoured under ZeRO-3)
                ema = (role.arch.params + role.lora_params()) * role.dtype_bytes
                ema //= n if sh.kind == "zero3" else 1
                if sh.kind == "zero3" and dep.reference is not None and dep.reference.offload:
                    host += ema
                else:
                    _add(table, "actor_ema.weights", PHASES, ema)
            if role.name == "actor":
                # an engine that does not sleep holds its weights before the sync too: nothing to net out
                ew = engine.weights if dep.engine.kind != "hf" and dep.engine.group == name and dep.engine.sleep else 0
                for comp, nbytes in sync_terms(role, dep, n, ew).items():
                    _add(table, comp, "weight_sync", nbytes)
        else:
            w = frozen_weights(role, sh, n)
            phases = ("scoring",) if role.offload else PHASES
            if role.offload:
                host += w
            _add(table, f"{tag}.weights", phases, w)
            _add(table, f"{tag}.activations", "scoring", scoring_transient(role, dep, n))
    eng = dep.engine
    if eng.group == name:
        if eng.kind == "hf" and dep.hybrid_engine is not None:
            # allocated at the first generate and kept through training unless release_inference_cache
            # (hybrid_engine.py generate: inference_cuda_module.release_workspace() after, retake_workspace before)
            kept = ("generation",) if dep.hybrid_engine.release_inference_cache else PHASES
            _add(table, "engine.inference_workspace", kept, engine.kv_pool)
            _add(table, "engine.sampling", "generation", engine.overhead)
        elif eng.kind == "hf":
            _add(table, "engine.kv_cache", "generation", engine.kv_pool)
            _add(table, "engine.sampling", "generation", engine.overhead)
        else:
            awake = ("generation", "weight_sync") if eng.sleep else PHASES
            _add(table, "engine.weights", awake, engine.weights)
            _add(table, "engine.kv_pool", ("generation",) if eng.sleep else PHASES, engine.kv_pool)
            _add(table, "engine.overhead", ("generation",) if eng.sleep else PHASES,
                 engine.footprint - engine.weights - engine.kv_pool)
            if eng.kind == "vllm" and not eng.sleep and len(table) > 3:
                notes.append("vLLM keeps total x gpu_memory_utilization for its whole life; training shares the rest")
    _one_forward_at_a_time(table)
    totals = {ph: sum(row[ph] for row in table.values()) + dep.reserve_bytes for ph in PHASES}
    peak_phase = max(PHASES, key=lambda ph: totals[ph])
    peak = totals[peak_phase]
    return GroupPlan(name, gpus, [r.name for r in roles] + (["engine"] if eng.group == name else []), table, totals,
                     peak_phase, peak, host, peak <= dep.gpu_memory, notes)


def torch_counted_peak(plan: DeploymentPlan, group: str | None = None) -> int:
    """What ``torch.cuda.max_memory_allocated()`` reports on a GPU of ``group`` (default: the engine's) when vLLM
    sleeps: its ``CuMemAllocator`` unmaps the physical memory of the weights and KV pool but keeps their blocks,
    allocated from a torch ``MemPool``, alive in torch's caching allocator, so torch still counts them through
    the training phases (veRL's ``perf/max_memory_allocated_gb`` does; its reserved counter then exceeds the
    GPU). The planner's phases count physical bytes; this is the number to set next to such a log."""
    dep = plan.deployment
    name = group or dep.engine.group
    g = next(x for x in plan.groups if x.name == name)
    if dep.engine.kind != "vllm" or not dep.engine.sleep or dep.engine.group != name:
        return g.peak_bytes
    slept = plan.engine.weights + plan.engine.kv_pool  # counted in every phase; awake in generation only

    def counted(ph: str) -> int:
        if ph == "generation":
            return g.totals[ph]
        physical_engine = sum(row[ph] for comp, row in g.table.items() if comp.startswith("engine."))
        return g.totals[ph] - physical_engine + slept

    return max(counted(ph) for ph in PHASES)


def torch_counted_note(plan: DeploymentPlan, group: str) -> str | None:
    """The report's line on ``torch_counted_peak`` where it differs from the physical peak (rendering only: the
    searches that plan many layouts do not need it)."""
    counted = torch_counted_peak(plan, group)
    if counted == next(g.peak_bytes for g in plan.groups if g.name == group):
        return None
    return (f"torch.cuda.max_memory_allocated() will read about {counted / 2**30:.2f} GiB here (veRL's "
            "perf/max_memory_allocated_gb): the sleeping vLLM's weights and KV pool stay allocated in torch's "
            "allocator while their memory is unmapped")


# Per GPU, what veRL's multi-GPU LoRA tuning scripts (vLLM TP = GPUs, Ulysses SP 2) lacked at their published
# out-of-memory boundaries below this planner's peak, lowest and highest over the three scripts
# (benchmarks/bench_memory_published.py, details.missing_at_boundaries; kept in step by a test). Cause not found:
# not the model step, Ulysses included (bench_memory_ulysses.py); see docs/memory.md, "Published setups".
VERL_LORA_TP_GAP_GIB = (15.1, 18.0)


def known_gap_note(plan: DeploymentPlan, group: str) -> str | None:
    """The report's line where a deployment is of the one kind whose published boundaries the planner misses:
    veRL, a LoRA actor, a vLLM engine at TP > 1 on this group's GPUs, a plan that fits by less than that miss."""
    dep = plan.deployment
    g = next(x for x in plan.groups if x.name == group)
    if not (dep.framework == "verl" and dep.actor.lora_rank and dep.engine.kind == "vllm" and dep.engine.tp > 1
            and dep.engine.group == group and g.gpus > 1 and g.fits):
        return None
    headroom = (dep.gpu_memory - g.peak_bytes) / 2**30
    low, high = VERL_LORA_TP_GAP_GIB
    if headroom >= high:
        return None
    return (f"veRL's own multi-GPU LoRA scripts with vLLM TP > 1 ran out of memory with {low:.1f}-{high:.1f} GiB per "
            "GPU still free by this planner's count (memory/published.json, family verl-lora; the cause is not "
            f"known); here {headroom:.1f} GiB is: keep that margin, or measure a step")


def plan_deployment(dep: Deployment) -> DeploymentPlan:
    """Per-group component x phase bytes per GPU, the peak phase, and whether each group fits."""
    eng = engine_memory(dep)
    groups = [plan_group(dep, g, eng) for g in dep.groups]
    notes = [eng.rule]
    if dep.autocast_bytes and dep.autocast_bytes < dep.actor.dtype_bytes:
        where = ("the update's saved activations and the weights' cast copies follow autocast; no-grad "
                 "forwards' activations are" if autocast_modelled(dep.actor, dep) else "activations are")
        notes.append(f"autocast to {8 * dep.autocast_bytes}-bit over {8 * dep.actor.dtype_bytes}-bit parameters: "
                     f"{where} planned in the parameters' dtype, an over-estimate (autocast keeps the residual "
                     "stream and norms in fp32 and the linears' inputs and outputs in 16 bits)")
    if dep.engine.kind != "hf" and eng.max_seqs < 1:
        notes.append(f"{dep.engine.kind}: no room for a KV pool holding one {dep.seq}-token sequence")
    return DeploymentPlan(dep, groups, eng, notes)


def fits_with(dep: Deployment, **changes: Any) -> bool:
    """Whether ``dep`` with ``changes`` fits; a deployment the changes make invalid does not."""
    try:
        return plan_deployment(dep.with_(**changes)).fits
    except ValueError:
        return False


def largest_micro_batch(dep: Deployment, hi: int = 4096) -> int:
    """Largest train micro-batch per GPU that fits (0: not even one sequence)."""
    return largest_fitting(lambda n: fits_with(dep, micro_batch=n), hi)


def largest_rollout_batch(dep: Deployment, hi: int = 1 << 16) -> int:
    """Sequences generated together per engine: for HF generate the largest batch per GPU whose KV cache fits
    next to everything else; for vLLM/SGLang the sequences of the requested length the KV pool holds."""
    if dep.engine.kind != "hf":
        return engine_memory(dep).max_seqs
    return largest_fitting(lambda n: fits_with(dep, rollout_per_gpu=n), hi)


def min_gpus(dep: Deployment, limit: int = 1024) -> int | None:
    """Fewest GPUs with this layout: every group scaled by the same factor (powers of two, then multiples of
    a node), engine TP kept. None when even ``limit`` GPUs do not fit."""
    base = dep.total_gpus
    counts = sorted({c for c in [1, 2, 4] + list(range(dep.gpus_per_node, limit + 1, dep.gpus_per_node)) if c <= limit})
    for total in counts:
        scale = total / base
        groups = {g: max(1, round(n * scale)) for g, n in dep.groups.items()}
        if sum(groups.values()) != total or any(groups[dep.engine.group] < dep.engine.tp for _ in [0]):
            continue
        if fits_with(dep, groups=groups):
            return total
    return None
