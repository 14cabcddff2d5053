"""Target-name resolution, settings validation, the swap's error cases and the meta-device flow,
on shoal's own tiny presets (no Hugging Face model needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from shoal.errors import ShoalError
from shoal.models.model import Transformer, build_model
from shoal.models.presets import get_preset
from shoal.peft import (
    ALL_LINEAR,
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_config_dict,
    merge_adapter_state_dict,
    resolve_target_modules,
)
from shoal.peft.lora import init_lora_weights


def test_nemo_names_map_to_hf_projections():
    assert resolve_target_modules(["linear_qkv"]) == ("q_proj", "k_proj", "v_proj")
    assert resolve_target_modules(["linear_proj", "linear_fc1"]) == ("o_proj", "gate_proj", "up_proj")
    assert resolve_target_modules(["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]) == ALL_LINEAR
    assert resolve_target_modules("all-linear") == ALL_LINEAR
    assert resolve_target_modules(" v_proj, q_proj,q_proj ") == ("q_proj", "v_proj")


@pytest.mark.parametrize("names", [["qkv_proj"], "q_proj,lm_head", [], ""])
def test_unknown_or_missing_targets_list_valid_names(names):
    with pytest.raises(ShoalError, match="linear_qkv.*all-linear"):
        resolve_target_modules(names)


@pytest.mark.parametrize(
    "bad, key",
    [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
     ({"use_dora": "yes"}, "use_dora"), ({"target_modules": ["attn"]}, "attn")],
)
def test_config_validation_names_the_key(bad, key):
    with pytest.raises(ShoalError, match=key):
        LoraConfig(**bad)
    with pytest.raises(ShoalError, match=rf"ckpt/peft.json: .*{key}"):
        LoraConfig.from_dict(bad, where="ckpt/peft.json")


def test_config_dict_round_trip_and_unknown_keys():
    config = LoraConfig(rank=4, alpha=8, dropout=0.05, target_modules=["linear_qkv"], use_dora=True)
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert config.scaling == 2.0
    with pytest.raises(ShoalError, match=r"peft.json: unknown adapter keys \['lora_rank'\]"):
        LoraConfig.from_dict({**config.to_dict(), "lora_rank": 4})
    with pytest.raises(ShoalError, match="JSON object"):
        LoraConfig.from_dict([1, 2])


@pytest.mark.parametrize("preset", ["llama_tiny", "qwen2_tiny", "qwen3_tiny"])
def test_swap_targets_exactly_the_named_layers(preset):
    torch.manual_seed(0)
    model = apply_lora(build_model(get_preset(preset)), rank=2, alpha=2, target_modules=["linear_qkv", "linear_fc2"])
    swapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    expected = {f"model.layers.{i}.{part}" for i in range(2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert swapped == expected
    settings = lora_config_dict(model)
    assert settings == LoraConfig(rank=2, alpha=2, target_modules=("q_proj", "k_proj", "v_proj", "down_proj")).to_dict()
    # The base weight keeps its name, so a base checkpoint still loads by name.
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_swap_errors():
    model = build_model(get_preset("llama_tiny"))
    apply_lora(model)
    with pytest.raises(ShoalError, match="already carries LoRA adapters"):
        apply_lora(model)
    with pytest.raises(ShoalError, match="no linear layer of the model is named"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), target_modules=["q_proj"])
    with pytest.raises(ShoalError, match="carries no LoRA adapters"):
        lora_config_dict(build_model(get_preset("llama_tiny")))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_meta_device_flow_gives_identity_adapters(dora):
    """Build on meta, swap, materialise, load base weights, then initialise the adapters."""
    torch.manual_seed(0)
    cfg = get_preset("qwen2_tiny")
    reference = build_model(cfg).eval()
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_lora(model, rank=4, alpha=8, use_dora=dora)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_buffers()
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys) and result.missing_keys
    init_lora_weights(model)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=1e-6, rtol=1e-6)
    if dora:
        layer = model.model.layers["1"].mlp.up_proj
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.weight.norm(dim=1))


def test_merge_adapter_state_dict_errors():
    model = apply_lora(build_model(get_preset("llama_tiny")), rank=2, alpha=4, target_modules=["q_proj"])
    state = model.state_dict()
    config = LoraConfig.from_dict(lora_config_dict(model))
    base = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ShoalError, match="no base weight"):
        merge_adapter_state_dict({k: v for k, v in state.items() if k != base}, config)
    with pytest.raises(ShoalError, match="r=3"):
        merge_adapter_state_dict(state, dataclasses.replace(config, rank=3))
    with pytest.raises(ShoalError, match="use_dora=True"):
        merge_adapter_state_dict(state, dataclasses.replace(config, use_dora=True))

