"""The decoder's parallel plan (shoal.models.parallel_plan) against Hugging Face's own plan, and
against the modules the model (or a pipeline stage of it) really holds.

transformers ships a tensor-parallel plan per family (`base_model_tp_plan`: "colwise", "rowwise",
"replicated_with_grad_allreduce" by module pattern); shoal uses HF's module names, so its plan for
each layer must say the same thing. torch's `parallelize_module` only warns on a name that
matches nothing and goes on, so every name is checked to exist here.
"""

from __future__ import annotations

import pytest
import transformers
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from shoal.models import build_model, get_preset
from shoal.models.parallel_plan import DECODER_PLAN

HF_CONFIGS = {
    "llama_tiny": transformers.LlamaConfig,
    "mistral_tiny": transformers.MistralConfig,
    "qwen2_tiny": transformers.Qwen2Config,
    "qwen3_tiny": transformers.Qwen3Config,
}


def _hf_kind(style) -> str:
    if isinstance(style, ColwiseParallel):
        return "colwise"
    if isinstance(style, RowwiseParallel):
        return "rowwise"
    if isinstance(style, SequenceParallel) and style.sequence_sharding == (Shard(2),):
        # Sharding the head axis of [B, S, heads, D] leaves the weight replicated, its gradient summed.
        return "replicated_with_grad_allreduce"
    return "other"


@pytest.mark.parametrize("preset", sorted(HF_CONFIGS))
def test_each_layer_is_split_as_hugging_face_splits_it(preset: str) -> None:
    model = build_model(get_preset(preset))
    plan = DECODER_PLAN.tensor_parallel(model, sequence_parallel=True)
    ours = {}
    for name, style in plan.items():
        if name.startswith("model.layers.") and _hf_kind(style) != "other":
            _, _, rest = name.removeprefix("model.layers.").partition(".")
            ours.setdefault(f"layers.*.{rest}", set()).add(_hf_kind(style))
    assert {k: v.pop() for k, v in ours.items() if len(v) == 1} == HF_CONFIGS[preset].base_model_tp_plan
    assert all(len(v) <= 1 for v in ours.values())  # every layer split the same way


@pytest.mark.parametrize("preset", ["llama_tiny", "qwen3_tiny"])
@pytest.mark.parametrize("sequence_parallel", [True, False])
@pytest.mark.parametrize("stages", [1, 2])
def test_every_name_in_the_plan_is_a_module_the_stage_holds(preset: str, sequence_parallel: bool, stages: int) -> None:
    model = build_model(get_preset(preset))
    covered = set()
    for index in range(stages):
        stage = DECODER_PLAN.pipeline_stage(model, index, stages) if stages > 1 else model
        plan = DECODER_PLAN.tensor_parallel(stage, sequence_parallel)
        for name, style in plan.items():
            target = stage.get_submodule(name)  # raises when the name matches nothing
            if isinstance(style, (ColwiseParallel, RowwiseParallel)):
                assert isinstance(target, (nn.Linear, nn.Embedding)), name
        covered |= {n for n, s in plan.items() if isinstance(s, (ColwiseParallel, RowwiseParallel))}
    # Between them the stages split every linear layer and the embedding of the model.
    splittable = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert covered == splittable


def test_fsdp_units_follow_the_forward_and_leave_a_tied_weight_to_the_root() -> None:
    model = build_model(get_preset("llama_tiny"))
    units = DECODER_PLAN.fsdp_units(model)
    layers = list(model.model.layers.values())
    assert [m for m, _ in units] == [model.model.embed_tokens, *layers, model.lm_head]
    assert [keep for _, keep in units] == [False] * (1 + len(layers)) + [True]

    tied = build_model(get_preset("qwen3_tiny"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert [m for m, _ in DECODER_PLAN.fsdp_units(tied)] == list(tied.model.layers.values())

    last = DECODER_PLAN.pipeline_stage(model, 1, 2)
    assert [m for m, _ in DECODER_PLAN.fsdp_units(last)] == [*last.model.layers.values(), last.lm_head]
    assert DECODER_PLAN.blocks(last) == list(last.model.layers.values())
