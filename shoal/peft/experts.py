"""LoRA on the routed experts of a mixture-of-experts layer (`shoal.models.moe.GroupedExperts`).

Shape legend: X experts, I in features, O out features, r rank.

The experts' projections are grouped weights W [X, O, I], not linear layers, so they cannot be
swapped for a `LoraLinear`. Each adapted projection gets instead one low-rank adapter per expert,
held grouped like the weight (expert on dim 0, so expert parallelism splits both alike):

    ...mlp.experts.lora.gate_proj.lora_A.weight   [X, r, I]   kaiming-uniform, as PEFT's
    ...mlp.experts.lora.gate_proj.lora_B.weight   [X, O, r]   zero

and expert x computes with W_x + s·B_x A_x, s = alpha / r (`expert_matmuls` applies it as
x W_xᵀ + s·(x A_xᵀ) B_xᵀ). That is, for each expert and projection, exactly the adapter PEFT puts
on the per-expert `nn.Linear` layers of transformers v4's Qwen3-MoE (`mlp.experts.{x}.gate_proj`):
`shoal.peft.adapter` writes them under those names, one slice per expert, and PEFT (0.21, checked) on
transformers 5, whose experts are fused (`gate_up_proj` [X, 2I, E]), folds them into its
`ParamWrapper` as it loads them (rank 2r on gate_up_proj: A stacked, B block-diagonal).

Gate and up are adapted together or not at all (PEFT cannot load one without the other into the
fused weight); no DoRA and no dropout on experts (PEFT's `ParamWrapper` has neither: dropout does
not factor out of x Wᵀ when the update is folded into W).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from shoal.models.moe import GroupedExperts, LowRankUpdate

EXPERT_PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

# `<layer>.mlp.experts.lora.<proj>`: an expert adapter's module name; its grouped base weight is
# `<layer>.mlp.experts.<proj>`.
_ADAPTER_MODULE = re.compile(r"^(.*\.experts)\.lora\.(gate_proj|up_proj|down_proj)$")
_GROUPED_WEIGHT = re.compile(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)$")


def grouped_weight_of(adapter_module: str) -> str | None:
    """`...experts.lora.gate_proj` -> `...experts.gate_proj`; None for a name of another kind."""
    match = _ADAPTER_MODULE.match(adapter_module)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def adapter_module_of(grouped_weight: str) -> str | None:
    """`...experts.gate_proj` -> `...experts.lora.gate_proj`; None for a name of another kind."""
    match = _GROUPED_WEIGHT.match(grouped_weight)
    return f"{match.group(1)}.lora.{match.group(2)}" if match else None


class _Factor(nn.Module):
    """Holds one factor as `.weight`, so its name ends in `lora_A.weight` like every adapter's."""

    def __init__(self, shape: tuple[int, ...], factory: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, **factory))


class ExpertAdapter(nn.Module):
    """Per-expert LoRA factors for one grouped weight [X, O, I]."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        x, out_features, in_features = weight.shape
        self.num_experts, self.in_features, self.out_features = x, in_features, out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = _Factor((x, rank, in_features), factory)
        self.lora_B = _Factor((x, out_features, rank), factory)

    # Settings `lora_config_dict` compares with the linear layers' (experts never drop out, never DoRA).
    dropout_p = 0.0
    use_dora = False

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's start: each expert's A as an `nn.Linear(I, r)` weight (kaiming-uniform, fan-in
        I), B zero. Drawn whole on the CPU, then cut to this rank's shard (see LoraLinear's)."""
        from shoal.peft.lora import _copy_whole_into

        a = self.lora_A.weight
        whole_a = torch.empty(a.shape, dtype=a.dtype)
        # On the [X·r, I] view: fan-in I, PEFT's bound for its ParamWrapper's A of that shape.
        nn.init.kaiming_uniform_(whole_a.view(-1, a.shape[-1]), a=math.sqrt(5), generator=generator)
        _copy_whole_into(a, whole_a)
        nn.init.zeros_(self.lora_B.weight)

    def update(self) -> LowRankUpdate:
        return LowRankUpdate(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"lora rank={self.rank}, alpha={self.alpha:g}")


class ExpertLora(nn.Module):
    """The adapters of one `GroupedExperts` (its `lora`), one `ExpertAdapter` per adapted projection."""

    def __init__(self, experts: GroupedExperts, projections: list[str], rank: int, alpha: float):
        super().__init__()
        for name in projections:
            self.add_module(name, ExpertAdapter(getattr(experts, name), rank, alpha))

    def adapters(self) -> list[tuple[str, ExpertAdapter]]:
        return [(name, module) for name, module in self.named_children() if isinstance(module, ExpertAdapter)]

    def low_rank_updates(self) -> dict[str, LowRankUpdate]:
        return {name: module.update() for name, module in self.adapters()}


def expert_adapters(model: nn.Module) -> list[tuple[str, ExpertAdapter]]:
    """(name, module) of every expert adapter, e.g. (`model.layers.0.mlp.experts.lora.gate_proj`, ...)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ExpertAdapter)]


def apply_expert_lora(model: nn.Module, projections: list[str], rank: int, alpha: float) -> int:
    """Give every `GroupedExperts` of the model adapters on `projections`; returns how many it adapted."""
    found = [module for module in model.modules() if isinstance(module, GroupedExperts)]
    if projections:
        for experts in found:
            experts.lora = ExpertLora(experts, projections, rank, alpha)
    return len(found) if projections else 0


@torch.no_grad()
def merge_expert_lora(model: nn.Module) -> None:
    """Fold every expert adapter into its grouped weight and remove the adapters."""
    from shoal.peft.lora import merged_weight

    for experts in (m for m in model.modules() if isinstance(m, GroupedExperts)):
        if experts.lora is None:
            continue
        for name, adapter in experts.lora.adapters():
            weight = getattr(experts, name)
            merged = merged_weight(weight, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling)
            setattr(experts, name, nn.Parameter(merged, requires_grad=weight.requires_grad))
        experts.lora = None
