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
