"""LoRA/DoRA training checkpoints hold what trains and name their base: same exports, a fraction
of the bytes, and every reader checks the base.

Oracles: the same run saved the whole-model way (`--checkpoint.adapter_only=false`, the form
shoal wrote before) exported by the same command, byte for byte; torch's own DCP converter and
the Hugging Face config for what the checkpoint holds; shapes worked by hand for the 8B figure.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from shoal.checkpoint.catalog import list_checkpoints
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_dcp, train_args, train_records

ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def last_checkpoint(exp: Path) -> Path:
    (ckpt,) = (exp / "checkpoints").glob("*-last")
    return ckpt


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lora_args(method: str) -> list[object]:
    return ["--max_steps", 3, "--peft", method, "--peft.rank=4", "--peft.alpha=8", "--peft.dropout=0.0",
            "--train.lr=1e-2", "--peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


@pytest.fixture(scope="module")
def bf16_assets(train_assets: TrainAssets, tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    """The training assets with the model imported in bfloat16, as real models come."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16_base")
    AutoModelForCausalLM.from_pretrained(train_assets.hf_model, dtype=torch.bfloat16).save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(train_assets.hf_model / name, root / "hf" / name)
    assert shoal("import", "--source", root / "hf", "--output_path", root / "ckpt") == 0
    return dataclasses.replace(train_assets, hf_model=root / "hf", checkpoint=root / "ckpt")


def data_files(folder: Path) -> list[Path]:
    """A DCP folder's data files, of either kind (safetensors from shoal's writer, .distcp from torch's)."""
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".distcp"))


@pytest.mark.parametrize("method, base_dtype", [("lora", "bfloat16"), ("dora", "bfloat16"), ("lora", "float32")])
def test_exports_are_those_of_the_whole_checkpoint_of_the_same_run(request, tmp_path: Path, method: str,
                                                                   base_dtype: str):
    assets = request.getfixturevalue("bf16_assets" if base_dtype == "bfloat16" else "train_assets")
    res = tmp_path / "res"
    assert shoal(*train_args(assets, "finetune", res, "adapters", *lora_args(method))) == 0
    assert shoal(*train_args(assets, "finetune", res, "whole", *lora_args(method),
                             "--checkpoint.adapter_only=false")) == 0
    adapters, whole = last_checkpoint(res / "adapters"), last_checkpoint(res / "whole")
    got, expected = train_records(res / "adapters"), train_records(res / "whole")
    assert [(r["loss"], r["grad_norm"]) for r in got.values()] == [(r["loss"], r["grad_norm"]) for r in expected.values()]

    held = read_dcp(adapters / "model", tmp_path / "a.pt")
    everything = read_dcp(whole / "model", tmp_path / "w.pt")
    assert held and all(k.endswith(ADAPTER_SUFFIXES) for k in held)
    assert set(held) == {k for k in everything if k.endswith(ADAPTER_SUFFIXES)}
    assert any(k.endswith("lora_magnitude_vector") for k in held) is (method == "dora")
    assert "base" not in json.loads((whole / "shoal.json").read_text())

    for flags in ([], ["--adapter_only"]):
        assert shoal("export", "--source", adapters, "--output_path", tmp_path / "from_adapters", *flags) == 0
        assert shoal("export", "--source", whole, "--output_path", tmp_path / "from_whole", *flags) == 0
        a, w = folder_bytes(tmp_path / "from_adapters"), folder_bytes(tmp_path / "from_whole")
        assert sorted(a) == sorted(w)
        for name in w:
            assert a[name] == w[name], f"{name} differs between the two exports ({flags or 'merged'})"
        if not flags:
            config = json.loads(a["config.json"])
            assert config.get("torch_dtype", config.get("dtype")) == base_dtype
        shutil.rmtree(tmp_path / "from_adapters")
        shutil.rmtree(tmp_path / "from_whole")


