"""`shoal download`: fetch a pretraining corpus as JSON Lines, or an instruction set split three ways.

`shoal download pretrain` replaces the seed's `load_dataset(ID)['train'].to_json(...)`;
`shoal download sft` replaces its `download_split_data.py` (alpaca rows become `{"input", "output"}`,
shuffled with a seed and split into training/validation/test.jsonl).

A source is a Hub id (read through the optional `datasets` package) or a local file or folder:
JSON Lines / JSON arrays / CSV / TSV (gz too), read with the standard library so that the demo runs
with core dependencies only; Parquet (needs `pyarrow`); a `save_to_disk` folder (needs `datasets`).
Outputs keep non-ASCII text as it is and appear only when complete. Hub tokens are passed to the
Hub and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import itertools
import json
import math
import os
import random
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from shoal.checkpoint.atomic import atomic_directory, check_output_dir, normalize_output, refuse_overlap
from shoal.errors import ShoalError, io_error

SFT_FILES = ("training.jsonl", "validation.jsonl", "test.jsonl")
DEFAULT_SFT_SPLIT = (0.98, 0.01, 0.01)
DEFAULT_SEED = 1234  # NeMo's FineTuningDataModule default seed
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet",
                  ".jsonl.gz", ".json.gz", ".csv.gz", ".tsv.gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Row = dict
# Each row comes with where it came from ("file:line", "ID[train] row 7") for error messages.
Rows = Iterator[tuple[str, Row]]


# -- reading sources ------------------------------------------------------------------------------

def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: files saved by spreadsheet tools often start with a byte-order mark.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_json(path: Path) -> Rows:
    """JSON Lines, or one JSON array of objects (as `to_json(lines=False)` writes)."""
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                items = json.load(f)
            except ValueError as err:
                raise ShoalError(f"{path}: not valid JSON: {err}") from err
            for i, item in enumerate(items):
                yield f"{path} item {i}", item
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ShoalError(f"{path}:{number}: not valid JSON ({err}); expected JSON Lines, "
                                 f"one object per line") from err
            yield f"{path}:{number}", row


def _read_csv(path: Path) -> Rows:
    delimiter = "\t" if path.name.removesuffix(".gz").endswith(".tsv") else ","
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except csv.Error as err:
            raise ShoalError(f"{path}:{reader.line_num}: not valid CSV: {err}") from err


def _read_parquet(path: Path) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ShoalError(f"reading {path} needs pyarrow: pip install pyarrow (or "
                         f"pip install 'shoal[datasets]'); JSONL and CSV need nothing extra") from None
    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            yield f"{path} row {number}", row
            number += 1


def _read_file(path: Path) -> Rows:
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return _read_json(path)
    if name.endswith((".csv", ".tsv")):
        return _read_csv(path)
    if name.endswith(".parquet") and not path.name.endswith(".gz"):
        return _read_parquet(path)
    raise ShoalError(f"{path}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}")


def _import_datasets(purpose: str):
    try:
        import datasets
    except ImportError:
        raise ShoalError(f"{purpose} needs the optional `datasets` package: pip install "
                         f"'shoal[datasets]' (or pip install datasets). Local JSONL/JSON/CSV files "
                         f"are read without it") from None
    return datasets


def _dataset_rows(dataset, label: str) -> Rows:
    for i, row in enumerate(dataset):
        yield f"{label} row {i}", row


def _read_saved(path: Path, split: str) -> Rows:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    datasets = _import_datasets(f"reading the save_to_disk folder {path}")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ShoalError(f"{path} has no split {split!r}; it has {', '.join(loaded)}")
        return _dataset_rows(loaded[split], f"{path}[{split}]")
    return _dataset_rows(loaded, str(path))


def _read_hub(repo_id: str, split: str, token: str | None) -> Rows:
    datasets = _import_datasets(f"downloading {repo_id!r} from the Hugging Face Hub")
    # The Hub client retries for about a minute before giving up on an unreachable Hub.
    print(f"shoal download: loading {repo_id!r} (split {split!r}) from the Hugging Face Hub "
          f"or its local cache", file=sys.stderr, flush=True)
    try:
        dataset = datasets.load_dataset(repo_id, split=split, token=token)
    except Exception as err:  # network, auth, missing repo and split errors come in many types
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if token:
            detail = detail.replace(token, "***")
        raise ShoalError(
            f"could not load {repo_id!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {detail}. If this machine cannot reach the Hub, download "
            f"the data where it can and pass the local path: --dataset_name FILE (.jsonl, .json, "
            f".csv, .parquet) or a save_to_disk folder") from None
    return _dataset_rows(dataset, f"{repo_id}[{split}]")


def iter_rows(source: str | os.PathLike, split: str = "train", token: str | None = None) -> Rows:
    """Rows of a local file, a folder of files, a save_to_disk folder, or a Hub dataset.

    `split` picks the Hub or save_to_disk split; a plain file or folder is read whole.
    """
    name = os.fspath(source)
    local = Path(name).expanduser()
    if local.is_file():
        return _read_file(local)
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return _read_saved(local, split)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
        if not files:
            raise ShoalError(f"folder {local} holds no data file ({', '.join(LOCAL_SUFFIXES)}) "
                             f"and is not a save_to_disk folder")
        return itertools.chain.from_iterable(_read_file(p) for p in files)
    repo_id = name[len("hf://"):] if name.startswith("hf://") else name
    if not _HUB_ID.match(repo_id) or repo_id.endswith(LOCAL_SUFFIXES):
        raise ShoalError(f"dataset {name} not found: no such local file or folder, and not a "
                         f"Hub id such as org/name")
    return _read_hub(repo_id, split, token or os.environ.get("HF_TOKEN"))


# -- writing ----------------------------------------------------------------------------------------

def _json_value(value: object) -> object:
    """Values that Parquet and `datasets` hand out but `json` cannot write as they are."""
    if hasattr(value, "isoformat"):  # date, datetime, time
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(row: Row, where: str) -> str:
    try:
        # ensure_ascii=False keeps Chinese (and all non-ASCII) text readable, as the seed's
        # to_json(force_ascii=False) does.
        return json.dumps(row, ensure_ascii=False, default=_json_value)
    except (TypeError, ValueError) as err:
        raise ShoalError(f"{where}: cannot write the row as JSON: {err}") from err


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, overwrite: bool) -> Iterator[IO[str]]:
    """A text file that appears at `path` only when the block finishes without error."""
    out = normalize_output(check_output_dir(path, overwrite))
    if out.is_dir():
        raise ShoalError(f"output {out} is a folder; expected a file name such as data.jsonl")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    made = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise io_error(err, f"writing {out}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first: a failed write removes them again."""
    return [parent for parent in path.parents if not parent.exists()]


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _write_jsonl(path: Path, rows: Sequence[tuple[str, Row]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for where, row in rows:
            f.write(_dumps(row, where) + "\n")


# -- pretraining corpus ---------------------------------------------------------------------------

def download_pretrain(dataset_name: str | os.PathLike, output: str | os.PathLike, *,
                      split: str = "train", text_key: str = "text", token: str | None = None,
                      overwrite: bool = False, max_rows: int | None = None) -> int:
    """Write the rows of `dataset_name` to the JSON Lines file `output`; returns the row count.

    Rows keep all their columns (as the seed's `to_json` does); every row must hold a string
    under `text_key`, the key to pass to `shoal preprocess --json-keys`.
    """
    _refuse_local_overlap(output, dataset_name)  # before "exists": --overwrite would not help
    check_output_dir(output, overwrite)  # fail before a long download, not after
    count = 0
    with _atomic_file(output, overwrite) as out:
        for where, row in itertools.islice(iter_rows(dataset_name, split, token), max_rows):
            if not isinstance(row, dict):
                raise ShoalError(f"{where}: expected an object with a {text_key!r} field, "
                                 f"got {type(row).__name__}")
            if not isinstance(row.get(text_key), str):
                found = "no such column" if text_key not in row else \
                    f"it holds {type(row[text_key]).__name__}"
                raise ShoalError(f"{where}: text column {text_key!r} missing or not a string "
                                 f"({found}; columns: {', '.join(map(str, row))}); "
                                 f"pass --text_key NAME")
            out.write(_dumps(row, where) + "\n")
            count += 1
        if count == 0:
            raise ShoalError(f"dataset {os.fspath(dataset_name)} has no rows; nothing written")
    return count


# -- instruction set ------------------------------------------------------------------------------

def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """Training/validation/test fractions: three numbers in [0, 1] adding up to 1."""
    text = split if isinstance(split, str) else ",".join(map(str, split))
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ShoalError(f"--split {text!r}: expected three fractions for training, validation "
                         f"and test, such as 0.98,0.01,0.01")
    try:
        fractions = tuple(float(p) for p in parts)
    except ValueError:
        raise ShoalError(f"--split {text!r}: fractions must be numbers, such as "
                         f"0.98,0.01,0.01") from None
    if any(not 0 <= f <= 1 for f in fractions):
        raise ShoalError(f"--split {text!r}: each fraction must lie between 0 and 1")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ShoalError(f"--split {text!r}: fractions add up to {sum(fractions):g}, expected 1")
    if fractions[0] == 0:
        raise ShoalError(f"--split {text!r}: the training fraction must be above 0")
    return fractions  # type: ignore[return-value]


def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Rows per split: proportional, rounded by largest remainder, none empty that was asked for."""
    wanted = [total * f for f in fractions]
    counts = [math.floor(w) for w in wanted]
    by_remainder = sorted((i for i, f in enumerate(fractions) if f > 0),
                          key=lambda i: (counts[i] - wanted[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    # A tiny set would leave validation or test empty, which later stages cannot use: give each
    # requested split one row, taken from the largest.
    asked = [i for i, f in enumerate(fractions) if f > 0]
    if total < len(asked):
        raise ShoalError(f"only {total} rows: too few to fill the {len(asked)} non-empty splits")
    for i in asked:
        if counts[i] == 0:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


def normalize_sft_row(row: object, where: str) -> Row:
    """The seed's rule: alpaca rows become {"input", "output"}; input/output and chat rows stay."""
    if not isinstance(row, dict):
        raise ShoalError(f"{where}: expected an object, got {type(row).__name__}")

    def text(key: str, optional: bool = False) -> str:
        value = row.get(key)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise ShoalError(f"{where}: {key!r} must be a string, got "
                             f"{'nothing' if value is None else type(value).__name__}")
        return value

    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ShoalError(f"{where}: 'messages' must be a non-empty list of "
                             f"{{\"role\": str, \"content\": str}} objects")
        return row
    if "instruction" in row:
        instruction, extra, output = text("instruction"), text("input", True), text("output")
        return {"input": f"{instruction}\n{extra}" if extra else instruction, "output": output}
    if "input" in row and "output" in row:
        text("input")
        text("output")
        return row
    raise ShoalError(f"{where}: cannot tell the row's format from its columns "
                     f"({', '.join(map(str, row)) or 'none'}); expected instruction/input/output "
                     f"(alpaca), input/output, or messages (chat)")


def download_sft(dataset_name: str | os.PathLike, output_dir: str | os.PathLike, *,
                 split: str | Sequence[float] = DEFAULT_SFT_SPLIT, seed: int = DEFAULT_SEED,
                 source_split: str = "train", token: str | None = None, overwrite: bool = False,
                 max_rows: int | None = None) -> dict[str, int]:
    """Shuffle the rows with `seed`, split them and write training/validation/test.jsonl.

    The same input, split and seed always give the same files. Returns rows per file name.
    """
    fractions = parse_split(split)
    _refuse_local_overlap(output_dir, dataset_name)
    check_output_dir(output_dir, overwrite)
    rows = [(where, normalize_sft_row(row, where))
            for where, row in itertools.islice(iter_rows(dataset_name, source_split, token),
                                               max_rows)]
    if not rows:
        raise ShoalError(f"dataset {os.fspath(dataset_name)} has no rows; nothing written")
    random.Random(seed).shuffle(rows)
    counts = split_counts(len(rows), fractions)
    with atomic_directory(output_dir, overwrite) as tmp:  # an OSError becomes a ShoalError there
        start = 0
        for name, count in zip(SFT_FILES, counts):
            _write_jsonl(tmp / name, rows[start:start + count])
            start += count
    return dict(zip(SFT_FILES, counts))


def _refuse_local_overlap(output: str | os.PathLike, dataset_name: str | os.PathLike) -> None:
    """A local source may not be the output, hold it, or lie inside the folder being replaced."""
    local = Path(os.fspath(dataset_name)).expanduser()
    if local.exists():
        refuse_overlap(output, [local])


# -- command line -----------------------------------------------------------------------------------

def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset_name", "--dataset-name", required=True, metavar="ID|PATH",
                        help="Hub dataset id (hf://org/name or org/name), or a local .jsonl, "
                             ".json, .csv, .parquet file, folder, or save_to_disk folder")
    parser.add_argument("--hf_token", "--hf-token", default=None,
                        help="Hub token for gated datasets (default: $HF_TOKEN); never stored")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--max_rows", "--max-rows", type=int, default=None,
                        help="keep only the first N rows of the source")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="{pretrain,sft}", required=True)
    pretrain = sub.add_parser("pretrain", help="a pretraining corpus as one JSON Lines file")
    _add_common(pretrain)
    pretrain.add_argument("--output", required=True, metavar="FILE.jsonl")
    pretrain.add_argument("--split", default="train", help="Hub split to download (default train)")
    pretrain.add_argument("--text_key", "--text-key", default="text",
                          help="column holding the text (default text)")
    sft = sub.add_parser("sft", help="an instruction set split into training/validation/test.jsonl")
    _add_common(sft)
    sft.add_argument("--output_dir", "--output-dir", default="data/alpaca", metavar="DIR",
                     help="folder for the three files (default data/alpaca, as the seed)")
    sft.add_argument("--split", default=",".join(map(str, DEFAULT_SFT_SPLIT)),
                     help="training,validation,test fractions (default 0.98,0.01,0.01)")
    sft.add_argument("--seed", type=int, default=DEFAULT_SEED,
                     help=f"shuffle seed (default {DEFAULT_SEED})")
    sft.add_argument("--source_split", "--source-split", default="train",
                     help="Hub split to read before splitting (default train)")


def main(args: argparse.Namespace) -> int:
    token = args.hf_token or os.environ.get("HF_TOKEN")
    if args.what == "pretrain":
        count = download_pretrain(args.dataset_name, args.output, split=args.split,
                                  text_key=args.text_key, token=token, overwrite=args.overwrite,
                                  max_rows=args.max_rows)
        print(f"wrote {count} rows to {args.output}", file=sys.stderr)
        return 0
    counts = download_sft(args.dataset_name, args.output_dir, split=args.split, seed=args.seed,
                          source_split=args.source_split, token=token, overwrite=args.overwrite,
                          max_rows=args.max_rows)
    listed = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"wrote {args.output_dir}: {listed} rows (seed {args.seed})", file=sys.stderr)
    return 0
