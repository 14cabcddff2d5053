"""`shoal preprocess`: tokenize JSON Lines into Megatron `.bin/.idx` files, one pair per JSON key.

It accepts the command line of NeMo's `preprocess_data_for_megatron.py` as it is (`--input=...`,
`--json-keys`, `--dataset-impl mmap`, `--tokenizer-library huggingface`, `--tokenizer-type ID`,
`--output-prefix`, `--append-eod`) and writes the same files: `PREFIX_<key>_document.bin/.idx`,
uint16 tokens below 65500 vocabulary entries, else int32.

BOS follows NeMo's script: none is added, and `--append-eod` appends the eos id. `--add-bos`
prepends the tokenizer's bos id as Megatron-LM's `tools/preprocess_data.py` does for Llama.
Documents whose text gives no token are skipped, as NeMo skips them.

Workers tokenize batches of lines in parallel; results are written in input order, so any number
of workers gives byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from shoal.checkpoint.atomic import refuse_overlap
from shoal.data.indexed import IndexedDatasetWriter, bin_path, idx_path, optimal_dtype
from shoal.data.tokenizer import bos_token_id, eod_token_id, load_tokenizer
from shoal.errors import ShoalError, io_error

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Megatron-LM names a tokenizer class in --tokenizer-type and the files in --tokenizer-model.
_MLM_HF_TYPES = {"HuggingFaceTokenizer"}


@dataclass
class PreprocessSummary:
    """What `preprocess` wrote; per-key counts are keyed by JSON key."""

    prefixes: dict[str, str]
    documents: dict[str, int]
    tokens: dict[str, int]
    empty_skipped: dict[str, int]
    lines: int = 0
    bad_lines: int = 0
    seconds: float = 0.0


@dataclass
class _Batch:
    """Consecutive raw lines of one input file, with how far into all inputs reading has got."""

    file_index: int
    first_line: int  # 1-based line number of lines[0]
    lines: list[bytes]
    bytes_done: int


@dataclass
class _Encoded:
    """A batch tokenized: per key, the concatenated tokens and each line's token count."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    problems: list[tuple[int, str]] = field(default_factory=list)  # (index in batch, message)
    doc_lines: list[int] = field(default_factory=list)  # index in batch of each document's line


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, globs or folders (`**/*.json*` inside), in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        text = os.fspath(pattern)
        if Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*.json*") if p.is_file())
            found = [p for p in found if p.name.endswith(INPUT_SUFFIXES)]
        elif glob.has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        else:
            found = [Path(text)] if Path(text).is_file() else []
        if not found:
            raise ShoalError(f"input {text} matches no file (expected a .jsonl/.json file, a glob "
                             f"or a folder; .gz variants are read too)")
        files.extend(found)
    unsupported = [str(p) for p in files if not p.name.endswith(INPUT_SUFFIXES)]
    if unsupported:
        raise ShoalError(f"input {unsupported[0]} is not JSON Lines: expected a name ending in "
                         f"{', '.join(INPUT_SUFFIXES)}")
    return files


# -- worker side: tokenizer and settings live in a per-process global set by the initializer ----

_WORKER: dict = {}


def _init_worker(tokenizer: PreTrainedTokenizerBase, keys: Sequence[str], bos: int | None,
                 eod: int | None) -> None:
    _WORKER.update(tokenizer=tokenizer, keys=list(keys), bos=bos, eod=eod)


def _parse_line(raw: bytes, keys: Sequence[str]) -> tuple[list[str] | None, str | None]:
    """The texts of one line, or a message saying what is wrong with it."""
    hint = (" (the file looks like one JSON array; expected JSON Lines, one object per line)"
            if raw.lstrip().startswith(b"[") else "")
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both
        return None, f"not valid JSON: {err}{hint}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}{hint}"
    texts = []
    for key in keys:
        if key not in record:
            return None, f"no key {key!r} (keys present: {', '.join(map(repr, record)) or 'none'})"
        if not isinstance(record[key], str):
            return None, f"key {key!r} holds {type(record[key]).__name__}, expected a string"
        texts.append(record[key])
    return texts, None


