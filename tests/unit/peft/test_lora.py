"""`LoraLinear` inside the model's own initialisation: a run from random weights with `--peft`
builds on meta, swaps in LoRA, materialises with `to_empty` and calls `init_weights` once.

The oracle is the same model without LoRA, built and initialised alike: every base weight must come
out of `init_weights` with the values a plain model's weights get (normal(0, initializer_range),
zero biases), not with whatever memory `to_empty` handed out.
"""

from __future__ import annotations

import pytest
import torch

from shoal.models import get_preset
from shoal.models.model import Transformer
from shoal.peft import apply_lora
from shoal.peft.lora import lora_modules


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