def hand_adapter_shapes(hf_config: dict, rank: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the LoRA tensors of every linear layer, from the HF config alone."""
    e, f = hf_config["hidden_size"], hf_config["intermediate_size"]
    d = hf_config.get("head_dim") or e // hf_config["num_attention_heads"]
    q, kv = hf_config["num_attention_heads"] * d, hf_config["num_key_value_heads"] * d
    linears = {"self_attn.q_proj": (e, q), "self_attn.k_proj": (e, kv), "self_attn.v_proj": (e, kv),
               "self_attn.o_proj": (q, e), "mlp.gate_proj": (e, f), "mlp.up_proj": (e, f), "mlp.down_proj": (f, e)}
    shapes = {}
    for i in range(hf_config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in linears.items():
            shapes[f"model.layers.{i}.{module}.lora_A.weight"] = (rank, fan_in)
            shapes[f"model.layers.{i}.{module}.lora_B.weight"] = (fan_out, rank)
    return shapes


def test_the_checkpoint_holds_the_adapters_and_their_moments_only(train_assets: TrainAssets, tmp_path: Path):
    assert shoal(*train_args(train_assets, "finetune", tmp_path / "res", "run", *lora_args("lora"))) == 0
    ckpt = last_checkpoint(tmp_path / "res" / "run")
    expected = hand_adapter_shapes(json.loads((train_assets.hf_model / "config.json").read_text()), rank=4)
    model = read_dcp(ckpt / "model", tmp_path / "m.pt")
    assert {k: tuple(v.shape) for k, v in model.items()} == expected
    assert all(v.dtype == torch.float32 for v in model.values())
    optim = read_dcp(ckpt / "optim", tmp_path / "o.pt")
    moments = {k for k in optim if k.rpartition(".")[2] in ("exp_avg", "exp_avg_sq")}
    assert {k.rpartition(".")[0].removeprefix("state.") for k in moments} == set(expected)

    # Bytes on disk: 4 per adapter parameter and 8 more for AdamW's moments, plus DCP's framing.
    params = sum(torch.Size(s).numel() for s in expected.values())
    data = sum(p.stat().st_size for folder in ("model", "optim") for p in data_files(ckpt / folder))
    framing, tensors = data - 12 * params, len(model) + len(optim)  # optim: two moments and a step count each
    assert 0 <= framing < 4096 * tensors, framing
    # The imported base's model/ holds safetensors data files (shoal.checkpoint.storage).
    whole = sum(p.stat().st_size for p in (train_assets.checkpoint / "model").iterdir() if p.name != ".metadata")
    assert whole > 0
    assert sum(p.stat().st_size for p in data_files(ckpt / "model")) < whole / 4

    # The same counts for the 8B shape (rank 32, every linear layer), worked by hand, are shoal's:
    # adapters, two moments and the same framing per tensor stay under 1 GiB.
    from shoal.models import get_preset
    from shoal.models.config import to_hf_config
    from shoal.peft.config import ALL_LINEAR
    from shoal.plan.counts import count_parameters

    cfg = get_preset("llama31_8b")
    shapes_8b = hand_adapter_shapes(to_hf_config(cfg), rank=32)
    params_8b = sum(torch.Size(s).numel() for s in shapes_8b.values())
    assert params_8b == 32 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)) == 83_886_080
    assert count_parameters(cfg, "lora", 32, ALL_LINEAR).trainable == params_8b
    per_tensor = framing / tensors
    on_disk_8b = 12 * params_8b + per_tensor * tensors * len(shapes_8b) / len(expected)
    assert on_disk_8b < 2**30, on_disk_8b  # 1.007e9 bytes: 0.94 GiB (and 33.1e9 for the whole model)


def test_retention_and_completeness_in_the_adapter_only_form(train_assets: TrainAssets, tmp_path: Path):
    args = train_args(train_assets, "finetune", tmp_path / "res", "run", *lora_args("lora"), "--max_steps", 4,
                      "--checkpoint.save_interval=1", "--checkpoint.save_top_k=1")
    before = folder_bytes(train_assets.checkpoint / "model")
    assert shoal(*args) == 0
    root = tmp_path / "res" / "run" / "checkpoints"
    kept = list_checkpoints(root)
    assert 1 <= len(kept) <= 2 and kept[-1].step == 4 and kept[-1].last
    assert folder_bytes(train_assets.checkpoint / "model") == before  # deleting checkpoints never touches the base
    data = data_files(kept[-1].path / "model")[0]
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size - 1)
    assert kept[-1].path not in [c.path for c in list_checkpoints(root)]  # an adapter file cut short: incomplete


def test_a_moved_base_is_refused_by_every_reader_until_pointed_at(train_assets: TrainAssets, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture):
    base = tmp_path / "base"
    shutil.copytree(train_assets.checkpoint, base)
    assets = dataclasses.replace(train_assets, checkpoint=base)
    args = train_args(assets, "finetune", tmp_path / "res", "run", *lora_args("lora"))
    assert shoal(*args) == 0
    exp = tmp_path / "res" / "run"
    assert shoal("export", "--source", exp, "--output_path", tmp_path / "before") == 0
    moved = tmp_path / "moved"
    base.rename(moved)
    capsys.readouterr()

    def refused(*command: object) -> str:
        assert shoal(*command) == 2
        err = capsys.readouterr().err
        assert str(base) in err and "does not exist" in err and "--base_checkpoint" in err, err
        return err

    refused("export", "--source", exp, "--output_path", tmp_path / "after")
    assert not (tmp_path / "after").exists()
    # The PEFT adapter export needs no base weights: PEFT applies it to the Hub model it names.
    assert shoal("export", "--source", exp, "--output_path", tmp_path / "peft", "--adapter_only") == 0
    refused("generate", "--source", exp, "--prompt", "hi", "--max_new_tokens", 2, "--device", "cpu")
    refused("eval", "--source", exp, "--dataset_path", train_assets.sft_dir, "--seq_length", 64, "--device", "cpu")
    # Fine-tuning anew from the adapter-only checkpoint needs its base too.
    next_run = train_args(assets, "finetune", tmp_path / "res", "next", *lora_args("lora"),
                          "--nemo_model", last_checkpoint(exp))
    refused(*next_run)
    assert shoal(*next_run, f"--checkpoint.base={moved}") == 0
    assert json.loads((last_checkpoint(tmp_path / "res" / "next") / "shoal.json").read_text())["base"]["path"] == \
        str(moved)

    assert shoal("export", "--source", exp, "--output_path", tmp_path / "after", "--base_checkpoint", moved) == 0
    assert folder_bytes(tmp_path / "after") == folder_bytes(tmp_path / "before")
    assert shoal("generate", "--source", exp, "--prompt", "hi", "--max_new_tokens", 2, "--device", "cpu",
                 "--base_checkpoint", moved) == 0
    # Resuming: the same command with --nemo_model naming the base where it now is.
    resume = train_args(dataclasses.replace(assets, checkpoint=moved), "finetune", tmp_path / "res", "run",
                        *lora_args("lora"), "--max_steps", 4)
    assert shoal(*resume) == 0
    assert "(step 3)" in capsys.readouterr().err
    recorded = json.loads((last_checkpoint(exp) / "shoal.json").read_text())["base"]
    assert recorded["path"] == str(moved) and recorded["resolved"] == str(moved.resolve())
    # The resumed run's checkpoints name the base where it now is: no flag needed any more.
    assert shoal("export", "--source", exp, "--output_path", tmp_path / "resumed") == 0


def test_full_fine_tuning_checkpoints_stay_whole(train_assets: TrainAssets, tmp_path: Path):
    assert shoal(*train_args(train_assets, "finetune", tmp_path / "res", "full", "--max_steps", 1)) == 0
    ckpt = last_checkpoint(tmp_path / "res" / "full")
    start = read_dcp(train_assets.checkpoint / "model", tmp_path / "s.pt")
    assert set(read_dcp(ckpt / "model", tmp_path / "f.pt")) == set(start)
    assert "base" not in json.loads((ckpt / "shoal.json").read_text())
