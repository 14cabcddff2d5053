"""shoal's safetensors DCP storage across layouts: written by every rank of FSDP2 (each its own
shards, in its own files), read into tensor parallel over 2 ranks, written again, then read in
one process by shoal's reader and by torch's `HuggingFaceStorageReader` (no shoal). Every hop must
reproduce the saved values exactly: storage copies bytes, it does not compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import build_layout, gathered_state, initial_state, model_config


def storage_across_layouts(root: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from shoal.checkpoint.storage import CheckpointStorageReader, SafetensorsStorageWriter

    weights = initial_state(model_config(), seed=321)
    _, _, _, parts, _ = build_layout({"parallel": {}}, weights)
    dcp.save(get_model_state_dict(parts[0]), storage_writer=SafetensorsStorageWriter(f"{root}/fsdp2"))
    _, _, _, parts, _ = build_layout({"parallel": {"tensor_model_parallel_size": 2}}, weights={})
    state = get_model_state_dict(parts[0])
    dcp.load(state, storage_reader=CheckpointStorageReader(f"{root}/fsdp2"))
    set_model_state_dict(parts[0], state, options=StateDictOptions(strict=False))
    dcp.save(state, storage_writer=SafetensorsStorageWriter(f"{root}/tp2"))
    return {"tp2": gathered_state(parts)}


def test_storage_moves_between_layouts_and_to_one_process(tmp_path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from shoal.checkpoint.model_state import load_model_state

    saved = initial_state(model_config(), seed=321)
    results = run_distributed(storage_across_layouts, 2, str(tmp_path))
    assert len(list(Path(tmp_path / "fsdp2").glob("__1_*.safetensors"))) >= 1  # rank 1 wrote its own files
    for result in results:
        for name, value in saved.items():
            torch.testing.assert_close(result["tp2"][name], value, rtol=0, atol=0, msg=f"tp2: {name}")

    stored = {k: v for k, v in saved.items() if k != "lm_head.weight" or not torch.equal(v, saved.get(
        "model.embed_tokens.weight", torch.empty(0)))}
    for read in ("shoal", "torch"):
        loaded = {k: torch.zeros_like(v) for k, v in stored.items()}
        if read == "shoal":
            load_model_state(loaded, tmp_path / "tp2")
        else:
            dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(tmp_path / "tp2")), no_dist=True)
        for name, value in stored.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=f"{read}: {name}")
