"""The `.bin/.idx` format against two oracles: megatron-core's own builder and reader (CPU import),
and the byte layout of formats.md section 1 rebuilt here with `struct`, element by element."""

from __future__ import annotations

import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from shoal.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from shoal.errors import ShoalError

# (struct format of one token, dtype code from the spec's table)
SPEC_DTYPES = {np.uint8: ("B", 1), np.int16: ("h", 3), np.int32: ("i", 4), np.int64: ("q", 5),
               np.uint16: ("H", 8)}

# Documents as lists of sequences: a one-sequence document, a three-sequence one, an empty
# document (no sequence at all), and an empty sequence inside a document.
DOCUMENTS = [[[5, 9, 2]], [[1], [7, 7, 200], [3, 4]], [], [[], [250]]]


def spec_files(documents: list[list[list[int]]], dtype: type) -> tuple[bytes, bytes]:
    """(.bin, .idx) bytes written from formats.md 1.2/1.3 by hand."""
    fmt, code = SPEC_DTYPES[dtype]
    sequences = [seq for doc in documents for seq in doc]
    data = b"".join(struct.pack(f"<{len(s)}{fmt}", *s) for s in sequences)
    itemsize = struct.calcsize(fmt)
    pointers, offset = [], 0
    for seq in sequences:
        pointers.append(offset)
        offset += len(seq) * itemsize
    doc_indices = [0]
    for doc in documents:
        doc_indices.append(doc_indices[-1] + len(doc))
    index = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    index += struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(doc_indices))
    index += b"".join(struct.pack("<i", len(s)) for s in sequences)
    index += b"".join(struct.pack("<q", p) for p in pointers)
    index += b"".join(struct.pack("<q", d) for d in doc_indices)
    return data, index


def write_shoal(prefix: Path, documents: list[list[list[int]]], dtype: type) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for i, doc in enumerate(documents):
            if i % 2 == 0:  # exercise both builder paths
                for seq in doc:
                    writer.add_item(seq)
                writer.end_document()
            else:
                writer.add_document([t for s in doc for t in s], [len(s) for s in doc])


def megatron():
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.mark.parametrize("dtype", list(SPEC_DTYPES))
def test_written_bytes_follow_the_spec(tmp_path: Path, dtype: type) -> None:
    write_shoal(tmp_path / "ds", DOCUMENTS, dtype)
    data, index = spec_files(DOCUMENTS, dtype)
    assert (tmp_path / "ds.bin").read_bytes() == data
    assert (tmp_path / "ds.idx").read_bytes() == index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temp files


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reader_parses_files_written_by_hand(tmp_path: Path, dtype: type) -> None:
    data, index = spec_files(DOCUMENTS, dtype)
    (tmp_path / "ds.bin").write_bytes(data)
    (tmp_path / "ds.idx").write_bytes(index)
    ds = IndexedDataset(tmp_path / "ds")
    sequences = [seq for doc in DOCUMENTS for seq in doc]
    assert len(ds) == len(sequences)
    assert ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    assert [s.tolist() for s in ds[1:4]] == sequences[1:4]
    assert ds[-1].tolist() == sequences[-1]
    assert ds.sequence_lengths.tolist() == [len(s) for s in sequences]
    assert ds.document_indices.tolist() == [0, 1, 4, 4, 6]
    assert ds.get(2, offset=1, length=2).tolist() == sequences[2][1:3]
    assert ds.get(2, offset=1).tolist() == sequences[2][1:]
    assert [d.tolist() for d in ds.documents()] == [[t for s in doc for t in s] for doc in DOCUMENTS]
    assert ds.num_tokens == sum(map(len, sequences)) and ds.num_documents == len(DOCUMENTS)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.get(2, offset=2, length=5)
    # a prefix given with its extension is understood, and the reader survives pickling
    assert len(IndexedDataset(tmp_path / "ds.bin")) == len(ds)
    assert pickle.loads(pickle.dumps(ds))[1].tolist() == sequences[1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron-core's numpy 2 warning
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_megatron_builder_and_shoal_writer_agree_byte_for_byte(tmp_path: Path, dtype: type) -> None:
    import torch

    mod = megatron()
    builder = mod.IndexedDatasetBuilder(str(tmp_path / "mcore.bin"), dtype=dtype)
    for i, doc in enumerate(DOCUMENTS):
        if i % 2 == 0:
            for seq in doc:
                builder.add_item(torch.tensor(seq, dtype=torch.int64))
            builder.end_document()
        else:
            builder.add_document(torch.tensor([t for s in doc for t in s]), [len(s) for s in doc])
    builder.finalize(str(tmp_path / "mcore.idx"))
    write_shoal(tmp_path / "shoal", DOCUMENTS, dtype)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"shoal.{ext}").read_bytes() == (tmp_path / f"mcore.{ext}").read_bytes()
    ours = IndexedDataset(tmp_path / "mcore")
    assert [ours[i].tolist() for i in range(len(ours))] == [s for doc in DOCUMENTS for s in doc]
    assert ours.document_indices.tolist() == [0, 1, 4, 4, 6]


