"""Hugging Face PEFT adapter folders, checked with PEFT's own loader and writer as the oracle."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from shoal.errors import ShoalError
from shoal.peft import (
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    load_peft_adapter,
    lora_config_dict,
    save_peft_adapter,
)
from tests.helpers.hf_models import tiny_peft_hf as tiny_hf
from tests.helpers.peft_twins import peft_twin, randomize_adapters, shoal_twin, tokens

TIGHT = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_shoal_adapter_loads_in_peft_from_pretrained(tmp_path, family, dora):
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path / "base")
    ours = apply_lora(shoal_twin(hf), rank=4, alpha=8, target_modules=["linear_qkv", "linear_proj", "down_proj"],
                      use_dora=dora)
    randomize_adapters(ours)
    out = save_peft_adapter(ours, lora_config_dict(ours), tmp_path / "adapter",
                            base_model_name_or_path=str(tmp_path / "base"))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = PeftModel.from_pretrained(base, out).eval()
    assert theirs.peft_config["default"].use_dora is dora
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(x), **TIGHT)
        # Random adapters: had PEFT skipped any tensor, that layer would be the identity and differ.
        assert (theirs(input_ids=x).logits - hf(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_saved_adapter_loads_in_shoal(tmp_path, dora):
    hf = tiny_hf("qwen2")
    theirs = peft_twin(hf, rank=4, alpha=16, dropout=0.1, targets=["q_proj", "v_proj", "gate_proj"], dora=dora)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(param * (0.5 + torch.rand(param.shape, generator=gen)) + 0.1 * torch.randn(
                    param.shape, generator=gen))
    theirs.save_pretrained(tmp_path / "adapter")

    config, state = load_peft_adapter(tmp_path / "adapter")
    assert (config.rank, config.alpha, config.dropout, config.use_dora) == (4, 16.0, 0.1, dora)
    assert config.target_modules == ("q_proj", "v_proj", "gate_proj")
    ours = apply_lora(shoal_twin(hf), **dataclasses.asdict(config))
    load_adapter_state_dict(ours, state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(input_ids=x).logits, **TIGHT)


def test_round_trip_and_adapter_state_input(tmp_path):
    ours = apply_lora(shoal_twin(tiny_hf("llama")), rank=2, alpha=3, use_dora=True)
    randomize_adapters(ours)
    state = adapter_state_dict(ours)
    # A full state dict works too: non-adapter keys are ignored.
    save_peft_adapter({**ours.state_dict(), **state}, lora_config_dict(ours), tmp_path / "a")
    config, loaded = load_peft_adapter(tmp_path / "a")
    assert config.to_dict() == lora_config_dict(ours)
    assert loaded.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(loaded[name], state[name], atol=0, rtol=0)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 3 and written["peft_type"] == "LORA" and written["use_dora"] is True
    raw = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in raw)


def test_save_refuses_existing_output_and_inconsistent_config(tmp_path):
    ours = apply_lora(shoal_twin(tiny_hf("llama")), rank=2, alpha=4)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ShoalError, match="already exists"):
        save_peft_adapter(ours, lora_config_dict(ours), existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    wrong = {**lora_config_dict(ours), "use_dora": True}
    with pytest.raises(ShoalError, match="lora_magnitude_vector"):
        save_peft_adapter(ours, wrong, tmp_path / "new")
    narrower = {**lora_config_dict(ours), "target_modules": ["q_proj"]}
    with pytest.raises(ShoalError, match="not among the target modules"):
        save_peft_adapter(ours, narrower, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exists"]  # no temporary folder left behind


def _good_adapter(tmp_path):
    ours = apply_lora(shoal_twin(tiny_hf("llama")), rank=2, alpha=4, target_modules="q_proj,v_proj")
    return save_peft_adapter(ours, lora_config_dict(ours), tmp_path / "adapter")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"use_rslora": True}, "use_rslora"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"bias": "all"}, "bias"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"r": 3}, "r=3"),
    ],
)
def test_load_refuses_what_shoal_cannot_reproduce(tmp_path, edit, message):
    folder = _good_adapter(tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ShoalError, match=message):
        load_peft_adapter(folder)


def test_load_reports_bad_files(tmp_path):
    folder = _good_adapter(tmp_path)
    config = folder / "adapter_config.json"
    text = config.read_text()
    config.write_text('{\n  "r": 2,\n  oops\n}')
    with pytest.raises(ShoalError, match=r"adapter_config.json: line 3"):
        load_peft_adapter(folder)
    config.write_text(text)

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace("base_model.model.", ""): v for k, v in tensors.items()}, str(weights))
    with pytest.raises(ShoalError, match="unexpected tensor"):
        load_peft_adapter(folder)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(weights))
    with pytest.raises(ShoalError, match="expected"):
        load_peft_adapter(folder)

    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ShoalError, match="pickle"):
        load_peft_adapter(folder)
    with pytest.raises(ShoalError, match="not found"):
        load_peft_adapter(tmp_path / "nowhere")


def test_load_adapter_state_dict_checks_keys_and_shapes(tmp_path):
    config, state = load_peft_adapter(_good_adapter(tmp_path))
    model = apply_lora(shoal_twin(tiny_hf("llama")), **dataclasses.asdict(config))
    missing = dict(list(state.items())[1:])
    with pytest.raises(ShoalError, match="missing"):
        load_adapter_state_dict(model, missing)
    name = next(iter(state))
    with pytest.raises(ShoalError, match="shape"):
        load_adapter_state_dict(model, {**state, name: state[name][:1]})
    with pytest.raises(ShoalError, match="no LoRA adapters"):
        load_adapter_state_dict(shoal_twin(tiny_hf("llama")), state)
