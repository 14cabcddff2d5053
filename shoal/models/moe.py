"""The mixture-of-experts block of Qwen3-MoE, in plain single-device PyTorch.

Shape legend: T tokens (B·S flattened), E hidden size, X number of experts, K experts per token
(top-k), I expert width (`moe_intermediate_size`).

A sparse layer replaces the dense SwiGLU MLP by a router and X SwiGLU experts. The router scores
every token against every expert, keeps the K best (softmax in fp32, then top-k, renormalised when
`norm_topk_prob`), and the token's output is the routing-weighted sum of its K experts' outputs,
exactly as Hugging Face's `Qwen3MoeSparseMoeBlock` computes it.

The experts' weights are grouped: one `[X, out, in]` tensor per projection (`experts.gate_proj`,
`experts.up_proj`, `experts.down_proj`), expert x's slice being the `nn.Linear` weight Hugging
Face stores as `mlp.experts.{x}.gate_proj.weight`. Grouped tensors are what grouped matmuls and
expert parallelism (a shard of the X axis per rank) want.

The load-balancing loss needs every sparse layer's routing at once, so each block keeps the
statistics of its last forward (`last_routing`) and `load_balancing_loss` combines them; the
model's forward output stays the logits alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shoal.models.config import ModelConfig

# Grouped matmuls through `torch._grouped_mm` on CUDA in bf16 (Hopper and later): equal to the loop
# below on an H200 (tests/gpu/test_moe_gpu.py) and 10x its speed on the 30B-A3B shape
# (bench/RESULTS.md, Qwen3-MoE). The loop is exact everywhere and is what CPU always uses (torch's
# CPU `_grouped_mm` has no working backward for empty groups in torch 2.13).
GROUPED_MM_ON_CUDA = True


@dataclass
class RoutingStats:
    """What one sparse layer's forward routed: the load-balancing loss's inputs."""

    prob_sum: torch.Tensor  # [X] fp32: Σ over tokens of the router's softmax (carries the gradient)
    counts: torch.Tensor  # [X] fp32: how many of the T·K routing slots chose each expert (no gradient)
    tokens: int  # T


class Router(nn.Module):
    """A bias-free linear scoring of tokens against experts (HF's `mlp.gate.weight`, [X, E]).

    A plain module rather than an `nn.Linear`, so LoRA's "every linear layer" never adapts it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # [T, X], in the input dtype as HF computes it

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)


