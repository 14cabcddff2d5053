"""What the model-agnostic parallel code asks of a model, and of a module that splits itself.

`distributed/` applies tensor parallelism, activation checkpointing, compile, FSDP2 and pipeline
stages without naming a model's modules: a `ParallelPlan` beside the model names them (for shoal's
decoder, `shoal.models.parallel_plan`), as torchtitan's model packages own their plans. A module
that a plain column-/row-wise style cannot split (a LoRA-adapted projection) says how it is split
through `SplitsItself`, so this package never imports the code that defines it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle


class ParallelPlan(Protocol):
    """A model family's answers to what parallelism needs to know about its modules. Every method
    takes the model, or one pipeline stage of it, and speaks only of the modules it holds."""

    def tensor_parallel(self, model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
        """DTensor styles by module name (as `get_submodule` takes it), in the order they apply."""
        ...

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated layers: each is checkpointed, compiled and FSDP-sharded as one unit."""
        ...

    def fsdp_units(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        """Every FSDP2 unit below the root (the blocks included), in forward order, each with
        whether to keep it gathered from its forward to its backward (worth it for a module whose
        backward comes right after its forward, such as the output layer)."""
        ...

    def experts(self, model: nn.Module) -> list[nn.Module]:
        """The grouped-experts modules of the sparse layers (none for a dense model), which expert
        parallelism splits along their expert axis (shoal.distributed.expert_parallel)."""
        ...

    def pipeline_stage(self, model: nn.Module, stage_index: int, num_stages: int) -> nn.Module:
        """A copy of `model` holding only stage `stage_index`'s modules, under the full model's names."""
        ...


@runtime_checkable
class SplitsItself(Protocol):
    """A module that tensor parallelism splits with a style of its own."""

    def tensor_parallel_style(self, style: ParallelStyle, compiled: bool) -> ParallelStyle:
        """The style that splits this module the way `style` splits a plain nn.Linear (same input and
        output layouts). `compiled`: the module's layer will run under torch.compile; refuse with a
        ShoalError what cannot."""
        ...
