"""What the distributed tests run: a few AdamW steps on one layout, and its one-process oracle.

Both sides build the same tiny model from the same seed and read the same global batches. The
oracle is plain PyTorch in one process (whole batch, `torch.nn.utils.clip_grad_norm_`, AdamW);
the layout run goes through shoal.distributed the way the training loop does: meta model,
parallelize (or split into pipeline stages), materialise, load the full weights through DCP's
state-dict API, then per step: count loss tokens over the ranks, accumulate micro-batches with
the loss `Σ CE · mask / N_global`, clip, step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from shoal.config.parallel import ParallelConfig
from shoal.distributed import (
    build_mesh,
    check_parallel_layout,
    clip_grad_norm_,
    context_parallel_context,
    parallelize_model,
    pipeline_model,
    pipeline_step,
)
from shoal.distributed.context_parallel import shard_sequence
from shoal.models import build_model, get_preset
from shoal.models.config import ModelConfig
from shoal.models.model import Transformer

SEQ_LENGTH = 32
GLOBAL_BATCH = 8
STEPS = 3
LR = 1e-3


MAX_NORM = 1.0  # low enough that clipping is active in the first steps
WEIGHTS_SEED = 0


def model_config(preset: str = "llama_tiny", num_layers: int = 2) -> ModelConfig:
    return dataclasses.replace(get_preset(preset), num_layers=num_layers)


def initial_state(cfg: ModelConfig, seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(cfg)
    # Tied weights appear once in the state dict under both names; loading handles either.
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_batch(step: int, cfg: ModelConfig, documents: bool, seq_length: int = SEQ_LENGTH) -> dict[str, torch.Tensor]:
    """The global batch of one step. The loss mask drops ~30% of tokens unevenly, so ranks hold
    different token counts (a per-rank mean would then differ from the global one). With
    `documents`, each row packs several documents: positions restart and document ids change."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, seq_length + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BATCH, seq_length, generator=g) > 0.3).float()
    loss_mask[0, : seq_length // 2] = 0  # one row with far fewer loss tokens
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": loss_mask}
    if documents:
        starts = torch.rand(GLOBAL_BATCH, seq_length, generator=g) < 0.15
        starts[:, 0] = True
        doc = torch.cumsum(starts.long(), dim=1) - 1
        index = torch.arange(seq_length).expand(GLOBAL_BATCH, -1)
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        batch["document_ids"] = doc
        batch["position_ids"] = index - first
    else:
        batch["position_ids"] = torch.arange(seq_length).expand(GLOBAL_BATCH, -1).clone()
    return batch


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().to(losses.dtype)).sum()


