"""The safetensors data files of a DCP folder (`model/`, `optim/`), without torch.

Every data file shoal writes into a DCP folder is a valid safetensors file: one chunk of a tensor
per header entry, and `__metadata__` in the layout of torch's `HuggingFaceStorageWriter`
(`DCP_SHARDING_INFO` gives each chunk's offsets in its global tensor). `shoal.checkpoint.storage`
writes them under DCP, with the `.metadata` pickle that needs torch. A conversion that copies every
tensor unchanged writes them here instead, without `.metadata` (format 3): the headers alone then
describe the folder (`shoal.checkpoint.model_state` turns them into DCP metadata), and the tensors'
bytes are copied file to file in the kernel from wherever they already lie, as `cp` does.

    write_whole_tensors({name: CopiedTensor.of([source entry])}, model_dir)
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
from typing import Any

from shoal.checkpoint.parallel_io import Threads, copy_range, write_all
from shoal.convert.safetensors_io import StoredDType, TensorEntry, build_header, read_header_and_metadata
from shoal.errors import ShoalError

DATA_SUFFIX = ".safetensors"
METADATA_NAME = ".metadata"  # DCP's pickled metadata, when torch wrote the folder
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"  # torch's key: each chunk's offsets in its global tensor
SAVE_ID_KEY = "shoal_save_id"  # a random id per save, as DCP's `.metadata` has: a re-import differs
SAVE_FILES_KEY = "shoal_save_files"  # how many data files that save wrote: a lost one is noticed
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


def dcp_header_metadata(sharding: dict[str, dict], save_id: str | None = None, files: int | None = None) -> dict[str, str]:
    """A data file's `__metadata__`: {fqn: {"saved_offsets": [...]}} of its chunks, as torch's writer
    keeps it; with the id of the save and the number of files it wrote, when given."""
    metadata = {"format": "pt", "DCP_VERSION": "1.0", SHARDING_INFO_KEY: json.dumps(sharding)}
    if save_id is not None:
        metadata[SAVE_ID_KEY] = save_id
    if files is not None:
        metadata[SAVE_FILES_KEY] = str(files)
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
                                     dcp_header_metadata(sharding, save_id, len(groups)))
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


def data_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors data files of a DCP folder, sorted by name (hidden files are not data)."""
    folder = Path(folder)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [folder / n for n in names if n.endswith(DATA_SUFFIX) and not n.startswith(".") and (folder / n).is_file()]


