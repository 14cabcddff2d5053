"""Checkpoints of format version 1 (every shoal before the safetensors storage) still convert and load.

A version-1 checkpoint is made exactly as that shoal's import made it: the same streaming planner
writing through torch's `FileSystemWriter` (one `.distcp` file of `torch.save` records per
tensor), `shoal.json` with `"format_version": 1`. The oracle is the Hugging Face source folder,
read with the safetensors library: the export of the old checkpoint must give back every tensor
bit for bit, as must a model loaded from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shoal.checkpoint.format import MODEL_DIR, copy_tokenizer, dtype_name, write_metadata
from shoal.checkpoint.model_state import save_model_state
from shoal.checkpoint.state import load_model_into
from shoal.cli import main as shoal
from shoal.convert.importer import read_hf_config
from shoal.convert.safetensors_io import find_weight_files, read_tensor
from shoal.convert.streaming import LazySavePlanner
from shoal.models import build_model
from tests.helpers.hf_models import save_hf_checkpoint
from tests.unit.convert.test_import_export import hf_tensors


def write_format1_checkpoint(hf_dir: Path, ckpt: Path) -> None:
    """What `shoal import` wrote before format 2 (llama: no tensor is transformed)."""
    _, cfg = read_hf_config(hf_dir)
    entries = find_weight_files(hf_dir)
    placeholders = {name: torch.empty(e.shape, dtype=e.dtype, device="meta") for name, e in entries.items()}
    ckpt.mkdir()
    copy_tokenizer(hf_dir, ckpt)
    save_model_state(placeholders, ckpt / MODEL_DIR, planner=LazySavePlanner(lambda n: read_tensor(entries[n])),
                     file_per_tensor=True)
    dtype = next(iter(entries.values())).dtype  # one dtype throughout, as save_pretrained writes it
    write_metadata(ckpt, cfg, dtype_name(dtype), made_by={"command": "shoal import", "source": str(hf_dir)})
    meta = json.loads((ckpt / "shoal.json").read_text())
    (ckpt / "shoal.json").write_text(json.dumps({**meta, "format_version": 1}, indent=2))


def test_a_format_1_checkpoint_exports_bit_for_bit_and_loads(tmp_path) -> None:
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "old", tmp_path / "out"
    save_hf_checkpoint(hf_dir, "llama", dtype=torch.bfloat16)
    write_format1_checkpoint(hf_dir, ckpt)
    assert list((ckpt / MODEL_DIR).glob("*.distcp")) and not list((ckpt / MODEL_DIR).glob("*.safetensors"))

    assert shoal(["export", "--source", str(ckpt), "--output_path", str(out)]) == 0
    source, exported = hf_tensors(hf_dir), hf_tensors(out)
    assert sorted(exported) == sorted(source)
    for name, value in source.items():
        assert exported[name].dtype == value.dtype and torch.equal(exported[name], value), name

    _, cfg = read_hf_config(hf_dir)
    model = build_model(cfg, init=False).to(torch.bfloat16)
    load_model_into(model, ckpt)
    for name, value in model.state_dict().items():
        expected = source.get(name, source.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        assert torch.equal(value, expected), name
