"""LoRA on the routed experts of Qwen3-MoE: shoal's per-expert adapters are PEFT's.

Oracle: `peft.PeftModel.from_pretrained` on the transformers model (whose experts are fused,
`gate_up_proj` [X, 2I, E]) loading the folder shoal writes; PEFT's own conversion turns the
per-expert adapters into its `ParamWrapper` layout. Gradients are compared in PEFT's layout the
same way: shoal's gradients are written as an adapter folder and loaded by PEFT, and only the
entries PEFT fills from shoal's tensors (an adapter of ones shows where) are compared; the
off-diagonal blocks of its fused gate/up B are PEFT's own and start at zero.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from shoal.errors import ShoalError
from shoal.models import build_model, get_preset
from shoal.peft import (
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    apply_lora,
    init_lora_weights,
    load_adapter_state_dict,
    load_peft_adapter,
    lora_config_dict,
    merge_lora,
    save_peft_adapter,
)
from shoal.peft.experts import ExpertAdapter
from tests.helpers.hf_moe import VOCAB_SIZE, imported_moe, make_hf_moe

torch.set_num_threads(1)
RANK, ALPHA = 4, 8.0


def tokens(seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model, seed: int = 3) -> None:
    """Non-zero B everywhere, so that every adapter changes the output (a fresh B is zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def peft_on(folder, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(make_hf_moe(0), folder, is_trainable=trainable)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.fixture()
def adapted(tmp_path):
    """(the transformers model, shoal's import of it with random LoRA adapters on every linear layer and expert)."""
    hf, ours = imported_moe(tmp_path)
    apply_lora(ours, rank=RANK, alpha=ALPHA, target_modules="all-linear")
    randomise_adapters(ours)
    return hf, ours


def test_adapters_cover_every_sparse_layers_experts_and_only_adapters_train(adapted):
    _, ours = adapted
    x, e, i = 8, 64, 32
    trainable = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    for layer in range(3):
        prefix = f"model.layers.{layer}.mlp.experts.lora"
        assert trainable[f"{prefix}.gate_proj.lora_A.weight"] == (x, RANK, e)
        assert trainable[f"{prefix}.up_proj.lora_B.weight"] == (x, i, RANK)
        assert trainable[f"{prefix}.down_proj.lora_A.weight"] == (x, RANK, i)
        assert trainable[f"{prefix}.down_proj.lora_B.weight"] == (x, e, RANK)
    assert all(".lora" in n for n in trainable)
    assert not ours.model.layers["0"].mlp.experts.gate_proj.requires_grad


def test_logits_and_adapter_gradients_equal_peft_on_transformers(adapted, tmp_path):
    hf, ours = adapted
    save_peft_adapter(ours, lora_config_dict(ours), tmp_path / "adapter")
    theirs = peft_on(tmp_path / "adapter", trainable=True)
    ids = tokens()
    ours.train()
    theirs.train()
    mine = ours(ids)
    expected = theirs(input_ids=ids).logits
    assert (mine - expected).abs().max().item() <= 1e-5
    assert (mine - hf(input_ids=ids).logits).abs().max().item() > 1e-2  # the adapters matter
    next_token_loss(mine, ids).backward()
    next_token_loss(expected, ids).backward()

    grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    save_peft_adapter(grads, lora_config_dict(ours), tmp_path / "grads")
    save_peft_adapter({k: torch.ones_like(v) for k, v in grads.items()}, lora_config_dict(ours), tmp_path / "ones")
    as_peft = dict(peft_on(tmp_path / "grads").named_parameters())
    filled = dict(peft_on(tmp_path / "ones").named_parameters())
    compared = 0
    for name, param in theirs.named_parameters():
        if not param.requires_grad:
            continue
        mask = filled[name] != 0
        assert mask.any(), name
        torch.testing.assert_close(as_peft[name][mask], param.grad[mask], rtol=1e-4, atol=1e-6, msg=name)
        compared += ".experts." in name
    assert compared == 3 * 4  # gate_up and down, lora_A and lora_B, in every layer


def test_merge_equals_peft_merge_and_unload(adapted, tmp_path):
    _, ours = adapted
    save_peft_adapter(ours, lora_config_dict(ours), tmp_path / "adapter")
    merged_hf = peft_on(tmp_path / "adapter").merge_and_unload()
    merge_lora(ours)
    assert all(not hasattr(m, "lora") or m.lora is None for m in ours.modules() if hasattr(m, "num_experts"))
    i = 32
    for layer in range(3):
        mine, theirs = ours.model.layers[str(layer)].mlp.experts, merged_hf.model.layers[layer].mlp.experts
        torch.testing.assert_close(mine.gate_proj, theirs.gate_up_proj[:, :i], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.up_proj, theirs.gate_up_proj[:, i:], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.down_proj, theirs.down_proj, rtol=0, atol=1e-6)
    assert all(".lora" not in n for n in ours.state_dict())


def test_peft_folder_reads_back_into_the_same_adapters(adapted, tmp_path):
    _, ours = adapted
    save_peft_adapter(ours, lora_config_dict(ours), tmp_path / "adapter")
    config, state = load_peft_adapter(tmp_path / "adapter")
    assert config == LoraConfig.from_dict(lora_config_dict(ours))
    expected = adapter_state_dict(ours)
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    fresh = apply_lora(build_model(ours.config), rank=RANK, alpha=ALPHA, target_modules=config.target_modules)
    load_adapter_state_dict(fresh, state)
    assert all(torch.equal(fresh.get_parameter(name), tensor) for name, tensor in expected.items())


def test_a_fresh_expert_adapter_starts_as_peft_does():
    """B zero (the model is unchanged); A within PEFT's kaiming bound for its [X·r, in] factor,
    1/sqrt(in), and different per expert; seeded per layer name, as the linear layers' adapters."""
    cfg = get_preset("qwen3_moe_tiny")
    model = build_model(cfg)
    apply_lora(model, rank=RANK, alpha=ALPHA, target_modules=["down_proj"])
    init_lora_weights(model, seed=7)
    adapters = [m for m in model.modules() if isinstance(m, ExpertAdapter)]
    assert adapters
    for adapter in adapters:
        a, b = adapter.lora_A.weight, adapter.lora_B.weight
        assert torch.equal(b, torch.zeros_like(b))
        bound = 1 / adapter.in_features ** 0.5
        assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
        assert not torch.equal(a[0], a[1])
    again = build_model(cfg)
    apply_lora(again, rank=RANK, alpha=ALPHA, target_modules=["down_proj"])
    init_lora_weights(again, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(adapter_state_dict(model).values(),
                                                  adapter_state_dict(again).values()))


@pytest.mark.parametrize("mlp_only_layers", [[], [0]], ids=["every-layer-sparse", "one-dense-layer"])
@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "down_proj"], ["linear_fc1"]])
def test_mlp_targets_adapt_the_routed_experts_and_the_dense_mlp_layers(mlp_only_layers, targets):
    cfg = dataclasses.replace(get_preset("qwen3_moe_tiny"), mlp_only_layers=mlp_only_layers)
    model = apply_lora(build_model(cfg), rank=2, alpha=2, target_modules=targets)
    wanted = LoraConfig(target_modules=targets).target_modules
    mlp = [p for p in ("gate_proj", "up_proj", "down_proj") if p in wanted]
    for index, layer in model.model.layers.items():
        if int(index) in mlp_only_layers:
            assert {n for n, m in layer.mlp.named_children() if isinstance(m, LoraLinear)} == set(mlp)
        else:
            assert [n for n, _ in layer.mlp.experts.lora.adapters()] == mlp
    assert lora_config_dict(model)["target_modules"] == list(wanted)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(use_dora=True), "DoRA on the routed experts"),
    (dict(dropout=0.1), r"dropout \(0.1\) on the routed experts"),
    (dict(target_modules=["gate_proj", "down_proj"]), "gate_proj and up_proj are one fused weight"),
])
def test_what_peft_cannot_do_on_experts_is_refused(settings, message):
    settings = {"rank": 2, "alpha": 2, "target_modules": "all-linear", **settings}
    with pytest.raises(ShoalError, match=message):
        apply_lora(build_model(get_preset("qwen3_moe_tiny")), **settings)
    attention_only = {**settings, "target_modules": ["linear_qkv", "linear_proj"]}
    apply_lora(build_model(get_preset("qwen3_moe_tiny")), **attention_only)  # fine without the experts


def test_peft_export_refuses_dense_mlp_adapters_beside_expert_ones(tmp_path):
    """PEFT on transformers 5 would load the experts' adapters and silently skip the dense MLP
    layer's (checked: the logits differ by about 0.5 with that folder), so shoal does not write it."""
    cfg = dataclasses.replace(get_preset("qwen3_moe_tiny"), mlp_only_layers=[0])
    model = apply_lora(build_model(cfg), rank=2, alpha=2, target_modules="all-linear")
    with pytest.raises(ShoalError, match="dense MLP projections.*export the merged model"):
        save_peft_adapter(model, lora_config_dict(model), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
