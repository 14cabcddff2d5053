"""Exporting checkpoints that carry LoRA/DoRA adapters (a `peft.json` beside `model/`).

`merged_weight_reader` is what `shoal export` uses by default: it hands the exporter base weights
with the adapters folded in, a few layers at a time, so the export is a plain Hugging Face model.
`write_peft_adapter` is the `--adapter_only` path: the adapters alone, in Hugging Face PEFT's format,
to load with `PeftModel.from_pretrained` on top of the base model.
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
from shoal.peft.lora import is_adapter_key, merge_adapter_state_dict


def read_peft_config(ckpt: Path) -> LoraConfig:
    config = _read_optional_peft_config(ckpt)
    if config is None:
        raise ShoalError(f"{ckpt} carries no LoRA/DoRA adapters (no {PEFT_FILE})")
    return config


class MergedWeightReader:
    """Base weights by shoal name, each adapted layer's weight merged with its adapters on read."""

    def __init__(self, ckpt: Path):
        self.config = read_peft_config(ckpt)
        self.where = str(ckpt / MODEL_DIR)
        self.raw = DCPWeightReader(ckpt / MODEL_DIR)
        self._info = {k: v for k, v in self.raw.tensor_info().items() if not is_adapter_key(k)}
        self._all = set(self.raw.tensor_info())

    def tensor_info(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        # Each weight needs its own adapter tensors: read them in the same DCP load.
        wanted = list(names)
        for name in names:
            module = name.removesuffix(".weight")
            wanted += [k for k in (f"{module}.lora_A.weight", f"{module}.lora_B.weight",
                                   f"{module}.lora_magnitude_vector") if k in self._all]
        merged = merge_adapter_state_dict(self.raw.load(wanted), self.config, where=self.where)
        return {name: merged[name] for name in names}


def merged_weight_reader(ckpt: Path) -> MergedWeightReader:
    return MergedWeightReader(ckpt)


def write_peft_adapter(ckpt: Path, out_dir: Path, base_model_name_or_path: str | None = None) -> None:
    """The checkpoint's adapters alone, as a Hugging Face PEFT adapter folder in `out_dir`."""
    raw = DCPWeightReader(ckpt / MODEL_DIR)
    adapters = raw.load([k for k in raw.tensor_info() if is_adapter_key(k)])
    save_peft_adapter(adapters, read_peft_config(ckpt), out_dir, base_model_name_or_path=base_model_name_or_path,
                      overwrite=True)