def reference_run(
    cfg: ModelConfig,
    documents: bool,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    seq_length: int = SEQ_LENGTH,
) -> dict[str, Any]:
    """The oracle: one process, the whole global batch at once.

    With a compute dtype (bf16), it does by hand what FSDP2's mixed precision does: forward and
    backward on a copy whose parameters (not buffers) are in that dtype, gradients taken back to
    the fp32 weights, which the optimizer updates.
    """
    model = Transformer(cfg).to(device)
    model.load_state_dict(initial_state(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    losses, norms = [], []
    for step in range(STEPS):
        b = {k: v.to(device) for k, v in make_batch(step, cfg, documents, seq_length).items()}
        runner = model
        if compute_dtype is not None:
            runner = Transformer(cfg).to(device)
            runner.load_state_dict(model.state_dict())
            for p in runner.parameters():
                p.data = p.data.to(compute_dtype)
        logits = runner(b["tokens"], position_ids=b["position_ids"], document_ids=b.get("document_ids"))
        loss = loss_sum(logits, b["labels"], b["loss_mask"]) / b["loss_mask"].sum()
        loss.backward()
        if runner is not model:
            for p, q in zip(model.parameters(), runner.parameters()):
                p.grad = q.grad.float()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "grad_norms": norms, "state": final}


def _device(spec: dict[str, Any]) -> torch.device:
    if spec.get("device", "cpu") == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _compute_dtype(spec: dict[str, Any]) -> torch.dtype | None:
    return {"bfloat16": torch.bfloat16, None: None}[spec.get("compute_dtype")]


def _rows(tensor: torch.Tensor, index: int, count: int) -> torch.Tensor:
    size = tensor.shape[0] // count
    return tensor[index * size : (index + 1) * size]


def build_layout(spec: dict[str, Any], weights: dict[str, torch.Tensor] | None = None):
    """Mesh, model parts (and pipeline) for a layout, loaded with `weights` (default: the oracle's
    initial weights; {}: all zeros, for a checkpoint to fill)."""
    pcfg = ParallelConfig(**spec["parallel"])
    cfg = model_config(spec.get("preset", "llama_tiny"), spec.get("num_layers", 2))
    world = dist.get_world_size()
    micro = spec.get("micro_batch_size", 1)
    seq = spec.get("seq_length", SEQ_LENGTH)
    check_parallel_layout(pcfg, world, cfg, seq_length=seq, global_batch_size=GLOBAL_BATCH, micro_batch_size=micro)
    device, dtype = _device(spec), _compute_dtype(spec)
    dims = build_mesh(pcfg, world, device.type)
    with torch.device("meta"):
        model = Transformer(cfg)
    pipe = None
    if dims.pp_enabled:
        n_micro = GLOBAL_BATCH // dims.dp_size // micro
        pipe, parts, _, _ = pipeline_model(model, dims, pcfg, loss_sum, micro, n_micro, device.type, dtype)
    else:
        parts = [parallelize_model(model, dims, pcfg, device.type, dtype)]
    full = initial_state(cfg) if weights is None else weights
    for part in parts:
        part.to_empty(device=device)
        part.init_buffers()
        if full:
            set_model_state_dict(part, full, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                for p in part.parameters():
                    p.zero_()
    return dims, pcfg, cfg, parts, pipe


def gathered_state(parts: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights of this rank's parts, keyed as DCP names them."""
    state = {}
    for part in parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        state.update({k: v.detach().cpu().clone() for k, v in sd.items()})
    return state


def train_layout(spec: dict[str, Any]) -> dict[str, Any]:
    """STEPS optimizer steps on one layout; returns losses, grad norms and the final weights."""
    dims, pcfg, cfg, parts, pipe = build_layout(spec)
    device = _device(spec)
    documents = spec.get("documents", False)
    explicit_positions = spec.get("explicit_positions", True)
    micro = spec.get("micro_batch_size", 1)
    params = [p for part in parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, foreach=False)
    cp, cp_rank = dims.cp, dims.rank_in("cp")
    losses, norms = [], []
    for step in range(STEPS):
        full = make_batch(step, cfg, documents, spec.get("seq_length", SEQ_LENGTH))
        batch = {k: _rows(v, dims.dp_rank, dims.dp_size).to(device) for k, v in full.items()}
        # Count the loss tokens this rank computes, then sum over the ranks holding other tokens.
        local_mask = batch["loss_mask"] if cp == 1 else shard_sequence(batch["loss_mask"], 1, cp, cp_rank)
        global_tokens = dims.all_reduce_over_batch(local_mask.sum().double()).item()
        docs = batch.get("document_ids")
        names = ["tokens", "labels", "loss_mask", "position_ids"]
        if pipe is not None:
            with context_parallel_context(
                dims, [batch[n] for n in names], [1] * 4, document_ids=docs if cp > 1 else None,
                backend=spec.get("cp_backend", "auto"),
            ) as (t, lab, m, p):
                model_docs = docs if cp == 1 else None
                total = pipeline_step(pipe, t, lab, m, global_tokens, position_ids=p, document_ids=model_docs)
        else:
            total = torch.zeros((), device=device)
            for i in range(batch["tokens"].shape[0] // micro):
                mb = {k: v[i * micro : (i + 1) * micro] for k, v in batch.items()}
                mb_docs = mb.get("document_ids")
                with context_parallel_context(
                    dims, [mb[n] for n in names], [1] * 4, document_ids=mb_docs if cp > 1 else None,
                    backend=spec.get("cp_backend", "auto"),
                ) as (t, lab, m, p):
                    kwargs = {"position_ids": p} if explicit_positions or cp > 1 else {}
                    if mb_docs is not None and cp == 1:
                        kwargs["document_ids"] = mb_docs
                    s = loss_sum(parts[0](t, **kwargs), lab, m)
                    (s / global_tokens).backward()
                total += s.detach()
        loss = dims.all_reduce_over_batch(total.double()).item() / global_tokens
        norms.append(clip_grad_norm_(params, MAX_NORM, dims).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss)
    return {"losses": losses, "grad_norms": norms, "state": gathered_state(parts)}


def dcp_across_layouts(checkpoint_root: str) -> dict[str, Any]:
    """Save with DCP from one layout, load into the next: FSDP2 -> TP2 -> PP2 (and PP2 saves too).

    Each loading layout starts from zeros, so anything the checkpoint does not fill shows.
    Returns the full weights each layout ended up with.
    """
    import torch.distributed.checkpoint as dcp

    weights = initial_state(model_config(), seed=123)  # not what a fresh model would hold
    _, _, _, parts, _ = build_layout({"parallel": {}}, weights)
    dcp.save(get_model_state_dict(parts[0]), checkpoint_id=f"{checkpoint_root}/fsdp2")

    out = {}
    for name, spec, source in [
        ("tp2", {"parallel": {"tensor_model_parallel_size": 2}}, "fsdp2"),
        ("pp2", {"parallel": {"pipeline_model_parallel_size": 2}, "micro_batch_size": 2}, "tp2"),
    ]:
        _, _, _, parts, _ = build_layout(spec, weights={})
        state = {}
        for part in parts:
            state.update(get_model_state_dict(part))
        dcp.load(state, checkpoint_id=f"{checkpoint_root}/{source}")
        for part in parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))
        out[name] = gathered_state(parts)
        dcp.save(state, checkpoint_id=f"{checkpoint_root}/{name}")
    return out


def assert_matches_reference(
    results: list[dict[str, Any]], expected: dict[str, Any], rtol: float, weight_tolerance: float
) -> None:
    """Every rank's losses and gradient norms within rtol of the oracle's; the final weights,
    gathered from all ranks, under exactly the oracle's names and with a mean absolute difference
    per tensor below weight_tolerance. (A mean, not a maximum: AdamW moves a weight by about ±LR
    whatever its gradient's size, so the rare weight whose gradient is ~0 can land ±LR away from
    rounding alone, while a wrong gradient displaces whole tensors.)"""
    for rank, result in enumerate(results):
        for key in ("losses", "grad_norms"):
            torch.testing.assert_close(
                result[key], expected[key], rtol=rtol, atol=0,
                msg=lambda m, key=key, rank=rank: f"{key}, rank {rank}: {m}",
            )
    final: dict[str, torch.Tensor] = {}
    for result in results:
        final.update(result["state"])
    assert sorted(final) == sorted(expected["state"])
    worst = max(
        ((final[name] - value).abs().mean().item(), name) for name, value in expected["state"].items()
    )
    print(f"largest mean |weight difference|: {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= weight_tolerance, f"{worst[1]}: mean |difference| {worst[0]:.2e} > {weight_tolerance:.0e}"


class AdaptedMLP(torch.nn.Module):
    """An MLP's up and down projections, both biased, both adapted: under tensor parallelism the
    first is split column-wise and the second row-wise, as in a decoder layer."""

    def __init__(self, dora: bool, hidden: int = 16, inner: int = 24):
        super().__init__()
        from shoal.peft import apply_lora

        self.up_proj = torch.nn.Linear(hidden, inner)
        self.down_proj = torch.nn.Linear(inner, hidden)
        apply_lora(self, rank=4, alpha=8, target_modules=["up_proj", "down_proj"], use_dora=dora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.up_proj(x)))


ADAPTED_MLP_SEED = 7


def adapted_mlp_inputs(dora: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Base weights, trained-looking adapters (B non-zero, so every adapter tensor gets a gradient)
    and a batch [4, 8, 16]: the same in every process."""
    g = torch.Generator().manual_seed(ADAPTED_MLP_SEED)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AdaptedMLP(dora).named_parameters()}
    base = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items() if ".lora_" not in k}
    adapters = {k: torch.randn(s, generator=g) * 0.3 + (1 if "magnitude" in k else 0)
                for k, s in shapes.items() if ".lora_" in k}
    return base, adapters, torch.randn(4, 8, 16, generator=g)


def adapted_mlp_backward(model: torch.nn.Module, x: torch.Tensor, micro_batches: int = 2) -> torch.Tensor:
    """Σ y·x over two micro-batches (gradients accumulate); returns the outputs."""
    outs = []
    for chunk in x.chunk(micro_batches):
        y = model(chunk)
        (y * chunk).sum().backward()
        outs.append(y.detach())
    return torch.cat(outs)


def adapted_mlp_under_tp(dora: bool, sequence_parallel: bool) -> dict[str, Any]:
    """AdaptedMLP split over the ranks with shoal's LoRA styles, built the way the training loop
    builds a model (meta, split, materialise, load the base, initialise the adapters), then given
    `adapted_mlp_inputs`' adapters and run forward/backward on this rank's part of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    from shoal.distributed.parallelize import apply_tp, complete_partial_grads
    from shoal.peft import adapter_state_dict, init_lora_weights, load_adapter_state_dict

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    between = Shard(1) if sequence_parallel else Replicate()
    with torch.device("meta"):
        model = AdaptedMLP(dora)
    plan = {
        "": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=between),
    }
    complete_partial_grads(model, apply_tp(model, mesh, plan))
    model.to_empty(device="cpu")
    base, adapters, x = adapted_mlp_inputs(dora)
    set_model_state_dict(model, base, options=StateDictOptions(full_state_dict=True, strict=False))
    init_lora_weights(model, seed=ADAPTED_MLP_SEED)
    initial = {k: v.clone() for k, v in adapter_state_dict(model).items()}  # not views of the parameters
    load_adapter_state_dict(model, adapters)

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = x.chunk(world, dim=1)[rank] if sequence_parallel else x
    y = adapted_mlp_backward(model, mine)
    out = {"initial": initial, "adapters": adapter_state_dict(model), "y": y, "grads": {}, "local_grads": {}}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad
        out["grads"][name] = (str(param.placements), str(grad.placements), grad.full_tensor().clone())
        if isinstance(grad, DTensor):
            out["local_grads"][name] = grad.to_local().clone()
    out["adapter_types"] = sorted({type(v).__name__ for v in out["adapters"].values()})
    return out
