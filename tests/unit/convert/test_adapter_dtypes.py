"""The adapters' plans and checks read only a dtype's `is_floating_point`, equality and `str()`, so
a torch-free conversion can hand them a stand-in dtype instead of a `torch.dtype`; both must agree."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from shoal.checkpoint.format import TensorInfo
from shoal.convert.adapters import get_adapter
from shoal.errors import ShoalError
from shoal.models.presets import PRESETS


@dataclass(frozen=True)
class StandInDtype:
    """What a torch-free reader of safetensors headers knows about a dtype."""

    name: str
    itemsize: int
    is_floating_point: bool

    def __str__(self) -> str:
        return self.name


BF16 = StandInDtype("bfloat16", 2, True)
I8 = StandInDtype("int8", 1, False)
DTYPES = {"torch": (torch.bfloat16, torch.int8), "stand-in": (BF16, I8)}


def hf_tensors(cfg, dtype) -> dict[str, TensorInfo]:
    """An HF checkpoint's tensors as the Hub stores them: per-expert weights, no tied lm_head."""
    adapter = get_adapter(cfg)
    found = {}
    for name, shape in adapter.expected_hf().items():
        if adapter.split_experts(name, cfg.num_experts)[0][1] is None:
            found[name] = TensorInfo(shape, dtype)
        else:
            for part, _ in adapter.split_experts(name, cfg.num_experts):
                found[part] = TensorInfo(shape[1:], dtype)
    return found


@pytest.mark.parametrize("kind", DTYPES)
@pytest.mark.parametrize("preset", ["llama_tiny", "qwen2_tiny", "qwen3_tiny", "qwen3_moe_tiny"])
def test_plans_take_either_dtype(preset, kind):
    float_dtype, int_dtype = DTYPES[kind]
    cfg = PRESETS[preset]
    adapter = get_adapter(cfg)
    view = adapter.group_experts(hf_tensors(cfg, float_dtype), "hf")
    plan = adapter.import_plan(view, "hf")
    assert list(plan) == list(adapter.expected_shoal())
    shoal_found = {name: TensorInfo(shape, float_dtype) for name, shape in adapter.expected_shoal().items()}
    assert list(adapter.export_plan(shoal_found, "ckpt")) == list(adapter.expected_hf())

    name = next(iter(view))
    with pytest.raises(ShoalError, match=r"is (torch\.)?int8; shoal expects floating-point"):
        adapter.import_plan({**view, name: TensorInfo(view[name].shape, int_dtype)}, "hf")


@pytest.mark.parametrize("kind", DTYPES)
def test_experts_of_mixed_dtypes_refused(kind):
    float_dtype, int_dtype = DTYPES[kind]
    cfg = PRESETS["qwen3_moe_tiny"]
    found = hf_tensors(cfg, float_dtype)
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    found[name] = TensorInfo(found[name].shape, int_dtype)
    with pytest.raises(ShoalError, match=r"experts\.3\.up_proj\.weight is \[32, 64\] (torch\.)?int8"):
        get_adapter(cfg).group_experts(found, "hf")
