"""DoRA and a bf16 frozen base under FP8, in torchao's emulation mode (the same casts, on CPU).

Oracles: PEFT's own DoRA layer fed torchao's own `Float8Linear` output as its base result (PEFT
takes the weight norm from the base layer's full-precision weight, detached), and torchao's
`Float8Linear` holding the same bf16 weight. Skipped where torchao is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from shoal.distributed.float8 import FrozenFloat8Linear, float8_config, float8_plan
from shoal.peft import apply_lora

torchao = pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

IN, OUT, RANK, ALPHA = 64, 48, 4, 8.0


def emulated(recipe: str):
    return dataclasses.replace(float8_config(float8_plan("hybrid", recipe)), emulate=True)


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def trained_dora_layer(seed: int = 0):
    """A DoRA layer whose adapters have moved: B non-zero, magnitudes away from ‖W‖."""
    torch.manual_seed(seed)
    layer = apply_lora(OneLinear(), rank=RANK, alpha=ALPHA, target_modules=["q_proj"], use_dora=True).q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.05)
        layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(OUT))
    return layer


def peft_dora_over(base_result: torch.Tensor, x: torch.Tensor, layer, weight: torch.Tensor):
    """PEFT's DoRA output for base result `base_result`, on copies of `layer`'s adapters."""
    from peft.tuners.lora.dora import DoraLinearLayer

    base = nn.Linear(IN, OUT, bias=False)
    base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    lora_a, lora_b = nn.Linear(IN, RANK, bias=False), nn.Linear(RANK, OUT, bias=False)
    lora_a.weight = nn.Parameter(layer.lora_A.weight.detach().clone())
    lora_b.weight = nn.Parameter(layer.lora_B.weight.detach().clone())
    dora = DoraLinearLayer(fan_in_fan_out=False)
    dora.update_layer(base_layer=base, lora_A=lora_a.weight, lora_B=lora_b.weight, scaling=ALPHA / RANK)
    dora.weight = nn.Parameter(layer.lora_magnitude_vector.detach().clone())
    out = base_result + dora(x, lora_A=lora_a, lora_B=lora_b, scaling=ALPHA / RANK, base_layer=base,
                             base_result=base_result)
    return out, {"lora_A.weight": lora_a.weight, "lora_B.weight": lora_b.weight, "lora_magnitude_vector": dora.weight}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_dora_over_an_fp8_base_is_peft_dora_over_torchaos_fp8_output(recipe):
    """The weight norm comes from the full-precision base weight (not its FP8 cast), the base matmul
    is applied once, in FP8, and every gradient is PEFT's for that FP8 base output."""
    config = emulated(recipe)
    layer = trained_dora_layer()
    layer.base_linear = FrozenFloat8Linear(config)
    x = torch.randn(3, 7, IN)
    grad = torch.randn(3, 7, OUT)

    x_ours = x.clone().requires_grad_(True)
    out = layer(x_ours)
    out.backward(grad)

    fp8_base = Float8Linear.from_float(nn.Linear(IN, OUT, bias=False), config=config)
    with torch.no_grad():
        fp8_base.weight.copy_(layer.weight)
    fp8_base.weight.requires_grad_(False)
    x_theirs = x.clone().requires_grad_(True)
    expected, theirs = peft_dora_over(fp8_base(x_theirs), x_theirs, layer, layer.weight)
    expected.backward(grad)

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-6)
    ours = dict(layer.named_parameters())
    for name, param in theirs.items():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert layer.weight.grad is None


def test_fp8_base_with_a_frozen_bf16_weight_is_torchaos_float8_linear():
    """A frozen base held in bf16 (to save memory) goes through the FP8 matmul as torchao's own
    Float8Linear takes the same bf16 weight: same output and input gradient, no weight gradient."""
    for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
        config = emulated(recipe)
        torch.manual_seed(0)
        weight = (torch.randn(OUT, IN) * 0.05).to(torch.bfloat16)
        reference = Float8Linear.from_float(nn.Linear(IN, OUT, bias=False, dtype=torch.bfloat16), config=config)
        with torch.no_grad():
            reference.weight.copy_(weight)
        reference.weight.requires_grad_(False)
        x = torch.randn(2, 5, IN, dtype=torch.bfloat16, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out = FrozenFloat8Linear(config)(x, weight)
        out_ref = reference(x_ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_ref.backward(grad)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, out_ref) and torch.equal(x.grad, x_ref.grad), recipe
        assert reference.weight.grad is None


def test_dora_over_a_frozen_bf16_fp8_base_trains_only_its_fp32_adapters():
    """The layout of a LoRA run with its frozen base in bf16, under --fp8: the adapters (fp32
    masters) get gradients through the bf16-autocast forward; the base gets none."""
    layer = trained_dora_layer()
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    layer.base_linear = FrozenFloat8Linear(emulated("tensorwise"))
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert layer.weight.grad is None
    for name in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        param = layer.get_parameter(name)
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.abs().sum() > 0, name
