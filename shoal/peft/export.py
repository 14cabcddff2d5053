"""Exporting checkpoints that carry LoRA/DoRA adapters (a `peft.json` beside `model/`).

`merged_weight_reader` is what `shoal export` uses by default: it hands the exporter base weights
with the adapters folded in, a few layers at a time, so the export is a plain Hugging Face model.
`write_peft_adapter` is the `--adapter_only` path: the adapters alone, in Hugging Face PEFT's format,
to load with `PeftModel.from_pretrained` on top of the base model.

An adapter-only checkpoint (what LoRA/DoRA training saves) holds the adapters and names its base
checkpoint (`shoal.checkpoint.base`): the merge reads the frozen weights from that base, checked
first, and whatever the checkpoint itself holds from the checkpoint, so the result is the same as
for a checkpoint holding the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shoal.checkpoint.format import MODEL_DIR, PEFT_FILE, TensorInfo
from shoal.checkpoint.format import read_peft_config as _read_optional_peft_config
from shoal.convert.streaming import DCPWeightReader
from shoal.errors import ShoalError
from shoal.peft.adapter import save_peft_adapter
from shoal.peft.config import LoraConfig
from shoal.peft.lora import adapter_module_for, is_adapter_key, merge_adapter_state_dict


def read_peft_config(ckpt: Path) -> LoraConfig:
    config = _read_optional_peft_config(ckpt)
    if config is None:
        raise ShoalError(f"{ckpt} carries no LoRA/DoRA adapters (no {PEFT_FILE})")
    return config


class MergedWeightReader:
    """Base weights by shoal name, each adapted layer's weight merged with its adapters on read.

    `base`: where an adapter-only checkpoint's base is, when it is not where it was recorded."""

    def __init__(self, ckpt: Path, base: Path | None = None):
        from shoal.checkpoint.base import resolve_base

        self.config = read_peft_config(ckpt)
        self.where = str(ckpt / MODEL_DIR)
        self.own = DCPWeightReader(ckpt / MODEL_DIR)
        base_ckpt = resolve_base(ckpt, base)
        self.base = DCPWeightReader(base_ckpt / MODEL_DIR) if base_ckpt is not None else None
        # What the checkpoint holds itself wins over its base (it trained).
        self._source = {k: self.base for k in (self.base.tensor_info() if self.base else {})}
        self._source.update({k: self.own for k in self.own.tensor_info()})
        infos = {**(self.base.tensor_info() if self.base else {}), **self.own.tensor_info()}
        self._info = {k: v for k, v in infos.items() if not is_adapter_key(k)}
        self._all = set(self._source)

    def tensor_info(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        # Each weight needs its own adapter tensors: read them in the same DCP load.
        wanted = list(names)
        for name in names:
            module = adapter_module_for(name)
            wanted += [k for k in (f"{module}.lora_A.weight", f"{module}.lora_B.weight",
                                   f"{module}.lora_magnitude_vector") if k in self._all]
        tensors = {}
        for reader in (self.base, self.own):
            mine = [k for k in wanted if self._source[k] is reader]
            if mine:
                tensors.update(reader.load(mine))
        merged = merge_adapter_state_dict(tensors, self.config, where=self.where)
        return {name: merged[name] for name in names}


def merged_weight_reader(ckpt: Path, base: Path | None = None) -> MergedWeightReader:
    return MergedWeightReader(ckpt, base)


def write_peft_adapter(ckpt: Path, out_dir: Path, base_model_name_or_path: str | None = None) -> None:
    """The checkpoint's adapters alone, as a Hugging Face PEFT adapter folder in `out_dir`."""
    raw = DCPWeightReader(ckpt / MODEL_DIR)
    adapters = raw.load([k for k in raw.tensor_info() if is_adapter_key(k)])
    save_peft_adapter(adapters, read_peft_config(ckpt), out_dir, base_model_name_or_path=base_model_name_or_path,
                      overwrite=True)
