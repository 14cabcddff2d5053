"""Pretraining samples checked against a slow reference of the spec and against megatron-core.

The corpora are random documents written here as `.bin/.idx` byte for byte from the format spec
(formats.md 1.3) and read back by a tiny reader of our own, so these tests depend on neither
`shoal.data.indexed` nor on the code under test for their expected values. The strongest oracle,
megatron-core's own GPTDataset/BlendedDataset (its compiled helpers run on CPU), is used when it
is installed.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest
import torch

from shoal.data import gpt_dataset
from shoal.data.blended_dataset import build_blending_indices, build_exhaustive_blending_indices
from shoal.data.gpt_dataset import GPTDataset, GPTDatasetConfig, build_pretrain_datasets
from shoal.errors import ShoalError

torch.set_num_threads(1)
EOD = 0

# ----------------------------------------------------------------------------------------------
# A corpus written from the spec, and a reader of our own


def write_indexed(prefix: str, docs: list[np.ndarray], dtype=np.uint16) -> None:
    """One sequence per document, as `shoal preprocess` without sentence splitting writes."""
    code = {np.uint16: 8, np.int32: 4}[dtype]
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for doc in docs:
            f.write(np.asarray(doc, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1))
        f.write(lengths.tobytes() + pointers.astype("<i8").tobytes())
        f.write(np.arange(len(docs) + 1, dtype="<i8").tobytes())


class SpecReader:
    """Reads the file pair above: header, lengths, pointers, tokens (enough for GPTDataset)."""

    def __init__(self, prefix: str) -> None:
        raw = np.fromfile(prefix + ".idx", dtype=np.uint8)
        _, code, count, _ = struct.unpack("<QBQQ", raw[9:34].tobytes())
        self.dtype = {8: np.uint16, 4: np.int32}[code]
        self.sequence_lengths = raw[34 : 34 + 4 * count].view("<i4")
        self.pointers = raw[34 + 4 * count : 34 + 12 * count].view("<i8")
        self.tokens = np.fromfile(prefix + ".bin", dtype=self.dtype)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = int(self.pointers[idx]) // np.dtype(self.dtype).itemsize + offset
        stop = start + (int(self.sequence_lengths[idx]) - offset if length is None else length)
        return self.tokens[start:stop]


def random_docs(seed: int, count: int, max_len: int = 30, empty_every: int = 0) -> list[np.ndarray]:
    """Documents of 1..max_len random tokens ending in EOD; every `empty_every`-th one empty."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        if empty_every and i % empty_every == 3:
            docs.append(np.zeros(0, dtype=np.int64))
            continue
        body = rng.integers(1, 1000, int(rng.integers(0, max_len)))
        docs.append(np.append(body, EOD))
    return docs


@pytest.fixture
def corpus(tmp_path):
    """A factory: write documents under tmp_path and return the prefix."""

    def make(name: str, docs: list[np.ndarray]) -> str:
        prefix = str(tmp_path / name)
        write_indexed(prefix, docs)
        return prefix

    return make


def build(paths, **kwargs):
    kwargs.setdefault("open_dataset", SpecReader)
    kwargs.setdefault("eod_token_id", EOD)
    return build_pretrain_datasets(paths, **kwargs)


# ----------------------------------------------------------------------------------------------
# A slow reference of the spec (formats.md section 2), written independently of the module


