"""Hugging Face safetensors files, read and written one tensor at a time.

The format (formats.md §5.4): 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
little-endian, C-order tensor bytes. Sharded checkpoints add `model.safetensors.index.json`
mapping each tensor to its file.

The header is parsed and checked here rather than trusted: a truncated download or a corrupt
file must end in a message naming the file, not in a crash halfway through a conversion. Tensors
are read with `readinto` straight into their own buffer and written from theirs at their offset,
so memory holds only the tensors in flight (no memory map whose pages would pile up, no
serialised copy of a shard).

Headers are read, checked and written without torch (`StoredDType` describes a dtype by its
safetensors code): a conversion that only copies bytes never imports it. Reading a tensor's
values, or writing one, imports torch then.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from shoal.checkpoint.parallel_io import copy_range, write_all
from shoal.errors import ShoalError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StoredDType:
    """A dtype as a safetensors header names it, with what checks and layouts need of it."""

    code: str  # the header's spelling: "BF16"
    name: str  # torch's spelling: "bfloat16"
    itemsize: int
    is_floating_point: bool

    def __str__(self) -> str:
        return self.name

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


STORED_DTYPES: dict[str, StoredDType] = {
    code: StoredDType(code, name, size, floating) for code, name, size, floating in (
        ("BF16", "bfloat16", 2, True), ("F16", "float16", 2, True), ("F32", "float32", 4, True),
        ("F64", "float64", 8, True), ("I64", "int64", 8, False), ("I32", "int32", 4, False),
        ("I16", "int16", 2, False), ("I8", "int8", 1, False), ("U8", "uint8", 1, False),
        ("BOOL", "bool", 1, False), ("F8_E4M3", "float8_e4m3fn", 1, True), ("F8_E5M2", "float8_e5m2", 1, True),
    )
}
_CODE_OF_NAME = {dtype.name: code for code, dtype in STORED_DTYPES.items()}


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a torch.dtype or a StoredDType ("BF16"); KeyError for one it lacks."""
    if isinstance(dtype, StoredDType):
        return dtype.code
    return _CODE_OF_NAME[str(dtype).removeprefix("torch.")]


def __getattr__(name: str) -> Any:
    # {code: torch.dtype} and its inverse, built on first use: importing torch is for those who need it.
    if name in ("DTYPES", "DTYPE_CODES"):
        dtypes = {code: dtype.torch for code, dtype in STORED_DTYPES.items()}
        globals().update(DTYPES=dtypes, DTYPE_CODES={dtype: code for code, dtype in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the reference parser's limit

if sys.byteorder != "little":  # the file is little-endian and we copy bytes as they are
    raise ImportError("shoal's safetensors I/O needs a little-endian machine")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: absolute byte range [begin, end) in `path`."""

    path: Path
    name: str
    stored: StoredDType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return self.stored.torch


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header: {name: TensorEntry}, in file order."""
    return read_header_and_metadata(path)[0]


def read_header_and_metadata(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, Any]]:
    """`read_header`, and the header's `__metadata__` as stored ({} without one), from one read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ShoalError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ShoalError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len} "
                    f"does not fit in {size} bytes)"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise ShoalError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShoalError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise ShoalError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})  # as stored: the caller that reads it checks it
    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = STORED_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ShoalError(f"{path}: tensor {name!r} has an invalid header entry {info!r}") from None
        if any(s < 0 for s in shape) or end - begin != _numel(shape) * dtype.itemsize or begin < 0:
            raise ShoalError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not match "
                             f"shape {list(shape)} of {info['dtype']}")
        if end > data_len:
            raise ShoalError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, data_start + end)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ShoalError(f"{path}: corrupt safetensors file: tensors {a!r} and {b!r} overlap")
    return entries, metadata


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor from disk into fresh memory of exactly its size."""
    import torch

    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if tensor.numel() == 0:
        return tensor
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    with open(entry.path, "rb") as handle:
        handle.seek(entry.begin)
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise ShoalError(f"{entry.path}: truncated while reading tensor {entry.name!r}")
            done += got
    return tensor


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header (length prefix included) for `tensors` [(name, dtype code, shape)],
    their data laid out in that order, and {name: (absolute offset in the file, byte length)}.
    The caller orders larger element sizes first, which keeps every tensor aligned to its size."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    spans = {}
    for name, code, shape in tensors:
        nbytes = _numel(shape) * STORED_DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer starts 8-byte aligned
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: (start + begin, n) for name, (begin, n) in spans.items()}


