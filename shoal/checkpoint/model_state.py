"""A checkpoint's `model/` and `optim/` folders as torch.distributed.checkpoint (DCP): save, load, inspect.

DCP stores global shapes plus the chunks each rank wrote, so a state dict of DTensors (FSDP2,
tensor parallel) saves and loads here as it is, and a checkpoint written by one layout loads into
any other or into a single process. DCP's `.metadata` file is a pickle; it is read here with an
unpickler that only admits DCP's own metadata classes, so a checkpoint from someone else cannot
run code when it is opened (the tensor blobs are read by DCP with `weights_only=True`).

A folder without `.metadata` whose data files are safetensors (format 3: an import that writes
`model/` without torch) is described by those files' headers instead: `metadata_from_headers`
builds the same `Metadata` from them, checking that every tensor's chunks tile it exactly.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from shoal.checkpoint.data_files import METADATA_NAME, headers_complete, read_chunks
from shoal.checkpoint.format import TensorInfo
from shoal.errors import ShoalError

_ALLOWED_PICKLE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's `.metadata` is made of; everything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from DCP metadata")


def metadata_from_headers(folder: str | os.PathLike) -> Metadata:
    """DCP's Metadata of a folder without `.metadata`, from its safetensors data files' headers
    (`shoal.checkpoint.data_files.read_chunks`, which checks that the chunks tile every tensor)."""
    state_dict_metadata: dict[str, TensorStorageMetadata] = {}
    storage_data: dict[MetadataIndex, _StorageInfo] = {}
    for name, tensor in read_chunks(folder).items():
        state_dict_metadata[name] = TensorStorageMetadata(
            properties=TensorProperties(dtype=tensor.stored.torch),
            size=torch.Size(tensor.size),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.shape))
                    for c in tensor.chunks],
        )
        for c in tensor.chunks:
            storage_data[MetadataIndex(name, c.offsets)] = _StorageInfo(c.file, c.begin, c.length)
    return Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data, storage_meta=StorageMeta())


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader with a restricted unpickler for `.metadata`; a folder without any
    `.metadata` but with safetensors data files is described by their headers (`metadata_from_headers`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}.metadata"
        path = Path(self.path) / name
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except FileNotFoundError:
            if (Path(self.path) / METADATA_NAME).exists():
                raise ShoalError(f"{Path(self.path)}: no DCP {name} file (incomplete or not a DCP checkpoint)") from None
            metadata = metadata_from_headers(self.path)
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise ShoalError(f"{path}: unreadable DCP metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise ShoalError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _storage_identity(tensor: Any) -> tuple | None:
    """What two state-dict entries share when they are the same (tied) parameter; None for meta."""
    if not isinstance(tensor, torch.Tensor):
        return None
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    while is_traceable_wrapper_subclass(local):
        # A wrapper such as torchao's FP8 all-gather weight owns no storage: its inner tensor does.
        names, _ = local.__tensor_flatten__()
        local = getattr(local, names[0])
    if local.device.type == "meta" or local.numel() == 0:
        return None
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.device)


def _aliases(state_dict: dict[str, Any]) -> dict[str, str]:
    """{name: earlier name} for entries that are the same tensor as an earlier one (tied weights)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, value in state_dict.items():
        ident = _storage_identity(value)
        if ident is None:
            continue
        if ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
    return aliases


