"""LoRA/DoRA under FSDP2 (`fully_shard`): two gloo processes on CPU must train the adapters exactly
as one process does on the same global batch, and gather the same adapter state."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from shoal.models.model import build_model
from shoal.models.presets import get_preset
from shoal.peft import adapter_state_dict, apply_lora

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_batch(dora: bool):
    torch.manual_seed(0)
    model = apply_lora(build_model(get_preset("qwen2_tiny")), rank=4, alpha=8, use_dora=dora)
    with torch.no_grad():  # non-trivial adapters, identical on every rank
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape) * 0.1)
    batch = torch.randint(0, 512, (2 * WORLD, 9))
    return model, batch[:, :-1], batch[:, 1:]


def _train(model, inputs, targets, steps: int = 2) -> list[float]:
    # Plain SGD: its update is proportional to the gradient, so a wrongly reduced gradient shows
    # (Adam's first step is nearly sign-only and would hide it).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _worker(rank: int, port: int, dora: bool, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        from shoal.models import fused_linear

        # Count the fused matmuls: FSDP2 hands the layers plain unsharded weights, so LoRA (not
        # DoRA) runs q/k/v and gate/up fused, and must still match one process.
        fused_linear.FUSED_PROJECTIONS = True  # FSDP's weights are not packed: fused only with the switch
        fused_calls = [0]
        apply = fused_linear._ConcatenatedLinear.apply

        def counted(*args):
            fused_calls[0] += 1
            return apply(*args)

        fused_linear._ConcatenatedLinear.apply = counted
        model, inputs, targets = _model_and_batch(dora)
        base_before = {n: p.detach().clone() for n, p in model.state_dict().items() if "lora_" not in n}
        for layer in model.model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        share = inputs.shape[0] // WORLD
        mine = slice(rank * share, (rank + 1) * share)
        losses = _train(model, inputs[mine], targets[mine])
        for loss in losses:  # the global loss is the mean of the ranks' losses (equal token counts)
            dist.all_reduce(loss)
        adapters = adapter_state_dict(model)  # collective: every rank gathers
        base_after = {n: p.full_tensor() for n, p in model.state_dict().items() if "lora_" not in n}
        if rank == 0:
            torch.save({"losses": [loss / WORLD for loss in losses], "adapters": adapters, "fused_calls": fused_calls[0],
                        "base_unchanged": all(torch.equal(base_after[n], v) for n, v in base_before.items())}, out)
        # Leave together: a rank tearing gloo down while its peer still talks to it aborts the peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fsdp2_matches_one_process(tmp_path, dora):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(_free_port(), dora, out), nprocs=WORLD, join=True)
    sharded = torch.load(out, weights_only=True)

    torch.set_num_threads(1)
    model, inputs, targets = _model_and_batch(dora)
    base_before = copy.deepcopy({n: p for n, p in model.state_dict().items() if "lora_" not in n})
    losses = _train(model, inputs, targets)
    reference = adapter_state_dict(model)

    assert sharded["base_unchanged"]
    # LoRA: 2 layers x 2 steps x (q/k/v base and A, gate/up base and A); DoRA never fuses.
    assert sharded["fused_calls"] == (0 if dora else 2 * 2 * 4)
    assert all(torch.equal(p, base_before[n]) for n, p in model.state_dict().items() if "lora_" not in n)
    torch.testing.assert_close(torch.stack(sharded["losses"]), torch.stack(losses), atol=1e-5, rtol=1e-5)
    assert sharded["adapters"].keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(sharded["adapters"][name], value, atol=1e-5, rtol=1e-4)
