"""Compiled decoder layers under tensor parallelism train as the eager ones do.

The recipes compile the layers (`parallel.compile`, every GPU recipe's default) and the seed's 8B
runs use tensor parallelism, so the two meet in most multi-GPU runs. On torch 2.13 (CI's; 2.11 took
it) the first layer's input arrives from the embedding's tensor-parallel style as a collective still in flight,
and the compiled layer's backward then handed a plain tensor to a DTensor backward: the step failed
(`shoal.distributed.parallelize._inputs_arrived`). The oracle is the same engine uncompiled, itself
held against one process by the layout tests: same losses and gradient norms, step by step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_float8_tensor_parallel import fp8_steps, start  # noqa: F401 (fixture)
from tests.helpers.distributed import run_distributed

pytest.importorskip("torchao")  # the FP8 case; the engine builder is the FP8 test's

CASES = {
    "sequence_parallel": ({"tensor_model_parallel_size": 2}, False),
    "no_sequence_parallel": ({"tensor_model_parallel_size": 2, "sequence_parallel": False}, False),
    # FP8 tensorwise, its sequence-parallel gathers in FP8 (torchao's FP8 styles) and compiled.
    "fp8_tensorwise_sequence_parallel": ({"tensor_model_parallel_size": 2}, True),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_layers_under_tensor_parallel_train_as_eager_ones(name: str, start: Path):  # noqa: F811
    parallel, fp8 = CASES[name]
    spec = {"parallel": parallel, "recipe": "tensorwise"}
    eager = run_distributed(fp8_steps, 2, spec, str(start), fp8)
    compiled = run_distributed(fp8_steps, 2, {**spec, "parallel": {**parallel, "compile": True}}, str(start), fp8)
    for got in compiled:
        torch.testing.assert_close(got["losses"], eager[0]["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["grad_norms"], eager[0]["grad_norms"], rtol=1e-5, atol=0)
    if fp8:
        assert compiled[0]["in_fp8"] == eager[0]["in_fp8"] > 0
        assert compiled[0]["float8_gathers"] > 0