@dataclass(frozen=True)
class LowRankUpdate:
    """A per-expert low-rank change of one grouped weight W [X, out, in]: expert x computes with
    W_x + scaling · B_x A_x. A [X, r, in], B [X, out, r] (all experts, or one rank's share)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


class GroupedExperts(nn.Module):
    """X SwiGLU experts held as grouped weights: gate/up [X, I, E], down [X, E, I].

    `lora` is None, or a module set from outside (shoal.peft's expert adapters) that maps
    projection names to `LowRankUpdate`s through `low_rank_updates()`; the model only applies them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        x, e, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = x
        self.gate_proj = nn.Parameter(torch.empty(x, i, e))
        self.up_proj = nn.Parameter(torch.empty(x, i, e))
        self.down_proj = nn.Parameter(torch.empty(x, e, i))
        self.lora: nn.Module | None = None

    def low_rank_updates(self) -> dict[str, LowRankUpdate]:
        return {} if self.lora is None else self.lora.low_rank_updates()

    def reset_parameters(self, std: float) -> None:
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, E]; indices and weights [T, K] -> Σ_k weight_k · expert_{index_k}(x) [T, E]."""
        order, token_of_slot, counts = sort_by_expert(indices, self.num_experts)
        routed = x[token_of_slot]  # [T·K, E]
        out = self.apply_experts(routed, counts)
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, out.to(x.dtype))

    def apply_experts(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """routed [T·K, E], sorted by expert with counts [X] rows each -> each row through its
        expert [T·K, E]. The seam expert parallelism replaces (shoal.distributed.expert_parallel:
        send the rows to the ranks holding their experts, run them there, bring them back)."""
        return expert_matmuls(routed, counts, self.gate_proj, self.up_proj, self.down_proj, self.low_rank_updates())


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T, K] -> (order, token_of_slot, counts): the T·K routing slots sorted by expert
    (stable), so each expert's rows are one contiguous run, the token of each sorted slot, and the
    rows per expert [X] (int64). Counted by a scatter-add into X bins, not `torch.bincount`, whose
    output size depends on the data: that breaks a compiled graph at every MoE layer and, on a
    GPU, waits for the device to size its output."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // indices.shape[1], counts


def expert_matmuls(
    routed: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    low_rank: Mapping[str, LowRankUpdate] | None = None,
) -> torch.Tensor:
    """routed [N, E] sorted by expert, counts[x] rows for expert x, weights gate/up [X, I, E] and
    down [X, E, I] (all experts, or one rank's share) -> down_x(silu(gate_x(r)) · up_x(r)) per row.

    `low_rank`: updates of some of the weights by name ("gate_proj", "up_proj", "down_proj"), for
    the same experts as the weights; applied as x Wᵀ + s·(x Aᵀ) Bᵀ, never by forming W + s·B A."""
    low_rank = low_rank or {}
    if GROUPED_MM_ON_CUDA and routed.is_cuda and _computes_in_bf16(routed):
        return _grouped_mm(routed, counts, gate, up, down, low_rank)
    return _loop(routed, counts, gate, up, down, low_rank)


def _computes_in_bf16(x: torch.Tensor) -> bool:
    """bf16 rows (FSDP2's compute dtype), or fp32 ones under a bf16 autocast (one GPU, no FSDP),
    whose matmuls the loop would run in bf16 too."""
    if x.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16


def _loop(
    routed: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    low_rank: Mapping[str, LowRankUpdate],
) -> torch.Tensor:
    """The exact fallback: one pair of matmuls per expert that received tokens."""

    def project(seg: torch.Tensor, weight: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        out = seg @ weight[expert].T
        update = low_rank.get(name)
        if update is not None:
            out = out + update.scaling * ((seg @ update.lora_A[expert].T) @ update.lora_B[expert].T)
        return out

    outs, start = [], 0
    for expert, n in enumerate(counts.tolist()):  # one host sync per layer
        if n == 0:
            continue
        seg = routed[start:start + n]
        hidden = F.silu(project(seg, gate, "gate_proj", expert)) * project(seg, up, "up_proj", expert)
        outs.append(project(hidden, down, "down_proj", expert))
        start += n
    return torch.cat(outs) if outs else routed.new_zeros(routed.shape[0], down.shape[1])


def _grouped_mm(
    routed: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    low_rank: Mapping[str, LowRankUpdate],
) -> torch.Tensor:
    """GPU: all experts in three grouped matmuls (two more per adapted weight), no host sync
    (see GROUPED_MM_ON_CUDA)."""
    # bf16 operands whatever autocast would do with `_grouped_mm` (the casts carry gradients back).
    routed, gate, up, down = (t.to(torch.bfloat16) for t in (routed, gate, up, down))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)

    def project(x: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
        out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        update = low_rank.get(name)
        if update is not None:
            a, b = (t.to(torch.bfloat16) for t in (update.lora_A, update.lora_B))
            down_projected = torch._grouped_mm(x, a.transpose(-2, -1), offs=offsets)  # [N, r]
            out = out + update.scaling * torch._grouped_mm(down_projected, b.transpose(-2, -1), offs=offsets)
        return out

    return project(F.silu(project(routed, gate, "gate_proj")) * project(routed, up, "up_proj"), down, "down_proj")


class MoE(nn.Module):
    """Router + grouped experts: HF's `Qwen3MoeSparseMoeBlock` ([B, S, E] -> [B, S, E])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.last_routing: RoutingStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        flat = x.reshape(-1, e)
        logits = self.gate(flat)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, X]
        top_probs, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        counts = torch.zeros(probs.shape[1], device=probs.device).scatter_add_(
            0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
        self.last_routing = RoutingStats(probs.sum(dim=0), counts, flat.shape[0])
        out = self.experts(flat, indices, top_probs.to(logits.dtype))
        return out.reshape(b, s, e)


def load_balancing_loss(blocks: list[MoE]) -> torch.Tensor | None:
    """The Switch-Transformer auxiliary loss over the last forward of `blocks`, as transformers'
    `load_balancing_loss_func` defines it: the routing counts and router probabilities are summed
    over all sparse layers first, then X · Σ_x (count_x / rows) · (prob_x / rows), rows = T · layers.
    (transformers takes its softmax in the logits' dtype; shoal's is fp32, the same in fp32.)"""
    stats = [block.last_routing for block in blocks if block.last_routing is not None]
    if not stats:
        return None
    rows = sum(s.tokens for s in stats)
    counts = torch.stack([s.counts for s in stats]).sum(0)
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)
    return counts.shape[0] * ((counts / rows) * (probs / rows)).sum()


def expert_load(counts: torch.Tensor) -> dict[str, float]:
    """Router health from routing counts [sparse layers, X] (summed over a global batch): each
    expert's share relative to a perfectly even one, the worst layer reported. `expert_load_max`
    is 1 when balanced and X/K when every token of a layer goes to the same K experts (a collapsed
    router); `expert_load_min` 0 means some expert received no token at all."""
    relative = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-12)
    return {"expert_load_max": relative.max().item(), "expert_load_min": relative.min().item()}
