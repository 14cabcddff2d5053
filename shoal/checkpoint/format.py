"""The shoal checkpoint directory (DESIGN §3): `shoal.json`, `tokenizer/`, `model/` (DCP).

    CKPT/
      shoal.json   format version, model family and full ModelConfig, dtype, training progress,
                   how the checkpoint was made
      tokenizer/   the Hugging Face tokenizer files, copied as they came (chat template included)
      model/       torch.distributed.checkpoint (DCP) of the weights, keyed by HF parameter names

Training checkpoints add `optim/` and `trainer.json` (shoal.checkpoint.training); a checkpoint
whose model carries LoRA/DoRA adapters has `peft.json`. An experiment's checkpoints folder is
shoal.checkpoint.catalog's. Every file of the folder is written and read by this package.

Saving, loading and inspecting `model/` and `optim/` (DCP) is `shoal.checkpoint.model_state`'s;
this module imports no torch, so that a conversion that only copies bytes never pays for it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.errors import ShoalError
from shoal.models.config import ModelConfig

if TYPE_CHECKING:
    import torch

    from shoal.peft.config import LoraConfig

FORMAT_NAME = "shoal-checkpoint"
# 3: model/ may lack DCP's `.metadata`: its safetensors headers then describe it (an import that
#    copies bytes, shoal.convert.byte_copy); 2: model/ may hold safetensors data files
#    (shoal.checkpoint.storage); 1: torch.save records only. This shoal reads all three; an older
#    shoal refuses a newer version with "written by a newer shoal".
FORMAT_VERSION = 3
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


# The floating-point dtypes checkpoints hold, named as torch names them (no torch needed to check).
_FLOAT_NAMES = ("bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype: torch.dtype | str | Any) -> str:
    """'bfloat16' for torch.bfloat16, for a safetensors dtype (`StoredDType`) and for the string
    itself; the spelling used in shoal.json. Common names are checked without importing torch."""
    if isinstance(dtype, str):
        key = _DTYPE_ALIASES.get(dtype, dtype.removeprefix("torch."))
        if key in _FLOAT_NAMES:
            return key
        dtype = parse_dtype(dtype)
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str = "dtype") -> torch.dtype:
    """torch dtype from 'bfloat16' / 'torch.bfloat16' / 'bf16' style names, refusing anything else."""
    import torch

    key = _DTYPE_ALIASES.get(name, name.removeprefix("torch."))
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
    if _DTYPE_ALIASES.get(meta["dtype"], meta["dtype"].removeprefix("torch.")) not in _FLOAT_NAMES:
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
# model/: what a tensor is (the folder itself is shoal.checkpoint.model_state's)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Global shape and dtype of one saved tensor. The dtype is a torch.dtype, or, where torch is
    not imported (a conversion that copies bytes), a `shoal.convert.safetensors_io.StoredDType`:
    both have `itemsize` and `is_floating_point`."""

    shape: tuple[int, ...]
    dtype: torch.dtype | Any

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize
