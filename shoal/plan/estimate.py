"""The planner's estimates: memory per GPU, throughput and time, checkpoint size, for one layout.

Every formula follows what shoal really keeps (docs/planning.md derives each one):

* weights live in fp32 (the model is built in fp32 and FSDP2 shards those master weights); with
  bf16 compute FSDP2 all-gathers bf16 copies per decoder layer, and without FSDP frozen weights are
  kept in bf16 and `torch.autocast` caches bf16 casts of the trainable weights for the step;
* gradients are fp32, sharded like the weights, except under `fsdp_gradient_sync=last_micro_batch`
  where each rank accumulates its unsharded fp32 gradients (and keeps the bf16 copies gathered);
* AdamW keeps two fp32 moments per trainable parameter (`shoal.train.step.build_optimizer`);
* activations follow the checkpointing mode, sharded by tensor/sequence and context parallelism;
* logits are whole on every tensor-parallel rank (the loss runs as in one process); in one process
  without FSDP or pipelining only one chunk of them exists at a time (the chunked output layer + loss).

Throughput is never derived from first principles: it is the MFU that shoal's benchmarks measured
on the nearest benchmarked configuration (`shoal.plan.measured`), adjusted only for the number of
FSDP shards, the tensor-parallel size, the checkpointing mode and the pipeline bubble, and every
estimate names its reference.
Mixture-of-experts layers (`moe_elements_per_token`) assume balanced routing (every expert gets
T·K/X rows); their experts are not split by tensor parallelism (each tensor-parallel rank runs the
whole sequence through them) and are sharded over the same ranks as FSDP (expert parallelism
carves its axis out of those). FP8 is not modelled: `check_modelled` refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shoal.errors import ShoalError
from shoal.models import ModelConfig
from shoal.plan.counts import ParamCounts
from shoal.plan.hardware import GIB, GpuKind
from shoal.plan.measured import MEASUREMENTS, Measurement
from shoal.train.linear_cross_entropy import CHUNK_ELEMENTS

# Outside torch's allocator (not in max_memory_allocated): CUDA context, cuBLAS/NCCL workspaces.
CONTEXT_BYTES = int(1.5 * GIB)
# Allocator slack (reserved − allocated), as a fraction of the allocated peak.
FRAGMENTATION = 0.05
# Bytes per logit per token in the loss: the bf16 logits and their bf16 gradient when the loss is
# compiled with the model (upcast and softmax fused). Eager (or fp32) cross-entropy holds three fp32
# tensors during its backward: the log-softmax and the gradients of it and of the logits (the
# training step no longer keeps a reference to the logits themselves through backward).
LOGIT_BYTES = {"compiled": 4, "eager": 12, "fp32": 12}
# The same for one chunk of the chunked output layer + loss (one process, no FSDP): its forward holds
# the logits, their softmax and the one-hot-corrected gradient at once (three fp32 tensors in an
# fp32 run, as measured on CPU by tests/unit/plan); compiled, the bf16 logits and bf16 gradient; in
# eager bf16 the bf16 logits, three fp32 temporaries and the bf16 gradient.
CHUNKED_LOGIT_BYTES = {"compiled": 4, "eager": 14, "fp32": 12}
# Shares of one step that survive sharding the data-parallel work over S FSDP ranks, measured by
# bench/scale.py (Llama-3.2-1B: 94% of one GPU's MFU on 2 GPUs, 88% on 4): 1 − 0.06·log2(S).
FSDP_LOSS_PER_DOUBLING = 0.06
# MFU kept per doubling of tensor parallelism (the sequence-parallel collectives sit on the critical
# path), measured by bench/scale.py (8B, 4 × H100, full checkpointing: TP2 × FSDP2 40.4% against
# FSDP4 48.0%, after the FSDP factor): 0.80.
TP_KEEP_PER_DOUBLING = 0.80
# MFU of full checkpointing relative to selective or none on the same layout, measured by
# bench/scale.py (8B, 4 × H100: 48.0% full against 56.8% selective): the recomputed forward.
FULL_RECOMPUTE_FACTOR = 0.845


@dataclass(frozen=True)
class Workload:
    """What one training step processes, and in which precision."""

    stage: str  # "pretrain" | "finetune"
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    precision: str = "bf16"  # compute dtype: "bf16" (GPU default) or "fp32"
    compile: bool = False
    peft: str = "none"
    peft_rank: int = 16
    save_optimizer: bool = True
    # LoRA/DoRA checkpoints hold only what trains (checkpoint.adapter_only); the base stays where it is.
    adapter_only_checkpoints: bool = True


@dataclass(frozen=True)
class Layout:
    """A parallel layout with every size resolved (what `shoal.distributed.build_mesh` would build)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp_replicate: int = 1
    sequence_parallel: bool = True
    stages_per_rank: int = 1
    activation_checkpointing: str = "none"
    gradient_sync: str = "auto"  # parallel.fsdp_gradient_sync as configured
    reshard_after_forward: str = "default"

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def fsdp(self) -> bool:
        return self.dp * self.cp > 1

    @property
    def fsdp_shards(self) -> int:
        """FSDP shards weights over dp_shard × cp (shoal.distributed.mesh.fsdp_mesh)."""
        return self.dp_shard * self.cp if self.fsdp else 1

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}" if self.pp > 1 else "", f"CP{self.cp}" if self.cp > 1 else "",
                 f"DP{self.dp}" + (f" (HSDP {self.dp_replicate}×{self.dp_shard})" if self.dp_replicate > 1 else "")]
        return " × ".join(p for p in parts if p) + f", checkpointing {self.activation_checkpointing}"


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the busiest rank at the step's peak instant, by what holds them."""

    parameters: float
    gradients: float
    optimizer: float
    working_copies: float  # bf16 copies of weights for compute (FSDP all-gathers, autocast cache)
    activations: float
    logits_loss: float
    overhead: float  # outside torch's allocated figure: CUDA context + allocator slack
    capacity: float
    deferred_gradient_sync: bool
    notes: list[str] = field(default_factory=list)

    @property
    def allocated(self) -> float:
        """What `torch.cuda.max_memory_allocated` would report."""
        return self.parameters + self.gradients + self.optimizer + self.working_copies + self.activations + self.logits_loss

    @property
    def total(self) -> float:
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass
class SpeedEstimate:
    mfu: float
    tokens_per_s_per_gpu: float
    step_seconds: float
    reference: Measurement
    notes: list[str] = field(default_factory=list)