def reference_samples(docs, doc_ids, seq_length, seed, num_samples):
    """Every sample's seq_length+1 tokens, in dataset order, from the flattened shuffled epochs."""
    tokens_per_epoch = sum(len(docs[i]) for i in doc_ids)
    epochs = 1
    if num_samples is not None:
        while epochs * tokens_per_epoch < num_samples * seq_length + 1:
            epochs += 1
    separate = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - before_final < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)

    def shuffled_epochs(n):
        order = np.array(list(doc_ids) * n, dtype=np.int32)
        rng.shuffle(order)
        return list(order)

    order = shuffled_epochs(epochs - 1) + shuffled_epochs(1) if separate else shuffled_epochs(epochs)
    flat = np.concatenate([docs[i] for i in order]).astype(np.int64)
    count = (len(flat) - 1) // seq_length
    windows = [flat[j * seq_length : j * seq_length + seq_length + 1] for j in range(count)]
    dtype = np.uint32
    if separate:
        first, rest = np.arange(before_final, dtype=dtype), np.arange(before_final, count, dtype=dtype)
        rng.shuffle(first)
        rng.shuffle(rest)
        permutation = np.concatenate((first, rest))
    else:
        permutation = np.arange(count, dtype=dtype)
        rng.shuffle(permutation)
    return [windows[int(j)] for j in permutation], order, separate


def reference_split(split: str, n: int) -> list[tuple[int, int] | None]:
    numbers = [float(x) for x in split.split(",")]
    numbers += [0.0] * (3 - len(numbers))
    total = sum(numbers)
    lo, out = 0.0, []
    for x in numbers:
        hi = lo + x / total
        out.append((int(round(lo * n)), int(round(hi * n))) if x > 0 else None)
        lo = hi
    return out


# ----------------------------------------------------------------------------------------------
# Splits and samples


@pytest.mark.parametrize("split", ["998,1,1", "90,10,0", "1,1,1", "7", "0,1,0", "80,0,20"])
@pytest.mark.parametrize("n", [1, 10, 37, 1000])
def test_split_ranges_are_contiguous_rounded_fractions(split, n):
    ranges = gpt_dataset.split_ranges(split, n)
    assert ranges == reference_split(split, n)
    built = [r for r in ranges if r is not None]
    assert all(a[1] == b[0] for a, b in zip(built, built[1:]))  # contiguous, in file order
    assert built[0][0] == 0 and built[-1][1] == n


def test_bad_split_string_is_a_clear_error():
    for bad in ("", "a,b", "0,0,0", "1,2,3,4", "9..8,1"):
        with pytest.raises(ShoalError, match="split"):
            gpt_dataset.parse_split(bad)


@pytest.mark.parametrize(
    "seq_length,num_samples,empty_every",
    [(8, None, 0), (7, None, 5), (16, 90, 0), (5, 1000, 4), (32, 41, 0)],
)
def test_samples_are_windows_of_the_shuffled_stream(corpus, seq_length, num_samples, empty_every):
    docs = random_docs(1, 60, empty_every=empty_every)
    prefix = corpus("c", docs)
    train, valid, _ = build([prefix], seq_length=seq_length, seed=7, split="80,20,0",
                            num_samples=(num_samples, None, None), cache_dir=None)
    for dataset, (lo, hi), n in ((train, reference_split("80,20,0", 60)[0], num_samples),
                                 (valid, reference_split("80,20,0", 60)[1], None)):
        expected, order, _ = reference_samples(docs, range(lo, hi), seq_length, 7, n)
        assert list(dataset.document_index) == order
        assert len(dataset) == len(expected) and (n is None or len(dataset) >= n)
        for idx, window in enumerate(expected):
            assert np.array_equal(dataset.sample_tokens(idx), window)
            sample = dataset[idx]
            assert torch.equal(sample["tokens"], torch.from_numpy(window[:-1]))
            assert torch.equal(sample["labels"], torch.from_numpy(window[1:]))
            assert all(v.shape == (seq_length,) for v in sample.values())
        # Neighbouring windows of the stream share exactly one token.
        rows = dataset.sample_index
        assert rows.shape == (len(dataset) + 1, 2) and rows.dtype == np.int32


