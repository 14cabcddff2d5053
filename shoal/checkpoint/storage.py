"""DCP storage at disk speed: tensor chunks as raw bytes in safetensors files, several threads.

torch's `FileSystemWriter` serialises every tensor with `torch.save` (a zip archive written in
small pieces through a Python file object, ~600 MB/s here) and, with more than one thread, drops
the exceptions of its extra threads. This writer lays each rank's chunks out in a few
safetensors files (one per thread), writes every header first, from the save plan, then each
chunk's bytes with large positional writes, or with an in-kernel copy when the planner says
where the bytes already lie in a file (`byte_source`, the import's case). An error in any thread
stops the others, every thread is joined, the files of the failed save are removed and the
first error is raised: nothing keeps writing after a failure and nothing is lost.

The result is still a DCP checkpoint: `.metadata` (written last, by the coordinator) holds the
global shapes and chunks, and each chunk's `_StorageInfo(file, offset, length)` points at its raw
bytes inside a data file. The data files are valid safetensors files in the layout torch's
`HuggingFaceStorageWriter` uses (`__metadata__["DCP_SHARDING_INFO"]` gives each chunk's offsets
in the global tensor), so `torch.distributed.checkpoint.HuggingFaceStorageReader` and the
`safetensors` library read them without shoal. `CheckpointStorageReader` reads both these files
and today's `.distcp` ones (`torch.save` records), so checkpoints of either kind load, into any
layout: a rank reads only the part of each chunk its shard needs. A folder of these files
without `.metadata` (format 3, written without torch) loads too: the headers describe it
(`shoal.checkpoint.model_state.metadata_from_headers`).

    dcp.save(state, storage_writer=SafetensorsStorageWriter(folder), no_dist=...)
    dcp.load(state, storage_reader=CheckpointStorageReader(folder), no_dist=...)
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from shoal.checkpoint.data_files import DATA_SUFFIX, DEFAULT_THREADS, METADATA_NAME, data_file_name, dcp_header_metadata
from shoal.checkpoint.model_state import SafeFileSystemReader
from shoal.checkpoint.parallel_io import Threads, copy_range, read_exact, write_all
from shoal.convert.safetensors_io import DTYPE_CODES, build_header, dtype_code
from shoal.errors import ShoalError

# A planner may offer, per write item, (path, offset, length) of a file that already holds its
# bytes exactly as they are to be stored; the writer then copies them in the kernel.
ByteSource = Callable[[MetadataIndex], "tuple[str, int, int] | None"]


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    item: WriteItem
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte offset in the file, set once the header is laid out

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass
class _DataFile:
    name: str
    entries: list[_Entry]
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(e.nbytes for e in self.entries)


def _entry(item: WriteItem) -> _Entry:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        raise ShoalError(f"{item.index.fqn}: this checkpoint storage holds tensors only, not pickled objects")
    dtype = item.tensor_data.properties.dtype
    if dtype not in DTYPE_CODES:
        raise ShoalError(f"{item.index.fqn}: dtype {dtype} cannot be stored in a safetensors file")
    return _Entry(item, dtype, tuple(item.tensor_data.chunk.sizes))


def _lay_out(items: Sequence[WriteItem], files: int, prefix: str) -> list[_DataFile]:
    """Split one rank's items into at most `files` files of about equal size, largest first, and
    give each its header; a file holds at most one chunk of a name (safetensors keys are unique)."""
    entries = sorted((_entry(item) for item in items), key=lambda e: -e.nbytes)
    bins: list[list[_Entry]] = [[] for _ in range(max(1, min(files, len(entries))))]
    sizes = [0] * len(bins)
    for entry in entries:
        free = [i for i, b in enumerate(bins) if all(e.item.index.fqn != entry.item.index.fqn for e in b)]
        if not free:
            bins.append([])
            sizes.append(0)
            free = [len(bins) - 1]
        i = min(free, key=sizes.__getitem__)
        bins[i].append(entry)
        sizes[i] += entry.nbytes
    laid_out = []
    for n, members in enumerate(b for b in bins if b):
        # Larger elements first keeps every chunk aligned to its element size, as safetensors does.
        members.sort(key=lambda e: -e.dtype.itemsize)
        laid_out.append(_with_header(_DataFile(data_file_name(prefix, n), members)))
    return laid_out


def _with_header(file: _DataFile) -> _DataFile:
    sharding = {e.item.index.fqn: {"saved_offsets": list(e.item.tensor_data.chunk.offsets)} for e in file.entries}
    file.header, spans = build_header([(e.item.index.fqn, dtype_code(e.dtype), e.shape) for e in file.entries],
                                      dcp_header_metadata(sharding))
    for entry in file.entries:
        entry.begin = spans[entry.item.index.fqn][0]
    return file


@dataclasses.dataclass(frozen=True)
class _RankFiles:
    """What the coordinator tells each rank in its plan: the prefix of its data files' names and
    how many ranks write into the folder."""

    prefix: str
    ranks: int


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsStorageWriter(StorageWriter):
    """A DCP StorageWriter of safetensors data files, written by `thread_count` threads per rank.

    `sync_files` fsyncs every data file, `.metadata` and the folder, so a checkpoint that is
    published is on disk. On failure the data files of this save are removed before the error
    is raised, and the folder too when this save created it and wrote it alone (in a save of
    several ranks the folder is left to the caller, since the others may still be writing there).
    """

    def __init__(self, path: str | os.PathLike, thread_count: int = DEFAULT_THREADS, sync_files: bool = True):
        super().__init__()
        self.path = Path(path)
        self.thread_count = max(1, int(thread_count))
        self.sync_files = sync_files
        self.save_id = str(uuid.uuid4())
        self.is_coordinator = True
        self._created_folder = False
        self._ranks_share_folder = False  # set from the global plan: more than one rank writes here

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        return str(self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return "://" not in str(checkpoint_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if not self.path.exists():
            self._created_folder = True
        self.path.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Each rank's file names start with its place in the plan list: no two ranks share a file.
        return [dataclasses.replace(plan, storage_data=_RankFiles(f"__{rank}_", len(plans)))
                for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank_files = plan.storage_data if isinstance(plan.storage_data, _RankFiles) else _RankFiles("__0_", 1)
        # Several ranks write into the folder: a failed rank must not remove it while others
        # still open their files there (their save would then fail with "no such file" instead
        # of the first rank's error); removing it is the caller's part (a training save's rank 0).
        self._ranks_share_folder = rank_files.ranks > 1
        try:
            files = _lay_out(plan.items, self.thread_count, rank_files.prefix)
        except BaseException:  # an item it cannot store (not a tensor, a dtype safetensors lacks)
            self._remove([])
            raise
        source: ByteSource | None = getattr(planner, "byte_source", None)
        threads = Threads()
        written: list[Path] = []
        lock = threading.Lock()

        def write_file(i: int) -> None:
            file = files[i]
            path = self.path / file.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with lock:
                written.append(path)
            try:
                write_all(fd, memoryview(file.header), 0)
                for entry in file.entries:
                    if threads.stopped():
                        return
                    found = source(entry.item.index) if source is not None else None
                    if found is not None and found[2] == entry.nbytes:
                        copy_range(found[0], found[1], found[2], fd, entry.begin)
                        continue
                    data = _tensor_bytes(planner.resolve_data(entry.item))
                    if len(data) != entry.nbytes:
                        raise RuntimeError(f"{entry.item.index.fqn}: {len(data)} bytes to write, planned {entry.nbytes}")
                    write_all(fd, data, entry.begin)
                    del data
                if self.sync_files:
                    os.fsync(fd)
            finally:
                os.close(fd)

        try:
            threads.run(write_file, len(files))
        except BaseException:
            self._remove(written)
            raise
        results = [WriteResult(index=e.item.index, size_in_bytes=e.nbytes,
                               storage_data=_StorageInfo(file.name, e.begin, e.nbytes))
                   for file in files for e in file.entries]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        if self._created_folder and not self._ranks_share_folder:
            try:
                self.path.rmdir()  # only if empty: another rank's files are that rank's to remove
            except OSError:
                pass

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        metadata.storage_meta = self.storage_meta()
        tmp = self.path / f"{METADATA_NAME}.tmp"
        with open(tmp, "wb") as handle:
            pickle.dump(metadata, handle)
            if self.sync_files:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, self.path / METADATA_NAME)
        if self.sync_files:
            folder = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


class CheckpointStorageReader(SafeFileSystemReader):
    """Reads a DCP folder whose data files are safetensors (raw chunks) or `.distcp` (torch.save),
    with `.metadata` unpickled by shoal's restricted unpickler (or, without it, the safetensors
    headers read as metadata). Raw chunks are read by
    `thread_count` threads straight into the destination tensor when its memory allows."""

    def __init__(self, path: str | os.PathLike, thread_count: int = DEFAULT_THREADS):
        super().__init__(str(path))
        self.thread_count = max(1, int(thread_count))
        self._chunks: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], torch.dtype]] = {}

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._chunks = {
            (fqn, tuple(chunk.offsets)): (tuple(chunk.sizes), md.properties.dtype)
            for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
            for chunk in md.chunks
        }

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw, older = [], []
        for req in plan.items:
            kind = raw if str(self.storage_data[req.storage_index].relative_path).endswith(DATA_SUFFIX) else older
            kind.append(req)
        if older:  # today's .distcp records: torch's own reader
            super().read_data(dataclasses.replace(plan, items=older), planner).wait()
        if raw:
            self._read_raw(raw, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_raw(self, items: list[ReadItem], planner: LoadPlanner) -> None:
        sized = sorted(items, key=lambda r: -self._request_bytes(r))
        shares: list[list[ReadItem]] = [[] for _ in range(min(self.thread_count, len(sized)))]
        loads = [0] * len(shares)
        for req in sized:
            i = loads.index(min(loads))
            shares[i].append(req)
            loads[i] += self._request_bytes(req)
        threads = Threads()

        def read_share(i: int) -> None:
            handles: dict[str, int] = {}
            try:
                for req in shares[i]:
                    if threads.stopped():
                        return
                    name = str(self.storage_data[req.storage_index].relative_path)
                    if name not in handles:
                        handles[name] = os.open(Path(self.path) / name, os.O_RDONLY)
                    self._read_one(handles[name], Path(self.path) / name, req, planner)
            finally:
                for fd in handles.values():
                    os.close(fd)

        threads.run(read_share, len(shares))

    def _request_bytes(self, req: ReadItem) -> int:
        _, dtype = self._chunks[(req.storage_index.fqn, tuple(req.storage_index.offset))]
        n = dtype.itemsize
        for length in req.lengths:
            n *= length
        return n

    def _read_one(self, fd: int, path: Path, req: ReadItem, planner: LoadPlanner) -> None:
        """Read the slab of the stored chunk's outer rows that the request covers, straight into
        the destination when it is exactly that slab; otherwise narrow a slab read into memory."""
        shape, dtype = self._chunks[(req.storage_index.fqn, tuple(req.storage_index.offset))]
        info = self.storage_data[req.storage_index]
        offsets, lengths = list(req.storage_offsets), list(req.lengths)
        row_bytes = dtype.itemsize
        for s in shape[1:]:
            row_bytes *= s
        first, rows = (offsets[0], lengths[0]) if shape else (0, 1)
        slab_shape = (rows, *shape[1:]) if shape else ()
        start = info.offset + first * row_bytes
        target = planner.resolve_tensor(req).detach()
        whole_rows = all(o == 0 for o in offsets[1:]) and tuple(lengths[1:]) == tuple(shape[1:])
        if (whole_rows and target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
                and tuple(target.shape) == tuple(slab_shape)):
            if target.numel():
                read_exact(fd, memoryview(target.reshape(-1).view(torch.uint8).numpy()), start, path)
        else:
            slab = torch.empty(slab_shape, dtype=dtype)
            if slab.numel():
                read_exact(fd, memoryview(slab.reshape(-1).view(torch.uint8).numpy()), start, path)
            for dim in range(1, len(shape)):
                slab = slab.narrow(dim, offsets[dim], lengths[dim])
            if tuple(target.shape) != tuple(slab.shape):
                raise ShoalError(f"{path}: chunk of {req.storage_index.fqn} is {list(slab.shape)}, "
                                 f"the destination {list(target.shape)}")
            target.copy_(slab)
        planner.commit_tensor(req, target)
