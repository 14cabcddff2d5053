"""Grouped expert matmuls (`torch._grouped_mm`) against the exact per-expert loop, on a GPU.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_moe_gpu.py`. The equality tests
passed on an H200 (2026-12-01), which is why `shoal.models.moe.GROUPED_MM_ON_CUDA` is on; the
sync test (added 2026-12-02, after `torch.bincount` was replaced) and the cases with LoRA adapters
on the experts (`lora`, added 2026-12-02: two more grouped matmuls per projection) have not run on
a GPU yet.

Oracle: the same `GroupedExperts` with the grouped path off (the loop CPU always uses), on the same
bf16 weights and tokens, one Qwen3-30B-A3B layer's shape (128 experts, 8 routed, hidden 2048,
expert width 768). Tolerance: bf16 matmuls summed in another order, 2e-2 relative to the largest
output / gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shoal.models import get_preset
from shoal.models import moe as moe_module

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

CFG = dataclasses.replace(get_preset("qwen3_30b_a3b"), num_layers=1)
TOKENS = 4096


def with_expert_lora(block: moe_module.MoE) -> None:
    """LoRA (rank 32, NeMo's) on all three projections of every expert, B drawn non-zero."""
    from shoal.peft.experts import ExpertLora

    block.experts.lora = ExpertLora(block.experts, ["gate_proj", "up_proj", "down_proj"], rank=32, alpha=32.0)
    for _, adapter in block.experts.lora.adapters():
        adapter.reset_lora_parameters()
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.02)


def run(grouped: bool, monkeypatch, autocast: bool = False, lora: bool = False
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16 weights and tokens (FSDP2's compute dtype), or with `autocast` fp32 ones under a bf16
    autocast (one GPU without FSDP, as bench/moe.py trains); with `lora`, adapters on the experts
    (their gradients compared too)."""
    monkeypatch.setattr(moe_module, "GROUPED_MM_ON_CUDA", grouped)
    torch.manual_seed(0)
    block = moe_module.MoE(CFG).cuda()
    block.gate.reset_parameters(0.5)
    block.experts.reset_parameters(0.02)
    if lora:
        with_expert_lora(block)
    dtype = torch.float32 if autocast else torch.bfloat16
    block = block.to(dtype)
    x = torch.randn(1, TOKENS, CFG.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = block(x)
    out.float().pow(2).sum().backward()
    return out.detach(), [x.grad, block.gate.weight.grad, *(p.grad for p in block.experts.parameters())]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_grouped_mm_equals_the_loop(monkeypatch, autocast: bool, lora: bool):
    expected, expected_grads = run(False, monkeypatch, autocast, lora)
    got, grads = run(True, monkeypatch, autocast, lora)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 2e-2 * scale
    for g, e in zip(grads, expected_grads):
        assert (g.float() - e.float()).abs().max() <= 2e-2 * e.float().abs().max()


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_the_grouped_block_never_waits_for_the_device(monkeypatch, lora: bool):
    """Forward and backward of the MoE block on the grouped path queue their work without one
    device-to-host sync (`torch.bincount` used to size its output from the device, at every layer).
    Oracle: CUDA's own sync debug mode, which raises on any synchronising call."""
    monkeypatch.setattr(moe_module, "GROUPED_MM_ON_CUDA", True)
    torch.manual_seed(0)
    block = moe_module.MoE(CFG).cuda()
    if lora:
        with_expert_lora(block)
    block = block.to(torch.bfloat16)
    x = torch.randn(1, TOKENS, CFG.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block(x).float().pow(2).sum().backward()  # warm-up: first-use allocations and kernel loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x).float().pow(2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
