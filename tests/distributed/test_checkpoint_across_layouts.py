"""A DCP checkpoint saved on one layout loads into any other, and into one process, unchanged.

The weights are written with `get_model_state_dict` keys (Hugging Face names on every layout) by
FSDP2 over 2 ranks, read by tensor parallel over 2 ranks, written again, read by a 2-stage
pipeline, written again, and finally read here by a plain model in one process without any
process group. Every hop must reproduce the saved values exactly: DCP copies bytes, it does not
compute.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from shoal.models.model import Transformer
from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import dcp_across_layouts, initial_state, model_config


def test_checkpoint_moves_between_layouts_and_to_one_process(tmp_path) -> None:
    cfg = model_config()
    saved = initial_state(cfg, seed=123)
    results = run_distributed(dcp_across_layouts, 2, str(tmp_path))

    for layout in ("tp2", "pp2"):
        loaded: dict[str, torch.Tensor] = {}
        for result in results:
            loaded.update(result[layout])
        assert sorted(loaded) == sorted(saved), layout
        for name, value in saved.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=f"{layout}: {name}")

    # One process, no process group: DCP reads the pipeline's checkpoint into a plain model.
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(tmp_path / "pp2"))
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
