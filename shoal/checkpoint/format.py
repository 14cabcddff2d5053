"""The shoal checkpoint directory (DESIGN §3): `shoal.json`, `tokenizer/`, `model/` (DCP).

    CKPT/
      shoal.json   format version, model family and full ModelConfig, dtype, training progress,
                   how the checkpoint was made
      tokenizer/   the Hugging Face tokenizer files, copied as they came (chat template included)
      model/       torch.distributed.checkpoint (DCP) of the weights, keyed by HF parameter names

Training checkpoints add `optim/` and `trainer.json` (shoal.checkpoint.training); a checkpoint
whose model carries LoRA/DoRA adapters has `peft.json`. An experiment's checkpoints folder is
shoal.checkpoint.catalog's. Every file of the folder is written and read by this package.

DCP stores global shapes plus the chunks each rank wrote, so a state dict of DTensors (FSDP2,
tensor parallel) saves and loads here as it is, and a checkpoint written by one layout loads into
any other or into a single process. DCP's `.metadata` file is a pickle; it is read here with an
unpickler that only admits DCP's own metadata classes, so a checkpoint from someone else cannot
run code when it is opened (the tensor blobs are read by DCP with `weights_only=True`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from shoal.errors import ShoalError
from shoal.models.config import ModelConfig

if TYPE_CHECKING:
    from shoal.peft.config import LoraConfig

FORMAT_NAME = "shoal-checkpoint"
# 2: model/ may hold safetensors data files (shoal.checkpoint.storage); 1: torch.save records only.
# This shoal reads both; a shoal that knows only 1 refuses a 2 with "written by a newer shoal".
FORMAT_VERSION = 2
METADATA_FILE = "shoal.json"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"

# The files a Hugging Face tokenizer may consist of; anything else in a model folder is not ours to copy.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)

OPTIM_DIR = "optim"
PEFT_FILE = "peft.json"

_PROGRESS_KEYS = ("step", "consumed_samples", "consumed_tokens")


# ---------------------------------------------------------------------------------------------
# shoal.json
# ---------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 (and for the string itself); the spelling used in shoal.json."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str = "dtype") -> torch.dtype:
    """torch dtype from 'bfloat16' / 'torch.bfloat16' / 'bf16' style names, refusing anything else."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    key = aliases.get(name, name.removeprefix("torch."))
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ShoalError(f"{where}: {name!r} is not a floating-point dtype (expected e.g. bfloat16, float16, float32)")
    return dtype


