"""Qwen3-MoE through `shoal import` and `shoal export`, with `transformers` and the safetensors
library as the oracles.

On disk a Hugging Face MoE checkpoint holds one tensor per expert (`mlp.experts.{x}.gate_proj.weight`,
as the Hub's Qwen3-30B-A3B and `save_pretrained` of transformers 5 write it); shoal stacks them
into grouped `[X, out, in]` tensors. The round trip must give back every tensor bit for bit under
its per-expert name, load in transformers with nothing missing or unexpected, and refuse a
checkpoint whose experts are incomplete or disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from shoal.checkpoint.format import read_model_config  # noqa: E402
from shoal.checkpoint.model_state import model_state_info  # noqa: E402
from shoal.cli import main as shoal  # noqa: E402
from shoal.convert.exporter import export_checkpoint  # noqa: E402
from tests.helpers.hf_moe import VOCAB_SIZE, save_hf_moe
from tests.unit.convert.test_import_export import hf_tensors, load_shoal

torch.set_num_threads(1)
LAYOUT = dict(mlp_only_layers=[1], norm_topk_prob=True)  # a dense layer between two sparse ones


def test_round_trip_fp32_loads_in_transformers_bit_identical(tmp_path):
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    hf_model = save_hf_moe(hf_dir, **LAYOUT)
    assert shoal(["import", "--source", str(hf_dir), "--output_path", str(ckpt)]) == 0
    # shoal holds the grouped layout: one [X, out, in] tensor per projection of a sparse layer.
    info = model_state_info(ckpt / "model")
    assert tuple(info["model.layers.0.mlp.experts.gate_proj"].shape) == (8, 32, 64)
    assert tuple(info["model.layers.2.mlp.experts.down_proj"].shape) == (8, 64, 32)
    assert "model.layers.1.mlp.gate_proj.weight" in info and "model.layers.1.mlp.gate.weight" not in info
    cfg = read_model_config(ckpt)
    assert (cfg.family, cfg.num_experts, cfg.mlp_only_layers, cfg.norm_topk_prob) == ("qwen3_moe", 8, [1], True)

    assert shoal(["export", "--source", str(ckpt), "--output_path", str(out)]) == 0
    before, after = hf_tensors(hf_dir), hf_tensors(out)
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in after
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]), name

    tokens = torch.randint(0, VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        assert (load_shoal(ckpt)(tokens) - expected).abs().max().item() <= 1e-5
        exported, loading = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(exported).__name__ == "Qwen3MoeForCausalLM"
        assert not any(loading.values()), loading
        assert (exported.eval()(tokens).logits - expected).abs().max().item() <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["mlp_only_layers"]) == (8, 2, [1])


def test_sharded_bf16_source_and_export_with_a_small_load_budget(tmp_path):
    """A source whose experts are spread over several files imports; an export in small shards,
    loading a few kilobytes at a time (so expert slices of one grouped tensor fall into several
    loads and shards), is still bit-identical."""
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    model = save_hf_moe(hf_dir, dtype=torch.bfloat16, decoder_sparse_step=2)
    model.save_pretrained(hf_dir, max_shard_size="40KB")  # re-save sharded
    (hf_dir / "model.safetensors").unlink(missing_ok=True)
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1
    assert shoal(["import", "--source", str(hf_dir), "--output_path", str(ckpt)]) == 0
    export_checkpoint(ckpt, out, max_shard_size=30_000, load_budget=6_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    before, after = hf_tensors(hf_dir), hf_tensors(out)
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == torch.bfloat16
        assert torch.equal(after[name].view(torch.int16), before[name].view(torch.int16)), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == after.keys()


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    path = tmp_path / "hf"
    save_hf_moe(path, **LAYOUT)
    return path


def rewrite(hf_dir: Path, change) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    change(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def refused(tmp_path: Path, hf_dir: Path, capsys, *phrases: str) -> None:
    out = tmp_path / "results" / "ckpt"
    assert shoal(["import", "--source", str(hf_dir), "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shoal import: error:"), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert not out.exists() and not list(out.parent.glob(".ckpt*"))


def test_missing_expert_is_named(tmp_path, hf_dir, capsys):
    rewrite(hf_dir, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    refused(tmp_path, hf_dir, capsys, "experts [3]", "model.layers.2.mlp.experts.up_proj")


def test_expert_of_another_shape_is_named(tmp_path, hf_dir, capsys):
    def shrink(tensors):
        name = "model.layers.0.mlp.experts.5.gate_proj.weight"
        tensors[name] = tensors[name][:16].clone()
    rewrite(hf_dir, shrink)
    refused(tmp_path, hf_dir, capsys, "model.layers.0.mlp.experts.5.gate_proj.weight", "experts must agree")


def test_more_experts_than_the_config_says_is_refused(tmp_path, hf_dir, capsys):
    def add(tensors):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            first = tensors[f"model.layers.0.mlp.experts.0.{proj}.weight"]
            tensors[f"model.layers.0.mlp.experts.8.{proj}.weight"] = first.clone()
    rewrite(hf_dir, add)
    refused(tmp_path, hf_dir, capsys, "model.layers.0.mlp.experts.gate_proj", "[9, 32, 64]", "[8, 32, 64]")


def test_dense_layer_with_experts_is_refused(tmp_path, hf_dir, capsys):
    """Layer 1 is dense (mlp_only_layers): a router there is a tensor the model would ignore."""
    rewrite(hf_dir, lambda t: t.__setitem__("model.layers.1.mlp.gate.weight", torch.zeros(8, 64)))
    refused(tmp_path, hf_dir, capsys, "does not use", "model.layers.1.mlp.gate.weight")


def test_export_loads_each_grouped_tensor_once_and_one_layer_at_a_time(tmp_path):
    """The streaming bound the docs give: in one output file, every grouped expert tensor is read
    from DCP once (not once per expert), and a read never takes experts of more than one layer."""
    from shoal.convert.streaming import DCPWeightReader

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    save_hf_moe(hf_dir)  # three sparse layers
    assert shoal(["import", "--source", str(hf_dir), "--output_path", str(ckpt)]) == 0
    loads: list[list[str]] = []

    class RecordingReader(DCPWeightReader):
        def load(self, names):
            loads.append(list(names))
            return super().load(names)

    export_checkpoint(ckpt, tmp_path / "out", weight_reader=lambda c: RecordingReader(c / "model"), load_budget=20_000)
    grouped = [name for names in loads for name in names if ".mlp.experts." in name]
    assert sorted(grouped) == sorted(set(grouped)) and len(grouped) == 3 * 3  # one file: each read once
    for names in loads:
        layers = {name.split(".")[2] for name in names if ".mlp.experts." in name}
        assert len(layers) <= 1, names
    assert torch.equal(hf_tensors(tmp_path / "out")["model.layers.2.mlp.experts.7.down_proj.weight"],
                       hf_tensors(hf_dir)["model.layers.2.mlp.experts.7.down_proj.weight"])