def _sharding_info(path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    raw = extra.get(SHARDING_INFO_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        raise ShoalError(f"{path}: corrupt safetensors header ({SHARDING_INFO_KEY} is not a JSON object)")
    return info


def _saved_offsets(path: Path, name: str, ndim: int, sharding: dict[str, Any]) -> tuple[int, ...]:
    entry = sharding.get(name)
    if entry is None:
        return (0,) * ndim  # a plain Hugging Face file: each tensor whole
    offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == ndim
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise ShoalError(f"{path}: tensor {name!r}: {SHARDING_INFO_KEY} gives saved_offsets {offsets!r}, "
                         f"not {ndim} non-negative integers")
    return tuple(offsets)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Chunk:
    """One header entry: a chunk of a tensor at `offsets`, its bytes at [begin, begin + length) of `file`."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    file: str
    begin: int
    length: int


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a folder's headers describe it: dtype, global size, its chunks by offsets."""

    stored: StoredDType
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def _check_tiling(folder: Path, name: str, size: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks of `name` cover its global `size` exactly once: no two overlap and their
    elements add up to the whole (they lie inside it by how `size` is made)."""
    ordered = sorted((c for c in chunks if _numel(c.shape)), key=lambda c: c.offsets)
    active: list[Chunk] = []
    for chunk in ordered:  # a sweep along dim 0: only chunks still open there can overlap this one
        active = [a for a in active if a.offsets[0] + a.shape[0] > chunk.offsets[0]]
        for other in active:
            if all(o1 < o2 + s2 and o2 < o1 + s1
                   for o1, s1, o2, s2 in zip(chunk.offsets, chunk.shape, other.offsets, other.shape)):
                what = "the same chunk" if other.offsets == chunk.offsets else "overlapping chunks"
                raise ShoalError(f"{folder}: tensor {name!r} has {what} at offsets {list(other.offsets)} "
                                 f"({other.file}) and {list(chunk.offsets)} ({chunk.file})")
        active.append(chunk)
    stored, whole = sum(_numel(c.shape) for c in chunks), _numel(size)
    if stored != whole:
        raise ShoalError(f"{folder}: tensor {name!r} of shape {list(size)} has {whole} elements, but its chunks in "
                         f"{', '.join(sorted({c.file for c in chunks}))} hold {stored}: they do not tile it")


def read_chunks(folder: str | os.PathLike) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of a DCP folder without `.metadata`, from its data files' headers, sorted by name.

    Every header entry is one chunk of its tensor, at the `saved_offsets` that
    `__metadata__["DCP_SHARDING_INFO"]` gives it (all zeros when it gives none: a plain Hugging Face
    file); a tensor's global size is, per dim, the largest offset + size of its chunks, and its
    dtype the one all its chunks have. Raises a ShoalError naming the file and tensor when a header
    is not valid (or its file is truncated), a tensor comes in two dtypes, two chunks overlap or
    repeat, or the chunks do not tile the tensor; when a save that wrote several files (its
    `shoal_save_files`) has lost one; and the "no DCP .metadata" one without data files.
    """
    folder = Path(folder)
    files = data_files(folder)
    if not files:
        raise ShoalError(f"{folder}: no DCP .metadata file (incomplete or not a DCP checkpoint)")
    parts: dict[str, dict[tuple[int, ...], Chunk]] = {}
    dtypes: dict[str, tuple[StoredDType, str]] = {}
    saves: dict[str, tuple[int, list[str]]] = {}  # save id -> (files it wrote, files found)
    for path in files:
        entries, extra = read_header_and_metadata(path)
        if not isinstance(extra, dict):
            raise ShoalError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
        sharding = _sharding_info(path, extra)
        if isinstance(extra.get(SAVE_ID_KEY), str) and str(extra.get(SAVE_FILES_KEY, "")).isdigit():
            saves.setdefault(extra[SAVE_ID_KEY], (int(extra[SAVE_FILES_KEY]), []))[1].append(path.name)
        for name, entry in entries.items():
            offsets = _saved_offsets(path, name, len(entry.shape), sharding)
            seen = dtypes.setdefault(name, (entry.stored, path.name))
            if seen[0] != entry.stored:
                raise ShoalError(f"{folder}: tensor {name!r} is {seen[0]} in {seen[1]} but {entry.stored} in {path.name}")
            chunk = Chunk(offsets, entry.shape, path.name, entry.begin, entry.end - entry.begin)
            chunks = parts.setdefault(name, {})
            if offsets in chunks and not _numel(entry.shape):
                continue  # an empty chunk where another lies adds nothing (a repeat of data is refused below)
            if offsets in chunks and _numel(chunks[offsets].shape):
                raise ShoalError(f"{folder}: tensor {name!r} has the same chunk at offsets {list(offsets)} "
                                 f"({chunks[offsets].file}) and {list(offsets)} ({path.name})")
            chunks[offsets] = chunk
    for save_id, (wrote, found) in saves.items():
        if len(found) != wrote:
            raise ShoalError(f"{folder}: {wrote} data files were written together ({SAVE_ID_KEY} {save_id}) but only "
                             f"{len(found)} are here ({', '.join(found)}): the others were lost")
    tensors: dict[str, StoredTensor] = {}
    for name in sorted(parts):
        chunks = sorted(parts[name].values(), key=lambda c: c.offsets)
        if len({len(c.offsets) for c in chunks}) > 1:
            raise ShoalError(f"{folder}: tensor {name!r} has chunks of different numbers of dimensions in "
                             f"{', '.join(sorted({c.file for c in chunks}))}")
        size = tuple(max(c.offsets[d] + c.shape[d] for c in chunks) for d in range(len(chunks[0].offsets)))
        _check_tiling(folder, name, size, chunks)
        tensors[name] = StoredTensor(dtypes[name][0], size, tuple(chunks))
    return tensors


def headers_complete(folder: str | os.PathLike) -> bool:
    """Whether a folder without `.metadata` is whole by its headers (`read_chunks` finds nothing wrong)."""
    try:
        read_chunks(folder)
    except ShoalError:
        return False
    return True


def folder_complete(folder: str | os.PathLike) -> bool:
    """The completeness rule of a DCP folder (docs/checkpoint-format.md): by its headers when it has
    no `.metadata` (no torch), else by DCP's metadata (`shoal.checkpoint.model_state`)."""
    folder = Path(folder)
    if not (folder / METADATA_NAME).is_file():
        return headers_complete(folder)
    from shoal.checkpoint.model_state import dcp_folder_complete

    return dcp_folder_complete(folder)


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
    for name, tensor in read_chunks(folder).items():
        if len(tensor.chunks) != 1:
            return None  # a tensor in pieces
        c = tensor.chunks[0]
        found[name] = TensorEntry(folder / c.file, name, tensor.stored, c.shape, c.begin, c.begin + c.length)
    return found or None
