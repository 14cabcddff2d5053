"""`shoal import`: a Hugging Face checkpoint (folder or `hf://ORG/NAME`) -> a shoal checkpoint.

    shoal import --source DIR|hf://ORG/NAME --output_path OUT [--overwrite] [--hf_token TOKEN]
    shoal import -y model=llama3_8b source=hf://ORG/NAME output_path=OUT overwrite=false   (NeMo form)

Reads `config.json` (refusing what shoal cannot represent), the tokenizer files and the
safetensors weights (one file or sharded with an index), checks every tensor against the shapes
the config implies, then writes `model/`. When no tensor needs a transform (every family today:
same names; an MoE model's per-expert tensors stacked into grouped ones, which moves no byte),
that is a copy of the bytes into safetensors data files whose headers describe the DCP folder
(`shoal.checkpoint.data_files`), and torch is never imported: the import takes about as long as
`cp`. Otherwise the weights are streamed into DCP one tensor at a time. The checkpoint appears
under OUT only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from shoal.checkpoint.atomic import atomic_directory, refuse_overlap
from shoal.checkpoint.data_files import CopiedTensor, write_whole_tensors
from shoal.checkpoint.format import MODEL_DIR, TensorInfo, copy_tokenizer, dtype_name, write_metadata
from shoal.convert import hub
from shoal.convert.adapters import StateDictAdapter, get_adapter
from shoal.convert.options import check_output
from shoal.convert.safetensors_io import TensorEntry, find_weight_files
from shoal.errors import ShoalError
from shoal.models.config import ModelConfig, from_hf_config
from shoal.models.presets import NEMO_ALIASES, get_preset

# ModelConfig fields compared with a `--model` preset: the architecture, not the token ids.
_SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias", "qk_norm",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size")


def default_output_path(source: str) -> Path:
    """Where an import goes without --output_path: $SHOAL_HOME/models/ORG/NAME (~/.cache/shoal)."""
    home = Path(os.environ.get("SHOAL_HOME", Path.home() / ".cache" / "shoal"))
    hub_source = hub.parse_hub_source(source)
    name = hub_source.repo_id if hub_source else Path(source).absolute().name
    return home / "models" / name


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, with a message naming the file (and line) when it is not one."""
    if not path.is_file():
        raise ShoalError(f"{path.parent}: {path.name} is missing ({what})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShoalError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ShoalError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise ShoalError(f"{path}: expected a JSON object")
    return data


def read_hf_config(model_dir: Path) -> tuple[dict, ModelConfig]:
    """config.json as a dict, and the ModelConfig it describes."""
    path = model_dir / "config.json"
    hf_config = read_json(path, "a Hugging Face model folder needs its config")
    try:
        return hf_config, from_hf_config(hf_config, where=str(path))
    except KeyError as err:
        raise ShoalError(f"{path}: required key {err.args[0]!r} is missing") from None
    except (TypeError, ValueError) as err:
        raise ShoalError(f"{path}: {err}") from None
    except ShoalError as err:
        if str(path) in str(err):
            raise
        raise ShoalError(f"{path}: {err}") from None


def check_preset(name: str, cfg: ModelConfig) -> list[str]:
    """Warnings for a `--model` preset that does not describe the imported architecture.

    config.json always decides what is imported; the preset name only catches a wrong source.
    """
    try:
        preset = get_preset(NEMO_ALIASES.get(name, name))
    except ShoalError:
        return [f"--model {name} is not a preset shoal knows; the architecture comes from config.json"]
    diffs = [f"{field}={getattr(cfg, field)!r} (preset: {getattr(preset, field)!r})"
             for field in _SHAPE_FIELDS if getattr(cfg, field) != getattr(preset, field)]
    if diffs:
        return [f"--model {name} does not match the imported config.json: " + ", ".join(diffs)
                + "; importing what config.json describes"]
    return []


# The files a tokenizer's vocabulary can be read from (transformers' fast and slow formats).
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def tokenizer_size(model_dir: Path) -> tuple[int, int, int] | None:
    """(tokens, tokens in the base vocabulary, highest id) of the folder's tokenizer, counted as
    `transformers` counts `len(tokenizer)`; None when it has no tokenizer files. A `tokenizer.json`
    is read with the `tokenizers` library (milliseconds); any other format loads through
    transformers (seconds: it imports torch)."""
    if not any((model_dir / name).is_file() for name in _VOCABULARY_FILES):
        return None  # a chat template or settings alone: no vocabulary to count
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # transformers also adds the tokens tokenizer_config.json declares that tokenizer.json
        # lacks, each at the next id after the vocabulary (not at the id the config gives it).
        config = model_dir / "tokenizer_config.json"
        declared = read_json(config, "tokenizer settings").get("added_tokens_decoder") if config.is_file() else None
        missing = {token.get("content") for token in (declared or {}).values()
                   if isinstance(token, dict) and token.get("content") not in vocab}
        length = len(vocab) + len(missing)
        highest = max(vocab.values(), default=-1)
        return length, tokenizer.get_vocab_size(with_added_tokens=False), max(highest, length - 1) if missing else highest
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return len(tokenizer), tokenizer.vocab_size, max(tokenizer.get_vocab().values(), default=-1)


def check_tokenizer_fits(model_dir: Path, vocab_size: int) -> None:
    """Refuse a tokenizer that gives ids the model cannot embed (config.json `vocab_size`).

    Counted as `transformers` counts it: the base vocabulary plus the added tokens, up to the highest
    id. Fewer tokens than embedding rows is normal (padded embeddings). A tokenizer that cannot be
    loaded here is left to the stage that loads it, with a warning; a tokenizer_config.json that is
    not JSON is refused here, with its line (it would be copied into the checkpoint as it is).
    """
    try:
        size = tokenizer_size(model_dir)
    except ShoalError:
        raise
    except Exception as err:  # noqa: BLE001 - many tokenizer formats, many failure types
        print(f"shoal import: warning: could not load the tokenizer in {model_dir} to check its size against "
              f"vocab_size ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", file=sys.stderr)
        return
    if size is None:
        return
    length, base, highest = size
    count = max(length, highest + 1)
    if count <= vocab_size:
        return
    raise ShoalError(
        f"{model_dir}: the tokenizer has {count} tokens ({base} in its vocabulary + {length - base} added; "
        f"highest id {highest}) but config.json vocab_size is {vocab_size}: ids {vocab_size}..{count - 1} would "
        "index past the model's embedding. Use the tokenizer that belongs to this model (or resize the model's "
        "embedding in transformers and save it again)"
    )


def _dominant_dtype(infos: dict[str, TensorInfo]) -> Any:
    """The dtype holding most of the weight bytes: the model's dtype for shoal.json."""
    by_dtype: dict[Any, int] = {}
    for info in infos.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return max(by_dtype, key=by_dtype.get)


def import_checkpoint(
    source: str | os.PathLike,
    output_path: str | os.PathLike,
    overwrite: bool = False,
    hf_token: str | None = None,
    model: str | None = None,
) -> Path:
    """Convert an HF checkpoint folder or `hf://ORG/NAME` into a shoal checkpoint at `output_path`.

    `model` names a preset (NeMo's `model=llama3_8b`); a mismatch with config.json is a warning.
    """
    source = str(source)
    hub_source = hub.parse_hub_source(source)
    local_source = None if hub_source else Path(source)
    if local_source and not local_source.is_dir():
        hint = f" (for a Hugging Face Hub model write hf://{source})" if source.count("/") == 1 else ""
        raise ShoalError(f"--source {source}: no such directory{hint}")
    out = check_output(output_path, overwrite, sources=(local_source,) if local_source else ())
    model_dir = hub.download(hub_source, token=hf_token) if hub_source else local_source
    if hub_source:  # an output inside the Hugging Face cache would damage the download it reads
        refuse_overlap(out, [model_dir])

    hf_config, cfg = read_hf_config(model_dir)
    for warning in check_preset(model, cfg) if model else []:
        print(f"shoal import: warning: {warning}", file=sys.stderr)
    check_tokenizer_fits(model_dir, cfg.vocab_size)
    entries = find_weight_files(model_dir)
    adapter = get_adapter(cfg)
    # Per-expert tensors appear stacked, under the grouped name (a no-op for dense families).
    found = adapter.group_experts({name: TensorInfo(e.shape, e.stored) for name, e in entries.items()}, model_dir)
    plan = adapter.import_plan(found, where=model_dir)  # {shoal name: HF name}
    specs = {name: found[hf_name] for name, hf_name in plan.items()}
    generation_config = None
    if (model_dir / "generation_config.json").is_file():
        generation_config = read_json(model_dir / "generation_config.json", "generation defaults")

    copies = {name: CopiedTensor.of([entries[m] for m in adapter.expert_members(hf_name) or [hf_name]])
              for name, hf_name in plan.items() if adapter.copies_bytes(hf_name)}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        copied = copy_tokenizer(model_dir, tmp)
        if not copied:
            print(f"shoal import: warning: {model_dir} has no tokenizer files; the checkpoint has no tokenizer/",
                  file=sys.stderr)
        if len(copies) == len(plan):  # every tensor as the file holds it: a copy, no torch
            write_whole_tensors(copies, tmp / MODEL_DIR)
        else:
            _stream_weights(specs, plan, entries, adapter, tmp / MODEL_DIR)
        made_by = {
            "command": "shoal import",
            "source": str(hub_source) if hub_source else str(model_dir.absolute()),
            # The snapshot folder of the HF cache is named after the commit it holds.
            "revision": model_dir.name if hub_source else None,
        }
        extra = {"generation_config": generation_config} if generation_config else {}
        write_metadata(tmp, cfg, dtype_name(_dominant_dtype(specs)), made_by=made_by, extra=extra)
    return out


def _stream_weights(specs: dict[str, TensorInfo], plan: dict[str, str], entries: dict[str, TensorEntry],
                    adapter: StateDictAdapter, model_dir: Path) -> None:
    """Write `model/` through DCP, reading (and stacking, for grouped experts) one tensor at a time;
    a tensor kept as its file holds it is still copied in the kernel (`stream_to_dcp`'s `source`)."""
    import torch

    from shoal.convert.safetensors_io import read_tensor
    from shoal.convert.streaming import stream_to_dcp

    def read(name: str) -> torch.Tensor:
        hf_name = plan[name]
        members = adapter.expert_members(hf_name)
        if members is not None:  # one layer's experts at once: the memory bound of an MoE import
            return adapter.to_shoal(hf_name, torch.stack([read_tensor(entries[m]) for m in members]))
        return adapter.to_shoal(hf_name, read_tensor(entries[hf_name]))

    def source(name: str) -> tuple[str, int, int] | None:
        hf_name = plan[name]
        if not adapter.keeps_bytes(hf_name):
            return None
        entry = entries[hf_name]
        return str(entry.path), entry.begin, entry.end - entry.begin

    torch_specs = {name: TensorInfo(info.shape, info.dtype.torch) for name, info in specs.items()}
    stream_to_dcp(torch_specs, read, model_dir, source=source)


def main(args: argparse.Namespace) -> int:
    output = args.output_path or default_output_path(args.source)
    out = import_checkpoint(args.source, output, overwrite=args.overwrite, hf_token=args.hf_token, model=args.model)
    print(f"shoal import: wrote {out}")
    return 0