@contextlib.contextmanager
def _dcp_errors() -> Iterator[None]:
    """Re-raise the exception DCP wrapped (it raises CheckpointException, a BaseException that
    would escape every `except Exception`), preferring a ShoalError, which the CLI reports cleanly;
    and silence DCP's notice that no process group means a single-process save or load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        try:
            yield
        except CheckpointException as err:
            causes = [exc for _, (exc, _trace) in sorted(err.failures.items())]
            cause = next((exc for exc in causes if isinstance(exc, ShoalError)), causes[0] if causes else None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise


def save_model_state(
    state_dict: dict[str, torch.Tensor], model_dir: str | os.PathLike, planner: Any = None,
    file_per_tensor: bool = False, process_group: Any = None, storage_writer: Any = None,
) -> None:
    """Save weights keyed by HF names as DCP into `model_dir` (every rank calls this when distributed).

    Tied weights are stored once, under their first name (`model.embed_tokens.weight`, as HF does):
    pass `model.state_dict()` as it is. Values may be DTensors; each rank writes its own shards.
    `planner` is for callers that stream tensors in (`shoal.convert.streaming`). `storage_writer`
    replaces torch's FileSystemWriter (`shoal.checkpoint.storage.SafetensorsStorageWriter`: several
    threads, large writes). With torch's, `file_per_tensor` lets each tensor be freed once written
    (it keeps every tensor of a data file referenced until that file is finished).
    `process_group` carries DCP's collectives (None: the default group); a background save gives
    its own (`shoal.checkpoint.background`).
    """
    aliases = _aliases(state_dict)
    to_save = {k: v for k, v in state_dict.items() if k not in aliases}
    if storage_writer is None:  # shoal's writer makes the folder itself, and removes it if the save fails
        Path(model_dir).mkdir(parents=True, exist_ok=True)
    with _dcp_errors():
        # One writer thread: torch's extra DCP writer threads drop their exceptions and keep
        # writing after the main thread has failed, which would break the clean-up of a failed import.
        writer = storage_writer or dcp.FileSystemWriter(str(model_dir), single_file_per_rank=not file_per_tensor)
        dcp.save(to_save, storage_writer=writer, planner=planner, process_group=process_group, no_dist=_no_dist())


def model_state_info(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """{name: TensorInfo(global shape, dtype)} of every tensor saved in a DCP folder, without loading any."""
    metadata = SafeFileSystemReader(str(model_dir)).read_metadata()
    return {
        name: TensorInfo(tuple(md.size), md.properties.dtype)
        for name, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def dcp_folder_complete(folder: str | os.PathLike) -> bool:
    """Whether a DCP folder has its metadata and every data file the metadata names, at full length;
    for a folder without `.metadata`: at least one safetensors data file, every header valid, every
    file as long as its header's last byte, and every tensor's chunks tiling it exactly."""
    folder = Path(folder)
    if not (folder / METADATA_NAME).is_file():
        return headers_complete(folder)
    try:
        metadata = SafeFileSystemReader(str(folder)).read_metadata()
    except ShoalError:
        return False
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        needed[name] = max(needed.get(name, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
    for name, size in needed.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size < size:
            return False
    return True


def model_state_keys(model_dir: str | os.PathLike) -> list[str]:
    """The tensor names saved in a DCP folder, sorted."""
    return sorted(model_state_info(model_dir))


def load_model_state(state_dict: dict[str, torch.Tensor], model_dir: str | os.PathLike) -> None:
    """Fill `state_dict`'s tensors in place from the DCP in `model_dir`.

    Works in one process or on every rank of a process group; DTensor values receive just their
    shards. Only the names asked for are read (a partial load). A name tied to another entry of
    `state_dict` (lm_head.weight when embeddings are tied) is filled through that entry; an untied
    `lm_head.weight` asked of a checkpoint that stored tied embeddings gets the embedding's values.
    Names or shapes the checkpoint lacks raise a ShoalError listing them. dtypes are converted.
    """
    model_dir = Path(model_dir)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        # DCP unpickles non-tensor entries with weights_only=False: never ask it for one.
        raise TypeError(f"load_model_state loads tensors only; not tensors: {not_tensors[:5]}")
    saved = model_state_info(model_dir)
    aliases = _aliases(state_dict)
    wanted = {k: v for k, v in state_dict.items() if k not in aliases}
    retie = {}
    if "lm_head.weight" in wanted and "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved:
        retie["model.embed_tokens.weight"] = wanted.pop("lm_head.weight")
    missing = sorted(k for k in wanted if k not in saved)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ShoalError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s): {shown}")
    for name, tensor in list(wanted.items()) + list(retie.items()):
        if tuple(tensor.shape) != saved[name].shape:
            raise ShoalError(
                f"{model_dir}: tensor {name} has shape {list(saved[name].shape)} in the checkpoint, "
                f"but the model expects {list(tensor.shape)}"
            )
    from shoal.checkpoint.storage import CheckpointStorageReader  # it builds on this module

    with _dcp_errors():
        for part in (wanted, retie):
            if part:  # either kind of data file: safetensors (raw) or torch.save records (format 1)
                dcp.load(part, storage_reader=CheckpointStorageReader(model_dir), no_dist=_no_dist())
