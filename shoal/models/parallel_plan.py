"""How shoal's decoder is split: its tensor-parallel plan, its repeated blocks, its FSDP units and
its pipeline stages (the `shoal.distributed.plan.ParallelPlan` that `parallelize_model` and
`pipeline_model` take).

This is the one place outside `model.py` that names the decoder's modules (`self_attn.q_proj`,
`model.embed_tokens`, ...); `model.py` stays single-device code and `shoal.distributed` stays
model-agnostic (torchtitan's split: the model package owns its plan). Every method takes the whole
model or one pipeline stage of it (a stage lacks the embedding, the output layer or both).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
)

from shoal.errors import ShoalError
from shoal.models.moe import MoE


def _between_layers(sequence_parallel: bool) -> Shard | Replicate:
    # With sequence parallelism, activations between layers are split along the sequence (dim 1);
    # without it they are whole on every rank.
    return Shard(1) if sequence_parallel else Replicate()


def _is_tied(model: nn.Module) -> bool:
    embed, lm_head = model.model.embed_tokens, model.lm_head
    return embed is not None and lm_head is not None and lm_head.weight is embed.weight


def layer_tp_plan(layer: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Megatron's split of one decoder layer: q/k/v and gate/up by output column (heads), o and
    down by input row, so each half of a block needs one collective at its end."""
    between = _between_layers(sequence_parallel)
    plan: dict[str, ParallelStyle] = {
        # Attention(x, cos, sin, mask): only x is laid out over ranks; RoPE tables and the mask are
        # the same full-sequence tensors on every rank.
        "self_attn": PrepareModuleInput(
            input_layouts=(between, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=between),
    }
    if isinstance(layer.mlp, MoE):
        # Experts are not split over tensor-parallel ranks: each rank routes the whole sequence
        # through all experts (replicated weights), so results, gradients and the load-balancing
        # statistics are those of one process, at the price of redundant expert compute.
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(between,), use_local_output=True,
        )
    else:
        plan.update({
            "mlp": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=between),
        })
    _gather_in_float8(layer, plan)
    if sequence_parallel:
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
    if layer.self_attn.q_norm is not None:
        # Qwen3's per-head q/k norms see [B, S, local heads, D]: the weight is shared by all heads,
        # so it is replicated and its gradient summed over ranks, which is what treating the head
        # axis (dim 2) as the sharded one gives.
        plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def _gather_in_float8(layer: nn.Module, plan: dict[str, ParallelStyle]) -> None:
    """FP8 tensorwise layers (--fp8): torchao's FP8 styles in place of the plain ones, so the
    sequence-parallel all-gathers (an attention or MLP input, an o/down output gradient) carry FP8,
    half the bytes of bf16, with the same numbers (one scale per tensor commutes with the gather).
    An input is cast before its gather only where every layer reading it computes in FP8: the
    attention's x feeds q/k/v alone, the MLP's gate/up alone. LoRA/DoRA layers keep the plain
    styles (their adapters read the input in high precision)."""
    from shoal.distributed.float8 import float8_parallel_style, gathers_in_float8

    readers = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
    for block, names in readers.items():
        members = [f"{block}.{n}" for n in names]
        if all(m in plan for m in (block, *members)) and gathers_in_float8([layer.get_submodule(m) for m in members]):
            for name in (block, *members):
                plan[name] = float8_parallel_style(plan[name])
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        if name in plan and gathers_in_float8([layer.get_submodule(name)]):
            plan[name] = float8_parallel_style(plan[name])


class DecoderParallelPlan:
    """The `ParallelPlan` of `shoal.models.model.Transformer` (every family shoal supports)."""

    def tensor_parallel(self, model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
        """The embedding, final norm and output layer this model (or stage) holds, then each layer.
        Logits come back whole on every rank, so the loss is computed as in one process."""
        decoder = _decoder(model)
        between = _between_layers(sequence_parallel)
        plan: dict[str, ParallelStyle] = {}
        if decoder.embed_tokens is not None:
            # Split by vocabulary row, like the output layer: a tied weight stays one Shard(0) tensor.
            plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
        if decoder.norm is not None and sequence_parallel:
            plan["model.norm"] = SequenceParallel()
        if model.lm_head is not None:
            plan["lm_head"] = ColwiseParallel(input_layouts=between, output_layouts=Replicate())
        for index, layer in decoder.layers.items():
            for name, style in layer_tp_plan(layer, sequence_parallel).items():
                plan[f"model.layers.{index}.{name}"] = style
        return plan

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_decoder(model).layers.values())

    def fsdp_units(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        """Each decoder layer, plus the embedding and the output layer when they are not tied (a
        tied weight is left to the root unit, which also takes the final norm)."""
        tied = _is_tied(model)
        units = []
        if model.model.embed_tokens is not None and not tied:
            units.append((model.model.embed_tokens, False))
        units += [(layer, False) for layer in self.blocks(model)]
        if model.lm_head is not None and not tied:
            # Its backward runs right after its forward: keeping it gathered saves an all-gather.
            units.append((model.lm_head, True))
        return units

    def experts(self, model: nn.Module) -> list[nn.Module]:
        return [layer.mlp.experts for layer in self.blocks(model) if isinstance(layer.mlp, MoE)]

    def pipeline_stage(self, model: nn.Module, stage_index: int, num_stages: int) -> nn.Module:
        """A copy of `model` with an even, contiguous share of the layers; the first stage keeps the
        embedding, the last the final norm and output layer (see docs/model-contract.md).

        The modules the stage drops are entered in deepcopy's memo as None, so their weights are
        never copied: splitting a model with real weights costs one stage's memory, on meta nothing.
        """
        layers = _decoder(model).layers
        keep = {str(i) for i in stage_layer_ids(len(layers), stage_index, num_stages)}
        dropped = [layer for name, layer in layers.items() if name not in keep]
        if stage_index != 0:
            dropped.append(model.model.embed_tokens)
        if stage_index != num_stages - 1:
            dropped += [model.model.norm, model.lm_head]
        memo = {id(module): None for module in dropped if module is not None}
        stage = copy.deepcopy(model, memo)
        for name in [name for name in stage.model.layers.keys() if name not in keep]:
            del stage.model.layers[name]
        return stage


def stage_layer_ids(num_layers: int, stage_index: int, num_stages: int) -> list[int]:
    """The layers of one pipeline stage: an even, contiguous share (the layout check has made
    sure the split is even)."""
    per_stage = num_layers // num_stages
    return list(range(stage_index * per_stage, (stage_index + 1) * per_stage))


def _decoder(model: nn.Module) -> nn.Module:
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ShoalError(f"the decoder's parallel plan applies to a shoal Transformer, not a {type(model).__name__}")
    return model.model


DECODER_PLAN = DecoderParallelPlan()