def test_separate_final_epoch(corpus):
    docs = random_docs(2, 40)
    prefix = corpus("c", docs)
    tokens = sum(len(d) for d in docs)
    seq_length = 10
    per_epoch = (tokens - 1) // seq_length
    # Just past one epoch: the small final epoch is shuffled on its own ...
    small, big = per_epoch + 2, 2 * per_epoch - 1
    for n, separated in ((small, True), (big, False)):
        train, *_ = build([prefix], seq_length=seq_length, seed=3, split="1",
                          num_samples=(n, None, None))
        expected, order, separate = reference_samples(docs, range(40), seq_length, 3, n)
        assert separate == separated
        index = np.asarray(train.document_index)
        assert list(index) == order
        if separated:  # ... so its 40 documents, each once, come last
            assert sorted(index[-40:].tolist()) == list(range(40))
        for idx in range(len(train)):
            assert np.array_equal(train.sample_tokens(idx), expected[idx])
        if separated:
            before_final = (tokens - 1) // seq_length
            assert set(np.asarray(train.shuffle_index[:before_final]).tolist()) == set(range(before_final))


# ----------------------------------------------------------------------------------------------
# Masks, positions, document ids, padding


def reference_fields(window, eod, reset_position_ids, eod_mask_loss, pad=-1):
    tokens, labels = list(window[:-1]), list(window[1:])
    doc, position, documents, positions, mask = 0, 0, [], [], []
    for t, label in zip(tokens, labels):
        documents.append(doc)
        positions.append(position if reset_position_ids else len(positions))
        keep = not (eod_mask_loss and t == eod) and label != pad
        mask.append(1.0 if keep else 0.0)
        position += 1
        if t == eod:  # the EOD closes its document; the next token starts a new one
            doc, position = doc + 1, 0
    return {
        "tokens": [0 if t == pad else t for t in tokens],
        "labels": [0 if t == pad else t for t in labels],
        "loss_mask": mask,
        "position_ids": positions,
        "document_ids": documents,
    }


@pytest.mark.parametrize("reset_position_ids", [False, True])
@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_masks_positions_and_document_ids(corpus, reset_position_ids, eod_mask_loss):
    docs = random_docs(4, 50, max_len=12)
    prefix = corpus("c", docs)
    train, *_ = build([prefix], seq_length=24, seed=1, split="1",
                      reset_position_ids=reset_position_ids, eod_mask_loss=eod_mask_loss)
    seen_eod = False
    for idx in range(len(train)):
        window = train.sample_tokens(idx)
        seen_eod |= bool((window[:-1] == EOD).any())
        sample = train[idx]
        expected = reference_fields(window, EOD, reset_position_ids, eod_mask_loss)
        for key, values in expected.items():
            assert sample[key].tolist() == values, key
        assert sample["loss_mask"].dtype == torch.float32
        assert all(sample[k].dtype == torch.int64 for k in ("tokens", "labels", "position_ids"))
    assert seen_eod


def test_partial_last_validation_sample_is_padded_and_masked(corpus):
    docs = random_docs(5, 30)
    prefix = corpus("c", docs)
    tokens = sum(len(d) for d in docs[15:])
    seq_length = 9 if (tokens - 1) % 9 else 8  # make sure the stream does not divide evenly
    config = GPTDatasetConfig(seq_length, 11, "50,50", None, EOD,
                              drop_last_partial_validation_sequence=False)
    valid = GPTDataset(SpecReader(prefix), prefix, np.arange(15, 30, dtype=np.int32), None, "valid", config)
    assert len(valid) == math.ceil((tokens - 1) / seq_length)
    last = [i for i in range(len(valid)) if int(valid.shuffle_index[i]) == len(valid) - 1][0]
    window = valid.sample_tokens(last)
    real = (tokens - 1) % seq_length + 1  # tokens left for the partial window
    assert (window[real:] == -1).all() and (window[:real] != -1).all()
    sample = valid[last]
    assert sample["loss_mask"].tolist() == reference_fields(window, EOD, False, False)["loss_mask"]
    assert sample["loss_mask"][real - 1 :].sum() == 0 and sample["tokens"][real:].eq(0).all()


# ----------------------------------------------------------------------------------------------
# Blending