def _encode_batch(batch: _Batch) -> _Encoded:
    tokenizer, keys = _WORKER["tokenizer"], _WORKER["keys"]
    bos, eod = _WORKER["bos"], _WORKER["eod"]
    texts: dict[str, list[str]] = {key: [] for key in keys}
    problems = []
    doc_lines = []
    for i, raw in enumerate(batch.lines):
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) are not documents
        parsed, problem = _parse_line(raw, keys)
        if problem is not None:
            problems.append((i, problem))
            continue
        doc_lines.append(i)
        for key, text in zip(keys, parsed):
            texts[key].append(text)
    tokens, lengths = {}, {}
    for key in keys:
        # No special tokens from the tokenizer: BOS/EOD are added explicitly below.
        ids = tokenizer(texts[key], add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"] if texts[key] else []
        docs = []
        for doc in ids:
            if doc:  # an empty text stays empty: no lone BOS/EOD documents
                doc = ([bos] if bos is not None else []) + doc + ([eod] if eod is not None else [])
            docs.append(doc)
        lengths[key] = np.array([len(d) for d in docs], dtype=np.int64)
        tokens[key] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64,
                                  count=int(lengths[key].sum()))
    return _Encoded(tokens=tokens, lengths=lengths, problems=problems, doc_lines=doc_lines)


# -- main process: read, fan out, write in order ----------------------------------------------

def _open_input(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(line stream, raw file): the raw file's position measures progress through gz inputs."""
    raw = open(path, "rb")
    return (gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw), raw


def _read_batches(files: Sequence[Path], batch_size: int) -> Iterator[_Batch]:
    done_before = 0
    for file_index, path in enumerate(files):
        stream, raw = _open_input(path)
        with stream, raw:
            lines: list[bytes] = []
            first = 1
            try:
                for number, line in enumerate(stream, start=1):
                    if not lines:
                        first = number
                    lines.append(line)
                    if len(lines) == batch_size:
                        yield _Batch(file_index, first, lines, done_before + raw.tell())
                        lines = []
            except (OSError, EOFError, zlib.error) as err:  # corrupt or truncated .gz
                raise ShoalError(f"cannot read {path}: {err}") from err
            if lines:
                yield _Batch(file_index, first, lines, done_before + raw.tell())
        done_before += path.stat().st_size


def _encoded_batches(batches: Iterator[_Batch], init_args: tuple, workers: int
                     ) -> Iterator[tuple[_Batch, _Encoded]]:
    """Tokenize batches, in order; with workers > 1 a bounded window of them is in flight."""
    if workers <= 1:
        _init_worker(*init_args)
        for batch in batches:
            yield batch, _encode_batch(batch)
        return
    window = 4 * workers  # enough to keep every worker busy without reading the corpus ahead
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_batch, (batch,))))
            if len(pending) >= window:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