def check_modelled(cfg: ModelConfig, precision: str) -> None:
    """The hook where FP8 would plug in; until it is modelled, refuse it."""
    if precision not in ("bf16", "fp32"):
        raise ShoalError(f"precision {precision!r} is not modelled by shoal plan (bf16 and fp32 are; FP8 is not): "
                         "leave --fp8 out to plan the same run in bf16")


# -- memory ----------------------------------------------------------------------------------------

def _per_rank_params(cfg: ModelConfig, counts: ParamCounts, layout: Layout) -> tuple[float, float, float]:
    """(all, trainable, one layer) parameters held by the busiest rank before FSDP sharding.

    Pipeline stages split the layers evenly; the busier end stage also holds the embedding (first)
    or the output layer (last); tensor parallelism splits every weight matrix over tp ranks."""
    layers = cfg.num_layers // layout.pp if layout.pp > 1 else cfg.num_layers
    if layout.pp > 1:
        ends = max(counts.embed, counts.lm_head)
        total = layers * counts.layer + ends
        trainable = layers * counts.layer_trainable + (ends if counts.trainable == counts.total else 0)
    else:
        total, trainable = counts.total, counts.trainable
    # Routed experts are replicated over tensor-parallel ranks (shoal.models.parallel_plan); they
    # are frozen under LoRA/DoRA, so `trainable` has none of them.
    split = (total - counts.experts) / layout.tp + counts.experts
    layer_experts = counts.experts / max(1, sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)))
    layer = (counts.layer - layer_experts) / layout.tp + layer_experts if counts.experts else counts.layer / layout.tp
    return split, trainable / layout.tp, layer


def resolve_gradient_sync(layout: Layout, trainable_per_rank: float, micro_batches: int, gpu: GpuKind) -> bool:
    """Whether FSDP reduces gradients once per step: shoal.train.engine's rule for "auto" (the
    unsharded fp32 gradients take at most 1/8 of the device), only with accumulation and FSDP."""
    if not layout.fsdp or layout.pp > 1 or micro_batches <= 1:
        return False
    if layout.gradient_sync != "auto":
        return layout.gradient_sync == "last_micro_batch"
    return trainable_per_rank * 4 <= gpu.memory_bytes / 8


