"""The global gradient norm and clipping on any layout.

A parallelized model mixes gradient kinds: DTensors on the FSDP mesh, on the tensor-parallel mesh,
on both (2-D), and plain tensors; a pipeline rank holds only its stages' gradients. Each group of
DTensors sharing a mesh gets its norm from DTensor (which knows which axes hold shards and which
hold copies); the squares are added, then summed over pipeline ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from shoal.distributed.mesh import ParallelDims


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.nn.Parameter], parallel_dims: ParallelDims | None = None) -> torch.Tensor:
    """The L2 norm of all gradients of the model (every stage), as a plain fp32 scalar on every rank."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    device = None
    for p in parameters:
        if p.grad is None:
            continue
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        by_mesh.setdefault(key, []).append(p.grad)
        device = p.grad.device
    if device is None:
        device = torch.device("cuda" if parallel_dims and parallel_dims.device_type == "cuda" else "cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float() ** 2
    if parallel_dims is not None and parallel_dims.pp_enabled:
        dist.all_reduce(total_sq, group=parallel_dims.group("pp"))
    return total_sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, parallel_dims: ParallelDims | None = None
) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm (no-op when max_norm <= 0);
    returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, parallel_dims)
    if max_norm > 0 and params:
        # The scale stays a device tensor: no host sync, so the next step's kernels queue behind
        # this one (a factor of exactly 1 when the norm is within max_norm). A DTensor takes a 0-d
        # plain tensor as a replicated scalar; one multi-tensor call per kind of gradient (mesh).
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for p in params:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coef)
    return total
