"""One optimizer step: the masked loss, gradient accumulation, clipping and the AdamW update.

The loss of a global batch is the mean over all of its answer (loss-mask) tokens, whatever the
micro-batch and data-parallel split: each micro-batch contributes `sum(CE · mask) / N_global`,
where N_global is the number of loss tokens in the whole global batch. That is what makes a run
split over ranks and micro-batches equal a one-process run on the same data.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def masked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Σ CE(logits, labels) · mask, computed in fp32. logits [B, S, V]; labels, mask [B, S]."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().to(losses.dtype)).sum()


def model_inputs(batch: dict[str, torch.Tensor], document_mask: bool) -> dict[str, torch.Tensor]:
    """The forward arguments for a batch: positions always, document ids only when masking documents."""
    inputs = {"position_ids": batch["position_ids"]}
    if document_mask:
        inputs["document_ids"] = batch["document_ids"]
    return inputs


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    global_loss_tokens: float,
    grad_scale: float,
    document_mask: bool,
) -> torch.Tensor:
    """Accumulate gradients over this rank's micro-batches; returns this rank's loss sum (detached).

    `grad_scale` undoes the averaging the data-parallel gradient reduction does (it is the
    data-parallel size when gradients are averaged across ranks, 1 otherwise).
    """
    total = torch.zeros((), device=micro_batches[0]["tokens"].device)
    for mb in micro_batches:
        logits = model(mb["tokens"], **model_inputs(mb, document_mask))
        loss_sum = masked_cross_entropy_sum(logits, mb["labels"], mb["loss_mask"])
        (loss_sum * (grad_scale / global_loss_tokens)).backward()
        total += loss_sum.detach()
    return total


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (clipped to `max_norm` when it is > 0), as a plain tensor on every rank."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor when parameters are sharded
        norm = norm.full_tensor()
    return norm


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> Any:
    """AdamW over trainable parameters; no weight decay on norms and biases (1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)
