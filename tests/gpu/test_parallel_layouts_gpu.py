"""GPU variant of tests/distributed: layouts on 2 or 4 GPUs with NCCL train like one GPU.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_parallel_layouts_gpu.py`.
The same workers as the CPU tests (tests/helpers/distributed_workers.py) run 3 AdamW steps per
layout; the oracle is the same steps in this process on one GPU. Two groups:

* fp32 (TF32 off), rtol 1e-5 like on CPU, adding what only runs on GPUs: NCCL, PyTorch's ring
  attention for context parallelism (CUDA only), and torch.compile with selective checkpointing.
* bf16 through FSDP2's mixed precision (bf16 compute, fp32 weights and gradient reduction),
  against a one-GPU oracle doing the same casts by hand. bf16 keeps 8 significant bits and the
  layouts sum bf16 partial products in other orders, so single values move by ~1e-2 relative;
  the loss (an average over ~180 tokens) and the gradient norm stay within 2e-2, and weights
  within LR/4 on average per tensor after 3 steps (more weights have gradients near bf16's
  rounding noise, whose AdamW step can flip sign), while a wrong gradient or normalisation moves
  them much further.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import (
    LR,
    SEQ_LENGTH,
    assert_matches_reference,
    model_config,
    reference_run,
    train_layout,
)

pytestmark = pytest.mark.gpu

FP32_LAYOUTS = [
    ("tp2_sp", 2, {"parallel": {"tensor_model_parallel_size": 2}}),
    ("pp2_1f1b", 2, {"parallel": {"pipeline_model_parallel_size": 2}, "micro_batch_size": 2}),
    ("pp2_interleaved_documents", 2, {"parallel": {"pipeline_model_parallel_size": 2,
                                                   "pipeline_schedule": "interleaved_1f1b"},
                                      "num_layers": 4, "documents": True}),
    # fp32 ring attention runs on the memory-efficient kernel, whose log-sum-exp PyTorch's ring
    # merge only handles for query chunks of a multiple of 32 tokens: 128 = 2 ranks × 2 × 32.
    ("cp2_ring", 2, {"parallel": {"context_parallel_size": 2}, "cp_backend": "ring", "seq_length": 128}),
    ("cp2_allgather_documents", 2, {"parallel": {"context_parallel_size": 2}, "documents": True}),
    ("tp2_fsdp2_compile_selective_ac", 4, {"parallel": {"tensor_model_parallel_size": 2, "compile": True,
                                                        "activation_checkpointing": "selective"}}),
    ("cp2_tp2_ring", 4, {"parallel": {"context_parallel_size": 2, "tensor_model_parallel_size": 2},
                         "cp_backend": "ring", "seq_length": 128}),
    ("pp2_fsdp2_full_ac", 4, {"parallel": {"pipeline_model_parallel_size": 2, "activation_checkpointing": "full"}}),
    # Expert parallelism over NCCL's all-to-all, eager and with compiled layers (the dispatch's
    # split sizes are data-dependent, so the compiled layer breaks its graph around it).
    ("ep2_moe", 2, {"parallel": {"expert_model_parallel_size": 2}, "preset": "qwen3_moe_tiny"}),
    ("ep2_fsdp2_moe_compile", 4, {"parallel": {"expert_model_parallel_size": 2, "compile": True},
                                  "preset": "qwen3_moe_tiny"}),
]

# Every bf16 layout shards over data-parallel ranks, so FSDP2 applies the mixed precision.
BF16_LAYOUTS = [
    ("fsdp2", 2, {"parallel": {}}),
    ("cp2_ring", 2, {"parallel": {"context_parallel_size": 2}, "cp_backend": "ring"}),
    ("tp2_fsdp2", 4, {"parallel": {"tensor_model_parallel_size": 2}}),
    ("pp2_fsdp2", 4, {"parallel": {"pipeline_model_parallel_size": 2}}),
]


def _params(layouts, dtype):
    out = []
    for name, world, spec in layouts:
        spec = {**spec, "device": "cuda", "compute_dtype": dtype}
        needs = pytest.mark.skipif(torch.cuda.device_count() < world, reason=f"needs {world} GPUs")
        out.append(pytest.param(world, spec, id=f"{name}_{dtype or 'fp32'}", marks=needs))
    return out


@functools.cache
def _reference(preset: str, num_layers: int, documents: bool, dtype: str | None, seq_length: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    compute = torch.bfloat16 if dtype == "bfloat16" else None
    return reference_run(model_config(preset, num_layers), documents, device="cuda", compute_dtype=compute,
                         seq_length=seq_length)


def _check(world_size: int, spec: dict, rtol: float, weight_tolerance: float) -> None:
    expected = _reference(spec.get("preset", "llama_tiny"), spec.get("num_layers", 2), spec.get("documents", False),
                          spec.get("compute_dtype"), spec.get("seq_length", SEQ_LENGTH))
    results = run_distributed(train_layout, world_size, spec, device_type="cuda")
    assert_matches_reference(results, expected, rtol=rtol, weight_tolerance=weight_tolerance)


@pytest.mark.parametrize("world_size,spec", _params(FP32_LAYOUTS, None))
def test_fp32_layout_matches_one_gpu(world_size: int, spec: dict) -> None:
    _check(world_size, spec, rtol=1e-5, weight_tolerance=LR / 10)


@pytest.mark.parametrize("world_size,spec", _params(BF16_LAYOUTS, "bfloat16"))
def test_bf16_layout_matches_one_gpu(world_size: int, spec: dict) -> None:
    _check(world_size, spec, rtol=2e-2, weight_tolerance=LR / 4)