def reference_blend(weights, size):
    counts, out = [0] * len(weights), []
    for s in range(size):
        errors = [w * max(s, 1) - c for w, c in zip(weights, counts)]
        d = errors.index(max(errors))  # first maximum: ties go to the lowest index
        out.append((d, counts[d]))
        counts[d] += 1
    return out


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.3, 0.5], [0.7, 0.1, 0.1, 0.1], [1.0]])
def test_blending_follows_weights_and_greedy_rule(weights):
    size = 997
    dataset_index, sample_index = build_blending_indices(weights, size)
    assert list(zip(dataset_index.tolist(), sample_index.tolist())) == reference_blend(weights, size)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    # Every prefix of the blend stays within two samples of its share (the greedy choice looks
    # at the share before the sample is drawn, so one step may overshoot by a little over one).
    counts = np.zeros(len(weights))
    for s, d in enumerate(dataset_index.tolist(), start=1):
        counts[d] += 1
        assert np.all(np.abs(counts - np.array(weights) * s) < 2.0)
    assert np.all(np.abs(counts / size - np.array(weights)) < 2.0 / size)


def test_exhaustive_blending_draws_every_sample_once():
    sizes = [5, 0, 17, 3]
    dataset_index, sample_index = build_exhaustive_blending_indices(sizes)
    assert len(dataset_index) == sum(sizes)
    for d, size in enumerate(sizes):
        assert sorted(sample_index[dataset_index == d].tolist()) == list(range(size))


def test_weighted_blend_requests_and_samples(corpus):
    docs_a, docs_b = random_docs(6, 50), random_docs(7, 80)
    a, b = corpus("a", docs_a), corpus("b", docs_b)
    size = 300
    train, valid, test = build(["30", a, "70", b], seq_length=8, seed=5, split="90,10,0",
                               num_samples=(size, 20, None))
    assert test is None
    for dataset, n in ((train, size), (valid, 20)):
        targets = [math.ceil(n * 0.3), math.ceil(n * 0.7)]
        assert len(dataset) == sum(targets)
        assert [d.num_samples for d in dataset.datasets] == [math.ceil(t * 1.005) for t in targets]
        assert np.bincount(dataset.dataset_index).tolist() == targets
        for idx in range(0, len(dataset), 7):
            d, j = int(dataset.dataset_index[idx]), int(dataset.dataset_sample_index[idx])
            assert torch.equal(dataset[idx]["tokens"], dataset.datasets[d][j]["tokens"])
    member = train.datasets[0]
    expected, _, _ = reference_samples(docs_a, range(45), 8, 5, member.num_samples)
    assert all(np.array_equal(member.sample_tokens(i), w) for i, w in enumerate(expected))


def test_directory_blends_its_prefixes_by_size(tmp_path):
    for name, seed, count in (("b_text_document", 8, 40), ("a_text_document", 9, 25)):
        write_indexed(str(tmp_path / name), random_docs(seed, count))
    (tmp_path / "notes.txt").write_text("not a dataset")
    train, _, _ = build([str(tmp_path)], seq_length=8, seed=1, split="1", num_samples=None)
    paths = [os.path.basename(d.dataset_path) for d in train.datasets]
    assert paths == ["a_text_document", "b_text_document"]
    assert np.bincount(train.dataset_index).tolist() == [len(d) for d in train.datasets]


def test_bad_paths_are_clear_errors(tmp_path, corpus):
    with pytest.raises(ShoalError, match="no Megatron .idx/.bin"):
        build([str(tmp_path)], seq_length=8, seed=1)
    prefix = corpus("c", random_docs(1, 20))
    os.remove(prefix + ".bin")
    with pytest.raises(ShoalError, match=r"c\.bin not found"):
        build([prefix], seq_length=8, seed=1)
    with pytest.raises(ShoalError, match="no sample"):
        build([corpus("tiny", random_docs(1, 3, max_len=2))], seq_length=64, seed=1)
    good = corpus("good", random_docs(1, 20))
    with pytest.raises(ShoalError, match="sample count"):
        build(["1", good, "2", good], seq_length=8, seed=1)
    with pytest.raises(ShoalError, match="eod_token_id"):
        build([good], seq_length=8, seed=1, eod_token_id=None, reset_position_ids=True)
    hollow = corpus("hollow", random_docs(1, 10) + [np.zeros(0, dtype=np.int64)] * 2)
    with pytest.raises(ShoalError, match=r"hollow: 5 valid samples requested"):
        build([hollow], seq_length=8, seed=1, split="10,2,0", num_samples=(10, 5, None))