def test_megatron_reader_reads_shoal_files(tmp_path: Path) -> None:
    mod = megatron()
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 128256, size=int(n)).tolist()] for n in rng.integers(1, 40, size=30)]
    write_shoal(tmp_path / "ds", docs, np.int32)
    theirs, ours = mod.IndexedDataset(str(tmp_path / "ds")), IndexedDataset(tmp_path / "ds")
    assert len(theirs) == len(ours) == 30
    assert theirs.index.dtype == ours.dtype == np.int32
    assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    assert np.array_equal(theirs.document_indices, ours.document_indices)
    for i in range(len(ours)):
        assert np.array_equal(theirs[i], ours[i])
    longest = int(np.argmax(ours.sequence_lengths))
    assert np.array_equal(theirs.get(longest, offset=1, length=3),
                          ours.get(longest, offset=1, length=3))


def test_add_index_merges_like_megatron_and_like_one_pass(tmp_path: Path) -> None:
    first, second = DOCUMENTS[:2], DOCUMENTS[2:]
    write_shoal(tmp_path / "a", first, np.uint16)
    write_shoal(tmp_path / "b", second, np.uint16)
    with IndexedDatasetWriter(tmp_path / "merged", np.uint16) as writer:
        writer.add_index(tmp_path / "a")
        writer.add_index(tmp_path / "b")
    data, index = spec_files(DOCUMENTS, np.uint16)  # as if written in one pass
    assert (tmp_path / "merged.bin").read_bytes() == data
    assert (tmp_path / "merged.idx").read_bytes() == index

    mod = megatron()
    builder = mod.IndexedDatasetBuilder(str(tmp_path / "mcore.bin"), dtype=np.uint16)
    builder.add_index(str(tmp_path / "a"))
    builder.add_index(str(tmp_path / "b"))
    builder.finalize(str(tmp_path / "mcore.idx"))
    assert (tmp_path / "mcore.idx").read_bytes() == index


def test_add_index_refuses_another_dtype(tmp_path: Path) -> None:
    write_shoal(tmp_path / "a", DOCUMENTS, np.int32)
    writer = IndexedDatasetWriter(tmp_path / "merged", np.uint16)
    with pytest.raises(ShoalError, match="dtypes differ"):
        writer.add_index(tmp_path / "a")
    writer.abort()
    assert not list(tmp_path.glob("merged*"))


def test_optimal_dtype_threshold_is_65500() -> None:
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32
    mod = megatron()
    for vocab in (256, 50257, 65499, 65500, 65536, 151936):
        assert optimal_dtype(vocab) == np.dtype(mod.DType.optimal_dtype(vocab))


def test_failed_write_leaves_nothing_and_keeps_the_old_dataset(tmp_path: Path) -> None:
    write_shoal(tmp_path / "ds", DOCUMENTS, np.uint16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    # a token that does not fit the dtype is refused rather than wrapped around
    with pytest.raises(ShoalError, match="70000 does not fit dtype uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
            writer.add_document([1, 70000])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_empty_dataset_round_trips(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16):
        pass
    data, index = spec_files([], np.uint16)
    assert (tmp_path / "ds.idx").read_bytes() == index and data == b""
    assert len(IndexedDataset(tmp_path / "ds")) == 0


def _corrupt(name: str, index: bytes, data: bytes) -> tuple[bytes, bytes]:
    header = 34
    if name == "magic":
        return b"NOTIDX\x00\x00\x00" + index[9:], data
    if name == "version":
        return index[:9] + struct.pack("<Q", 2) + index[17:], data
    if name == "dtype":
        return index[:17] + bytes([9]) + index[18:], data
    if name == "short_header":
        return index[:20], data
    if name == "truncated_idx":
        return index[:-8], data
    if name == "long_idx":
        return index + b"\x00" * 3, data
    if name == "truncated_bin":
        return index, data[:-2]
    if name == "document_indices":  # last document index no longer equals the sequence count
        return index[:-8] + struct.pack("<q", 5), data
    assert name == "negative_length"
    return index[:header] + struct.pack("<i", -1) + index[header + 4:], data


@pytest.mark.parametrize("name, message", [
    ("magic", "not a Megatron indexed dataset"), ("version", "unsupported index version 2"),
    ("dtype", "unknown dtype code 9"), ("short_header", "shorter than the 34-byte header"),
    ("truncated_idx", "is truncated"), ("long_idx", "longer than its header"),
    ("truncated_bin", r"ds\.bin is truncated"), ("document_indices", "document indices"),
    ("negative_length", "negative sequence length"),
])
def test_damaged_files_are_refused_with_a_clear_error(tmp_path: Path, name: str, message: str) -> None:
    data, index = spec_files(DOCUMENTS, np.uint16)
    index, data = _corrupt(name, index, data)
    (tmp_path / "ds.bin").write_bytes(data)
    (tmp_path / "ds.idx").write_bytes(index)
    with pytest.raises(ShoalError, match=message) as err:
        IndexedDataset(tmp_path / "ds")
    assert str(tmp_path / "ds") in str(err.value)


@pytest.mark.parametrize("missing", ["bin", "idx"])
def test_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    write_shoal(tmp_path / "ds", DOCUMENTS, np.uint16)
    (tmp_path / f"ds.{missing}").unlink()
    with pytest.raises(ShoalError, match=rf"ds\.{missing} not found"):
        IndexedDataset(tmp_path / "ds")
