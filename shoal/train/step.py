"""The pieces of a training step: the masked loss, batch preparation and transfer, and the AdamW optimizer.

The loss of a global batch is the mean over all of its answer (loss-mask) tokens, whatever the
micro-batch and data-parallel split: each micro-batch contributes `sum(CE · mask) / N_global`,
where N_global is the number of loss tokens in the whole global batch. That is what makes a run
split over ranks and micro-batches equal a one-process run on the same data.

What the step needs to know about a batch (its loss-token count, its documents' spans, the
positions of its loss tokens) is read on
the host, from the data loader's batch before it is copied: reading it from the device copy would
make the host wait for the GPU, so it could never queue the next step's work ahead of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


def masked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Σ CE(logits, labels) · mask, computed in fp32. logits [B, S, V]; labels, mask [B, S]."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().to(losses.dtype)).sum()


def model_inputs(batch: dict[str, torch.Tensor], document_mask: bool) -> dict[str, torch.Tensor]:
    """The forward arguments for a batch: positions always, document ids (and their spans, where the
    host computed them: `with_document_spans`) only when masking documents."""
    inputs = {"position_ids": batch["position_ids"]}
    if document_mask:
        inputs["document_ids"] = batch["document_ids"]
        if "cu_seqlens" in batch:
            inputs["cu_seqlens"] = batch["cu_seqlens"]
    return inputs


def host_loss_tokens(batch: dict[str, torch.Tensor]) -> float:
    """Σ loss_mask of a batch in host memory, counted on the host (exact: the mask holds 0s and 1s)."""
    return float(batch["loss_mask"].numpy().sum(dtype=np.float64))


def with_document_spans(batch: dict[str, torch.Tensor], fixed_shapes: bool = False) -> dict[str, torch.Tensor]:
    """A host batch plus `cu_seqlens`, its documents' varlen spans (see shoal.models.document_attention);
    `fixed_shapes` pads them to one of a few lengths (for CUDA graphs)."""
    from shoal.models.document_attention import host_cu_seqlens

    return {**batch, "cu_seqlens": host_cu_seqlens(batch["document_ids"], fixed_shapes)}


# Loss positions are padded up to a multiple of this many tokens, so their count takes few values
# (kernels and memory blocks picked for one size are reused) at a cost of less than one bucket of
# padded rows per micro-batch. A compiled chunk function recompiles once, not once per count:
# Dynamo marks the row dimension dynamic when it sees a second size (automatic dynamic shapes).
LOSS_POSITION_BUCKET = 256


def with_loss_positions(batch: dict[str, torch.Tensor], bucket: int | None = None) -> dict[str, torch.Tensor]:
    """A host batch plus `loss_positions`: int64 flat indices (into its B·S tokens) of the tokens
    whose loss_mask is not 0, so that the output layer and the loss run on those rows alone.

    Their count is rounded up to a multiple of `bucket` (LOSS_POSITION_BUCKET by default; at least
    one bucket) so that their shape changes seldom. Padding repeats the index of a token whose mask
    is 0: it weighs 0 in the loss, hence adds exactly 0 to it and to every gradient. Where the
    rounded count reaches B·S (pretraining, or few prompt tokens) the batch is returned as it is:
    gathering every row would save nothing."""
    bucket = bucket or LOSS_POSITION_BUCKET
    mask = batch["loss_mask"].numpy().reshape(-1)
    # numpy, not torch.nonzero: host work, and the step loop's sync checks flag torch's nonzero.
    positions = np.flatnonzero(mask)
    size = max(-(-positions.size // bucket), 1) * bucket
    if size >= mask.size:
        return batch
    filler = np.flatnonzero(mask == 0)[0]  # exists: fewer loss tokens than `size` < B·S
    positions = np.concatenate([positions, np.full(size - positions.size, filler)])
    return {**batch, "loss_positions": torch.from_numpy(positions.astype(np.int64))}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a host batch to `device` without the host waiting: on CUDA from pinned memory (the data
    loader pins its batches; what was added after it, such as `cu_seqlens`, is pinned here), so
    that `non_blocking` really is asynchronous. On the CPU the tensors are used as they are."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v if v.is_cuda or v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
            for k, v in batch.items()}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> Any:
    """AdamW over trainable parameters; no weight decay on norms and biases (1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    # Multi-tensor kernels take one kind of tensor: an MoE model under tensor parallelism mixes
    # DTensors (attention) with plain or other-mesh tensors (its replicated experts).
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for g in groups for p in g["params"]}
    if len(meshes) > 1:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)
