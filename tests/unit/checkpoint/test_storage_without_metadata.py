"""model/ (and optim/) without DCP's `.metadata` (format 3): the safetensors headers describe it.

Fixtures are made two ways: a save through `SafetensorsStorageWriter` with `.metadata` deleted
afterwards (what a torch-free import writes), and files written by the `safetensors` library
itself (a plain Hugging Face folder, no DCP_SHARDING_INFO; hand-cut chunks with it). Oracles: the
tensors that were saved; the `Metadata` DCP's own `.metadata` held for the same files; torch's
`HuggingFaceStorageReader`, which reads such a folder without shoal. Every refusal is made by
editing a header the way a broken or mixed-up folder would be, and must name the file and tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shoal.checkpoint.catalog import is_complete, list_checkpoints, resolve_checkpoint
from shoal.checkpoint.format import MODEL_DIR, OPTIM_DIR, write_metadata
from shoal.checkpoint.model_state import (
    SafeFileSystemReader,
    dcp_folder_complete,
    load_model_state,
    metadata_from_headers,
    model_state_info,
)
from shoal.checkpoint.storage import CheckpointStorageReader
from shoal.convert.streaming import DCPWeightReader, stored_bytes
from shoal.errors import ShoalError
from shoal.models import get_preset
from tests.unit.checkpoint.test_storage import sample_state, save


def save_without_metadata(state: dict[str, torch.Tensor], folder: Path, threads: int = 2):
    """Save as training does, then drop `.metadata`; returns the Metadata it held."""
    save(state, folder, threads)
    held = SafeFileSystemReader(str(folder)).read_metadata()
    (folder / ".metadata").unlink()
    return held


def hf_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=g),
        "model.norm.weight": torch.randn(16, generator=g).to(torch.float16),
    }


def write_hf_folder(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Two shards as Hugging Face writes them (the `safetensors` library, `{"format": "pt"}` only)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    save_file({k: state[k] for k in names[:2]}, str(folder / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({k: state[k] for k in names[2:]}, str(folder / "model-00002-of-00002.safetensors"), {"format": "pt"})


def write_chunks(path: Path, chunks: dict[str, tuple[torch.Tensor, list[int]]], extra: dict | None = None) -> None:
    """One DCP-style data file by the `safetensors` library: {name: (chunk, saved_offsets)}."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sharding = {name: {"saved_offsets": offsets} for name, (_, offsets) in chunks.items()}
    meta = {"format": "pt", "DCP_VERSION": "1.0", "DCP_SHARDING_INFO": json.dumps(sharding), **(extra or {})}
    save_file({name: t.contiguous() for name, (t, _) in chunks.items()}, str(path), meta)


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header JSON through `edit(header)`; the data bytes stay."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def sorted_chunks(md) -> list:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)


def assert_same_metadata(synthesized, held) -> None:
    assert synthesized.state_dict_metadata.keys() == held.state_dict_metadata.keys()
    for name, md in held.state_dict_metadata.items():
        got = synthesized.state_dict_metadata[name]
        assert got.size == md.size, name
        assert got.properties.dtype == md.properties.dtype, name
        assert sorted_chunks(got) == sorted_chunks(md), name
    assert synthesized.storage_data == held.storage_data