# ----------------------------------------------------------------------------------------------
# Caches


def test_cache_files_are_reused_and_keyed(corpus, monkeypatch, tmp_path):
    prefix = corpus("c", random_docs(3, 50))
    first, *_ = build([prefix], seq_length=8, seed=2, split="1", num_samples=(100, None, None))
    cache = os.path.join(prefix, "cache", "GPTDataset_indices")  # Megatron's default location
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(f.split("-")[1:3] == ["GPTDataset", "train"] for f in files)
    assert {f.split("-", 3)[3] for f in files} == {
        "description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"}
    for name in files:
        if name.endswith(".npy"):  # plain arrays, loadable without pickle
            np.load(os.path.join(cache, name), allow_pickle=False)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", no_rebuild)
    second, *_ = build([prefix], seq_length=8, seed=2, split="1", num_samples=(100, None, None))
    assert isinstance(second.sample_index, np.memmap)
    assert all(torch.equal(first[i]["tokens"], second[i]["tokens"]) for i in range(len(first)))
    monkeypatch.undo()

    for changed in ({"seed": 3}, {"seq_length": 9}, {"num_samples": (101, None, None)}):
        args = {"seq_length": 8, "seed": 2, "split": "1", "num_samples": (100, None, None)} | changed
        build([prefix], **args)
        now = sorted(os.listdir(cache))
        assert len(now) == len(files) + 4  # a new family of four files, none overwritten
        files = now

    # A damaged cache file is rebuilt, not trusted.
    index_file = [f for f in files if f.endswith("sample_index.npy")][0]
    with open(os.path.join(cache, index_file), "r+b") as f:
        f.truncate(20)
    build([prefix], seq_length=8, seed=2, split="1", num_samples=(100, None, None))

    # An explicit cache directory is used as given, blends included.
    other = corpus("d", random_docs(4, 30))
    custom = str(tmp_path / "my_cache")
    build([prefix, other], seq_length=8, seed=2, split="1", cache_dir=custom)
    kinds = sorted({f.split("-")[1] for f in os.listdir(custom)})
    assert kinds == ["BlendedDataset", "GPTDataset"]


def test_interrupted_cache_write_leaves_no_usable_half(corpus, monkeypatch, tmp_path):
    from shoal.data import index_cache

    prefix = corpus("c", random_docs(5, 40))
    cache = str(tmp_path / "cache")
    real_save, calls = index_cache._save_npy, []

    def failing_save(fd, array):
        calls.append(1)
        if len(calls) == 2:  # the disk fills up while the second array is written
            os.close(fd)
            raise OSError("No space left on device")
        real_save(fd, array)

    monkeypatch.setattr(index_cache, "_save_npy", failing_save)
    first, *_ = build([prefix], seq_length=8, seed=2, split="1", cache_dir=cache)
    monkeypatch.undo()
    left = os.listdir(cache)
    assert not any(f.endswith("description.txt") or f.endswith(".tmp") for f in left)
    assert len(left) == 1  # the one finished array, unused without its description
    second, *_ = build([prefix], seq_length=8, seed=2, split="1", cache_dir=cache)
    assert len(os.listdir(cache)) == 4 and not isinstance(first.sample_index, np.memmap)
    assert all(torch.equal(first[i]["tokens"], second[i]["tokens"]) for i in range(len(first)))


