"""The expert-parallel dispatch (shoal.distributed.expert_parallel) against the experts in one process.

Two gloo ranks each hold 4 of 8 experts and their own tokens. The oracle is `GroupedExperts` in
this process on both ranks' tokens at once, with the whole weights: each rank's outputs and input
gradients must be its rows of the oracle's, and each rank's expert gradients its slice of the
oracle's (fp32; the dispatch only moves rows, so the tolerance is that of reordered sums).

The routing is uneven on purpose: rank 1 sends most of its rows to rank 0's experts, and in the
second case every row goes to rank 0's experts, so rank 1 receives nothing and must still return
(zero) gradients for its experts. With `lora`, the experts carry LoRA adapters on their three
projections (shoal.peft.experts), split with them: their gradients are checked the same way.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shoal.models import get_preset
from shoal.models.moe import GroupedExperts
from tests.helpers.distributed import run_distributed

CFG = get_preset("qwen3_moe_tiny")  # 8 experts, 2 per token, hidden 64, expert width 32
TOKENS_PER_RANK = 12


def _experts(lora: bool) -> GroupedExperts:
    from shoal.peft.experts import ExpertLora

    experts = GroupedExperts(CFG)
    if lora:
        experts.lora = ExpertLora(experts, ["gate_proj", "up_proj", "down_proj"], rank=2, alpha=4.0)
    return experts


def _inputs(all_on_rank0: bool, lora: bool = False):
    """Weights (adapters included), and per rank: tokens [T, E], expert indices [T, K] and routing weights [T, K]."""
    g = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _experts(lora).named_parameters()}
    weights = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    ranks = []
    for rank in range(2):
        x = torch.randn(TOKENS_PER_RANK, CFG.hidden_size, generator=g)
        # Two distinct experts per token; rank 1 prefers experts 0-3 (rank 0's).
        high = 4 if all_on_rank0 or rank == 1 else CFG.num_experts
        scores = torch.rand(TOKENS_PER_RANK, high, generator=g)
        indices = scores.topk(CFG.num_experts_per_tok, dim=1).indices
        if rank == 1 and not all_on_rank0:
            indices[:2, 0] = 7  # a few rows for rank 1's own experts
        routing = torch.rand(TOKENS_PER_RANK, CFG.num_experts_per_tok, generator=g)
        ranks.append((x, indices, routing))
    return weights, ranks


def _oracle(all_on_rank0: bool, lora: bool):
    weights, ranks = _inputs(all_on_rank0, lora)
    experts = _experts(lora)
    experts.load_state_dict(weights)
    x = torch.cat([r[0] for r in ranks]).requires_grad_()
    out = experts(x, torch.cat([r[1] for r in ranks]), torch.cat([r[2] for r in ranks]))
    (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in experts.named_parameters()}


def dispatched(all_on_rank0: bool, lora: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from shoal.distributed.expert_parallel import apply_expert_parallel

    rank = dist.get_rank()
    weights, ranks = _inputs(all_on_rank0, lora)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    with torch.device("meta"):
        experts = _experts(lora)
    apply_expert_parallel([experts], mesh)
    experts.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in experts.named_parameters():
            param.to_local().copy_(weights[name].chunk(2)[rank])
    x, indices, routing = ranks[rank]
    x = x.clone().requires_grad_()
    out = experts(x, indices, routing)
    # The oracle's output weighting, this rank's rows of it.
    full = torch.arange(2 * out.numel()).view(2 * out.shape[0], -1).sin()
    (out * full[rank * out.shape[0]:(rank + 1) * out.shape[0]]).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad,
            "grads": {k: p.grad.to_local().clone() for k, p in experts.named_parameters()},
            "placements": {k: str(p.placements) for k, p in experts.named_parameters()}}


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("all_on_rank0", [False, True], ids=["uneven", "rank1_receives_nothing"])
def test_dispatch_equals_the_experts_in_one_process(all_on_rank0: bool, lora: bool) -> None:
    out, x_grad, grads = _oracle(all_on_rank0, lora)
    assert len(grads) == (9 if lora else 3)
    results = run_distributed(dispatched, 2, all_on_rank0, lora)
    for rank, result in enumerate(results):
        rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        torch.testing.assert_close(result["out"], out[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["x_grad"], x_grad[rows], rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            assert result["placements"][name] == "(Shard(dim=0),)"
            torch.testing.assert_close(result["grads"][name], grad.chunk(2)[rank], rtol=1e-5, atol=1e-6)
    if all_on_rank0:
        assert all(g.abs().sum() == 0 for g in results[1]["grads"].values())  # nothing reached rank 1's experts
