"""The base reference of an adapter-only checkpoint: found where recorded or where the user
points, refused with the base's path and what differs once it has moved or changed.

The changes are made the way a user makes them (mv, cp -r, a re-save of the same weights, a
truncated file); what must be kept or refused follows from the operation alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from shoal.checkpoint.base import base_reference, is_adapter_only, resolve_base
from shoal.checkpoint.format import MODEL_DIR, write_metadata
from shoal.checkpoint.model_state import save_model_state
from shoal.errors import ShoalError
from shoal.models import get_preset

WEIGHTS = {"model.norm.weight": torch.arange(8.0), "model.embed_tokens.weight": torch.ones(16, 8)}


def write_base(folder: Path) -> Path:
    save_model_state({k: v.clone() for k, v in WEIGHTS.items()}, folder / MODEL_DIR)
    write_metadata(folder, get_preset("llama_tiny"), "float32")
    return folder


def write_adapters(folder: Path, base: Path, given: str | None = None) -> Path:
    save_model_state({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8)}, folder / MODEL_DIR)
    write_metadata(folder, get_preset("llama_tiny"), "float32", base=base_reference(base, given))
    return folder


def test_found_where_recorded_and_a_whole_checkpoint_has_no_base(tmp_path):
    base = write_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base, given="base")
    assert resolve_base(ckpt) == base.resolve()
    assert is_adapter_only(ckpt) and not is_adapter_only(base)
    assert resolve_base(base) is None


def test_a_moved_base_is_refused_naming_it_and_the_flag_then_found_where_pointed(tmp_path):
    base = write_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    moved = tmp_path / "elsewhere" / "base"
    moved.parent.mkdir()
    base.rename(moved)
    with pytest.raises(ShoalError) as err:
        resolve_base(ckpt)
    message = str(err.value)
    assert str(base.resolve()) in message and "does not exist" in message
    assert "--base_checkpoint" in message and "--checkpoint.base" in message
    assert resolve_base(ckpt, moved) == moved  # mv keeps what the fingerprint covers

    copied = tmp_path / "copy"
    shutil.copytree(moved, copied, copy_function=shutil.copyfile)  # a plain copy: new file dates
    assert resolve_base(ckpt, copied) == copied


def test_the_same_weights_saved_again_are_another_base(tmp_path):
    base = write_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    shutil.rmtree(base)
    write_base(base)  # equal tensors, but a new save: nothing cheap can tell it is the same model
    with pytest.raises(ShoalError) as err:
        resolve_base(ckpt)
    assert str(base.resolve()) in str(err.value) and "model/.metadata differs" in str(err.value)


def test_a_truncated_base_file_is_named(tmp_path):
    base = write_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    (data,) = (base / MODEL_DIR).glob("*.distcp")
    size = data.stat().st_size
    with open(data, "r+b") as handle:
        handle.truncate(size - 4)
    with pytest.raises(ShoalError, match=rf"model/{data.name} is {size - 4} bytes, recorded {size} bytes"):
        resolve_base(ckpt)


def test_a_base_pointed_at_must_be_the_same_one(tmp_path):
    base = write_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    other = write_base(tmp_path / "other")
    with pytest.raises(ShoalError, match="has changed since the adapters were trained on it"):
        resolve_base(ckpt, other)
    with pytest.raises(ShoalError, match="is not a complete shoal checkpoint"):
        resolve_base(ckpt, tmp_path)


def test_a_bad_base_entry_names_the_key(tmp_path):
    base = write_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    write_metadata(ckpt, get_preset("llama_tiny"), "float32", base={"path": "x"})
    with pytest.raises(ShoalError, match=r"shoal.json: key 'base' must be"):
        resolve_base(ckpt)


# A base whose model/ has no `.metadata` (format 3, written without torch): the headers of its
# safetensors data files carry a random per-save `shoal_save_id`, and are what the fingerprint covers.


def write_headers_base(folder: Path, save_id: str | None = None) -> Path:
    """A base as a torch-free import leaves it: safetensors data files, each header with a save id."""
    import uuid

    from shoal.checkpoint.storage import SafetensorsStorageWriter

    model = folder / MODEL_DIR
    save_model_state({k: v.clone() for k, v in WEIGHTS.items()}, model, storage_writer=SafetensorsStorageWriter(model))
    (model / ".metadata").unlink()
    for data in sorted(model.glob("*.safetensors")):
        set_save_id(data, save_id or str(uuid.uuid4()))
    write_metadata(folder, get_preset("llama_tiny"), "float32")
    return folder


def set_save_id(data: Path, save_id: str) -> None:
    import json
    import struct

    raw = data.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"]["shoal_save_id"] = save_id
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def test_a_base_without_metadata_resolves_moved_and_copied(tmp_path):
    base = write_headers_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    assert resolve_base(ckpt) == base.resolve()
    recorded = base_reference(base)["fingerprint"]
    assert sorted(recorded["files"]) == sorted(p.name for p in (base / MODEL_DIR).glob("*.safetensors"))
    assert recorded["files"] == {p.name: p.stat().st_size for p in (base / MODEL_DIR).glob("*.safetensors")}
    copied = tmp_path / "copy"
    shutil.copytree(base, copied, copy_function=shutil.copyfile)
    assert resolve_base(ckpt, copied) == copied
    loaded = {k: torch.zeros_like(v) for k, v in WEIGHTS.items()}
    from shoal.checkpoint.model_state import load_model_state

    load_model_state(loaded, copied / MODEL_DIR)
    assert all(torch.equal(loaded[k], v) for k, v in WEIGHTS.items())


def test_a_new_save_id_in_a_header_is_another_base(tmp_path):
    import uuid

    base = write_headers_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    data = sorted((base / MODEL_DIR).glob("*.safetensors"))[-1]
    size = data.stat().st_size
    set_save_id(data, str(uuid.uuid4()))  # a re-import of the same weights: same bytes but the id
    assert data.stat().st_size == size
    with pytest.raises(ShoalError) as err:
        resolve_base(ckpt)
    assert str(base.resolve()) in str(err.value)
    assert "the safetensors headers in model/ differ" in str(err.value) and "bytes, recorded" not in str(err.value)


def test_a_changed_size_of_a_headers_base_file_is_named(tmp_path):
    base = write_headers_base(tmp_path / "base")
    ckpt = write_adapters(tmp_path / "ckpt", base)
    data = sorted((base / MODEL_DIR).glob("*.safetensors"))[0]
    size = data.stat().st_size
    with open(data, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(ShoalError, match=rf"model/{data.name} is {size + 8} bytes, recorded {size} bytes"):
        resolve_base(ckpt)
    with open(data, "r+b") as handle:
        handle.truncate(size - 4)
    with pytest.raises(ShoalError, match=rf"model/{data.name} is {size - 4} bytes, recorded {size} bytes"):
        resolve_base(ckpt)


def test_a_headers_base_and_its_metadata_twin_are_different_bases(tmp_path):
    """Deleting `.metadata` (or writing it) changes what is hashed: the fingerprint changes."""
    base = write_base(tmp_path / "base")
    from shoal.checkpoint.base import fingerprint

    before = fingerprint(base)
    (base / MODEL_DIR / ".metadata").unlink()
    for path in (base / MODEL_DIR).iterdir():
        path.unlink()
    with pytest.raises(ShoalError, match="no DCP .metadata file and no safetensors data files"):
        fingerprint(base)
    base2 = write_headers_base(tmp_path / "base2", save_id="same")
    base3 = write_headers_base(tmp_path / "base3", save_id="same")
    assert fingerprint(base2) == fingerprint(base3) != before  # the same headers and sizes
