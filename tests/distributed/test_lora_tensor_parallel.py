"""LoRA/DoRA-adapted projections split by tensor parallelism compute what one process computes.

An adapted MLP (biased up and down projections, the first split column-wise, the second row-wise)
runs on two gloo ranks with shoal's LoRA styles, with and without sequence parallelism, and here
in one plain process. Compared, fp32: the adapters' starting values, the outputs, every adapter
gradient (accumulated over two micro-batches), and the gathered adapter state. DoRA's row-wise
case is the one that needs care: each rank holds only part of every row of W + s·B A, whose norm
must still be the whole row's.
"""

from __future__ import annotations

import pytest
import torch

from shoal.peft import adapter_state_dict, init_lora_weights, load_adapter_state_dict
from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import (
    ADAPTED_MLP_SEED,
    AdaptedMLP,
    adapted_mlp_backward,
    adapted_mlp_inputs,
    adapted_mlp_under_tp,
)

# Reordered fp32 sums over at most 24 terms.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def one_process(dora: bool) -> dict:
    model = AdaptedMLP(dora)
    base, adapters, x = adapted_mlp_inputs(dora)
    model.load_state_dict(base, strict=False)
    init_lora_weights(model, seed=ADAPTED_MLP_SEED)
    initial = {k: v.clone() for k, v in adapter_state_dict(model).items()}  # not views of the parameters
    load_adapter_state_dict(model, adapters)
    y = adapted_mlp_backward(model, x)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"initial": initial, "adapters": adapter_state_dict(model), "y": y, "grads": grads}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no_sp"])
def test_adapted_projections_under_tp_match_one_process(dora: bool, sequence_parallel: bool) -> None:
    torch.set_num_threads(1)
    expected = one_process(dora)
    results = run_distributed(adapted_mlp_under_tp, 2, dora, sequence_parallel)

    # Only the adapters train (the split keeps the base frozen), and each has its gradient.
    assert sorted(expected["grads"]) == sorted(n for n in expected["adapters"])
    dim = 1 if sequence_parallel else None
    for rank, got in enumerate(results):
        # A drawn whole and cut to shards: the same start as one process. DoRA's magnitude starts
        # as the row norms of W, summed over shards of the row for the row-wise projection.
        for name, value in expected["initial"].items():
            tolerance = TOLERANCE if "magnitude" in name else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(got["initial"][name], value, **tolerance, msg=name)
        assert got["adapter_types"] == ["Tensor"]  # gathered into plain tensors
        for name, value in expected["adapters"].items():
            torch.testing.assert_close(got["adapters"][name], value, rtol=0, atol=0, msg=name)
        y = expected["y"] if dim is None else expected["y"].chunk(2, dim=dim)[rank]
        torch.testing.assert_close(got["y"], y, **TOLERANCE)
        assert sorted(got["grads"]) == sorted(expected["grads"])
        for name, grad in expected["grads"].items():
            placement, grad_placement, whole = got["grads"][name]
            # A replicated adapter's gradient is made whole on every rank, not left a partial sum.
            assert grad_placement == placement, (name, placement, grad_placement)
            torch.testing.assert_close(whole, grad, **TOLERANCE,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    for name, local in results[0]["local_grads"].items():
        if "Replicate" in results[0]["grads"][name][0]:
            assert torch.equal(local, results[1]["local_grads"][name]), f"{name}: ranks hold different gradients"


def test_compiled_adapter_dropout_under_tp_is_refused() -> None:
    """torch.compile cannot trace dropout on tensor-parallel (DTensor) inputs: refused before
    anything is split, with the two ways out."""
    from shoal.config.parallel import ParallelConfig
    from shoal.distributed import ParallelDims, parallelize_model
    from shoal.errors import ShoalError
    from shoal.models import get_preset
    from shoal.models.model import Transformer
    from shoal.peft import apply_lora

    with torch.device("meta"):
        model = apply_lora(Transformer(get_preset("llama_tiny")), rank=4, dropout=0.1)
    dims = ParallelDims(world_size=2, tp=2)
    with pytest.raises(ShoalError, match=r"dropout \(0.1\).*peft.dropout=0 or parallel.compile=false"):
        parallelize_model(model, dims, ParallelConfig(tensor_model_parallel_size=2, compile=True), "cpu")