def test_shoal_reader_gives_the_same_samples(corpus):
    """The real reader of `shoal.data.indexed` behind the default `open_dataset`."""
    prefix = corpus("c", random_docs(12, 40))
    ours, *_ = build([prefix], seq_length=8, seed=4, split="1", open_dataset=SpecReader)
    real, *_ = build_pretrain_datasets([prefix], seq_length=8, seed=4, split="1", eod_token_id=EOD)
    assert all(torch.equal(ours[i]["tokens"], real[i]["tokens"]) for i in range(len(ours)))


# ----------------------------------------------------------------------------------------------
# megatron-core, the implementation these datasets must agree with


def megatron_build(prefixes, weights, sizes, seq_length, seed, split, **options):
    helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    assert helpers  # its compiled index builders are what we compare against
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MegatronConfig

    class Tokenizer:
        vocab_size, eod, unique_identifiers = 1000, EOD, {"class": "test"}

    config = MegatronConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=None, tokenizer=Tokenizer(), reset_attention_mask=False,
        reset_position_ids=options.get("reset_position_ids", False),
        eod_mask_loss=options.get("eod_mask_loss", False), create_attention_mask=False,
        drop_last_partial_validation_sequence=options.get("drop_last", True),
    )
    return BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


def assert_same_gpt(ours, theirs):
    for name in ("document_index", "sample_index", "shuffle_index"):
        a, b = np.asarray(getattr(ours, name)), np.asarray(getattr(theirs, name))
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for idx in range(len(ours)):
        mine, megatron = ours[idx], theirs[idx]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(mine[key], megatron[key]), (idx, key)


@pytest.mark.parametrize(
    "seq_length,sizes,empty_every,options",
    [
        (16, [None, None, None], 0, {}),
        (8, [700, 30, 9], 5, {"reset_position_ids": True, "eod_mask_loss": True}),
        (13, [101, 7, None], 0, {"drop_last": False}),
    ],
)
def test_single_prefix_matches_megatron_core(tmp_path, seq_length, sizes, empty_every, options):
    prefix = str(tmp_path / "c")
    write_indexed(prefix, random_docs(21, 120, empty_every=empty_every))
    theirs = megatron_build([prefix], None, sizes, seq_length, 1234, "90,7,3", **options)
    kwargs = {k: v for k, v in options.items() if k != "drop_last"}
    ours = build([prefix], seq_length=seq_length, seed=1234, split="90,7,3", num_samples=sizes,
                 cache_dir=str(tmp_path / "cache"),
                 drop_last_partial_validation_sequence=options.get("drop_last", True), **kwargs)
    for mine, megatron in zip(ours, theirs):
        assert (mine is None) == (megatron is None or len(megatron) == 0)
        if mine is not None:
            assert_same_gpt(mine, megatron)


@pytest.mark.parametrize(
    "weights,sizes",
    [(["2", "1", "1"], [400, 40, 20]), (["0.37", "1.1", "0.53"], [333, 41, 17]), (None, [300, None, 25])],
)
def test_blend_matches_megatron_core(tmp_path, weights, sizes):
    prefixes = []
    for k, count in enumerate((90, 60, 75)):
        prefixes.append(str(tmp_path / f"p{k}"))
        write_indexed(prefixes[-1], random_docs(30 + k, count, empty_every=7))
    theirs = megatron_build(prefixes, None if weights is None else [float(w) for w in weights],
                            sizes, 10, 99, "80,12,8")
    paths = prefixes if weights is None else [x for pair in zip(weights, prefixes) for x in pair]
    ours = build(paths, seq_length=10, seed=99, split="80,12,8", num_samples=sizes)
    for mine, megatron in zip(ours, theirs):
        assert np.array_equal(mine.dataset_index, megatron.dataset_index)
        assert np.array_equal(mine.dataset_sample_index, megatron.dataset_sample_index)
        for a, b in zip(mine.datasets, megatron.datasets):
            for name in ("document_index", "sample_index", "shuffle_index"):
                assert np.array_equal(getattr(a, name), getattr(b, name)), name
        for idx in range(0, len(mine), 5):
            assert torch.equal(mine[idx]["tokens"], megatron[idx]["tokens"])
