"""Counting the matmuls a piece of code runs: what fusing projections into one matmul changes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class CountMatmuls(TorchDispatchMode):
    """Within `with CountMatmuls() as c:`, `c.count` is the number of aten mm/addmm calls dispatched."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


def compiled_matmuls(module: torch.nn.Module, run):
    """(`run()`'s result, matmuls in the graphs traced) with `module.forward` compiled whole
    (`fullgraph`: a graph break fails) by aot_autograd, forward and backward graphs both counted."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    count = 0

    def compiler(gm: torch.fx.GraphModule, example_inputs):
        nonlocal count
        count += sum(node.target in MATMULS for node in gm.graph.nodes)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    forward = module.forward
    module.forward = torch.compile(forward, backend=aot_autograd(fw_compiler=compiler, bw_compiler=compiler),
                                   fullgraph=True)
    try:
        result = run()
    finally:
        module.forward = forward
        torch._dynamo.reset()
    return result, count
