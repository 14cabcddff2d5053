"""shoal's DCP storage (safetensors data files, several writer threads) against independent readers.

Oracles: the `safetensors` library and torch's own `HuggingFaceStorageReader` read what the writer
wrote (the format spec, not shoal's reader); tensors saved by torch's `FileSystemWriter` (the
writer every shoal checkpoint of format 1 was made with) load through shoal's reader unchanged;
a failure injected into each writer thread in turn must surface as that very error, with every
thread stopped and nothing left on disk.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from shoal.checkpoint.model_state import load_model_state, model_state_info, save_model_state
from shoal.checkpoint.storage import CheckpointStorageReader, SafetensorsStorageWriter


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "model.embed_tokens.weight": torch.randn(64, 24, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(40, 24, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(24, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(24, generator=g).to(torch.bfloat16),
        "step": torch.tensor(12, dtype=torch.int64),  # 0-dim, as optimizer step counts are
        "empty": torch.empty(0, 24),
        "noncontiguous": torch.randn(24, 8, generator=g).t(),
    }


def save(state: dict[str, torch.Tensor], folder: Path, threads: int = 2, planner=None) -> None:
    save_model_state(state, folder, planner=planner, storage_writer=SafetensorsStorageWriter(folder, threads))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_round_trip_and_the_safetensors_library_reads_the_files(tmp_path, threads) -> None:
    from safetensors import safe_open

    state = sample_state()
    save(state, tmp_path / "model", threads)
    files = sorted((tmp_path / "model").glob("*.safetensors"))
    assert 1 <= len(files) <= threads
    seen = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                seen[key] = f.get_tensor(key)
    assert sorted(seen) == sorted(state)
    for name, value in state.items():
        assert seen[name].dtype == value.dtype and torch.equal(seen[name], value), name

    loaded = {k: torch.full_like(v, 3) if v.numel() else torch.empty_like(v) for k, v in state.items()}
    load_model_state(loaded, tmp_path / "model")
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    assert {k: (v.shape, v.dtype) for k, v in model_state_info(tmp_path / "model").items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def test_torch_hugging_face_reader_loads_it_without_shoal(tmp_path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = {k: v for k, v in sample_state().items() if k != "empty"}
    save(state, tmp_path / "model")
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(tmp_path / "model")), no_dist=True)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_part_of_a_chunk_is_read_into_a_smaller_destination(tmp_path) -> None:
    """A sharded load asks for a slice of a stored chunk: rows (dim 0) or columns (dim 1)."""
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    weight = torch.arange(40 * 24, dtype=torch.float32).reshape(40, 24)
    save({"w": weight}, tmp_path / "model")
    reader = CheckpointStorageReader(tmp_path / "model")
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    index = next(iter(metadata.storage_data))

    class Planner:
        def __init__(self, target):
            self.target = target

        def resolve_tensor(self, req):
            return self.target

        def commit_tensor(self, req, tensor):
            pass

    for offsets, lengths, expected in [((8, 0), (10, 24), weight[8:18]), ((0, 5), (40, 7), weight[:, 5:12]),
                                       ((3, 2), (4, 9), weight[3:7, 2:11])]:
        target = torch.zeros(lengths)
        req = ReadItem(type=LoadItemType.TENSOR, dest_index=index, dest_offsets=torch.Size((0, 0)),
                       storage_index=index, storage_offsets=torch.Size(offsets), lengths=torch.Size(lengths))
        reader._read_raw([req], Planner(target))
        assert torch.equal(target, expected), (offsets, lengths)


def test_a_checkpoint_of_todays_writer_still_loads(tmp_path) -> None:
    """model/ as every shoal before this storage wrote it: torch's FileSystemWriter, torch.save records."""
    state = sample_state()
    save_model_state(state, tmp_path / "model")  # no storage_writer: torch's FileSystemWriter
    assert list((tmp_path / "model").glob("*.distcp")) and not list((tmp_path / "model").glob("*.safetensors"))
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    load_model_state(loaded, tmp_path / "model")
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


class FailingPlanner(DefaultSavePlanner):
    """Hands DCP the data of every tensor but `fail`, whose read raises (a failing source disk)."""

    def __init__(self, fail: str):
        super().__init__()
        self.fail = fail

    def resolve_data(self, item):
        if item.index.fqn == self.fail:
            raise OSError(5, f"simulated read failure of {self.fail}")
        return super().resolve_data(item)


@pytest.mark.parametrize("fail", sorted(sample_state()))
def test_an_error_in_any_writer_thread_fails_the_save_and_leaves_nothing(tmp_path, fail) -> None:
    """Each tensor in turn fails, so the failure lands in every thread (and file) there is."""
    before = threading.active_count()
    folder = tmp_path / "ckpt" / "model"
    with pytest.raises(OSError, match=f"simulated read failure of {fail}"):
        save(sample_state(), folder, threads=2, planner=FailingPlanner(fail))
    assert threading.active_count() == before  # every writer thread was joined before the error came
    assert not folder.exists()  # the folder the save made is gone with the data files in it


def test_a_failed_save_keeps_a_folder_it_did_not_make_and_the_files_in_it(tmp_path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    with pytest.raises(OSError):
        save(sample_state(), folder, planner=FailingPlanner("model.norm.weight"))
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