def write_metadata(
    ckpt_dir: str | os.PathLike,
    model_config: ModelConfig,
    dtype: torch.dtype | str,
    progress: dict[str, int] | None = None,
    made_by: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Path:
    """Write `ckpt_dir/shoal.json` (atomically: a reader never sees half a file).

    progress: {step, consumed_samples, consumed_tokens}, zeros by default.
    made_by: {command, source, ...}; shoal_version and time are filled in when absent.
    base: for an adapter-only checkpoint, the base it applies to (`shoal.checkpoint.base`).
    Secrets must not be passed in `made_by` or `extra`: this file is meant to be shared.
    """
    from shoal import __version__

    progress = {key: int((progress or {}).get(key, 0)) for key in _PROGRESS_KEYS} | {
        k: v for k, v in (progress or {}).items() if k not in _PROGRESS_KEYS
    }
    made = {
        "shoal_version": __version__,
        "command": None,
        "source": None,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    made.update(made_by or {})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": model_config.family,
        "model": model_config.to_dict(),
        "dtype": dtype_name(dtype),
        "progress": progress,
        "made_by": made,
        "extra": dict(extra or {}),
    }
    if base is not None:
        meta["base"] = base
    path = Path(ckpt_dir) / METADATA_FILE
    tmp = path.with_name(f".{METADATA_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def read_metadata(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate `ckpt_dir/shoal.json`; a ShoalError names the file and key at fault."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not Path(ckpt_dir).is_dir():
        raise ShoalError(f"{ckpt_dir} is not a shoal checkpoint: no such directory")
    if not path.is_file():
        raise ShoalError(f"{ckpt_dir} is not a shoal checkpoint: {METADATA_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShoalError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ShoalError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ShoalError(f"{path}: not a shoal checkpoint (expected \"format\": \"{FORMAT_NAME}\")")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ShoalError(f"{path}: \"format_version\" must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ShoalError(
            f"{path}: format_version {version} was written by a newer shoal; "
            f"this shoal reads format_version <= {FORMAT_VERSION}"
        )
    for key, kind in (("model", dict), ("dtype", str), ("progress", dict), ("made_by", dict)):
        if not isinstance(meta.get(key), kind):
            raise ShoalError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    for key in _PROGRESS_KEYS:
        value = meta["progress"].get(key)
        if not isinstance(value, int) or value < 0:
            raise ShoalError(f"{path}: progress.{key} must be a non-negative integer, got {value!r}")
    parse_dtype(meta["dtype"], where=f"{path}: key 'dtype'")
    meta.setdefault("extra", {})
    if meta.get("family", meta["model"].get("family")) != meta["model"].get("family"):
        raise ShoalError(f"{path}: family {meta['family']!r} disagrees with model.family {meta['model'].get('family')!r}")
    return meta


def read_model_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with."""
    meta = read_metadata(ckpt_dir)
    try:
        return ModelConfig.from_dict(meta["model"])
    except ShoalError as err:
        raise ShoalError(f"{Path(ckpt_dir) / METADATA_FILE}: key 'model': {err}") from None
    except TypeError as err:
        raise ShoalError(f"{Path(ckpt_dir) / METADATA_FILE}: key 'model': {err}") from None


# ---------------------------------------------------------------------------------------------
# tokenizer/
# ---------------------------------------------------------------------------------------------


def tokenizer_files(src_dir: str | os.PathLike) -> list[Path]:
    """The tokenizer files and folders present in a Hugging Face model folder."""
    src = Path(src_dir)
    found = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    return found + [src / name for name in TOKENIZER_DIRS if (src / name).is_dir()]


def copy_tokenizer(src_dir: str | os.PathLike, ckpt_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of an HF folder (or of a shoal checkpoint) into `ckpt_dir/tokenizer/`.

    Files are copied byte for byte, so the chat template and special tokens stay exactly as they
    came. Returns the names copied; an empty list means the source had no tokenizer.
    """
    src = Path(src_dir)
    if is_checkpoint(src):
        src = src / TOKENIZER_DIR
    found = tokenizer_files(src)
    if not found:
        return []
    dest = Path(ckpt_dir) / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for item in found:
        if item.is_dir():
            shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
        else:
            shutil.copyfile(item, dest / item.name)
    return [item.name for item in found]


def snapshot_tokenizer(src_dir: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files of an HF folder or a checkpoint, read into memory ({relative path: bytes}).

    A training run takes this once at its start and writes it into every checkpoint it saves, so
    its checkpoints keep their tokenizer even after retention deletes the one it started from.
    """
    src = Path(src_dir)
    if is_checkpoint(src):
        src = src / TOKENIZER_DIR
    files: dict[str, bytes] = {}
    for item in tokenizer_files(src):
        paths = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for path in paths:
            files[str(path.relative_to(src))] = path.read_bytes()
    return files


def write_tokenizer_snapshot(files: dict[str, bytes], ckpt_dir: str | os.PathLike) -> None:
    dest = Path(ckpt_dir) / TOKENIZER_DIR
    for name, data in files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# peft.json
# ---------------------------------------------------------------------------------------------


def write_peft_config(ckpt_dir: str | os.PathLike, config: LoraConfig) -> None:
    (Path(ckpt_dir) / PEFT_FILE).write_text(json.dumps(config.to_dict(), indent=1))


def read_peft_config(ckpt_dir: str | os.PathLike) -> LoraConfig | None:
    """The adapter settings of a checkpoint whose model carries LoRA/DoRA adapters; None without."""
    from shoal.peft.config import LoraConfig

    path = Path(ckpt_dir) / PEFT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShoalError(f"{path}: not valid JSON ({err})") from None
    return LoraConfig.from_dict(data, where=str(path))


# ---------------------------------------------------------------------------------------------
# model/ (DCP)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Global shape and dtype of one saved tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


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


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader with a restricted unpickler for `.metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        path = Path(self.path) / name
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except FileNotFoundError:
            raise ShoalError(f"{Path(self.path)}: no DCP .metadata file (incomplete or not a DCP checkpoint)") from None
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
    """Whether a DCP folder has its metadata and every data file the metadata names, at full length."""
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        return False
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
