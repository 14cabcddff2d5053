"""Expert parallelism: each rank of the "ep" mesh axis holds X/ep experts of every sparse layer,
and tokens travel to the ranks holding their experts by all-to-all, and back the same way.

Shape legend: N routed rows on this rank (T tokens × K experts each), E hidden size, X experts,
L = X/ep experts per rank, P = ep ranks.

The grouped expert weights ([X, ...], expert on dim 0) become DTensors sharded on dim 0 over
"ep", so a checkpoint (DCP) holds the global [X, ...] tensors whatever the layout, and FSDP2 can
shard each rank's share further over the ranks holding the same experts ("efsdp", see mesh.py).

A layer's forward on one rank (the module's `apply_experts` seam, shoal.models.moe):

1. its rows arrive sorted by expert (counts [X]); expert x lives on rank x // L, so the rows for
   each rank are one contiguous run: the send split sizes are the counts summed per rank;
2. the counts themselves are exchanged first (an even all-to-all of [X] counts), so each rank
   knows how many rows it receives from each peer for each of its experts ([P, L]);
3. the rows are exchanged (uneven all-to-all, autograd-aware: its backward is the reverse
   all-to-all, which brings the gradients of the rows back to where they came from);
4. the received rows, grouped by source rank then expert, are re-sorted by local expert, run
   through the local experts, put back in arrival order and returned by the reverse all-to-all.

Routing (router, top-k, load-balancing statistics) stays on the rank that owns the tokens, so the
auxiliary loss and the router statistics are exactly those of data parallelism.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from shoal.errors import ShoalError
from shoal.models.moe import LowRankUpdate, expert_matmuls

# The grouped weights of an experts module, each [X, ...] with the expert on dim 0.
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def apply_expert_parallel(experts: list[nn.Module], ep_mesh: DeviceMesh) -> None:
    """Split each experts module's grouped weights over `ep_mesh` (in place, meta or real) and
    route its rows through the all-to-all dispatch. Frozen weights stay frozen. LoRA adapters on
    the experts (`module.lora`, each factor [X, ...]) are split with their experts."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for module in experts:
        if module.num_experts % ep:  # layout_checks refuses this first; a plan gone wrong lands here
            raise ShoalError(f"{module.num_experts} experts cannot be split over {ep} expert-parallel ranks")
        holders = [(module, name) for name in EXPERT_WEIGHTS]
        if getattr(module, "lora", None) is not None:
            holders += [(owner, name) for owner in module.lora.modules()
                        for name, _ in owner.named_parameters(recurse=False)]
        for owner, name in holders:
            param = getattr(owner, name)
            local = param.detach().chunk(ep, dim=0)[rank]
            if not local.is_meta:
                local = local.clone()  # its own storage, not a view of the whole tensor
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(owner, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.apply_experts = types.MethodType(_dispatched_experts(ep_mesh), module)


def _dispatched_experts(ep_mesh: DeviceMesh):
    group = ep_mesh.get_group()
    ep = ep_mesh.size()

    def apply_experts(self: nn.Module, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = [_local(getattr(self, name)) for name in EXPERT_WEIGHTS]
        low_rank = {name: LowRankUpdate(_local(u.lora_A), _local(u.lora_B), u.scaling)
                    for name, u in self.low_rank_updates().items()}
        return dispatch_to_experts(routed, counts, weights, group, ep, low_rank)

    return apply_experts


def _local(weight: torch.Tensor) -> torch.Tensor:
    # FSDP2 hands the module its gathered weight as the "ep"-sharded DTensor: this rank's experts.
    return weight.to_local() if isinstance(weight, DTensor) else weight


def dispatch_to_experts(
    routed: torch.Tensor, counts: torch.Tensor, weights: list[torch.Tensor], group: dist.ProcessGroup, ep: int,
    low_rank: dict[str, LowRankUpdate] | None = None,
) -> torch.Tensor:
    """routed [N, E] sorted by expert (counts [X]) -> each row through its expert, which may live
    on another rank of `group`; weights: this rank's [L, ...] gate, up and down (and `low_rank`,
    their adapters' [L, ...] factors)."""
    local_experts = counts.shape[0] // ep
    # (2) How many rows each peer sends for each of this rank's experts: received[p, l].
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    received = received.view(ep, local_experts)
    # One host sync for both split lists (the all-to-all needs them as Python ints).
    sizes = torch.stack([counts.view(ep, local_experts).sum(1), received.sum(1)]).tolist()
    send_sizes, recv_sizes = sizes
    # (3) Rows to their experts' ranks; grouped by source rank, then by expert, on arrival.
    arrived = all_to_all_single_autograd(routed, recv_sizes, send_sizes, group)
    # (4) Re-sort by local expert, run, restore the arrival order, send back.
    expert_of_row = torch.repeat_interleave(
        torch.arange(local_experts, device=counts.device).repeat(ep), received.reshape(-1))
    order = torch.argsort(expert_of_row, stable=True)
    low_rank = low_rank or {}
    out = expert_matmuls(arrived[order], received.sum(0), *weights, low_rank)
    if out.shape[0] == 0:
        # No row reached this rank's experts. Keep the (empty) arrived rows in the graph, or this
        # rank would skip the backward all-to-all its peers wait in (a hang), and the weights and
        # adapters too, so that every rank reduces the same (here zero) gradients.
        factors = [t for u in low_rank.values() for t in (u.lora_A, u.lora_B)]
        out = out + (arrived.sum() + sum(w.sum() for w in [*weights, *factors])) * 0
    out = torch.empty_like(out).index_copy(0, order, out)
    return all_to_all_single_autograd(out, send_sizes, recv_sizes, group)
