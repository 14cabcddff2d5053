"""Tensor-parallel styles for LoRA/DoRA-adapted projections (`shoal.peft.LoraLinear`).

`LoraLinear.tensor_parallel_style` hands them to `shoal.distributed` (its `SplitsItself`
protocol), in place of the plain style the model's plan names, so the distributed code never
imports peft and this module never imports the layer it splits.

`ColwiseParallel` and `RowwiseParallel` only split `nn.Linear`. An adapted projection holds the
frozen base weight W [O, I] (and bias), lora_A [r, I], lora_B [O, r] and, for DoRA, the magnitude
m [O]. These styles make each of them a DTensor on the tensor-parallel mesh and leave the maths to
DTensor, running `LoraLinear.forward` unchanged:

    column-wise (q/k/v, gate/up): split by output row O.
        W, b, B, m: Shard(0); A: Replicate (small: r × I).  x whole -> x Aᵀ whole -> B: O-shard.
        DoRA's norm of a row of W + s·B A is local: every rank holds whole rows.
    row-wise (o, down): split by input column I.
        W, A: Shard(1); B, m, b: Replicate.  x I-shard -> x Wᵀ and x Aᵀ partial sums; B (x Aᵀ)
        stays a partial sum (B is linear), so base + adapter is reduced once, like the plain
        row-wise output (reduce-scatter under sequence parallelism, all-reduce otherwise).
        DoRA's row norm over a split row is a partial norm, which DTensor completes (√ of the
        summed squares over ranks) before m is divided by it.

Gradients of the replicated tensors (A column-wise; B and m row-wise) come out of DTensor as
partial sums; FSDP2's reduction completes them, and without FSDP a hook does
(`shoal.distributed.parallelize.complete_partial_grads`), so every rank holds the one-process
gradient.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from shoal.errors import ShoalError

# Where each tensor of a LoraLinear lives, by its name inside the module.
COLWISE_PLACEMENTS: dict[str, Placement] = {
    "weight": Shard(0),
    "bias": Shard(0),
    "lora_A.weight": Replicate(),
    "lora_B.weight": Shard(0),
    "lora_magnitude_vector": Shard(0),
}
ROWWISE_PLACEMENTS: dict[str, Placement] = {
    "weight": Shard(1),
    "bias": Replicate(),
    "lora_A.weight": Shard(1),
    "lora_B.weight": Replicate(),
    "lora_magnitude_vector": Replicate(),
}


def _distribute_lora(
    placements: dict[str, Placement], src_data_rank: int | None, name: str, module: nn.Module, mesh: DeviceMesh
) -> None:
    """distribute_module's partition function: called once per submodule (the LoraLinear is "",
    its adapters "lora_A", "lora_B"); each parameter gets its placement by its name in the layer."""
    for param_name, param in list(module.named_parameters(recurse=False)):
        key = f"{name}.{param_name}" if name else param_name
        if key not in placements:
            raise ShoalError(f"no tensor-parallel placement for the LoraLinear tensor {key!r}")
        dist_param = distribute_tensor(param, mesh, [placements[key]], src_data_rank=src_data_rank)
        module.register_parameter(param_name, nn.Parameter(dist_param, requires_grad=param.requires_grad))


class LoraColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a LoraLinear: same input and output handling, adapter tensors split as
    in COLWISE_PLACEMENTS."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            partial(_distribute_lora, COLWISE_PLACEMENTS, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class LoraRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a LoraLinear: input split along its last dim, output reduced from the
    partial sums of base and adapter together; adapter tensors split as in ROWWISE_PLACEMENTS."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module,
            device_mesh,
            partial(_distribute_lora, ROWWISE_PLACEMENTS, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def lora_style(style: ParallelStyle, dropout_p: float, compiled: bool) -> ParallelStyle:
    """The LoRA version of a column-/row-wise style (same input and output layouts); any other
    style unchanged.

    Refuses adapter dropout in compiled layers: dropout on the adapter's (DTensor) input draws
    through DTensor's random-number tracker, which torch.compile fails to trace (seen with torch
    2.11 on CUDA); uncompiled it runs, and the tracker gives every tensor-parallel rank the same
    mask for a replicated input."""
    if not isinstance(style, (ColwiseParallel, RowwiseParallel)):
        return style
    if compiled and dropout_p > 0:
        raise ShoalError(
            f"LoRA/DoRA dropout ({dropout_p:g}) with tensor parallelism cannot be compiled: torch.compile fails "
            "to trace dropout on tensor-parallel inputs; set peft.dropout=0 or parallel.compile=false"
        )
    lora_class = LoraColwiseParallel if isinstance(style, ColwiseParallel) else LoraRowwiseParallel
    return lora_class(
        input_layouts=style.input_layouts[0],
        output_layouts=style.output_layouts[0],
        use_local_output=style.use_local_output,
    )
