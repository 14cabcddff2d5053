"""How `apply_tp` picks each module's style, in one process (the split itself runs on gloo in
tests/distributed): a LoRA/DoRA layer brings its own style through the `SplitsItself` protocol,
with the layouts the model's plan asked for; anything a plain style cannot split is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from shoal.distributed.parallelize import _styles_for_targets
from shoal.distributed.plan import SplitsItself
from shoal.errors import ShoalError
from shoal.models import get_preset
from shoal.models.model import Transformer
from shoal.models.parallel_plan import DECODER_PLAN
from shoal.peft import LoraLinear, apply_lora
from shoal.peft.tensor_parallel import LoraColwiseParallel, LoraRowwiseParallel


def _meta_model(**lora) -> torch.nn.Module:
    with torch.device("meta"):
        model = Transformer(get_preset("llama_tiny"))
        return apply_lora(model, rank=4, **lora) if lora else model


def test_adapted_layers_bring_their_own_styles_with_the_plans_layouts() -> None:
    model = _meta_model(dropout=0.0, target_modules=["q_proj", "o_proj"])
    plan = DECODER_PLAN.tensor_parallel(model, sequence_parallel=True)
    styles, self_split = _styles_for_targets(model, plan, compiled=False)
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert sorted(adapted) == sorted(n for n in plan if n.endswith(("q_proj", "o_proj")))
    assert [id(m) for m in self_split] == [id(model.get_submodule(n)) for n in plan if n in adapted]
    for name in plan:
        if name.endswith("q_proj"):
            assert type(styles[name]) is LoraColwiseParallel
        elif name.endswith("o_proj"):
            # o_proj reduces into the sequence-sharded residual stream: Shard(1) out, as planned.
            assert type(styles[name]) is LoraRowwiseParallel
            assert styles[name].output_layouts == (Shard(1),) == plan[name].output_layouts
        else:
            assert styles[name] is plan[name]  # untouched: k/v/gate/up/down stay plain nn.Linear styles
    assert isinstance(model.get_submodule(adapted[0]), SplitsItself)
    assert not isinstance(model.model.layers["0"].mlp.up_proj, SplitsItself)


def test_compiled_adapter_dropout_is_refused_before_anything_is_split() -> None:
    model = _meta_model(dropout=0.1)
    plan = DECODER_PLAN.tensor_parallel(model, sequence_parallel=False)
    with pytest.raises(ShoalError, match=r"dropout \(0.1\).*peft.dropout=0 or parallel.compile=false"):
        _styles_for_targets(model, plan, compiled=True)
    styles, _ = _styles_for_targets(model, plan, compiled=False)  # uncompiled it runs
    assert type(styles["model.layers.0.mlp.down_proj"]) is LoraRowwiseParallel


def test_a_plain_style_on_a_module_it_cannot_split_is_refused_by_name() -> None:
    model = _meta_model()
    plan = {"model.layers.1.input_layernorm": ColwiseParallel(), "lm_head": RowwiseParallel(input_layouts=Replicate())}
    with pytest.raises(ShoalError, match=r"cannot split model\.layers\.1\.input_layernorm: it is a RMSNorm"):
        _styles_for_targets(model, plan, compiled=False)
