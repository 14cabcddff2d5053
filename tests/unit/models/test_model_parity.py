"""shoal's model against Hugging Face `transformers`, the oracle, for every family on CPU.

Each tiny model has random norms and biases (not the ones/zeros of a fresh init) so that a norm
or bias shoal ignored would change the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from shoal.models import PRESETS, Transformer, build_model, from_hf_config, to_hf_config
from shoal.models.model import rope_inverse_frequencies
from tests.helpers.hf_models import FAMILY_CONFIGS, VOCAB_SIZE, make_hf_model

torch.set_num_threads(1)
FAMILIES = sorted(FAMILY_CONFIGS)


def shoal_twin(hf_model) -> torch.nn.Module:
    """The shoal model described by the HF model's config.json, holding the same weights."""
    cfg = from_hf_config(json.loads(hf_model.config.to_json_string()))
    model = build_model(cfg, init=False)
    result = model.load_state_dict(hf_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(next(hf_model.parameters()).dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_fp32(family):
    hf = make_hf_model(family)
    ours = shoal_twin(hf)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_bf16(family):
    hf = make_hf_model(family, dtype=torch.bfloat16)
    ours = shoal_twin(hf)
    tokens = torch.randint(0, VOCAB_SIZE, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        got = ours(tokens).float()
    # bf16 kernels may round differently; the two must still agree to bf16 precision.
    assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_explicit_positions_match_transformers(family):
    hf = make_hf_model(family)
    ours = shoal_twin(hf)
    tokens = torch.randint(0, VOCAB_SIZE, (1, 32), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(100, 132)[None]
    with torch.no_grad():
        expected = hf(tokens, position_ids=positions).logits
        got = ours(tokens, position_ids=positions)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_documents_match_separate_runs(family):
    """Two documents packed in one row, positions restarting, give what HF gives for each alone."""
    hf = make_hf_model(family)
    ours = shoal_twin(hf)
    gen = torch.Generator().manual_seed(4)
    first = torch.randint(0, VOCAB_SIZE, (1, 20), generator=gen)
    second = torch.randint(0, VOCAB_SIZE, (1, 12), generator=gen)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None]
    documents = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(12, dtype=torch.long)])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=positions, document_ids=documents)
        expected = torch.cat([hf(first).logits, hf(second).logits], dim=1)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_frequencies_match_transformers(family):
    hf = make_hf_model(family)
    cfg = from_hf_config(json.loads(hf.config.to_json_string()))
    expected = hf.model.rotary_emb.inv_freq
    assert torch.allclose(rope_inverse_frequencies(cfg), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip_through_hf(family):
    """from_hf_config(to_hf_config(c)) == c, and transformers builds the same model from to_hf_config."""
    hf = make_hf_model(family)
    cfg = from_hf_config(json.loads(hf.config.to_json_string()))
    exported = to_hf_config(cfg, dtype="float32")
    assert from_hf_config(json.loads(json.dumps(exported))) == cfg
    rebuilt = transformers.AutoConfig.for_model(**exported)
    twin = transformers.AutoModelForCausalLM.from_config(rebuilt).eval()
    twin.load_state_dict(hf.state_dict())
    tokens = torch.randint(0, VOCAB_SIZE, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(twin(tokens).logits, hf(tokens).logits)


def test_classic_rope_spelling_is_read_like_rope_parameters():
    """Configs from transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) agree."""
    hf = make_hf_model("llama")
    modern = json.loads(hf.config.to_json_string())
    classic = {k: v for k, v in modern.items() if k != "rope_parameters"}
    scaling = dict(modern["rope_parameters"])
    classic["rope_theta"] = scaling.pop("rope_theta")
    classic["rope_scaling"] = scaling
    assert from_hf_config(classic) == from_hf_config(modern)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_transformers(name):
    """Each preset's HF config builds (on the meta device) a transformers model whose parameter
    count, a tied embedding counted once, equals ModelConfig.num_params, and whose parameter names
    and shapes are shoal's."""
    cfg = PRESETS[name]
    hf_config = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = Transformer(cfg)
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_params
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # transformers 5 holds an MoE layer's gate and up experts fused, [X, 2I, E]; shoal keeps them apart.
    for name in [k for k in our_shapes if k.endswith("mlp.experts.gate_proj")]:
        x, i, e = our_shapes.pop(name)
        assert our_shapes.pop(name.replace("gate_proj", "up_proj")) == (x, i, e)
        our_shapes[name.replace("gate_proj", "gate_up_proj")] = (x, 2 * i, e)
    assert hf_shapes == our_shapes