def activation_elements_per_token(cfg: ModelConfig, layout: Layout, mode: str, compiled: bool = True,
                                   moe_layer: bool = False, frozen_experts: bool = False,
                                   element_bytes: int = 2) -> tuple[float, float]:
    """(elements kept per token by one decoder layer, of which residual-stream elements).

    none: the layer input and the post-attention residual (norm backward), both normed inputs
    (weight gradients), q, k, v after RoPE and the attention output (attention backward; flash
    attention keeps no S×S matrix), gate and up outputs (SiLU·up backward) and their product
    (down-projection weight gradient): 4h + 2q + 2kv + 3I.
    selective: the matmul and attention outputs plus the layer input; norms, RoPE, SiLU and the
    product are recomputed: 3h + 2q + 2kv + 2I. full: the layer input alone, h.
    Without compile, "none" also keeps what eager autograd saves between the fused ops: each norm's
    normalised input and scaled output (4h), RoPE's rotated halves (q + kv), SiLU's output (I) and,
    with `qk_norm` (Qwen3), the normalised queries and keys (q + kv).
    Tensor parallelism splits q, kv and I by heads/columns; the h terms only with sequence parallelism.
    A mixture-of-experts layer (`moe_layer`) has `moe_elements_per_token` in place of the 3I / 2I."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    h_share = h / layout.tp if layout.sequence_parallel else h
    q, kv, inter = q / layout.tp, kv / layout.tp, inter / layout.tp
    if mode not in ("none", "selective", "full"):
        raise ShoalError(f"parallel.activation_checkpointing {mode!r}: expected none, full or selective")
    mlp = moe_elements_per_token(cfg, mode, compiled, frozen_experts, element_bytes) if moe_layer else None
    if mode == "none":
        eager = 0 if compiled else 4 * h_share + q + kv + (q + kv if cfg.qk_norm else 0)
        dense_mlp = 3 * inter + (0 if compiled else inter)
        return 4 * h_share + 2 * q + 2 * kv + eager + (dense_mlp if mlp is None else mlp), 2 * h_share
    if mode == "selective":
        return 3 * h_share + 2 * q + 2 * kv + (2 * inter if mlp is None else mlp), h_share
    return h_share, h_share


def moe_elements_per_token(cfg: ModelConfig, mode: str, compiled: bool = True, frozen_experts: bool = False,
                           element_bytes: int = 2) -> float:
    """Elements (of `element_bytes` each) one token's routing keeps in a mixture-of-experts block
    (shoal.models.moe), with K routed slots of width E (hidden) and I (expert SwiGLU) each and X
    experts; the router's probabilities (its softmax output, kept for backward) are fp32 always.

    none, eager: the sorted rows (the grouped gate/up weight gradients), the gate and up outputs,
    their product (down's weight gradient), the expert output (the routing weights' gradient), the
    weighted output (index_add keeps its source) and SiLU's output: K(3E + 4I). Frozen experts
    (LoRA/DoRA) need no weight gradient, so neither the sorted rows nor the product are kept:
    K(2E + 3I). Compiled, the partitioner does not keep the weighted output (it recomputes it from
    what it keeps) nor SiLU's output: K(2E + 3I), frozen K(E + 2I) (read off AOTAutograd's
    backward graph on CPU, tests/unit/plan). selective: the grouped matmuls' outputs and the router
    logits, K(2I + E) + X: with frozen experts exactly what a compiled block keeps without
    checkpointing, so selective saves nothing in the MoE block there. full: nothing beyond the
    layer input. The block's input is the normed input the
    attention terms count already. Not split by tensor parallelism: every tensor-parallel rank
    routes the whole sequence. Balanced routing assumed; the int64 routing indices and the top-k
    weights (about 17 fp32 elements a token at K = 2) are left out. Checked against autograd's saved
    tensors on CPU (tests/unit/plan)."""
    k, e, i, x = cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    if mode == "none":
        kept = k * (e + 2 * i) if frozen_experts else k * (2 * e + 3 * i)
        return kept + (0 if compiled else k * (e + i)) + x * 4 / element_bytes
    if mode == "selective":
        return k * (2 * i + e) + x
    return 0.0


def _layer_elements(cfg: ModelConfig, counts: ParamCounts, layout: Layout, mode: str, work: Workload) -> list[float]:
    """`activation_elements_per_token` of each of this rank's layers (dense and MoE layers differ).

    Experts are frozen under LoRA/DoRA unless they carry adapters of their own (shoal.peft.experts):
    then the rows and the product are kept for the adapters' gradients, as in full training, plus
    each adapted projection's x·A (rank elements per routed slot, none of it recomputed by selective)."""
    adapted = counts.adapted_expert_projections
    frozen = work.peft != "none" and not adapted
    expert_adapters = cfg.num_experts_per_tok * work.peft_rank * adapted if mode != "full" else 0
    out = []
    for i in range(cfg.num_layers // layout.pp):
        moe = cfg.is_moe_layer(i)
        element_bytes = 2 if work.precision == "bf16" else 4
        elements = activation_elements_per_token(cfg, layout, mode, work.compile, moe, frozen, element_bytes)[0]
        out.append(elements + (expert_adapters if moe else 0))
    return out


def saved_activation_bytes(cfg: ModelConfig, counts: ParamCounts, layout: Layout, work: Workload) -> float:
    """What autograd keeps for backward from one micro-batch's forward through this rank's layers."""
    bf16 = work.precision == "bf16"
    tokens = work.micro_batch_size * work.seq_length / layout.cp
    mode = layout.activation_checkpointing
    _, residual = activation_elements_per_token(cfg, layout, mode, work.compile)
    # x·A of each adapter (recomputed, like the rest of a layer, under full checkpointing)
    adapters = counts.adapter_targets_per_layer * work.peft_rank / layout.tp if mode != "full" else 0
    element = 2 if bf16 else 4
    # Without FSDP, autocast leaves the residual stream (embedding output, layer inputs) in fp32.
    residual_extra = 2 * residual if bf16 and not layout.fsdp else 0
    rope_tables = 2 * tokens * cfg.head_dim * 4  # cos and sin (fp32), shared by every layer
    per_layer = _layer_elements(cfg, counts, layout, mode, work)
    return tokens * sum((n + adapters) * element + residual_extra for n in per_layer) + rope_tables


def estimate_memory(cfg: ModelConfig, counts: ParamCounts, layout: Layout, work: Workload, gpu: GpuKind) -> MemoryEstimate:
    check_modelled(cfg, work.precision)
    notes: list[str] = []
    bf16 = work.precision == "bf16"
    p_rank, t_rank, layer_rank = _per_rank_params(cfg, counts, layout)
    shards = layout.fsdp_shards
    micro_batches = work.global_batch_size // (work.micro_batch_size * layout.dp)
    deferred = resolve_gradient_sync(layout, t_rank, micro_batches, gpu)

    parameters = 4 * p_rank / shards  # fp32 master weights
    if bf16 and not layout.fsdp:
        # Without FSDP the frozen weights (a LoRA/DoRA base) are kept in bf16 (shoal.train.engine.store_frozen_in).
        parameters = 4 * t_rank + 2 * (p_rank - t_rank)
    gradients = 4 * t_rank if deferred else 4 * t_rank / shards
    if layout.tp > 1 and not layout.fsdp and counts.trainable == counts.total:
        # Under tensor parallelism alone the vocabulary-sharded embedding gets a whole (Replicate)
        # gradient on every rank (seen in tests/unit/plan on 2 gloo ranks).
        gradients += 4 * counts.embed * (1 - 1 / layout.tp)
    optimizer = 8 * t_rank / shards  # AdamW exp_avg + exp_avg_sq, fp32

    # bf16 copies of weights for compute, at the loss (forward done) and at the end of backward.
    at_loss = end_of_backward = 0.0
    if bf16 and layout.fsdp:
        # The running layer and the prefetched next one; the output layer stays gathered from
        # its forward to its backward; a tied embedding lives in the root unit, never resharded.
        per_layer = 2 * 2 * layer_rank + 2 * (counts.lm_head or counts.embed) / layout.tp
        everything = 2 * p_rank
        if (layout.pp > 1 and layout.reshard_after_forward != "always") or layout.reshard_after_forward == "never":
            at_loss = end_of_backward = everything  # nothing is resharded after forward
        elif deferred:
            # Resharded after each forward, but kept gathered after backward until the last micro-batch.
            at_loss, end_of_backward = per_layer, everything
        else:
            # Plus one layer's fp32 gradient waiting for its reduce-scatter.
            at_loss = end_of_backward = per_layer + 4 * counts.layer_trainable / layout.tp
    elif bf16:
        # torch.autocast caches the bf16 cast of every trainable weight for the forward, and autograd
        # keeps them until backward frees them (frozen weights are bf16 already: nothing to cast).
        at_loss = 2 * t_rank

    tokens = work.micro_batch_size * work.seq_length / layout.cp
    mode = layout.activation_checkpointing
    element = 2 if bf16 else 4
    in_flight = min(layout.pp, max(micro_batches, 1)) if layout.pp > 1 else 1  # 1F1B: stage 0 holds pp micro-batches
    activations = in_flight * saved_activation_bytes(cfg, counts, layout, work)
    recompute = 0.0
    if mode == "full":  # one layer's activations exist again while it is recomputed in backward
        recompute = tokens * max(_layer_elements(cfg, counts, layout, "none", work)) * element
    if work.peft == "dora":
        notes.append("DoRA: its weight-norm temporaries (one adapted weight per layer) are not modelled")

    logit_kind = "fp32" if not bf16 else ("compiled" if work.compile else "eager")
    if not layout.fsdp and layout.tp == 1 and layout.pp == 1:
        # The output layer and the loss run a chunk of tokens at a time (shoal.train.linear_cross_entropy).
        logits = min(tokens, max(1, CHUNK_ELEMENTS // cfg.vocab_size)) * cfg.vocab_size * CHUNKED_LOGIT_BYTES[logit_kind]
    else:
        logits = tokens * cfg.vocab_size * LOGIT_BYTES[logit_kind]
    if layout.tp > 1:
        logits += tokens * cfg.vocab_size / layout.tp * element  # this rank's shard before the gather

    # The peak is at one of two instants. At the loss, every activation and the logits are alive;
    # gradients exist then only from a step's second micro-batch on (they are freed after each
    # step). At the end of backward, activations are gone and all gradients exist.
    grads_at_loss = gradients if micro_batches > 1 else 0.0
    loss_peak = parameters + optimizer + grads_at_loss + at_loss + activations + logits
    backward_peak = parameters + optimizer + gradients + end_of_backward + recompute
    if loss_peak >= backward_peak:
        gradients, working = grads_at_loss, at_loss
    else:
        working, activations, logits = end_of_backward, recompute, 0.0
        notes.append("the peak is at the end of backward (gradients and gathered weights), not at the loss")
    allocated = parameters + gradients + optimizer + working + activations + logits
    overhead = CONTEXT_BYTES + FRAGMENTATION * allocated
    return MemoryEstimate(parameters, gradients, optimizer, working, activations, logits, overhead,
                          gpu.memory_bytes, deferred, notes)


# -- speed -----------------------------------------------------------------------------------------

def _fsdp_factor(shards: int) -> float:
    return max(0.5, 1 - FSDP_LOSS_PER_DOUBLING * math.log2(max(shards, 1)))


def _tp_factor(tp: int) -> float:
    return TP_KEEP_PER_DOUBLING ** math.log2(tp)


def _checkpoint_factor(mode: str) -> float:
    return FULL_RECOMPUTE_FACTOR if mode == "full" else 1.0


def _distance(m: Measurement, params: int, work: Workload, layout: Layout, gradient_sync_once: bool) -> float:
    """How unlike the planned run a benchmark is. Stage (packed fine-tuning runs short sequences)
    and model size weigh most, then tensor parallelism, sequence length, and whether FSDP works
    under gradient accumulation (it gathers weights again for every micro-batch) and how it syncs."""
    ref_params = _PRESET_PARAMS.get(m.preset)
    d = 8.0 if m.stage != work.stage else 0.0
    d += 4 * abs(math.log2(ref_params / params)) if ref_params else 4
    d += 2 * abs(math.log2(m.tp / layout.tp))
    d += 2 * abs(math.log2(m.seq_length / work.seq_length))
    d += 1 if (m.peft == "none") != (work.peft == "none") else 0
    m_dp = m.num_gpus // m.tp
    m_accumulates = m.global_batch_size > m.micro_batch_size * m_dp
    accumulates = work.global_batch_size > work.micro_batch_size * layout.dp
    d += 1 if (m_dp > 1) != layout.fsdp else 0
    d += 2 if m_dp > 1 and layout.fsdp and m_accumulates != accumulates else 0
    m_once = m.gradient_sync != "every_micro_batch"
    d += 2 if layout.fsdp and m_dp > 1 and m_accumulates and accumulates and m_once != gradient_sync_once else 0
    d += 0.5 if (m.activation_checkpointing == "full") != (layout.activation_checkpointing == "full") else 0
    return d


def _preset_params() -> dict[str, int]:
    from shoal.models.presets import get_preset

    return {name: get_preset(name).num_params for name in {m.preset for m in MEASUREMENTS}}


_PRESET_PARAMS: dict[str, int] = {}


def estimate_speed(cfg: ModelConfig, layout: Layout, work: Workload, gpu: GpuKind, memory: MemoryEstimate,
                   exclude: str | None = None) -> SpeedEstimate:
    """MFU of the nearest measured configuration, adjusted for FSDP shards, checkpointing and the
    pipeline bubble; `exclude` leaves one measurement out (to validate on it)."""
    if not _PRESET_PARAMS:
        _PRESET_PARAMS.update(_preset_params())
    candidates = [m for m in MEASUREMENTS if not m.superseded and m.name != exclude]
    ref = min(candidates, key=lambda m: (_distance(m, cfg.num_params, work, layout, memory.deferred_gradient_sync),
                                         m.gpu != gpu.name.split()[0].lower()))
    ref_shards = ref.num_gpus // ref.tp
    mfu = ref.mfu * _fsdp_factor(layout.fsdp_shards) / _fsdp_factor(ref_shards)
    mfu *= _checkpoint_factor(layout.activation_checkpointing) / _checkpoint_factor(ref.activation_checkpointing)
    mfu *= _tp_factor(layout.tp) / _tp_factor(ref.tp)
    notes = [f"MFU {100 * ref.mfu:.1f}% measured by shoal's benchmarks for {ref.name} ({ref.source})"]
    if cfg.is_moe:
        notes.append("mixture of experts: the MFU is a dense model's; no MoE run is in the planner's table, and "
                     "bench/moe.py measured far less on one H200 (18% for the 30B-A3B shape with LoRA and "
                     "full checkpointing): read this speed as an upper bound")
    if layout.pp > 1:
        micro_batches = work.global_batch_size // (work.micro_batch_size * layout.dp)
        bubble = micro_batches / (micro_batches + (layout.pp - 1) / layout.stages_per_rank)
        mfu *= bubble
        notes.append(f"pipeline parallelism not benchmarked yet: MFU × {bubble:.2f} for the 1F1B bubble, otherwise a guess")
    if layout.cp > 1:
        notes.append("context parallelism not benchmarked yet: its communication is not counted")
    if not gpu.measured:
        notes.append(f"{gpu.name} not benchmarked: assumes the MFU measured on {ref.gpu.upper()}")
    if work.precision != "bf16":
        notes.append("fp32 compute is not benchmarked on GPU: the MFU (and time) assumes bf16 tensor cores")
    tokens_per_s = mfu * gpu.peak_flops / cfg.flops_per_token(work.seq_length)
    step = work.global_batch_size * work.seq_length / (tokens_per_s * layout.world_size)
    return SpeedEstimate(mfu, tokens_per_s, step, ref, notes)


# -- the whole plan --------------------------------------------------------------------------------

@dataclass
class Estimate:
    layout: Layout
    memory: MemoryEstimate
    speed: SpeedEstimate
    checkpoint_bytes: float
    steps: int | None
    run_seconds: float | None


def saved_weight_bytes(counts: ParamCounts, work: Workload) -> float:
    """The fp32 weights a training checkpoint holds (DCP, a tied embedding once): every one, or for
    a LoRA/DoRA run's adapter-only checkpoints only the trainable ones."""
    adapter_only = work.peft != "none" and work.adapter_only_checkpoints
    return 4 * (counts.trainable if adapter_only else counts.total)


def checkpoint_bytes(counts: ParamCounts, work: Workload) -> float:
    """On disk: the saved fp32 weights, plus AdamW's two fp32 moments per trainable parameter
    when checkpoint.save_optimizer is on."""
    return saved_weight_bytes(counts, work) + (8 * counts.trainable if work.save_optimizer else 0)


def estimate(cfg: ModelConfig, counts: ParamCounts, layout: Layout, work: Workload, gpu: GpuKind,
             steps: int | None = None, exclude: str | None = None) -> Estimate:
    memory = estimate_memory(cfg, counts, layout, work, gpu)
    speed = estimate_speed(cfg, layout, work, gpu, memory, exclude=exclude)
    run = steps * speed.step_seconds if steps else None
    return Estimate(layout, memory, speed, checkpoint_bytes(counts, work), steps, run)