@pytest.mark.parametrize("threads", [1, 3])
def test_the_headers_give_the_metadata_dcp_held_and_the_saved_tensors(tmp_path, threads) -> None:
    state = sample_state()
    held = save_without_metadata(state, tmp_path / "model", threads)
    folder = tmp_path / "model"
    assert_same_metadata(metadata_from_headers(folder), held)
    read = CheckpointStorageReader(folder).read_metadata()
    assert_same_metadata(read, held)
    assert read.storage_meta is not None and read.storage_meta.load_id is not None

    loaded = {k: torch.full_like(v, 3) if v.numel() else torch.empty_like(v) for k, v in state.items()}
    load_model_state(loaded, folder)
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert {k: (v.shape, v.dtype) for k, v in model_state_info(folder).items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    assert dcp_folder_complete(folder)


def test_torch_hugging_face_reader_loads_the_same_folder_to_the_same_values(tmp_path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = {k: v for k, v in sample_state().items() if k != "empty"}  # torch's reader cannot place an empty one
    save_without_metadata(state, tmp_path / "model")
    by_torch = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(by_torch, storage_reader=HuggingFaceStorageReader(str(tmp_path / "model")), no_dist=True)
    by_shoal = {k: torch.zeros_like(v) for k, v in state.items()}
    load_model_state(by_shoal, tmp_path / "model")
    for name in state:
        assert torch.equal(by_shoal[name], by_torch[name]) and torch.equal(by_shoal[name], state[name]), name


def test_a_plain_hugging_face_folder_loads_each_tensor_whole(tmp_path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = hf_state()
    write_hf_folder(tmp_path / "model", state)
    metadata = metadata_from_headers(tmp_path / "model")
    for name, value in state.items():
        md = metadata.state_dict_metadata[name]
        assert tuple(md.size) == tuple(value.shape) and md.properties.dtype == value.dtype
        assert sorted_chunks(md) == [((0,) * value.dim(), tuple(value.shape))]
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    load_model_state(loaded, tmp_path / "model")
    by_torch = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(by_torch, storage_reader=HuggingFaceStorageReader(str(tmp_path / "model")), no_dist=True)
    for name, value in state.items():
        assert torch.equal(loaded[name], value) and torch.equal(by_torch[name], value), name
    # Every tensor is one whole raw chunk: an export may copy its bytes; they are the tensor's.
    found = stored_bytes(tmp_path / "model")
    assert sorted(found) == sorted(state)
    for name, (file, offset, length) in found.items():
        with open(file, "rb") as handle:
            handle.seek(offset)
            data = bytearray(handle.read(length))
        assert torch.equal(torch.frombuffer(data, dtype=state[name].dtype).reshape(state[name].shape), state[name])
    assert DCPWeightReader(tmp_path / "model").load(sorted(state))["model.norm.weight"].equal(state["model.norm.weight"])


def test_chunks_cut_in_rows_and_columns_tile_the_tensor(tmp_path) -> None:
    """A tensor in a 2x2 grid of chunks over two files (tensor parallel over FSDP), one in rows."""
    w = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    v = torch.arange(10, dtype=torch.int64)
    write_chunks(tmp_path / "model" / "__0_0.safetensors", {"w": (w[:4, :3], [0, 0]), "v": (v[:7], [0])})
    write_chunks(tmp_path / "model" / "__0_1.safetensors", {"w": (w[:4, 3:], [0, 3])})
    write_chunks(tmp_path / "model" / "__1_0.safetensors", {"w": (w[4:, :3], [4, 0]), "v": (v[7:], [7])})
    write_chunks(tmp_path / "model" / "__1_1.safetensors", {"w": (w[4:, 3:], [4, 3])})
    metadata = metadata_from_headers(tmp_path / "model")
    assert tuple(metadata.state_dict_metadata["w"].size) == (6, 8)
    assert sorted_chunks(metadata.state_dict_metadata["w"]) == [((0, 0), (4, 3)), ((0, 3), (4, 5)),
                                                                ((4, 0), (2, 3)), ((4, 3), (2, 5))]
    loaded = {"w": torch.zeros(6, 8), "v": torch.zeros(10, dtype=torch.int64)}
    load_model_state(loaded, tmp_path / "model")
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["v"], v)
    assert dcp_folder_complete(tmp_path / "model")


def refusal(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    w = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    write_chunks(folder / "__0_0.safetensors", {"w": (w[:3], [0, 0])})
    write_chunks(folder / "__1_0.safetensors", {"w": (w[3:], [3, 0])})
    return folder


@pytest.mark.parametrize("case, message", [
    ("two dtypes", r"tensor 'w' is float32 in __0_0.safetensors but bfloat16 in __1_0.safetensors"),
    ("overlap", r"tensor 'w' has overlapping chunks at offsets \[0, 0\] \(__0_0.safetensors\) and \[2, 0\] \(__1_0"),
    ("duplicate", r"tensor 'w' has the same chunk at offsets \[0, 0\] \(__0_0.safetensors\) and \[0, 0\] \(__1_0"),
    ("gap", r"tensor 'w' of shape \[7, 4\] has 28 elements, but its chunks in __0_0.safetensors, "
            r"__1_0.safetensors hold 24: they do not tile it"),
    ("not json", r"__1_0.safetensors: corrupt safetensors header \(not valid JSON\)"),
    ("bad offsets", r"__1_0.safetensors: tensor 'w': DCP_SHARDING_INFO gives saved_offsets \[3\], not 2"),
    ("bad sharding", r"__1_0.safetensors: corrupt safetensors header \(DCP_SHARDING_INFO is not a JSON object\)"),
    ("truncated", r"__1_0.safetensors: truncated safetensors file: tensor 'w'"),
    ("no files", r"no DCP .metadata file \(incomplete or not a DCP checkpoint\)"),
])
def test_a_folder_that_does_not_describe_its_tensors_is_refused_naming_file_and_tensor(tmp_path, case, message):
    folder = refusal(tmp_path)
    second = folder / "__1_0.safetensors"
    w = torch.arange(24, dtype=torch.float32).reshape(6, 4)

    def sharding(offsets):
        return lambda h: h["__metadata__"].update(DCP_SHARDING_INFO=json.dumps({"w": {"saved_offsets": offsets}}))

    if case == "two dtypes":
        write_chunks(second, {"w": (w[3:].to(torch.bfloat16), [3, 0])})
    elif case == "overlap":
        rewrite_header(second, sharding([2, 0]))
    elif case == "duplicate":
        rewrite_header(second, sharding([0, 0]))
    elif case == "gap":
        rewrite_header(second, sharding([4, 0]))
    elif case == "not json":
        raw = bytearray(second.read_bytes())
        raw[8] = ord("[") + 1  # the header's first byte no longer opens a JSON object
        second.write_bytes(bytes(raw))
    elif case == "bad offsets":
        rewrite_header(second, sharding([3]))
    elif case == "bad sharding":
        rewrite_header(second, lambda h: h["__metadata__"].update(DCP_SHARDING_INFO="[1, 2"))
    elif case == "truncated":
        second.write_bytes(second.read_bytes()[:-4])
    elif case == "no files":
        for path in folder.iterdir():
            path.unlink()
    with pytest.raises(ShoalError, match=message):
        metadata_from_headers(folder)
    with pytest.raises(ShoalError, match=message):  # what every reader goes through
        load_model_state({"w": torch.zeros(6, 4)}, folder)
    assert not dcp_folder_complete(folder)


def test_the_refusal_fixture_itself_loads(tmp_path) -> None:
    loaded = {"w": torch.zeros(6, 4)}
    load_model_state(loaded, refusal(tmp_path))
    assert torch.equal(loaded["w"], torch.arange(24, dtype=torch.float32).reshape(6, 4))


def checkpoint(folder: Path, optim: bool = False) -> Path:
    save_without_metadata(hf_state(), folder / MODEL_DIR)
    if optim:
        save_without_metadata({"state.model.norm.weight.exp_avg": torch.ones(16)}, folder / OPTIM_DIR)
    write_metadata(folder, get_preset("llama_tiny"), "bfloat16")
    return folder


def test_completeness_of_a_folder_without_metadata(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    good = checkpoint(root / "step=000010-last", optim=True)
    assert is_complete(good) and resolve_checkpoint(good) == good

    truncated = checkpoint(root / "step=000020-last")
    data = sorted((truncated / MODEL_DIR).glob("*.safetensors"))[-1]
    data.write_bytes(data.read_bytes()[:-1])  # one byte short of its header's last tensor
    assert not is_complete(truncated)
    with pytest.raises(ShoalError, match="is incomplete"):
        resolve_checkpoint(truncated)

    # A tensor's chunks over several files: a lost file leaves a tensor that is not tiled.
    split = checkpoint(root / "step=000040-last")
    for path in (split / MODEL_DIR).iterdir():
        path.unlink()
    write_chunks(split / MODEL_DIR / "__0_0.safetensors", {"w": (torch.ones(3, 4), [0, 0])})
    write_chunks(split / MODEL_DIR / "__1_0.safetensors", {"w": (torch.ones(3, 4), [3, 0])})
    assert is_complete(split)
    (split / MODEL_DIR / "__0_0.safetensors").unlink()  # rank 0's file lost: rows 0-2 of w are missing
    assert not is_complete(split)

    # The limit of the rule: without `.metadata` nothing lists the files, so a whole file lost from
    # a folder whose files each hold whole tensors leaves a smaller folder that is still complete
    # (loading it then names the tensors it lacks).
    lost = checkpoint(root / "step=000030-last")
    sorted((lost / MODEL_DIR).glob("*.safetensors"))[0].unlink()
    assert is_complete(lost)
    with pytest.raises(ShoalError, match=r"checkpoint lacks \d tensor"):
        load_model_state({k: torch.zeros_like(v) for k, v in hf_state().items()}, lost / MODEL_DIR)

    optim_cut = checkpoint(root / "step=000050-last", optim=True)
    data = next((optim_cut / OPTIM_DIR).glob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:-1])
    assert not is_complete(optim_cut)

    empty = checkpoint(root / "step=000060-last")
    for path in (empty / MODEL_DIR).iterdir():
        path.unlink()
    assert not is_complete(empty)

    assert [c.step for c in list_checkpoints(root)] == [10, 30]


def test_a_folder_with_metadata_reads_it_not_the_headers(tmp_path) -> None:
    """`.metadata` present: it is what is read (format 1 and 2), even when a header says otherwise."""
    save(sample_state(), tmp_path / "model")
    held = SafeFileSystemReader(str(tmp_path / "model")).read_metadata()
    first = sorted((tmp_path / "model").glob("*.safetensors"))[0]
    rewrite_header(first, lambda h: h["__metadata__"].update(DCP_SHARDING_INFO="not json"))
    assert_same_metadata(SafeFileSystemReader(str(tmp_path / "model")).read_metadata(), held)
