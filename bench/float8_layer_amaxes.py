"""The FP8 scales (|t|.max()) one compiled Llama-3.2-3B decoder layer computes, forward and backward,
with q/k/v and gate/up judged as groups (shoal.distributed.float8.SHARED_INPUT_GROUPS) and with each
layer judged alone (torchao's auto filter). CPU only: torchao's emulation, traced as torch.compile
traces it (AOTAutograd with inductor's partitioner), at 32 tokens; each amax is listed with the
shape it reads, so one sees which casts converting k/v adds.

    PYTHONPATH=. python bench/float8_layer_amaxes.py   (torchao installed)
"""

from __future__ import annotations

import collections
import dataclasses
from unittest import mock

import torch
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

from shoal.distributed import float8 as f8
from shoal.models import get_preset
from shoal.models.model import Transformer


def amaxes(groups: tuple) -> tuple[int, collections.Counter]:
    """(layers converted, Counter of (graph, shape read) over the layer's amax computations)."""
    cfg = dataclasses.replace(get_preset("llama32_3b"), num_layers=1, vocab_size=256)
    torch.manual_seed(0)
    model = Transformer(cfg)
    emulated = lambda plan, real=f8.float8_config: dataclasses.replace(real(plan), emulate=True)  # noqa: E731
    with mock.patch.object(f8, "SHARED_INPUT_GROUPS", groups), mock.patch.object(f8, "float8_config", emulated):
        conversion = f8.apply_float8(model, f8.float8_plan("hybrid", "tensorwise"), compiled=True)
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    layer = torch.compile(model.model.layers["0"], backend=backend)
    x = torch.randn(1, 32, cfg.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(32)[None], x.dtype)
    layer(x, cos, sin, None).pow(2).sum().backward()
    found = collections.Counter(
        ("forward" if i == 0 else "backward", tuple(node.args[0].meta["val"].shape))
        for i, g in enumerate(graphs) for node in g.graph.nodes if node.target is torch.ops.aten.abs.default)
    return len(conversion.converted), found


def main() -> None:
    grouped, alone = amaxes(f8.SHARED_INPUT_GROUPS), amaxes(())
    for name, (converted, found) in (("grouped", grouped), ("each alone", alone)):
        print(f"{name}: {converted} linears in FP8, {sum(found.values())} amaxes: {dict(sorted(found.items()))}")
    print(f"added by grouping: {dict(grouped[1] - alone[1])}; removed: {dict(alone[1] - grouped[1])}")


if __name__ == "__main__":
    main()
