"""Every parallel layout trains like one process: same losses, gradient norms and final weights.

Each case runs 3 AdamW steps (with gradient clipping active) of a tiny model on CPU in several
gloo processes, and compares against the same 3 steps in this process with plain PyTorch (see
tests/helpers/distributed_workers.py). Tolerances, fp32 throughout:

* loss and gradient norm, rtol 1e-5: the layouts only reorder fp32 sums (sharded matmuls,
  reduce-scatters, micro-batch accumulation), which moves results by a few 1e-7 relative;
  a missing or doubled contribution (a gradient not reduced over tensor-parallel ranks, a loss
  normalised per rank instead of globally) moves them by 1e-3 or more.
* final weights, mean absolute difference per tensor below LR/10: AdamW's first steps move every
  weight by about ±LR whatever the gradient's size, so a wrong gradient shows as differences of
  order LR across a tensor, while reordered sums leave ~1e-7 on average.
Final weights are gathered through DCP's `get_model_state_dict`, so the test also checks that
every layout names its parameters exactly as Hugging Face does.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import LR, assert_matches_reference, model_config, reference_run, train_layout

# (id, world size, spec). A spec names the ParallelConfig fields it sets; "preset", "num_layers",
# "documents" (packed sequences with a document mask), "micro_batch_size" and
# "explicit_positions" (False: let the model derive positions) shape the run.
LAYOUTS = [
    ("dp2_replicate", 2, {"parallel": {"data_parallel_replicate_size": 2}}),
    ("fsdp2", 2, {"parallel": {}, "micro_batch_size": 2}),
    # Qwen3-MoE: grouped expert weights [X, I, E] sharded by FSDP2 along the expert axis, with full
    # activation checkpointing around the routed layers.
    ("fsdp2_moe_full_ac", 2, {"parallel": {"activation_checkpointing": "full"}, "preset": "qwen3_moe_tiny",
                              "micro_batch_size": 2}),
    # Tensor parallel on the attention of an MoE model; the experts replicated, with and without
    # sequence parallelism (the MoE block gathers the sequence, then hands back this rank's part).
    ("tp2_sp_moe", 2, {"parallel": {"tensor_model_parallel_size": 2}, "preset": "qwen3_moe_tiny"}),
    ("tp2_no_sp_moe", 2, {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": False},
                          "preset": "qwen3_moe_tiny"}),
    # Expert parallelism: 4 of the 8 experts per rank, tokens dispatched by all-to-all; alone (every
    # data-parallel rank an expert-parallel one) and with the experts FSDP-sharded over 2 groups.
    ("ep2_moe", 2, {"parallel": {"expert_model_parallel_size": 2}, "preset": "qwen3_moe_tiny"}),
    ("ep2_fsdp2_moe_full_ac", 4, {"parallel": {"expert_model_parallel_size": 2, "activation_checkpointing": "full"},
                                  "preset": "qwen3_moe_tiny"}),
    ("tp2_ep2_moe", 4, {"parallel": {"expert_model_parallel_size": 2, "tensor_model_parallel_size": 2},
                        "preset": "qwen3_moe_tiny"}),
    ("tp2_fsdp2_moe", 4, {"parallel": {"tensor_model_parallel_size": 2}, "preset": "qwen3_moe_tiny"}),
    ("tp2_sp", 2, {"parallel": {"tensor_model_parallel_size": 2}, "explicit_positions": False}),
    ("tp2_no_sp", 2, {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": False}}),
    # Qwen3: per-head q/k norms (replicated weights fed by head shards) and tied embeddings.
    ("tp2_sp_qwen3_documents", 2, {"parallel": {"tensor_model_parallel_size": 2}, "preset": "qwen3_tiny",
                                   "documents": True, "explicit_positions": False}),
    ("pp2_1f1b", 2, {"parallel": {"pipeline_model_parallel_size": 2}, "micro_batch_size": 2}),
    ("pp2_interleaved_documents", 2, {"parallel": {"pipeline_model_parallel_size": 2,
                                                   "pipeline_schedule": "interleaved_1f1b"},
                                      "num_layers": 4, "documents": True}),
    ("cp2", 2, {"parallel": {"context_parallel_size": 2}}),
    ("cp2_documents", 2, {"parallel": {"context_parallel_size": 2}, "documents": True}),
    # Qwen2: biased q/k/v projections, sharded with their weights.
    ("tp2_fsdp2_qwen2_full_ac", 4, {"parallel": {"tensor_model_parallel_size": 2, "activation_checkpointing": "full"},
                                    "preset": "qwen2_tiny"}),
    ("pp2_fsdp2_selective_ac", 4, {"parallel": {"pipeline_model_parallel_size": 2,
                                                "activation_checkpointing": "selective"}}),
    ("cp2_tp2_documents", 4, {"parallel": {"context_parallel_size": 2, "tensor_model_parallel_size": 2},
                              "documents": True}),
    ("hsdp2x_cp2", 4, {"parallel": {"data_parallel_replicate_size": 2, "context_parallel_size": 2}}),
    ("pp2_fsdp2_tp2", 8, {"parallel": {"pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 2},
                          "micro_batch_size": 2}),
]


@functools.cache
def _reference(preset: str, num_layers: int, documents: bool) -> dict:
    torch.manual_seed(0)
    return reference_run(model_config(preset, num_layers), documents)


@pytest.mark.parametrize("world_size,spec", [pytest.param(w, s, id=i) for i, w, s in LAYOUTS])
def test_layout_matches_one_process(world_size: int, spec: dict) -> None:
    expected = _reference(spec.get("preset", "llama_tiny"), spec.get("num_layers", 2), spec.get("documents", False))
    results = run_distributed(train_layout, world_size, spec)
    assert_matches_reference(results, expected, rtol=1e-5, weight_tolerance=LR / 10)
