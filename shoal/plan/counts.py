"""Parameter counts for planning, read off the real model built on the meta device.

Building shoal's own `Transformer` (with LoRA/DoRA swapped in by `shoal.peft.apply_lora`) on the
meta device costs no memory and cannot drift from what training builds: trainable and frozen
counts, the largest decoder layer (FSDP's unit) and the embedding/output layers come out exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.models import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter, a tied embedding once
    trainable: int
    layer: int  # one decoder layer (all its parameters, adapters included)
    layer_trainable: int
    embed: int  # the input embedding
    lm_head: int  # the output layer; 0 when tied to the embedding
    adapter_targets_per_layer: int  # LoRA/DoRA-adapted linear layers in one decoder layer
    adapter_in_features_per_layer: int  # Σ in_features over those layers (dropout copies of their input)
    experts: int = 0  # the routed experts' grouped weights, all layers (mixture of experts; frozen under LoRA)
    adapted_expert_projections: int = 0  # of gate/up/down, how many carry per-expert adapters (shoal.peft.experts)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(cfg: ModelConfig, peft_method: str = "none", rank: int = 16,
                     target_modules: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> ParamCounts:
    import torch

    from shoal.models.model import Transformer
    from shoal.models.moe import GroupedExperts

    with torch.device("meta"):
        model = Transformer(cfg)
    if peft_method != "none":
        from shoal.peft import apply_lora

        apply_lora(model, rank=rank, alpha=float(rank), target_modules=list(target_modules),
                   use_dora=peft_method == "dora")
    unique = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    # The largest layer is FSDP's unit (an MoE model's dense `mlp_only_layers` are smaller).
    layer = max(model.model.layers.values(), key=lambda m: sum(p.numel() for p in m.parameters()))
    layer_params = list(layer.parameters())
    # Linear layers carrying adapters (the routed experts' adapters, shoal.peft.experts, have no dropout).
    targets = [m for m in layer.modules() if hasattr(m, "lora_A") and hasattr(m, "lora_dropout")]
    experts = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts)
                  for p in m.parameters(recurse=False))  # the frozen grouped weights, not their adapters
    adapted = max((len(m.low_rank_updates()) for m in model.modules() if isinstance(m, GroupedExperts)), default=0)
    tied = cfg.tie_word_embeddings
    return ParamCounts(
        total=total,
        trainable=trainable,
        layer=sum(p.numel() for p in layer_params),
        layer_trainable=sum(p.numel() for p in layer_params if p.requires_grad),
        embed=model.model.embed_tokens.weight.numel(),
        lm_head=0 if tied else model.lm_head.weight.numel(),
        adapter_targets_per_layer=len(targets),
        adapter_in_features_per_layer=sum(m.in_features for m in targets),
        experts=experts,
        adapted_expert_projections=adapted,
    )
