"""GPU kinds `shoal plan --gpu` knows: usable memory and dense bf16 peak FLOP/s (no sparsity).

Memory is what `torch.cuda.get_device_properties(...).total_memory` reports on that kind (a little
under the marketing figure); peaks are the vendors' dense bf16 tensor-core numbers, the same ones
`shoal.train.metrics.PEAK_FLOPS` divides by, so planned and logged MFU mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ShoalError

GIB = 2**30


@dataclass(frozen=True)
class GpuKind:
    name: str
    memory_bytes: int
    peak_flops: float  # dense bf16 FLOP/s
    # Whether shoal's benchmarks ran on this kind (otherwise its MFU is assumed equal to the
    # nearest measured kind's, and the plan says so).
    measured: bool = False


GPUS: dict[str, GpuKind] = {
    "h100": GpuKind("H100 80GB", int(79.19 * GIB), 989e12, measured=True),
    "h200": GpuKind("H200 141GB", int(139.8 * GIB), 989e12, measured=True),
    "a100": GpuKind("A100 80GB", int(79.15 * GIB), 312e12),
    "a100-40gb": GpuKind("A100 40GB", int(39.39 * GIB), 312e12),
    "l40s": GpuKind("L40S 48GB", int(44.39 * GIB), 362e12),
    "b200": GpuKind("B200 180GB", int(178.4 * GIB), 2250e12),
}


def gpu_kind(name: str) -> GpuKind:
    key = name.lower().replace("_", "-")
    if key not in GPUS:
        raise ShoalError(f"--gpu {name!r}: unknown GPU kind; known: {', '.join(GPUS)}")
    return GPUS[key]