class SafetensorsWriter:
    """Write one safetensors file whose tensors are known in advance and arrive in any order.

    The header is written first from the declared names, shapes and dtypes, which fixes every
    tensor's place: `write` (a tensor's bytes) and `copy` (bytes another file already holds) put
    each at its offset with positional writes, so several threads may fill one file. The data
    follow `self.order` (larger element sizes first, which keeps every tensor aligned to its
    element size, as the reference writer does). `close` checks all arrived.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], Any]],
                 metadata: dict[str, str] | None = None):
        """specs: {name: (shape, dtype)}, the dtype a torch.dtype or a StoredDType."""
        self.path = Path(path)
        # Stable sort: within one element size the caller's (HF state-dict) order is kept.
        self.order = sorted(specs, key=lambda name: -specs[name][1].itemsize)
        self.specs = specs
        header, self.spans = build_header([(name, dtype_code(specs[name][1]), specs[name][0]) for name in self.order],
                                          metadata or {"format": "pt"})
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._done: set[str] = set()
        self._lock = threading.Lock()
        write_all(self._fd, memoryview(header), 0)
        self.total_bytes = sum(nbytes for _, nbytes in self.spans.values())

    def _claim(self, name: str) -> tuple[int, int]:
        with self._lock:
            if name not in self.spans or name in self._done:
                raise RuntimeError(f"{self.path}: tensor {name!r} was not declared, or is written twice")
            self._done.add(name)
        return self.spans[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        shape, dtype = self.specs.get(name, (None, None))
        if tuple(tensor.shape) != tuple(shape or ()) or dtype is None or dtype_code(tensor.dtype) != dtype_code(dtype):
            raise RuntimeError(f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                               f"declared {shape} {dtype}")
        offset, _ = self._claim(name)
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            write_all(self._fd, memoryview(data), offset)

    def copy(self, name: str, source: tuple[str, int, int]) -> None:
        """Take the tensor's bytes from (file, offset, length), where they lie exactly as stored."""
        offset, nbytes = self.spans[name]
        if source[2] != nbytes:
            raise RuntimeError(f"{self.path}: tensor {name!r} takes {nbytes} bytes, its source holds {source[2]}")
        self._claim(name)
        copy_range(source[0], source[1], nbytes, self._fd, offset)

    def close(self) -> None:
        missing = len(self.order) - len(self._done)
        self.abort()
        if missing:
            raise RuntimeError(f"{self.path}: {missing} tensor(s) were never written")

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors (in order) into shards the way Hugging Face does: a new shard starts when the
    next tensor would push the current one past the limit; a tensor above the limit sits alone."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-0000k-of-0000n.safetensors` (1-based)."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(out_dir: str | os.PathLike, weight_map: dict[str, str], total_size: int,
                total_parameters: int | None = None) -> Path:
    """Write `model.safetensors.index.json` as transformers does (indent 2, names sorted)."""
    metadata: dict[str, int] = {"total_size": total_size}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    path = Path(out_dir) / INDEX_FILE
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def _check_inside(file: object, index_path: Path) -> None:
    """An index names shards by their place in the model folder: never an absolute path or a `..` step.

    Checked on the name as written, not on the resolved path: the Hugging Face cache keeps every
    shard as a symlink into its blobs folder, and a link is not what the index may not do.
    """
    if not isinstance(file, str) or not file:
        raise ShoalError(f"{index_path}: weight_map values must be file names, got {file!r}")
    pure = PurePosixPath(file.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(file).drive or ".." in pure.parts:
        raise ShoalError(f"{index_path}: names the shard {file!r}, outside the model folder; an index may "
                         "only name files inside its own folder (refusing to read it)")


def find_weight_files(model_dir: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of an HF model folder, {name: TensorEntry}, from the index or `model.safetensors`.

    Only the files the index names are read (Mistral repos also ship a `consolidated.safetensors`
    that must not be mixed in). PyTorch `.bin` weights are refused: loading them runs pickle.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except json.JSONDecodeError as err:
            raise ShoalError(f"{index_path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        except (KeyError, TypeError):
            raise ShoalError(f"{index_path}: expected a \"weight_map\" object of tensor name -> file") from None
        files = sorted(set(weight_map.values()))
        for file in files:
            _check_inside(file, index_path)
        missing_files = [f for f in files if not (model_dir / f).is_file()]
        if missing_files:
            raise ShoalError(f"{index_path}: names shard file(s) that do not exist: {', '.join(missing_files)}")
        entries: dict[str, TensorEntry] = {}
        headers = {f: read_header(model_dir / f) for f in files}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise ShoalError(f"{index_path}: tensor {name!r} is mapped to {file}, which does not contain it")
            entries[name] = headers[file][name]
        return entries
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return read_header(single)
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ShoalError(
            f"{model_dir}: only PyTorch pickle weights (.bin/.pt) found; shoal reads safetensors only, "
            "because loading pickle files can run arbitrary code. Convert them to safetensors first."
        )
    raise ShoalError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}: nothing to import")
