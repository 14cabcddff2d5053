"""bench/common.py: each variant starts from an empty torch.compile cache.

Without that, the variants of one benchmark process share Dynamo's cache: a bf16 LoRA case followed by
an fp32 full fine-tune recompiled each decoder layer until the recompile limit and then ran eager,
so the later case was measured ~25% slow (the H200 run of 2026-12-02)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from common import measure_variant  # noqa: E402


def _double(x):
    return x * 2


def test_each_variant_compiles_afresh():
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    compiled = torch.compile(_double, backend=backend)

    def variant():
        compiled(torch.ones(3))
        return {"seconds_per_step": 1.0}

    first = measure_variant(variant, 1, 1.0, torch.device("cpu"))
    second = measure_variant(variant, 1, 1.0, torch.device("cpu"))
    assert "error" not in first and "error" not in second
    # The same function on the same input: a shared cache would compile it once for both variants.
    assert len(compiles) == 2
