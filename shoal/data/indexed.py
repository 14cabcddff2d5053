"""Megatron's indexed dataset (`PREFIX.bin` + `PREFIX.idx`, magic `MMIDIDX`), byte for byte.

`.bin` is the bare concatenation of every sequence's tokens in one little-endian dtype.
`.idx` is a 34-byte header (magic, version 1, dtype code, sequence count, document count) followed
by `sequence_lengths` (int32), `sequence_pointers` (int64 byte offsets into `.bin`) and
`document_indices` (int64, the sequence index where each document starts, plus a final entry equal
to the sequence count). Files written here are read by Megatron-LM / NeMo and the reverse.
`docs/data-formats.md` has the full layout.

The writer publishes a pair only when it is complete: both files are written under temporary names
and renamed into place by `finalize`, `.idx` last, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shoal.errors import ShoalError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version (u64), dtype code (u8), sequence count (u64), document count (u64); no padding.
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34

# Megatron-core's `DType` codes. (Legacy NeMo maps 7 to float64; Megatron-core, followed here,
# maps it to float32. Token data never uses either.)
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron and NeMo pick: uint16 below 65500 entries, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype: np.dtype | type) -> int:
    """The `.idx` code of a numpy dtype; a ShoalError for dtypes the format cannot store."""
    dt = np.dtype(dtype).newbyteorder("=")
    if dt not in _CODE_OF:
        raise ShoalError(f"dtype {dt} cannot be stored in a .bin/.idx dataset; use one of "
                         f"{sorted(str(d) for d in _CODE_OF)}")
    return _CODE_OF[dt]


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """True when both files of the pair exist (Megatron's `IndexedDataset.exists`)."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def _strip_extension(prefix: str | os.PathLike) -> str:
    """Accept `data.bin` / `data.idx` where a prefix is meant: a common slip."""
    text = os.fspath(prefix)
    for ext in (".bin", ".idx"):
        if text.endswith(ext) and not dataset_exists(text) and dataset_exists(text[: -len(ext)]):
            return text[: -len(ext)]
    return text


class IndexedDatasetWriter:
    """Build a `.bin/.idx` pair sequence by sequence (Megatron's `IndexedDatasetBuilder`).

    A *sequence* is one item; a *document* is a run of sequences closed by `end_document`. Without
    sentence splitting every document is one sequence (`add_document(tokens)`).

    Used as a context manager, it finalizes on a clean exit and removes its temporary files if the
    block raises. Outside one, call `finalize()` or `abort()`.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.int32) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._code = dtype_code(self.dtype)
        # Integer tokens outside the dtype's range would wrap silently when cast; check instead.
        self._range = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        tag = uuid.uuid4().hex[:8]
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp-{tag}")
        self._tmp_idx = Path(f"{self.prefix}.idx.tmp-{tag}")
        try:
            self._bin = open(self._tmp_bin, "wb")
        except OSError as err:
            raise ShoalError(f"cannot write dataset {self.prefix}.bin: {err.strerror}") from err
        self._done = False

    # -- adding data ---------------------------------------------------------------------------

    def _as_array(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise ShoalError(f"a sequence must be one-dimensional, got shape {values.shape}")
        if self._range is not None and values.size:
            if values.dtype.kind not in "iub":
                raise ShoalError(f"tokens must be integers for dtype {self.dtype}, got {values.dtype}")
            low, high = int(values.min()), int(values.max())
            if low < self._range.min or high > self._range.max:
                raise ShoalError(
                    f"token id {high if high > self._range.max else low} does not fit dtype "
                    f"{self.dtype.name} of dataset {self.prefix} (range {self._range.min}.."
                    f"{self._range.max}); choose the dtype from the vocabulary size")
        return values.astype(self.dtype, copy=False)

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence; the document stays open until `end_document`."""
        values = self._as_array(tokens)
        self._bin.write(values.tobytes(order="C"))
        self.sequence_lengths.append(values.size)

    def end_document(self) -> None:
        """Close the current document: it spans the sequences added since the previous one."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray,
                     lengths: Sequence[int] | None = None) -> None:
        """Append a whole document; `lengths` cuts it into sequences (default: one sequence)."""
        values = self._as_array(tokens)
        if lengths is None:
            lengths = [values.size]
        if sum(lengths) != values.size or any(n < 0 for n in lengths):
            raise ShoalError(f"document lengths {list(lengths)} do not add up to its "
                             f"{values.size} tokens")
        self._bin.write(values.tobytes(order="C"))
        self.sequence_lengths.extend(int(n) for n in lengths)
        self.end_document()

    def add_index(self, other_prefix: str | os.PathLike) -> None:
        """Append every document of another dataset (same dtype), as Megatron merges partitions."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype.newbyteorder("="):
            raise ShoalError(f"cannot merge {other.prefix} (dtype {other.dtype}) into "
                             f"{self.prefix} (dtype {self.dtype.name}): dtypes differ")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        with open(bin_path(other.prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    # -- publishing ----------------------------------------------------------------------------

    def index_bytes(self) -> bytes:
        """The `.idx` content for what was added so far."""
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32) if self.sequence_lengths \
            else np.zeros(0, np.int32)
        # Byte offsets accumulate in int64: a big corpus passes 2**31 bytes quickly.
        pointers = np.zeros(len(lengths), dtype="<i8")
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.asarray(self.document_indices, dtype="<i8")
        header = _HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(documents))
        return b"".join((header, lengths.astype("<i4").tobytes(), pointers.tobytes(),
                         documents.tobytes()))

    def finalize(self) -> None:
        """Write `.idx` and move both files into place (replacing an older pair)."""
        if self._done:
            return
        try:
            self._bin.close()
            self._tmp_idx.write_bytes(self.index_bytes())
            # Remove the old `.idx` first and publish the new one last: in between, the pair
            # does not look complete, so no reader can pair a new `.bin` with an old `.idx`.
            idx_path(self.prefix).unlink(missing_ok=True)
            os.replace(self._tmp_bin, bin_path(self.prefix))
            os.replace(self._tmp_idx, idx_path(self.prefix))
        except OSError as err:
            self.abort()
            raise ShoalError(f"cannot write dataset {self.prefix}: {err}") from err
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far; the destination is left as it was."""
        if not self._bin.closed:
            self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only memory-mapped view of a `.bin/.idx` pair.

    `ds[i]` is sequence i as a numpy array (a view into the memory map), `ds[i:j]` a list of them,
    `ds.get(i, offset, length)` a slice of sequence i read without touching the rest.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = _strip_extension(prefix)
        self._open()

    def _open(self) -> None:
        idx_file, bin_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (idx_file, bin_file):
            if not path.is_file():
                raise ShoalError(f"dataset file {path} not found (a dataset is named by its path "
                                 f"prefix, without .bin/.idx)")
        idx_size = idx_file.stat().st_size
        if idx_size < HEADER_SIZE:
            raise ShoalError(f"{idx_file} is truncated: {idx_size} bytes, shorter than the "
                             f"{HEADER_SIZE}-byte header")
        with open(idx_file, "rb") as f:
            magic, version, code, count, doc_count = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise ShoalError(f"{idx_file} is not a Megatron indexed dataset: magic {magic!r}, "
                             f"expected {MAGIC!r}")
        if version != VERSION:
            raise ShoalError(f"{idx_file}: unsupported index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ShoalError(f"{idx_file}: unknown dtype code {code}, expected one of "
                             f"{sorted(DTYPE_CODES)}")
        expected = HEADER_SIZE + 12 * count + 8 * doc_count
        # Multimodal datasets append one int8 mode per sequence.
        if idx_size not in (expected, expected + count):
            problem = "truncated" if idx_size < expected else "longer than its header announces"
            raise ShoalError(f"{idx_file} is {problem}: {idx_size} bytes, expected {expected} "
                             f"for {count} sequences and {doc_count} document indices")
        self.dtype = DTYPE_CODES[code]
        self._idx = np.memmap(idx_file, mode="r", dtype=np.uint8)
        buffer = memoryview(self._idx)
        self.sequence_lengths = np.frombuffer(buffer, "<i4", count, HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buffer, "<i8", count, HEADER_SIZE + 4 * count)
        self.document_indices = np.frombuffer(buffer, "<i8", doc_count, HEADER_SIZE + 12 * count)
        self.sequence_modes = (np.frombuffer(buffer, np.int8, count, expected)
                               if idx_size > expected else None)
        self._validate(idx_file, bin_file)
        bin_size = bin_file.stat().st_size
        # numpy cannot memory-map an empty file; an empty dataset has nothing to map anyway.
        on_disk = self.dtype.newbyteorder("<")
        self._bin = (np.memmap(bin_file, mode="r", dtype=on_disk) if bin_size
                     else np.zeros(0, on_disk))

    def _validate(self, idx_file: Path, bin_file: Path) -> None:
        docs, lengths, pointers = self.document_indices, self.sequence_lengths, self.sequence_pointers
        count = len(lengths)
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != count:
            raise ShoalError(f"{idx_file}: document indices must start at 0 and end at the "
                             f"sequence count {count}; found "
                             f"{docs[:1].tolist()}..{docs[-1:].tolist()}")
        if np.any(np.diff(docs) < 0):
            raise ShoalError(f"{idx_file}: document indices are not in increasing order")
        if count == 0:
            return
        if lengths.min() < 0 or pointers.min() < 0:
            raise ShoalError(f"{idx_file}: negative sequence length or pointer")
        end = int((pointers + lengths.astype(np.int64) * self.dtype.itemsize).max())
        bin_size = bin_file.stat().st_size
        if end > bin_size:
            raise ShoalError(f"{bin_file} is truncated: {bin_size} bytes, but its index points "
                             f"up to byte {end}")
        if np.any(pointers % self.dtype.itemsize):
            raise ShoalError(f"{idx_file}: sequence pointers are not multiples of the "
                             f"{self.dtype.itemsize}-byte token size")

    # Memory maps do not pickle; DataLoader workers reopen the files instead.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `idx` (to its end when length is None)."""
        count = len(self)
        if not -count <= idx < count:
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({count} sequences)")
        idx %= count
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence "
                             f"{idx} of {self.prefix} ({size} tokens)")
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def documents(self) -> Iterable[np.ndarray]:
        """Each document's tokens, its sequences joined."""
        for start, stop in zip(self.document_indices[:-1], self.document_indices[1:]):
            parts = [self.get(i) for i in range(int(start), int(stop))]
            yield np.concatenate(parts) if parts else np.zeros(0, self.dtype)
