"""The flags of `shoal import` and `shoal export`, and the output checks both make.

Both commands accept the seed's NeMo spellings (`overwrite=false`, `-y`) next to shoal's own, and
both refuse an output they could not publish before doing any work. This module imports no torch:
`shoal import --help` builds its parser from it alone.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from shoal.checkpoint.atomic import check_output_dir, normalize_output, refuse_overlap
from shoal.config.source import add_base_checkpoint_argument
from shoal.errors import ShoalError

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # Hugging Face's default, decimal bytes

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_bool(text: str | bool) -> bool:
    """'true'/'false' (and yes/no/1/0) as NeMo's `overwrite=false` writes them."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_size(text: str | int) -> int:
    """Bytes from '5GB' (decimal, as Hugging Face counts), '500MiB' (binary) or a plain integer."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 1GiB, got {text!r}")
    number, unit = match.groups()
    unit = (unit or "").upper().removesuffix("B")
    size = int(float(number) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """`--overwrite` as a bare flag, or with a value (`--overwrite false`, NeMo's `overwrite=false`)."""
    parser.add_argument("--overwrite", nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL",
                        help="replace an existing output (bare flag, or true/false)")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="accepted for NeMo compatibility (`nemo llm import -y`); shoal never prompts")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """`shoal import`'s flags."""
    parser.add_argument("--source", required=True,
                        help="Hugging Face model folder, or hf://ORG/NAME[@REVISION] to download from the Hub")
    parser.add_argument("--output_path", "--output-path", dest="output_path", default=None,
                        help="the shoal checkpoint to write (default $SHOAL_HOME/models/ORG/NAME)")
    add_overwrite_argument(parser)
    parser.add_argument("--hf_token", "--hf-token", dest="hf_token", default=None,
                        help="Hugging Face token for gated/private models (default: $HF_TOKEN); never saved")
    parser.add_argument("--model", "-M", default=None,
                        help="preset name as in NeMo's `model=llama3_8b`; checked against config.json")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """`shoal export`'s flags."""
    parser.add_argument("--source", "--path", dest="source", required=True,
                        help="shoal checkpoint, or an experiment / checkpoints folder (its latest checkpoint)")
    parser.add_argument("--output_path", "--output-path", dest="output_path", required=True,
                        help="the Hugging Face model folder to write")
    add_overwrite_argument(parser)
    parser.add_argument("--dtype", default=None,
                        help="convert weights to this dtype (bfloat16, float16, float32); default: the source "
                             "model's dtype (training checkpoints hold float32; the export goes back to it)")
    parser.add_argument("--max_shard_size", "--max-shard-size", dest="max_shard_size", type=parse_size,
                        default=DEFAULT_MAX_SHARD_SIZE, help="largest safetensors file, e.g. 5GB (default), 500MB")
    parser.add_argument("--target", default="hf", choices=["hf", "hf-peft"],
                        help="hf: a full model (adapters merged); hf-peft: the adapters alone (NeMo's names)")
    parser.add_argument("--adapter_only", "--adapter-only", action="store_true",
                        help="write only the LoRA/DoRA adapters, in Hugging Face PEFT format (same as target=hf-peft)")
    parser.add_argument("--base_model", "--base-model", default=None, metavar="ID|DIR",
                        help="with --adapter_only: the base_model_name_or_path to record (default: the "
                             "checkpoint's --hf_model_id or import source)")
    add_base_checkpoint_argument(parser)


def check_output(output: str | os.PathLike, overwrite: bool, sources: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, an output that exists (without overwrite), that cannot be created,
    or that reaches an input (the same folder, one inside it, or one holding it, however spelled)."""
    out = normalize_output(output)
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ShoalError(f"cannot create output {output}: {probe} is a file, not a directory")
    if out.exists() and not out.is_dir():
        raise ShoalError(f"output {output} exists and is a file, not a directory")
    refuse_overlap(output, sources)
    check_output_dir(out, overwrite)
    return out
