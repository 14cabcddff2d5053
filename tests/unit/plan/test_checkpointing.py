"""`activation_checkpointing: auto` picks the least recomputation that fits, on a shape worked by hand.

The shape: llama_tiny (hidden h = 64, q = 4 heads × 16 = 64, kv = 2 × 16 = 32, intermediate I = 128,
2 layers, vocabulary 512, ~140k parameters), full training in fp32, compiled, one row of 2^20 tokens,
so the activations dwarf everything else. By hand, per token and layer, autograd keeps:
    none:      4h + 2q + 2kv + 3I = 256 + 128 + 64 + 384 = 832 elements
    selective: 3h + 2q + 2kv + 2I = 192 + 128 + 64 + 256 = 640 elements
    full:      h = 64 elements, plus one layer's 832 again while it is recomputed
At 4 bytes, 2 layers and 2^20 tokens: none 6.5 GiB, selective 5.0 GiB, full 0.5 + 3.25 GiB. Beside
them: one chunk of the loss (2^27 / 512 = 2^18 tokens × 512 logits × 12 B, three fp32 tensors = 1.5 GiB;
not at full's peak, which is in backward), the RoPE tables (0.125 GiB), 1.5 GiB of CUDA context and
5% allocator slack:
    none ≈ 6.5 + 0.125 + 1.5 + 1.5 + 5% ≈ 10.0 GiB, selective ≈ 8.45 GiB, full ≈ 3.25 + 0.125 + 1.5 + 5% ≈ 4.9 GiB.
Capacities are chosen between those figures, 10% of each kept free.
"""

from __future__ import annotations

import pytest
import torch

from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import build_mesh
from shoal.models import get_preset
from shoal.plan.checkpointing import choose_activation_checkpointing
from shoal.plan.counts import count_parameters
from shoal.plan.estimate import Layout, Workload
from shoal.plan.hardware import GIB

CFG = get_preset("llama_tiny")
WORK = Workload("finetune", seq_length=2**20, micro_batch_size=1, global_batch_size=1, precision="fp32", compile=True)


@pytest.mark.parametrize("capacity_gib,mode", [(20, "none"), (10.5, "selective"), (7, "full")])
def test_auto_takes_the_least_recomputation_that_fits(capacity_gib, mode):
    # usable = 0.9 × capacity: 18 fits none (10.0); 9.45 fits selective (8.45) but not none; 6.3 only full (4.9).
    choice = choose_activation_checkpointing(CFG, count_parameters(CFG), Layout(1), WORK, capacity_gib * GIB)
    assert choice.mode == mode
    assert f"auto -> {mode}" in choice.reason and "fits" in choice.reason
    assert list(choice.needs) == ["none", "selective", "full"][: ["none", "selective", "full"].index(mode) + 1]


def test_nothing_fits_takes_full_and_says_so():
    choice = choose_activation_checkpointing(CFG, count_parameters(CFG), Layout(1), WORK, 4 * GIB)
    assert choice.mode == "full" and "does not fit" in choice.reason
    # The figures the log gives are the hand-worked ones, to the estimate's rounding.
    assert choice.needs["none"] / GIB == pytest.approx(10.0, abs=0.2)
    assert choice.needs["selective"] / GIB == pytest.approx(8.45, abs=0.2)
    assert choice.needs["full"] / GIB == pytest.approx(4.9, abs=0.2)


def test_training_resolves_auto_against_the_free_memory_and_logs_it(monkeypatch, capsys):
    from shoal.distributed.parallelize import _checkpointed_forward
    from shoal.train import engine as engine_module

    monkeypatch.setattr(engine_module, "_free_memory", lambda device, dist: 7 * GIB)
    parallel = ParallelConfig(activation_checkpointing="auto")
    built = engine_module.build_engine(
        CFG, train=TrainSection(micro_batch_size=1, global_batch_size=1), parallel=parallel, peft=None,
        dims=build_mesh(parallel, 1, "cpu"), device=torch.device("cpu"), compute_dtype=torch.float32,
        seq_length=2**20,
    )
    assert "activation_checkpointing auto -> full" in capsys.readouterr().err
    layer = built.parts[0].model.layers["0"]
    forward = layer.forward.__func__  # a partial of the checkpointed forward, bound to the layer
    assert forward.func is _checkpointed_forward and forward.keywords["_shoal_context_fn"] is None  # full


def test_plan_resolves_auto_for_the_gpu():
    from shoal.plan.hardware import gpu_kind
    from shoal.plan.layouts import plan_layout

    cfg = get_preset("llama31_8b")
    work = Workload("finetune", seq_length=2048, micro_batch_size=1, global_batch_size=8, peft="lora", peft_rank=32)
    counts = count_parameters(cfg, "lora", 32, ("q_proj", "k_proj", "v_proj", "o_proj"))
    est = plan_layout(cfg, counts, ParallelConfig(activation_checkpointing="auto"), work, gpu_kind("h200"), 1)
    assert est.layout.activation_checkpointing == "none"  # 16 GiB of bf16 base, a few GiB of activations
    long = Workload("finetune", seq_length=65536, micro_batch_size=1, global_batch_size=8, peft="lora", peft_rank=32)
    est = plan_layout(cfg, counts, ParallelConfig(activation_checkpointing="auto"), long, gpu_kind("h100"), 1)
    assert est.layout.activation_checkpointing in ("selective", "full")


def _free_memory_seen(pages_by_rank: list[int]) -> float:
    """In each gloo rank: the free memory `auto` decides on, with this rank's RAM faked."""
    import os

    import torch.distributed as dist

    from shoal.train.engine import _free_memory

    pages = pages_by_rank[dist.get_rank()]
    real = os.sysconf
    os.sysconf = lambda name: pages if name == "SC_AVPHYS_PAGES" else real(name)
    try:
        return _free_memory(torch.device("cpu"), dist) / real("SC_PAGE_SIZE")
    finally:
        os.sysconf = real


def test_every_rank_decides_on_the_least_free_memory():
    from tests.helpers.distributed import run_distributed

    # Ranks that saw different free memory would checkpoint differently and stop matching.
    assert run_distributed(_free_memory_seen, 2, [5_000_000, 3_000_000]) == [3_000_000.0, 3_000_000.0]
