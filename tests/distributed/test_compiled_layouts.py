"""Compiled decoder layers train as the eager ones do, in each parallel layout.

The recipes compile the layers (`parallel.compile`, every GPU recipe's default), so compiled is
what multi-GPU runs train with. Under tensor parallelism, on torch 2.13 (CI's; 2.11 took it), the
first layer's input arrives from the embedding's style as a collective still in flight, and the
compiled layer's backward handed a plain tensor to a DTensor backward: every step failed
(`shoal.distributed.parallelize._inputs_arrived`); full checkpointing compiled inside a TP layer
stopped too (`checkpoint_compiled`). The oracle is the same engine uncompiled, itself
held against one process by the layout tests: same losses and gradient norms, step by step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_float8_tensor_parallel import fp8_steps, start  # noqa: F401 (fixture)
from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import train_layout

pytest.importorskip("torchao")  # the engine builder is the FP8 test's (FP8 off but in one case)

# name: (parallel config, processes, FP8 tensorwise, extra spec)
LAYOUTS = {
    "tp2_sequence_parallel": ({"tensor_model_parallel_size": 2}, 2, False, {}),
    "tp2": ({"tensor_model_parallel_size": 2, "sequence_parallel": False}, 2, False, {}),
    # FP8 tensorwise, its sequence-parallel gathers in FP8 (torchao's FP8 styles).
    "tp2_sequence_parallel_fp8": ({"tensor_model_parallel_size": 2}, 2, True, {}),
    "tp2_sequence_parallel_lora": ({"tensor_model_parallel_size": 2}, 2, False, {"peft": "lora"}),
    # Full checkpointing of a TP layer: checkpointed around the compiled layer (torch 2.13 stops on
    # the checkpoint inside it: shoal.distributed.parallelize.checkpoint_compiled).
    "tp2_sequence_parallel_full_checkpointing": ({"tensor_model_parallel_size": 2, "activation_checkpointing": "full"},
                                                 2, False, {}),
    "tp2_selective_checkpointing_fp8": ({"tensor_model_parallel_size": 2, "activation_checkpointing": "selective"},
                                        2, True, {}),
    "fsdp2": ({}, 2, False, {}),
    "pp2": ({"pipeline_model_parallel_size": 2}, 2, False, {"pipeline_micro_batches": 2}),
    "cp2": ({"context_parallel_size": 2}, 2, False, {}),
    "tp2_fsdp2": ({"tensor_model_parallel_size": 2}, 4, False, {}),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_compiled_layers_train_as_eager_ones(name: str, start: Path):  # noqa: F811
    parallel, world, fp8, extra = LAYOUTS[name]
    spec = {"parallel": parallel, "recipe": "tensorwise", **extra}
    eager = run_distributed(fp8_steps, world, spec, str(start), fp8)
    compiled = run_distributed(fp8_steps, world, {**spec, "parallel": {**parallel, "compile": True}}, str(start), fp8)
    for got in compiled:
        torch.testing.assert_close(got["losses"], eager[0]["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["grad_norms"], eager[0]["grad_norms"], rtol=1e-5, atol=0)
    if fp8:
        assert compiled[0]["in_fp8"] == eager[0]["in_fp8"] > 0
        assert compiled[0]["float8_gathers"] > 0


def test_compiled_mixture_of_experts_layers_under_tensor_parallel_with_full_checkpointing_train_as_eager_ones():
    """The MoE layer keeps its checkpoint inside the compiled graph (dense TP layers take it outside)."""
    spec = {"parallel": {"tensor_model_parallel_size": 2, "activation_checkpointing": "full"}, "preset": "qwen3_moe_tiny"}
    eager = run_distributed(train_layout, 2, spec)
    compiled = run_distributed(train_layout, 2, {**spec, "parallel": {**spec["parallel"], "compile": True}})
    for got in compiled:
        torch.testing.assert_close(got["losses"], eager[0]["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["grad_norms"], eager[0]["grad_norms"], rtol=1e-5, atol=0)