class _Progress:
    """A progress line every `interval` documents, rates and an ETA from input bytes read."""

    def __init__(self, total_bytes: int, interval: int, stream: IO[str] | None) -> None:
        self.total_bytes, self.interval, self.stream = max(total_bytes, 1), interval, stream
        self.start = time.perf_counter()
        self.next_report = interval

    def update(self, documents: int, tokens: int, bytes_done: int) -> None:
        if self.stream is None or self.interval <= 0 or documents < self.next_report:
            return
        self.next_report = (documents // self.interval + 1) * self.interval
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        fraction = min(bytes_done / self.total_bytes, 1.0)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        print(f"processed {documents} documents ({documents / elapsed:.0f} docs/s, "
              f"{tokens / elapsed:.0f} tokens/s, {bytes_done / elapsed / 2**20:.1f} MB/s), "
              f"{100 * fraction:.1f}% of input, ETA {_clock(eta)}", file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing read yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
               tokenizer: str | os.PathLike | PreTrainedTokenizerBase,
               json_keys: Sequence[str] = ("text",), *, append_eod: bool = False,
               add_bos: bool = False, workers: int = 1, skip_bad_lines: bool = False,
               overwrite: bool = False, log_interval: int = 1000, batch_size: int = 256,
               progress: bool = True, vocab_size: int | None = None) -> PreprocessSummary:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx` for each key.

    `tokenizer` is a tokenizer object or anything `load_tokenizer` accepts. Outputs appear only
    when every input was read; an error leaves no output (and an older output untouched).
    `progress` prints a line on stderr every `log_interval` documents. `vocab_size` is the model's
    embedding size: a token id at or above it is refused (the default, when `tokenizer` names a
    shoal checkpoint, is the checkpoint's own).
    """
    if not json_keys:
        raise ShoalError("--json-keys needs at least one key")
    if workers < 1:
        raise ShoalError(f"--workers must be at least 1, got {workers}")
    files = expand_inputs(inputs)
    if isinstance(tokenizer, (str, os.PathLike)):
        vocab_size = vocab_size if vocab_size is not None else checkpoint_vocab_size(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    dtype = optimal_dtype(len(tokenizer))
    bos = bos_token_id(tokenizer) if add_bos else None
    eod = eod_token_id(tokenizer) if append_eod else None
    for name, special in (("--add-bos: bos", bos), ("--append-eod: eos", eod)):
        if special is not None and vocab_size is not None and special >= vocab_size:
            raise ShoalError(f"{name} id {special} is beyond the model's embedding (vocab_size {vocab_size}, "
                             f"ids 0..{vocab_size - 1}); the tokenizer does not belong to this model")
    prefixes = {key: f"{os.fspath(output_prefix)}_{key}_document" for key in json_keys}
    for prefix in prefixes.values():
        for path in (bin_path(prefix), idx_path(prefix)):
            refuse_overlap(path, files)
            if path.exists() and not overwrite:
                raise ShoalError(f"output {path} already exists; pass --overwrite to replace it")
    out_dir = Path(prefixes[json_keys[0]]).absolute().parent
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise io_error(err, f"creating the output folder of {os.fspath(output_prefix)}") from err

    summary = PreprocessSummary(prefixes=prefixes, documents=dict.fromkeys(json_keys, 0),
                                tokens=dict.fromkeys(json_keys, 0),
                                empty_skipped=dict.fromkeys(json_keys, 0))
    meter = _Progress(sum(p.stat().st_size for p in files), log_interval,
                      sys.stderr if progress else None)
    writers: dict[str, IndexedDatasetWriter] = {}
    batches = _read_batches(files, batch_size)
    results = _encoded_batches(batches, (tokenizer, json_keys, bos, eod), workers)
    try:
        for key, prefix in prefixes.items():
            writers[key] = IndexedDatasetWriter(prefix, dtype)
        for batch, encoded in results:
            summary.lines += len(batch.lines)
            for index, problem in encoded.problems:
                if not skip_bad_lines:
                    raise ShoalError(f"{files[batch.file_index]}:{batch.first_line + index}: "
                                     f"{problem}; fix the line or pass --skip-bad-lines")
                summary.bad_lines += 1
            if vocab_size is not None:
                _check_vocabulary(encoded, vocab_size, files[batch.file_index], batch.first_line)
            for key, writer in writers.items():
                _write_documents(writer, encoded.tokens[key], encoded.lengths[key], summary, key)
            meter.update(summary.documents[json_keys[0]], sum(summary.tokens.values()),
                         batch.bytes_done)
        for writer in writers.values():
            writer.finalize()
    except BaseException as err:
        for writer in writers.values():
            writer.abort()
        for folder in created:  # a failed run leaves no trace, not even the folders it made
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, OSError):  # a full disk, a lost permission: say which and where
            raise io_error(err, f"tokenizing into {os.fspath(output_prefix)}_*_document.bin/.idx") from err
        raise
    finally:
        # Stop the worker pool and close the inputs now, not whenever the traceback is freed.
        results.close()
        batches.close()
    summary.seconds = time.perf_counter() - meter.start
    for key in json_keys:
        if summary.documents[key] == 0:
            # Training on an empty dataset fails much later and far from here: say it now.
            print(f"shoal preprocess: warning: no documents written for key {key!r}: {len(files)} input file(s) "
                  f"({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) held {summary.lines} "
                  f"line(s), {summary.empty_skipped[key]} empty text(s) and {summary.bad_lines} bad line(s); "
                  f"{prefixes[key]}.bin/.idx is an empty dataset", file=sys.stderr)
    return summary


def checkpoint_vocab_size(tokenizer: str | os.PathLike) -> int | None:
    """The embedding size of the model when `tokenizer` names a shoal checkpoint, else None.

    Read leniently: a shoal.json without the key (or unreadable) only means there is nothing to check
    against; the tokenizer itself is loaded and checked by `load_tokenizer`.
    """
    path = Path(tokenizer).expanduser() / "shoal.json"
    if not path.is_file():
        return None
    try:
        size = json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def _check_vocabulary(encoded: _Encoded, vocab_size: int, path: Path, first_line: int) -> None:
    """Refuse a token id the model cannot embed, naming the line that produced it."""
    for key, tokens in encoded.tokens.items():
        if not tokens.size or int(tokens.max()) < vocab_size:
            continue
        position = int(np.argmax(tokens >= vocab_size))
        doc = int(np.searchsorted(np.cumsum(encoded.lengths[key]), position, side="right"))
        line = first_line + encoded.doc_lines[doc]
        raise ShoalError(f"{path}:{line}: key {key!r} gives token id {int(tokens[position])}, beyond the model's "
                         f"embedding (vocab_size {vocab_size}, ids 0..{vocab_size - 1}): the tokenizer has "
                         f"more tokens than the checkpoint's model; nothing was written")


def _write_documents(writer: IndexedDatasetWriter, tokens: np.ndarray, lengths: np.ndarray,
                     summary: PreprocessSummary, key: str) -> None:
    start = 0
    for length in lengths.tolist():
        if length == 0:
            summary.empty_skipped[key] += 1
            continue
        writer.add_document(tokens[start:start + length])
        start += length
        summary.documents[key] += 1
        summary.tokens[key] += length


# -- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "--inputs", nargs="+", action="extend", default=[],
                        metavar="FILE|GLOB|DIR",
                        help="JSON Lines inputs (.jsonl, .json, and .gz variants); globs and folders")
    parser.add_argument("--preproc-folder", "--preproc_folder", default=None, metavar="DIR",
                        help="NeMo's flag: read every file under DIR matching --files-filter")
    parser.add_argument("--files-filter", "--files_filter", default="**/*.json*",
                        help="glob under --preproc-folder (default: **/*.json*)")
    parser.add_argument("--json-keys", "--json_keys", nargs="+", default=["text"], metavar="KEY",
                        help="keys to tokenize; each gets its own output pair (default: text)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR|CKPT|ID",
                        help="tokenizer folder, shoal checkpoint, or Hub id (hf://org/name)")
    parser.add_argument("--tokenizer-type", "--tokenizer_type", default=None,
                        help="NeMo's name for --tokenizer (a Hugging Face id or folder)")
    parser.add_argument("--tokenizer-model", "--tokenizer_model", default=None,
                        help="Megatron-LM's tokenizer folder (with --tokenizer-type "
                             "HuggingFaceTokenizer)")
    parser.add_argument("--tokenizer-library", "--tokenizer_library", default="huggingface",
                        help="NeMo's flag; only huggingface is supported")
    parser.add_argument("--dataset-impl", "--dataset_impl", default="mmap",
                        help="NeMo's flag; only mmap (the .bin/.idx format) is supported")
    parser.add_argument("--output-prefix", "--output_prefix", required=True, metavar="PREFIX",
                        help="outputs are PREFIX_<key>_document.bin/.idx")
    parser.add_argument("--append-eod", "--append_eod", action="store_true",
                        help="append the tokenizer's eos id to every document (NeMo's EOD)")
    parser.add_argument("--add-bos", "--add_bos", action=argparse.BooleanOptionalAction,
                        default=False, help="prepend the bos id to every document, as "
                        "Megatron-LM's script does (default: no BOS, as NeMo's script)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--skip-bad-lines", "--skip_bad_lines", action="store_true",
                        help="skip and count lines that are not valid JSON objects with the keys")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--log-interval", "--log_interval", type=int, default=1000,
                        help="documents between progress lines (default 1000; 0: none)")
    parser.add_argument("--hf_token", "--hf-token", default=None,
                        help="Hub token for a gated tokenizer (default: $HF_TOKEN); never stored")


def _tokenizer_name(args: argparse.Namespace) -> str:
    if args.tokenizer_library.lower() != "huggingface":
        raise ShoalError(f"--tokenizer-library {args.tokenizer_library} is not supported: shoal "
                         f"reads Hugging Face tokenizers (--tokenizer-library huggingface)")
    if args.tokenizer:
        return args.tokenizer
    if args.tokenizer_type in _MLM_HF_TYPES:
        if not args.tokenizer_model:
            raise ShoalError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
        print("shoal preprocess: note: Megatron-LM's script adds BOS to every document; pass "
              "--add-bos for the same tokens", file=sys.stderr)
        return args.tokenizer_model
    if args.tokenizer_type and args.tokenizer_type.endswith("Tokenizer"):
        raise ShoalError(f"--tokenizer-type {args.tokenizer_type} is not supported: pass a Hugging "
                         f"Face tokenizer folder or id with --tokenizer")
    name = args.tokenizer_type or args.tokenizer_model
    if not name:
        raise ShoalError("no tokenizer given: pass --tokenizer DIR|CKPT|ID "
                         "(or NeMo's --tokenizer-type)")
    return name


def main(args: argparse.Namespace) -> int:
    if args.dataset_impl != "mmap":
        raise ShoalError(f"--dataset-impl {args.dataset_impl} is not supported; shoal writes "
                         f"the mmap .bin/.idx format (--dataset-impl mmap)")
    inputs = list(args.input)
    if args.preproc_folder:
        inputs.append(os.path.join(args.preproc_folder, args.files_filter))
    if not inputs:
        raise ShoalError("no input: pass --input FILE|GLOB (or --preproc-folder DIR)")
    name = _tokenizer_name(args)
    tokenizer = load_tokenizer(name, token=args.hf_token)
    summary = preprocess(inputs, args.output_prefix, tokenizer, args.json_keys,
                         append_eod=args.append_eod, add_bos=args.add_bos, workers=args.workers,
                         skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite,
                         log_interval=args.log_interval, vocab_size=checkpoint_vocab_size(name))
    for key, prefix in summary.prefixes.items():
        print(f"wrote {prefix}.bin/.idx: {summary.documents[key]} documents, "
              f"{summary.tokens[key]} tokens", file=sys.stderr)
    skipped = sum(summary.empty_skipped.values())
    rate = sum(summary.tokens.values()) / max(summary.seconds, 1e-9)
    print(f"done in {summary.seconds:.2f} s ({rate:.0f} tokens/s): {summary.lines} lines read, "
          f"{skipped} empty documents skipped, {summary.bad_lines} bad lines skipped; "
          f"BOS {'added' if args.add_bos else 'not added'}, "
          f"EOD {'appended' if args.append_eod else 'not appended'}", file=sys.stderr)
    return 0
