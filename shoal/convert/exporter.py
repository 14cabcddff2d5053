"""`shoal export`: a shoal checkpoint -> a Hugging Face checkpoint that `transformers` loads as it is.

    shoal export --source CKPT --output_path OUT [--overwrite] [--dtype bfloat16] [--max_shard_size 5GB]
    shoal export -y path=CKPT output_path=OUT target=hf        (NeMo's `nemo llm export` form)

`--source` may be a checkpoint, an experiment folder or its `checkpoints/` folder; for the last
two the latest checkpoint (highest `step=NNNNNN`) is exported.

Writes safetensors shards (`model.safetensors`, or `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json` past `--max_shard_size`, as `save_pretrained` does), `config.json`,
`generation_config.json` and the tokenizer files exactly as they were imported. Weights are read
from DCP a bounded group at a time and written straight to their shard, so memory holds at most
`load_budget` bytes of weights, whatever the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.checkpoint.atomic import atomic_directory
from shoal.checkpoint.data_files import whole_tensors
from shoal.checkpoint.format import MODEL_DIR, TOKENIZER_DIR, TensorInfo, dtype_name, read_metadata, read_model_config
from shoal.checkpoint.parallel_io import Threads
from shoal.convert.adapters import get_adapter
from shoal.convert.options import DEFAULT_MAX_SHARD_SIZE, check_output, parse_size
from shoal.convert.provenance import base_model_name, describe_checkpoint, resolve_export_source, source_dtype
from shoal.convert.safetensors_io import (
    SafetensorsWriter,
    StoredDType,
    TensorEntry,
    dtype_code,
    plan_shards,
    shard_file_names,
    write_index,
)
from shoal.errors import ShoalError
from shoal.models.config import to_hf_config

if TYPE_CHECKING:
    import torch

    from shoal.convert.streaming import WeightReader

DEFAULT_LOAD_BUDGET = 256 << 20  # bytes of weights read from DCP per load (plus one tensor in flight)
COPY_THREADS = 2  # threads copying unchanged tensors into a shard (one of them also writes the rest)

WeightReaderFactory = Callable[[Path], "WeightReader"]
Finalizer = Callable[[Path, Path], None]


class WholeTensorReader:
    """The weights of a `model/` that holds every tensor whole in a safetensors data file and no
    DCP `.metadata` (an import's, `shoal.checkpoint.data_files`): shapes, dtypes and byte ranges
    come from the headers, so an export that copies every tensor never imports torch."""

    def __init__(self, entries: dict[str, TensorEntry]):
        self._entries = entries

    def tensor_info(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(e.shape, e.stored) for name, e in self._entries.items()}

    def byte_source(self, name: str) -> tuple[str, int, int] | None:
        entry = self._entries.get(name)
        return None if entry is None else (str(entry.path), entry.begin, entry.end - entry.begin)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from shoal.convert.safetensors_io import read_tensor

        return {name: read_tensor(self._entries[name]) for name in names}


def _torch_dtype(dtype: Any) -> torch.dtype:
    return dtype.torch if isinstance(dtype, StoredDType) else dtype


def generation_config(meta: dict) -> dict:
    """The imported generation_config.json when there was one, else the token ids of the model config."""
    kept = meta.get("extra", {}).get("generation_config")
    if kept:
        return dict(kept)
    model = meta["model"]
    config = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if model.get(key) is not None:
            config[key] = model[key]
    return config


def export_checkpoint(
    source: str | os.PathLike,
    output_path: str | os.PathLike,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    weight_reader: WeightReaderFactory | None = None,
    finalize: Finalizer | None = None,
    load_budget: int = DEFAULT_LOAD_BUDGET,
    report: Callable[[str], None] | None = None,
    base_checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Export a shoal checkpoint (or the latest of an experiment) as a Hugging Face checkpoint.

    dtype: convert floating weights to it. None: the source model's dtype (`provenance.source_dtype`);
        a checkpoint saved in that dtype already (an import) keeps each tensor as saved (lossless),
        one saved in another (training's float32) is converted back to it.
    report: called with one line per fact worth telling the user (which checkpoint, adapters, dtype).
    weight_reader: hook for checkpoints whose weights need work before export (LoRA/DoRA merge):
        called with the checkpoint folder, it returns a `WeightReader` giving full-model weights by
        shoal name. Default: plain DCP reads of `model/` (adapters merged on read when peft.json exists).
    finalize: hook called as finalize(ckpt_dir, out_dir) before the output is published, to add
        files (e.g. a PEFT adapter folder); whatever it writes appears atomically with the rest.
    base_checkpoint: where an adapter-only checkpoint's base is, when it moved (checked all the same).
    """
    ckpt = resolve_export_source(source)
    meta = read_metadata(ckpt)
    cfg = read_model_config(ckpt)
    # The dtype asked for, by name (None: keep each tensor's); names are checked without torch.
    if dtype is not None:
        try:
            target_dtype = dtype_name(dtype)
        except ShoalError:
            from shoal.checkpoint.format import parse_dtype

            target_dtype = dtype_name(parse_dtype(dtype, where="--dtype"))
    elif source_dtype(meta) != dtype_name(meta["dtype"]):
        target_dtype = source_dtype(meta)
    else:
        target_dtype = None
    max_bytes = parse_size(max_shard_size)
    base = _checked_base(ckpt, base_checkpoint)
    out = check_output(output_path, overwrite, sources=(ckpt, *base))
    merging = weight_reader is None and (ckpt / "peft.json").is_file()
    if merging:
        from shoal.peft.export import merged_weight_reader

        weight_reader = lambda folder: merged_weight_reader(folder, *base)  # noqa: E731
    if weight_reader is None and not (ckpt / MODEL_DIR).is_dir():
        raise ShoalError(f"{ckpt}: {MODEL_DIR}/ is missing (an incomplete checkpoint?)")
    reader = weight_reader(ckpt) if weight_reader else _plain_reader(ckpt / MODEL_DIR)

    adapter = get_adapter(cfg)
    saved = reader.tensor_info()
    plan = adapter.export_plan(saved, where=ckpt / MODEL_DIR)  # {HF name: shoal name}, HF order
    # {tensor written: (shoal name, expert index)}: a grouped expert tensor is written one expert
    # at a time, under Hugging Face's per-expert names; every other tensor as it is (index None).
    written = {disk: (name, expert) for hf, name in plan.items()
               for disk, expert in adapter.split_experts(hf, cfg.num_experts)}

    def out_info(disk_name: str) -> TensorInfo:
        name, expert = written[disk_name]
        info = saved[name]
        shape = tuple(info.shape) if expert is None else tuple(info.shape[1:])
        if target_dtype is None or target_dtype == dtype_name(info.dtype):
            return TensorInfo(shape, info.dtype)
        from shoal.checkpoint.format import parse_dtype

        return TensorInfo(shape, parse_dtype(target_dtype))

    # Tensors written exactly as stored (no transform, no dtype change, one raw chunk in model/), and
    # each expert of a grouped tensor (its contiguous share of the chunk): their bytes are copied
    # file to file in the kernel, never loaded (an import's export). Only
    # from the plain reader of model/: a hook's reader returns other values than the stored bytes.
    byte_source = reader.byte_source if weight_reader is None else None
    copies = {}
    for disk, (name, expert) in written.items():
        if byte_source is not None and adapter.keeps_bytes(disk) \
                and (expert is None or adapter.copies_bytes(adapter.to_hf_name(name))) \
                and dtype_code(out_info(disk).dtype) == dtype_code(saved[name].dtype):
            found = byte_source(name)
            if found is not None and expert is not None:  # one expert of [X, ...]: its contiguous share
                share = found[2] // saved[name].shape[0]
                found = (found[0], found[1] + expert * share, share)
            if found is not None:
                copies[disk] = found

    shards = plan_shards([(disk, out_info(disk).nbytes) for disk in written], max_bytes)
    files = shard_file_names(len(shards))
    config_dtype = dtype_name(target_dtype or meta["dtype"])

    with atomic_directory(out, overwrite=overwrite) as tmp:
        weight_map = {}
        for shard, file in zip(shards, files):
            specs = {hf: (out_info(hf).shape, out_info(hf).dtype) for hf in shard}
            writer = SafetensorsWriter(tmp / file, specs, metadata={"format": "pt"})
            try:
                _write_shard(writer, written, copies, reader, adapter, out_info, load_budget)
            finally:
                writer.abort()
            weight_map.update({hf: file for hf in shard})
        if len(files) > 1:
            total = sum(out_info(disk).nbytes for disk in written)
            params = sum(out_info(disk).nbytes // out_info(disk).dtype.itemsize for disk in written)
            write_index(tmp, weight_map, total, total_parameters=params)
        (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg, dtype=config_dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(meta), indent=2) + "\n")
        tokenizer = ckpt / TOKENIZER_DIR
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
        if finalize is not None:
            finalize(ckpt, tmp)
    if report is not None:
        dtypes = sorted({dtype_name(out_info(disk).dtype) for disk in written})
        report(f"took {describe_checkpoint(ckpt, meta)}")
        report("adapters merged into the weights (LoRA/DoRA from peft.json)" if merging else "no adapters")
        report(f"wrote {out}: {len(files)} safetensors file(s) in {', '.join(dtypes)}"
               + ("" if dtype is not None else " (the source model's dtype; --dtype to change)"))
    return out


def _plain_reader(model_dir: Path) -> WeightReader:
    """The reader of a checkpoint's own `model/`: from the data files' headers when they describe it
    whole (no torch), else through DCP."""
    entries = whole_tensors(model_dir)
    if entries is not None:
        return WholeTensorReader(entries)
    from shoal.convert.streaming import DCPWeightReader

    return DCPWeightReader(model_dir)


def _checked_base(ckpt: Path, override: str | os.PathLike | None) -> tuple[Path, ...]:
    """(the base,) of an adapter-only checkpoint, checked before any output is made; () otherwise."""
    from shoal.checkpoint.base import resolve_base

    base = resolve_base(ckpt, override)
    return (base,) if base is not None else ()


def _write_shard(writer: SafetensorsWriter, written: dict[str, tuple[str, int | None]],
                 copies: dict[str, tuple[str, int, int]], reader: WeightReader, adapter,
                 out_info: Callable[[str], TensorInfo], load_budget: int) -> None:
    """Fill one shard: the tensors in `copies` by in-kernel copies, shared between two threads;
    the others loaded, converted and written by the first thread (`_write_loaded`). An error in
    either stops both, and is raised once both have stopped."""
    threads = Threads()
    to_copy = [hf for hf in writer.order if hf in copies]
    lock = threading.Lock()

    def next_copy() -> str | None:
        with lock:
            return to_copy.pop(0) if to_copy and not threads.stopped() else None

    def work(i: int) -> None:
        if i == 0:
            _write_loaded(writer, [hf for hf in writer.order if hf not in copies], written, reader, adapter,
                          out_info, load_budget, threads.stopped)
        while (hf := next_copy()) is not None:
            writer.copy(hf, copies[hf])

    threads.run(work, COPY_THREADS if to_copy else 1)
    writer.close()


def _write_loaded(writer: SafetensorsWriter, names: list[str], written: dict[str, tuple[str, int | None]],
                  reader: WeightReader, adapter, out_info: Callable[[str], TensorInfo], load_budget: int,
                  stopped: Callable[[], bool]) -> None:
    """Write `names` (in the shard's data order), loading at most `load_budget` bytes of weights at a
    time (plus, for an MoE model, the grouped expert tensors whose experts are still being written:
    one layer's worth, since each grouped tensor's experts are written one after another)."""
    group: list[str] = []
    group_bytes = 0
    # Grouped expert tensors loaded whole, kept until their last expert is written.
    pending = {}
    for hf in names:
        name, expert = written[hf]
        if expert is not None:
            pending[name] = pending.get(name, 0) + 1
    grouped: dict[str, torch.Tensor] = {}

    def flush() -> None:
        plain = [written[hf][0] for hf in group if written[hf][1] is None]
        new = list(dict.fromkeys(written[hf][0] for hf in group
                                 if written[hf][1] is not None and written[hf][0] not in grouped))
        tensors = reader.load(plain + new)
        grouped.update({name: tensors.pop(name) for name in new})
        for hf in group:
            name, expert = written[hf]
            if expert is None:
                tensor = adapter.to_hf(name, tensors.pop(name))
            else:
                tensor = adapter.to_hf(name, grouped[name][expert])
                pending[name] -= 1
                if not pending[name]:
                    del grouped[name]
            wanted = out_info(hf).dtype
            if dtype_code(tensor.dtype) != dtype_code(wanted):
                tensor = tensor.to(_torch_dtype(wanted))
            writer.write(hf, tensor)
            del tensor

    for hf in names:
        if stopped():
            return
        nbytes = out_info(hf).nbytes
        if group and group_bytes + nbytes > load_budget:
            flush()
            group, group_bytes = [], 0
        group.append(hf)
        group_bytes += nbytes
    if group:
        flush()


def export_adapter(source: str | os.PathLike, output_path: str | os.PathLike, overwrite: bool = False,
                   base_model: str | None = None, report: Callable[[str], None] | None = None) -> Path:
    """The checkpoint's LoRA/DoRA adapters alone, as a PEFT folder with the tokenizer beside them.

    `AutoPeftModelForCausalLM.from_pretrained(OUT)` loads it by itself: `base_model_name_or_path` is
    `base_model`, else what the checkpoint records (`provenance.base_model_name`).
    """
    ckpt = resolve_export_source(source)
    if not (ckpt / "peft.json").is_file():
        raise ShoalError(f"{ckpt} carries no LoRA/DoRA adapters (no peft.json); export the full model instead")
    out = check_output(output_path, overwrite, sources=(ckpt,))
    meta = read_metadata(ckpt)
    base = base_model or base_model_name(meta)
    if base is None:
        print(f"shoal export: warning: {ckpt} does not record its base model, so adapter_config.json has "
              "base_model_name_or_path null and AutoPeftModelForCausalLM cannot load it alone; pass "
              "--base_model ID|DIR", file=sys.stderr)
    from shoal.peft.export import write_peft_adapter

    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_peft_adapter(ckpt, tmp / "adapter", base_model_name_or_path=base)
        for item in (tmp / "adapter").iterdir():
            item.rename(tmp / item.name)
        (tmp / "adapter").rmdir()
        tokenizer = ckpt / TOKENIZER_DIR
        if tokenizer.is_dir():  # PEFT's own save_pretrained users ship it too: a chat needs it
            shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
    if report is not None:
        report(f"took {describe_checkpoint(ckpt, meta)}")
        report(f"adapters only (PEFT format), base model {base or 'unknown'}")
        report(f"wrote {out}")
    return out


def main(args: argparse.Namespace) -> int:
    def report(line: str) -> None:
        print(f"shoal export: {line}", flush=True)

    if args.adapter_only or args.target == "hf-peft":
        export_adapter(args.source, args.output_path, overwrite=args.overwrite, base_model=args.base_model,
                       report=report)
    else:
        export_checkpoint(args.source, args.output_path, overwrite=args.overwrite, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, report=report,
                          base_checkpoint=args.base_checkpoint)
    return 0
