"""DoRA with a frozen base weight stored in bf16 and adapters kept as fp32 masters (the layout of a
LoRA run whose frozen base is held in bf16 to save memory): each row's scale m / ‖W + s·B A‖ must
keep fp32 precision, as PEFT computes it on the same values in fp32.

Oracle: PEFT's DoRA layer in fp32 on the bf16 weight's exact fp32 copy. The values are chosen so
that every matmul is exact in bf16 (one-hot inputs, weights on a grid of 1/8 and adapters on one of
1/4, rank 2), so the only rounding left in shoal's bf16-autocast forward is that of the scale.
"""

from __future__ import annotations

import peft
import torch
from torch import nn

from shoal.peft import apply_lora
from shoal.peft.lora import dora_weight_norm

IN, OUT, RANK = 32, 24, 2


def grid(shape: tuple[int, ...], step: float, span: int, seed: int) -> torch.Tensor:
    """Random multiples of `step` in [-span·step, span·step]: exact in bf16 and in small sums."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-span, span + 1, shape, generator=gen).float() * step


class OneLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.q_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.q_proj.weight.data.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def test_dora_scale_keeps_fp32_precision_over_a_bf16_base():
    weight = grid((OUT, IN), 1 / 8, 4, seed=0)
    lora_a, lora_b = grid((RANK, IN), 1 / 4, 2, seed=1), grid((OUT, RANK), 1 / 4, 2, seed=2)
    gen = torch.Generator().manual_seed(3)

    theirs = peft.get_peft_model(OneLinear(weight),
                                 peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj"], use_dora=True))
    layer = theirs.base_model.model.q_proj
    layer.lora_A["default"].weight.data.copy_(lora_a)
    layer.lora_B["default"].weight.data.copy_(lora_b)
    magnitude = layer.lora_magnitude_vector["default"].weight
    magnitude.data.mul_(1 + 0.1 * torch.randn(OUT, generator=gen))  # a trained magnitude, not the start
    x = torch.eye(IN)
    with torch.no_grad():
        expected = theirs(x)  # fp32 throughout

    ours = apply_lora(OneLinear(weight), rank=RANK, alpha=RANK, target_modules=["q_proj"], use_dora=True).q_proj
    with torch.no_grad():
        ours.weight.data = weight.to(torch.bfloat16)  # frozen base in bf16, exactly the same values
        ours.lora_A.weight.copy_(lora_a)
        ours.lora_B.weight.copy_(lora_b)
        ours.lora_magnitude_vector.copy_(magnitude)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x)
    # The output keeps the compute dtype (flash attention takes no fp32 activations), so the
    # scale's precision is checked where it is made: ‖W + s·B A‖ against PEFT's own norm in fp32.
    # bf16 rounding of the norm would leave errors up to 2^-9 of each row's scale.
    assert ours.lora_magnitude_vector.dtype == torch.float32 and got.dtype == torch.bfloat16
    with torch.no_grad():
        their_norm = layer.lora_magnitude_vector["default"].get_weight_norm(weight, lora_b @ lora_a, scaling=1.0)
        our_norm = dora_weight_norm(ours.weight, ours.lora_A.weight, ours.lora_B.weight, ours.scaling)
    assert our_norm.dtype == torch.float32
    torch.testing.assert_close(our_norm, their_norm, rtol=1e-6, atol=0)
    # And the output is PEFT's, rounded once to bf16.
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=0)


def test_an_all_bf16_dora_layer_stays_bf16_and_starts_as_its_base():
    """A model held wholly in bf16 (adapters too, as under FSDP's bf16 mixed precision): the fp32
    norm must not promote the output to fp32, and a fresh adapter (B = 0, m = ‖W‖) is exactly the
    base layer."""
    model = OneLinear(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        got = apply_lora(model, rank=RANK, alpha=RANK, target_modules=["q_proj"], use_dora=True)(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
