"""The safetensors data files of a DCP folder (`model/`, `optim/`), without torch.

Every data file shoal writes into a DCP folder is a valid safetensors file: one chunk of a tensor
per header entry, and `__metadata__` in the layout of torch's `HuggingFaceStorageWriter`
(`DCP_SHARDING_INFO` gives each chunk's offsets in its global tensor). `shoal.checkpoint.storage`
writes them under DCP, with the `.metadata` pickle that needs torch. A conversion that copies every
tensor unchanged writes them here instead, without `.metadata` (format 3): the headers alone then
describe the folder (`shoal.checkpoint.model_state` turns them into DCP metadata), and the tensors'
bytes are copied file to file in the kernel from wherever they already lie, as `cp` does.

    write_whole_tensors({name: CopiedTensor.of(source entry)}, model_dir)
    whole_tensors(model_dir) -> {name: TensorEntry} | None
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal.checkpoint.parallel_io import Threads, copy_range, write_all
from shoal.convert.safetensors_io import StoredDType, TensorEntry, build_header, read_header
from shoal.errors import ShoalError

DATA_SUFFIX = ".safetensors"
METADATA_NAME = ".metadata"  # DCP's pickled metadata, when torch wrote the folder
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"  # torch's key: each chunk's offsets in its global tensor
SAVE_ID_KEY = "shoal_save_id"  # a random id per save, as DCP's `.metadata` has: a re-import differs
DEFAULT_THREADS = 2


@dataclass(frozen=True)
class CopiedTensor:
    """A tensor stored whole whose bytes are `pieces` [(file, offset, length)] one after another:
    one piece for a tensor kept as its file holds it, one per expert for experts stacked along a
    new first dimension (C order makes the stack the experts' bytes in expert order)."""

    stored: StoredDType
    shape: tuple[int, ...]
    pieces: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, entries: Sequence[TensorEntry]) -> CopiedTensor:
        """One entry as it is, or several of one shape and dtype stacked."""
        first = entries[0]
        shape = first.shape if len(entries) == 1 else (len(entries), *first.shape)
        return cls(first.stored, tuple(shape), tuple((str(e.path), e.begin, e.end - e.begin) for e in entries))

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.pieces)


def dcp_header_metadata(sharding: dict[str, dict], save_id: str | None = None) -> dict[str, str]:
    """A data file's `__metadata__`: {fqn: {"saved_offsets": [...]}} of its chunks, as torch's writer keeps it."""
    metadata = {"format": "pt", "DCP_VERSION": "1.0", SHARDING_INFO_KEY: json.dumps(sharding)}
    if save_id is not None:
        metadata[SAVE_ID_KEY] = save_id
    return metadata


def data_file_name(rank_prefix: str, index: int) -> str:
    """`__0_1.safetensors`: the second data file of the rank whose plan prefix is `__0_`."""
    return f"{rank_prefix}{index}{DATA_SUFFIX}"


def _balance(sizes: dict[str, int], files: int) -> list[list[str]]:
    """Names split into at most `files` groups of about equal bytes, largest first."""
    bins: list[list[str]] = [[] for _ in range(max(1, min(files, len(sizes))))]
    loads = [0] * len(bins)
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        i = loads.index(min(loads))
        bins[i].append(name)
        loads[i] += sizes[name]
    return [b for b in bins if b]


def write_whole_tensors(sources: dict[str, CopiedTensor], folder: str | os.PathLike,
                        threads: int = DEFAULT_THREADS, sync: bool = True) -> list[Path]:
    """Write a DCP folder without `.metadata` holding each tensor whole, its bytes copied from
    `sources[name].pieces` (ranges of other files). One data file per thread; an error in
    any thread stops the others and is raised once all have stopped (the caller's atomic folder
    removes what was written). `sync` fsyncs the files and the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_id = str(uuid.uuid4())
    groups = _balance({name: source.nbytes for name, source in sources.items()}, threads)
    workers = Threads()
    written: list[Path] = []
    lock = threading.Lock()

    def write_file(i: int) -> None:
        # Larger elements first keeps every chunk aligned to its element size, as safetensors does.
        names = sorted(groups[i], key=lambda n: -sources[n].stored.itemsize)
        sharding = {name: {"saved_offsets": [0] * len(sources[name].shape)} for name in names}
        header, spans = build_header([(n, sources[n].stored.code, sources[n].shape) for n in names],
                                     dcp_header_metadata(sharding, save_id))
        path = folder / data_file_name("__0_", i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with lock:
            written.append(path)
        try:
            write_all(fd, memoryview(header), 0)
            for name in names:
                at = spans[name][0]
                for path, begin, length in sources[name].pieces:
                    if workers.stopped():
                        return
                    copy_range(path, begin, length, fd, at)
                    at += length
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    workers.run(write_file, len(groups))
    if sync:
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    return sorted(written)


def folder_headers(folder: str | os.PathLike) -> dict[str, dict[str, TensorEntry]]:
    """{data file name: {name: TensorEntry}} of every safetensors data file of a DCP folder, sorted by name."""
    folder = Path(folder)
    return {path.name: read_header(path) for path in sorted(folder.glob(f"*{DATA_SUFFIX}"))}


def saved_offsets(path: Path, name: str, ndim: int, header_metadata: dict | None) -> tuple[int, ...]:
    """Where a chunk starts in its global tensor: DCP_SHARDING_INFO's offsets, or zeros (a whole tensor)."""
    raw = (header_metadata or {}).get(SHARDING_INFO_KEY)
    if raw is None:
        return (0,) * ndim
    try:
        offsets = json.loads(raw)[name]["saved_offsets"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ShoalError(f"{path}: {SHARDING_INFO_KEY} in its header has no saved_offsets for {name!r}") from None
    if not isinstance(offsets, list) or len(offsets) != ndim or not all(isinstance(o, int) and o >= 0 for o in offsets):
        raise ShoalError(f"{path}: {SHARDING_INFO_KEY} gives {name!r} the offsets {offsets!r}, "
                         f"expected {ndim} non-negative integers")
    return tuple(offsets)


def header_metadata(path: Path) -> dict:
    """A safetensors file's `__metadata__` ({} when it has none)."""
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def whole_tensors(folder: str | os.PathLike) -> dict[str, TensorEntry] | None:
    """{name: where its bytes lie} when a DCP folder holds every tensor whole, in one chunk of a
    safetensors data file, and has no `.metadata` (the headers are then the whole description);
    None for any other folder (DCP's pickle, torch.save records, sharded chunks), which needs torch."""
    folder = Path(folder)
    if (folder / METADATA_NAME).exists() or not folder.is_dir():
        return None
    if any(p.is_file() and not p.name.endswith(DATA_SUFFIX) and not p.name.startswith(".") for p in folder.iterdir()):
        return None
    found: dict[str, TensorEntry] = {}
    for file, entries in folder_headers(folder).items():
        meta = header_metadata(folder / file)
        for name, entry in entries.items():
            if name in found or any(saved_offsets(folder / file, name, len(entry.shape), meta)):
                return None  # a tensor in pieces
            found[name] = entry
    return found or None
