"""What a checkpoint says about where it came from, as the exporter needs it.

Three questions, each answered from `shoal.json` (docs/checkpoint-format.md, "Provenance keys"):

* the source model's dtype, to export in it: `made_by.source_dtype`, else `extra.source_dtype`,
  else `dtype` (an imported checkpoint stores its weights in the source's dtype already);
* the base model an adapter applies to, for PEFT's `base_model_name_or_path`: `made_by.hf_model_id`,
  else `--hf_model_id` on the recorded command line, else the source of an import;
* which checkpoint it is, in words: step and validation loss.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from shoal.checkpoint.catalog import resolve_checkpoint
from shoal.checkpoint.format import TOKENIZER_DIR, dtype_name, is_checkpoint
from shoal.convert.hub import HF_SCHEME
from shoal.errors import ShoalError

SOURCE_DTYPE_KEY = "source_dtype"
_VAL_LOSS = re.compile(r"-val_loss=([0-9.]+|nan|inf)")
_HF_MODEL_ID_FLAGS = ("--hf_model_id", "--model.hf_model_id", "hf_model_id", "model.hf_model_id")


def resolve_export_source(source: str | Path) -> Path:
    """The checkpoint `--source` names, with a message that says what else it is when it is not one."""
    path = Path(source)
    if not path.exists():
        raise ShoalError(f"--source {source} does not exist")
    if path.is_dir() and not is_checkpoint(path) and (path / "config.json").is_file():
        raise ShoalError(
            f"--source {source} is not a shoal checkpoint: it is a Hugging Face checkpoint (config.json, no "
            f"shoal.json), which transformers loads as it is. To convert it to a shoal checkpoint, run "
            f"`shoal import --source {source} --output_path CKPT`"
        )
    return resolve_checkpoint(path)


def source_dtype(meta: dict[str, Any]) -> str:
    """The dtype of the model this checkpoint was trained from (see the module docstring)."""
    for record in (meta.get("made_by") or {}, meta.get("extra") or {}):
        value = record.get(SOURCE_DTYPE_KEY)
        if isinstance(value, str) and value:
            return dtype_name(value)
    return dtype_name(meta["dtype"])


def _flag_value(command: str, flags: tuple[str, ...]) -> str | None:
    """The value of the first of `flags` on a recorded command line (`--flag V` or `--flag=V`)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if name in flags:
            if eq:
                return value or None
            if i + 1 < len(words) and not words[i + 1].startswith("-"):
                return words[i + 1]
    return None


def base_model_name(meta: dict[str, Any]) -> str | None:
    """What PEFT should load as the base of this checkpoint's adapters, or None when nothing says."""
    made_by = meta.get("made_by") or {}
    for key in ("hf_model_id", "base_model_name_or_path"):
        if isinstance(made_by.get(key), str) and made_by[key]:
            return made_by[key]
    command = made_by.get("command")
    if isinstance(command, str):
        from_flag = _flag_value(command, _HF_MODEL_ID_FLAGS)
        if from_flag:
            return from_flag
    source = made_by.get("source")
    if command == "shoal import" and isinstance(source, str) and source:
        if source.startswith(HF_SCHEME):  # hf://org/name@rev -> org/name, what from_pretrained takes
            return source[len(HF_SCHEME):].partition("@")[0]
        return source
    return None


def describe_checkpoint(ckpt: Path, meta: dict[str, Any]) -> str:
    """`CKPT (step 7, val_loss 1.234)`, as the export reports what it took."""
    parts = [f"step {meta.get('progress', {}).get('step', 0)}"]
    loss = meta.get("progress", {}).get("val_loss")
    match = _VAL_LOSS.search(ckpt.name)
    if loss is None and match:
        loss = match.group(1)
    if loss is not None:
        parts.append(f"val_loss {loss:.3f}" if isinstance(loss, float) else f"val_loss {loss}")
    return f"{ckpt} ({', '.join(parts)})"


def tokenizer_dir(ckpt: Path) -> Path | None:
    folder = ckpt / TOKENIZER_DIR
    return folder if folder.is_dir() else None
