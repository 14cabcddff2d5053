"""Clipping plain (one-process) gradients: the same gradients as torch's own clip_grad_norm_, with
no host sync (nothing is read back to Python, so the next step's kernels can queue behind it)."""

from __future__ import annotations

import pytest
import torch

from shoal.distributed.grad_norm import clip_grad_norm_


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(7, 3), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])  # clipping, within the limit, clipping off
def test_clipping_matches_torch_without_reading_back(max_norm, monkeypatch):
    ours, theirs = _params(0), _params(0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm) if max_norm > 0 else None

    def no_sync(self):
        raise AssertionError("a host sync (Tensor.item) in clip_grad_norm_")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    norm = clip_grad_norm_(ours, max_norm)
    monkeypatch.undo()
    if expected is not None:
        torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-6)


def _no_item(self):
    raise AssertionError("a host sync (Tensor.item) in clip_grad_norm_")


def clip_dtensor_gradients(max_norm: float) -> dict:
    """On 2 gloo ranks: the `_params` gradients as DTensors (sharded, and one replicated), clipped
    with Tensor.item raising; returns the norm and the whole clipped gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    params = []
    for i, p in enumerate(_params(0)):
        placements = [Replicate()] if i == 1 else [Shard(0)]
        param = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, placements))
        param.grad = distribute_tensor(p.grad, mesh, placements)
        params.append(param)
    item, torch.Tensor.item = torch.Tensor.item, _no_item
    try:
        norm = clip_grad_norm_(params, max_norm)
    finally:
        torch.Tensor.item = item
    return {"norm": norm, "grads": [p.grad.full_tensor() for p in params]}


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, within the limit
def test_dtensor_clipping_matches_torch_without_reading_back(max_norm):
    from tests.helpers.distributed import run_distributed

    theirs = _params(0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    for result in run_distributed(clip_dtensor_gradients, 2, max_norm):
        torch.testing.assert_close(result["norm"], expected)
        for ours, b in zip(result["grads"], theirs):
            torch.testing.assert_close(ours, b.grad, atol=1e-7, rtol=1e-6)
