"""Move weights between Hugging Face safetensors and DCP without holding the whole model.

Import: DCP plans a save from tensor shapes and dtypes alone, and asks for each tensor's data
only when it writes that tensor. `LazySavePlanner` hands DCP meta-device placeholders to plan
with and reads the real tensor from its safetensors file at that moment, so one tensor per writer
thread is in memory; a tensor kept as the file holds it is not read at all: the planner tells the
writer where its bytes lie (`byte_source`) and they are copied in the kernel, as `cp` does
(`shoal.checkpoint.storage`).

Export: `DCPWeightReader.load` does partial DCP loads of a caller-chosen group of names, which
the exporter bounds by bytes; `byte_source` names where a tensor stored whole lies, for the
exporter to copy it in the kernel when it is written unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from shoal.checkpoint.format import TensorInfo
from shoal.checkpoint.model_state import SafeFileSystemReader, load_model_state, model_state_info, save_model_state
from shoal.checkpoint.storage import DATA_SUFFIX, SafetensorsStorageWriter


class LazySavePlanner(DefaultSavePlanner):
    """A DCP save planner whose state dict holds meta tensors; `read(name)` supplies the data."""

    def __init__(self, read: Callable[[str], torch.Tensor],
                 source: Callable[[str], tuple[str, int, int] | None] | None = None):
        super().__init__()
        self._read = read
        self._source = source

    def byte_source(self, index: MetadataIndex) -> tuple[str, int, int] | None:
        """(file, offset, length) holding the tensor's bytes as stored, when `source` knows them."""
        if self._source is None or any(index.offset or ()):  # whole tensors only: one process saves
            return None
        return self._source(index.fqn)

    def lookup_object(self, index: MetadataIndex) -> Any:
        placeholder = super().lookup_object(index)
        if isinstance(placeholder, torch.Tensor) and placeholder.is_meta:
            tensor = self._read(index.fqn)
            if tuple(tensor.shape) != tuple(placeholder.shape) or tensor.dtype != placeholder.dtype:
                raise RuntimeError(f"tensor {index.fqn} changed while being converted")
            return tensor
        return placeholder


def stream_to_dcp(specs: dict[str, TensorInfo], read: Callable[[str], torch.Tensor],
                  model_dir: str | os.PathLike,
                  source: Callable[[str], tuple[str, int, int] | None] | None = None) -> None:
    """Write a DCP checkpoint of tensors described by `specs`, reading each with `read(name)` just in
    time, or copying the bytes `source(name)` names (file, offset, length) when it names any."""
    placeholders = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in specs.items()}
    save_model_state(placeholders, model_dir, planner=LazySavePlanner(read, source),
                     storage_writer=SafetensorsStorageWriter(model_dir))


def stored_bytes(model_dir: Path) -> dict[str, tuple[str, int, int]]:
    """{name: (file, offset, length)} for every tensor of a DCP folder stored as one whole raw chunk."""
    metadata = SafeFileSystemReader(str(model_dir)).read_metadata()
    found = {}
    for index, info in (metadata.storage_data or {}).items():
        md = metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(md, TensorStorageMetadata) or len(md.chunks) != 1 or any(index.offset or ()):
            continue
        if str(info.relative_path).endswith(DATA_SUFFIX):
            found[index.fqn] = (str(model_dir / info.relative_path), int(info.offset), int(info.length))
    return found


class WeightReader(Protocol):
    """Where the exporter gets a checkpoint's weights from, by shoal name.

    The default reads `model/` of a checkpoint. A checkpoint with LoRA/DoRA adapters (`peft.json`)
    needs a reader that returns base weights with the adapters merged in; the PEFT code provides
    it (see `shoal.convert.exporter.export_checkpoint`).
    """

    def tensor_info(self) -> dict[str, TensorInfo]:
        """{shoal name: TensorInfo} of the full-model weights this reader can return."""
        ...

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as full CPU tensors."""
        ...


class DCPWeightReader:
    """Reads the plain weights of a checkpoint's `model/` folder, a few tensors per DCP load."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self._info = model_state_info(self.model_dir)
        self._bytes = stored_bytes(self.model_dir)

    def byte_source(self, name: str) -> tuple[str, int, int] | None:
        """(file, offset, length) of a tensor stored whole as raw bytes, which an export may copy
        without loading it; None for a tensor in pieces or in torch.save records (format 1)."""
        return self._bytes.get(name)

    def tensor_info(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {name: torch.empty(self._info[name].shape, dtype=self._info[name].dtype) for name in names}
        load_model_state(tensors, self.model_dir)
        return tensors
