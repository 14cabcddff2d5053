"""`parallel.activation_checkpointing: auto`: the least recomputation whose memory fits the device.

Recomputation costs time (full checkpointing repeats every layer's forward, about 15% of a step;
selective repeats only element-wise ops), so `auto` takes the first of none, selective and full
whose planned peak (`shoal.plan.estimate.estimate_memory`: weights, gradients, optimizer state,
working copies, activations, logits, CUDA context and allocator slack) fits in `capacity` bytes
with `HEADROOM` to spare; when none does it takes full and says so. Training resolves it when it
builds the model, against the device's free memory; `shoal plan` against the `--gpu`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shoal.models import ModelConfig
from shoal.plan.counts import ParamCounts
from shoal.plan.estimate import Layout, Workload, estimate_memory
from shoal.plan.hardware import GIB, GpuKind

MODES = ("none", "selective", "full")  # least recomputation first
# Share of the capacity left free: the estimate's errors against measured peaks are within about
# 10% (docs/planning.md), and other processes may take some of the device during the run.
HEADROOM = 0.10


@dataclass(frozen=True)
class CheckpointingChoice:
    mode: str
    needs: dict[str, float]  # planned bytes of each mode tried, in order
    capacity: float

    @property
    def reason(self) -> str:
        usable = self.capacity * (1 - HEADROOM)
        tried = ", ".join(f"{m} {self.needs[m] / GIB:.1f} GiB" for m in self.needs)
        verdict = "fits" if self.needs[self.mode] <= usable else "does not fit either; it needs the least"
        return (f"activation_checkpointing auto -> {self.mode}: planned peaks {tried} against "
                f"{usable / GIB:.1f} GiB usable ({self.capacity / GIB:.1f} GiB free less {HEADROOM:.0%}); "
                f"{self.mode} {verdict}")


def choose_activation_checkpointing(cfg: ModelConfig, counts: ParamCounts, layout: Layout, work: Workload,
                                    capacity: float) -> CheckpointingChoice:
    """The first mode of MODES whose planned peak fits `capacity` × (1 − HEADROOM), else full."""
    gpu = GpuKind("this device", int(capacity), 0.0)
    usable = capacity * (1 - HEADROOM)
    needs: dict[str, float] = {}
    for mode in MODES:
        needs[mode] = estimate_memory(cfg, counts, replace(layout, activation_checkpointing=mode), work, gpu).total
        if needs[mode] <= usable:
            return CheckpointingChoice(mode, needs, capacity)
    return CheckpointingChoice("full", needs, capacity)
