"""parallel.cuda_graphs is refused, before anything is built, where a recorded graph could not replay.

What the graphs compute is checked on a GPU against the same engine without them
(tests/gpu/test_cuda_graphs_gpu.py); here only the refusals, which need no GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shoal.config.parallel import ParallelConfig
from shoal.distributed import build_mesh
from shoal.errors import ShoalError
from shoal.train.engine import check_cuda_graphs


def test_cuda_graphs_need_a_cuda_device():
    parallel = ParallelConfig(compile=True, cuda_graphs=True)
    with pytest.raises(ShoalError, match="needs a CUDA GPU; this run is on cpu"):
        check_cuda_graphs(parallel, build_mesh(parallel, 1, "cpu"), torch.device("cpu"))


def test_cuda_graphs_need_compile():
    parallel = ParallelConfig(compile=False, cuda_graphs=True)
    with pytest.raises(ShoalError, match="set parallel.compile=true"):
        check_cuda_graphs(parallel, build_mesh(parallel, 1, "cpu"), torch.device("cuda"))


def test_cuda_graphs_need_one_process():
    parallel = ParallelConfig(compile=True, cuda_graphs=True)
    with pytest.raises(ShoalError, match="one GPU only; this run has 2 processes"):
        # Only the layout's size is read: a stand-in for a 2-process mesh (which needs torchrun).
        check_cuda_graphs(parallel, SimpleNamespace(world_size=2), torch.device("cuda"))


def test_cuda_graphs_pass_on_one_gpu():
    parallel = ParallelConfig(compile=True, cuda_graphs=True)
    check_cuda_graphs(parallel, build_mesh(parallel, 1, "cpu"), torch.device("cuda"))


def _engine_and_batches():
    from shoal.config.recipe import TrainSection
    from shoal.models import get_preset
    from shoal.peft.config import LoraConfig
    from shoal.train.engine import build_engine

    parallel = ParallelConfig()
    engine = build_engine(get_preset("llama_tiny"), train=TrainSection(micro_batch_size=2, global_batch_size=4),
                          parallel=parallel, peft=LoraConfig(rank=4, alpha=8.0), dims=build_mesh(parallel, 1, "cpu"),
                          device=torch.device("cpu"), compute_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, 512, (2, 33), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32),
                        "position_ids": torch.arange(32).expand(2, 32)})
    return engine, batches


def test_graph_mode_keeps_gradients_and_trains_as_the_plain_step():
    """What graph mode changes outside the graphs (each trainable parameter keeps a zeroed gradient
    between steps instead of none, so micro-batches add into it) must train exactly as the plain
    step: gradient accumulation over two micro-batches, three steps, the same losses and weights.
    The graphs themselves need a GPU (tests/gpu/test_cuda_graphs_gpu.py); on the CPU the mode runs
    the same compiled-or-eager code with its bookkeeping."""
    results = []
    for graphs in (False, True):
        engine, batches = _engine_and_batches()
        engine.cuda_graphs = graphs  # the engine as build_engine makes it on a GPU, its refusal aside
        losses = []
        for _ in range(3):
            losses.append(engine.forward_backward(batches, 128.0))
            engine.clip_and_step(1.0, 1e-2)
            grads = [p.grad for p in engine.parameters()]
            # plain: freed after the step; graphs: kept, zeroed in place
            assert all(g is None for g in grads) if not graphs else all(g is not None and not g.any() for g in grads)
        results.append((torch.stack(losses), [p.detach().clone() for p in engine.parameters()]))
    (plain_losses, plain_params), (graph_losses, graph_params) = results
    assert not torch.equal(plain_losses[0], plain_losses[-1])  # it trained
    torch.testing.assert_close(graph_losses, plain_losses, rtol=0, atol=0)
    for got, want in zip(graph_params, plain_params, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
