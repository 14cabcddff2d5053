"""`weight_shapes(cfg)` is the model's state dict, names, shapes and order, computed without torch.

The model is the oracle: every preset and the tests' tiny models of each family (tied or not,
q/k/v biases, q/k norms, MoE with dense layers) are built on the meta device and compared. The
subprocess tests check that the torch-free modules stay torch-free as the code around them moves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from shoal.models import ModelConfig, Transformer, from_hf_config
from shoal.models.presets import PRESETS
from shoal.models.shapes import weight_shapes
from tests.helpers.hf_models import FAMILY_CONFIGS, make_hf_config
from tests.helpers.hf_moe import MOE_SHAPE


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def assert_same(cfg: ModelConfig) -> None:
    ours, model = weight_shapes(cfg), model_shapes(cfg)
    assert ours == model
    assert list(ours) == list(model)  # dict equality ignores order; the checkpoint order does not


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    assert_same(PRESETS[name])


TINY_DENSE = [(family, {}) for family in FAMILY_CONFIGS] + [
    ("llama", dict(tie_word_embeddings=False)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict(attention_bias=True)),
    ("qwen3", dict(tie_word_embeddings=True, num_hidden_layers=3)),
]


@pytest.mark.parametrize("family,overrides", TINY_DENSE, ids=lambda v: str(v))
def test_tiny_dense_models(family, overrides):
    cfg = from_hf_config(make_hf_config(family, **overrides).to_dict())
    assert cfg.attention_bias == (family == "qwen2" or bool(overrides.get("attention_bias")))
    assert_same(cfg)


MOE_LAYOUTS = [
    {},
    dict(mlp_only_layers=[1]),
    dict(mlp_only_layers=[0, 2]),
    dict(decoder_sparse_step=2),
    dict(decoder_sparse_step=2, mlp_only_layers=[1], tie_word_embeddings=True),  # no sparse layer left
    dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=True),
]


@pytest.mark.parametrize("overrides", MOE_LAYOUTS, ids=lambda v: str(v))
def test_tiny_moe_models(overrides):
    cfg = from_hf_config(transformers.Qwen3MoeConfig(**{**MOE_SHAPE, **overrides}).to_dict())
    assert cfg.num_experts == MOE_SHAPE["num_experts"]
    assert_same(cfg)


def test_moe_with_bias_built_directly():
    # Not importable from HF (from_hf_config refuses it), but the model supports it.
    assert_same(ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                            num_heads=4, num_kv_heads=1, head_dim=8, attention_bias=True, qk_norm=True,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1]))


def imports_torch(module: str) -> bool:
    """Whether importing `module` in a fresh interpreter puts torch in sys.modules."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[3]  # this checkout's shoal, not whichever is installed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", ["shoal.models.shapes", "shoal.models.config", "shoal.models.presets"])
def test_shape_modules_import_no_torch(module):
    assert not imports_torch(module)


def test_adapters_import_no_torch():
    if imports_torch("shoal.checkpoint.format"):  # TensorInfo's module: torch-free once its own change lands
        pytest.xfail("shoal.checkpoint.format still imports torch")
    assert not imports_torch("shoal.convert.adapters")
