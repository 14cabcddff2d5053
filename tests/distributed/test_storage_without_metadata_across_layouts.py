"""model/ without `.metadata` (format 3) across layouts: the safetensors headers that 2 FSDP2 ranks
wrote describe the same checkpoint DCP's `.metadata` did (global sizes, every rank's chunks,
dtypes, where each chunk's bytes lie), and with `.metadata` deleted the folder loads into one
process, into tensor parallel over 2 ranks, and a one-process save into 2 FSDP2 ranks, each equal
to the weights saved. Oracles: the `.metadata` DCP wrote for the same files, the saved weights,
and torch's `HuggingFaceStorageReader` reading the same folder without shoal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import build_layout, gathered_state, initial_state, model_config

SEED = 321


def save_from_fsdp2(root: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from shoal.checkpoint.model_state import save_model_state
    from shoal.checkpoint.storage import SafetensorsStorageWriter

    _, _, _, parts, _ = build_layout({"parallel": {}}, initial_state(model_config(), seed=SEED))
    folder = f"{root}/fsdp2"
    save_model_state(get_model_state_dict(parts[0]), folder, storage_writer=SafetensorsStorageWriter(folder))


def load_into_layouts(root: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from shoal.checkpoint.model_state import load_model_state

    out = {}
    for name, spec, source in [("tp2", {"parallel": {"tensor_model_parallel_size": 2}}, "fsdp2"),
                               ("fsdp2", {"parallel": {}}, "one")]:
        _, _, _, parts, _ = build_layout(spec, weights={})
        state = get_model_state_dict(parts[0])
        load_model_state(state, f"{root}/{source}")
        set_model_state_dict(parts[0], state, options=StateDictOptions(strict=False))
        out[name] = gathered_state(parts)
    return out


def stored(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries a save keeps: a tied lm_head.weight is stored once, as model.embed_tokens.weight."""
    embed = saved.get("model.embed_tokens.weight")
    return {k: v for k, v in saved.items()
            if not (k == "lm_head.weight" and embed is not None and torch.equal(v, embed))}


def test_headers_describe_a_sharded_save_and_it_loads_into_every_layout(tmp_path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from shoal.checkpoint.model_state import (
        SafeFileSystemReader,
        dcp_folder_complete,
        load_model_state,
        metadata_from_headers,
        save_model_state,
    )
    from shoal.checkpoint.storage import SafetensorsStorageWriter

    saved = initial_state(model_config(), seed=SEED)
    run_distributed(save_from_fsdp2, 2, str(tmp_path))
    fsdp2 = tmp_path / "fsdp2"
    assert list(fsdp2.glob("__1_*.safetensors"))  # rank 1 wrote its own files

    held = SafeFileSystemReader(str(fsdp2)).read_metadata()
    synthesized = metadata_from_headers(fsdp2)
    assert synthesized.state_dict_metadata.keys() == held.state_dict_metadata.keys()
    split = 0
    for name, md in held.state_dict_metadata.items():
        got = synthesized.state_dict_metadata[name]
        assert got.size == md.size and got.properties.dtype == md.properties.dtype, name
        assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in got.chunks) == \
            sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks), name
        split += len(md.chunks) > 1
    assert split >= len(held.state_dict_metadata) // 2  # FSDP2 did shard: most tensors are in 2 chunks
    assert synthesized.storage_data == held.storage_data

    (fsdp2 / ".metadata").unlink()
    assert dcp_folder_complete(fsdp2)
    expected = stored(saved)
    for read in ("shoal", "torch"):
        loaded = {k: torch.zeros_like(v) for k, v in expected.items()}
        if read == "shoal":
            load_model_state(loaded, fsdp2)
        else:
            dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(fsdp2)), no_dist=True)
        for name, value in expected.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=f"{read}: {name}")

    one = tmp_path / "one"
    save_model_state({k: v.clone() for k, v in saved.items()}, one, storage_writer=SafetensorsStorageWriter(one))
    (one / ".metadata").unlink()
    results = run_distributed(load_into_layouts, 2, str(tmp_path))
    for result in results:
        for layout in ("tp2", "fsdp2"):
            for name, value in saved.items():
                torch.testing.assert_close(result[layout][name], value, rtol=0, atol=0, msg=f"{layout}: {name}")
