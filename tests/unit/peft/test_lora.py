"""shoal's LoRA/DoRA against Hugging Face PEFT on the same tiny models: outputs, gradients,
initial values, dropout, training only adapters, and merging; and `LoraLinear` inside the model's
own initialisation (the last test)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from shoal.models import get_preset
from shoal.models.model import Transformer
from shoal.peft import (
    ALL_LINEAR,
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    apply_lora,
    lora_config_dict,
    merge_adapter_state_dict,
    merge_lora,
)
from shoal.peft.lora import lora_modules
from tests.helpers.hf_models import tiny_peft_hf as tiny_hf
from tests.helpers.peft_twins import (
    copy_adapters_to_peft,
    peft_adapter_params,
    peft_twin,
    randomize_adapters,
    shoal_twin,
    tokens,
)

TIGHT = dict(atol=1e-5, rtol=1e-5)
# NeMo's names, as a seed user types them, against the HF names PEFT gets for the same layers.
TARGET_CASES = {
    "all": (list(ALL_LINEAR), list(ALL_LINEAR)),
    "nemo_qkv_fc2": (["linear_qkv", "linear_fc2"], ["q_proj", "k_proj", "v_proj", "down_proj"]),
}


def _pair(family: str, dora: bool, targets: str = "all", dropout: float = 0.0, rank: int = 4, alpha: float = 8.0):
    hf = tiny_hf(family)
    shoal_targets, peft_targets = TARGET_CASES[targets]
    ours = apply_lora(shoal_twin(hf), rank=rank, alpha=alpha, dropout=dropout,
                      target_modules=shoal_targets, use_dora=dora)
    theirs = peft_twin(hf, rank, alpha, dropout, peft_targets, dora)
    return hf, ours, theirs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_leaves_model_unchanged_and_starts_like_peft(family, dora):
    hf, ours, theirs = _pair(family, dora)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-6, rtol=1e-6)
    theirs_params = peft_adapter_params(theirs)
    for name, param in ours.named_parameters():
        if name.endswith("lora_B.weight"):
            assert torch.count_nonzero(param) == 0
        elif name.endswith("lora_A.weight"):
            # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in)), like PEFT's.
            bound = 1 / param.shape[1] ** 0.5
            assert param.abs().max() <= bound and param.std() > bound / 3
        elif name.endswith("lora_magnitude_vector"):
            # DoRA's magnitude starts at the base weight's row norms, as PEFT computes them.
            torch.testing.assert_close(param, theirs_params[name], atol=1e-6, rtol=1e-6)
    assert sorted(n for n, _ in ours.named_parameters() if "lora_" in n) == sorted(theirs_params)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("targets", list(TARGET_CASES))
def test_logits_and_gradients_match_peft(family, dora, targets):
    _, ours, theirs = _pair(family, dora, targets)
    randomize_adapters(ours)
    copy_adapters_to_peft(ours, theirs)
    x = tokens()
    ours_logits, theirs_logits = ours(x), theirs(input_ids=x).logits
    torch.testing.assert_close(ours_logits, theirs_logits, **TIGHT)
    assert (ours_logits - shoal_twin(tiny_hf(family))(x)).abs().max() > 1e-2  # the adapters do matter

    target = tokens(seed=3)
    F.cross_entropy(ours_logits.flatten(0, 1), target.flatten()).backward()
    F.cross_entropy(theirs_logits.flatten(0, 1), target.flatten()).backward()
    theirs_params = peft_adapter_params(theirs)
    for name, param in ours.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param.grad, theirs_params[name].grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_acts_in_training_only_and_like_peft(dora):
    _, ours, theirs = _pair("qwen2", dora, dropout=0.3)
    _, no_dropout, _ = _pair("qwen2", dora, dropout=0.0)
    for model in (ours, no_dropout):
        randomize_adapters(model)
    copy_adapters_to_peft(ours, theirs)
    x = tokens()
    with torch.no_grad():
        eval_logits = ours(x)
        torch.testing.assert_close(eval_logits, no_dropout(x), **TIGHT)
        ours.train(), theirs.train()
        torch.manual_seed(7)
        train_a = ours(x)
        train_b = ours(x)
        torch.manual_seed(7)
        theirs_train = theirs(input_ids=x).logits
    assert (train_a - eval_logits).abs().max() > 1e-3
    assert (train_a - train_b).abs().max() > 1e-3
    # Same random stream, one dropout draw per adapted layer in the same order: PEFT's masks exactly.
    torch.testing.assert_close(train_a, theirs_train, **TIGHT)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_only_adapters_get_gradients_and_change(dora):
    _, ours, _ = _pair("qwen2", dora)
    randomize_adapters(ours)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    adapter_names = set(adapter_state_dict(ours))
    assert trainable == adapter_names
    assert all(n.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")) for n in adapter_names)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}

    # A user passing every parameter to the optimizer (with weight decay) must still only train adapters.
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    logits = ours(tokens())
    F.cross_entropy(logits.flatten(0, 1), tokens(seed=3).flatten()).backward()
    for name, param in ours.named_parameters():
        if name in adapter_names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    optimizer.step()
    for name, param in ours.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in adapter_names), name


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_matches_adapted_model_and_peft_merge(family, dora):
    hf, ours, theirs = _pair(family, dora)
    randomize_adapters(ours)
    copy_adapters_to_peft(ours, theirs)
    x = tokens()
    config = LoraConfig.from_dict(lora_config_dict(ours))
    full_state = {k: v.clone() for k, v in ours.state_dict().items()}
    tied_before = ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        adapted = ours(x)
        merged = merge_lora(ours)
        torch.testing.assert_close(merged(x), adapted, **TIGHT)

    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert set(merged.state_dict()) == set(hf.state_dict())
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied_before  # merge keeps ties as found

    reference = theirs.merge_and_unload().state_dict()
    assert set(reference) == set(merged.state_dict())
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=1e-5)

    # The state-dict path (export without building the model) gives the same weights.
    from_state = merge_adapter_state_dict(full_state, config)
    assert set(from_state) == set(merged.state_dict())
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(from_state[name], value, atol=0, rtol=0)


def test_merge_keeps_bias_and_applies_to_copy_only():
    _, ours, _ = _pair("qwen2", dora=True)
    randomize_adapters(ours)
    bias = ours.model.layers["0"].self_attn.q_proj.bias
    other = copy.deepcopy(ours)
    merge_lora(ours)
    assert ours.model.layers["0"].self_attn.q_proj.bias is bias  # shared, untouched
    assert isinstance(other.model.layers["0"].self_attn.q_proj, LoraLinear)

# A run from random weights with `--peft` builds on meta, swaps in LoRA, materialises with
# `to_empty` and calls `init_weights` once. The oracle is the same model without LoRA, built and
# initialised alike: every base weight must come out of `init_weights` with the values a plain
# model's weights get (normal(0, initializer_range), zero biases), not with whatever memory
# `to_empty` handed out.


def _initialised(use_lora: bool, family: str) -> Transformer:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(get_preset(f"{family}_tiny"))
    if use_lora:
        apply_lora(model, rank=4, alpha=8.0)
    model.to_empty(device="cpu")
    # `to_empty` leaves memory as it was; NaN stands for that garbage deterministically, so a
    # parameter that init_weights skips cannot pass by holding a freed tensor's old values.
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    model.init_weights()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases must be zeroed too
def test_init_weights_initialises_the_base_weights_under_lora(family):
    plain = dict(_initialised(False, family).named_parameters())
    adapted = _initialised(True, family)
    assert sum(1 for _ in lora_modules(adapted)) > 0
    std = adapted.config.initializer_range
    for name, param in adapted.named_parameters():
        if "lora_" in name:
            continue  # adapters start in init_lora_weights, after a checkpoint load
        assert not param.isnan().any(), f"{name} was left uninitialised"
        reference = plain[name]
        assert param.shape == reference.shape
        if name.endswith(".bias") or name.endswith("norm.weight"):
            # Deterministic values: zero biases, unit norms, as in the plain model.
            torch.testing.assert_close(param, reference, rtol=0, atol=0)
        else:
            # Random draws (the RNG stream differs once adapters draw too): compare the statistics.
            # With >= 64*64 samples of normal(0, 0.02) the sample std lies within 10% of 0.02 and the
            # mean within 0.002 of 0 by a wide margin (5+ standard errors).
            assert abs(param.std().item() - std) < 0.1 * std, name
            assert abs(param.mean().item()) < 0.1 * std, name
            assert abs(reference.std().item() - std) < 0.1 * std, name
