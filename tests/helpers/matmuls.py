"""Counting the matmuls a piece of code runs, eagerly or in the graphs torch.compile traces."""

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


def recording_backend(graphs: list, partition_fn=None):
    """A torch.compile backend that runs what it is given as traced and appends each forward and
    backward graph AOTAutograd hands it to `graphs` (`partition_fn`: how forward and backward are
    split, e.g. inductor's min-cut, whose recomputation decisions a test may want to see)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    extra = {"partition_fn": partition_fn} if partition_fn is not None else {}
    return aot_autograd(fw_compiler=keep, bw_compiler=keep, **extra)


def compiled_matmuls(module: torch.nn.Module, run):
    """(`run()`'s result, matmuls in the graphs traced) with `module.forward` compiled whole
    (`fullgraph`: a graph break fails) by aot_autograd, forward and backward graphs both counted."""
    graphs: list[torch.fx.GraphModule] = []
    torch._dynamo.reset()
    forward = module.forward
    module.forward = torch.compile(forward, backend=recording_backend(graphs), fullgraph=True)
    try:
        result = run()
    finally:
        module.forward = forward
        torch._dynamo.reset()
    return result, sum(node.target in MATMULS for g in graphs for node in g.graph.nodes)
