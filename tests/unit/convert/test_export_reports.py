"""`shoal export` says what it did and writes what the user needs (issue 13, convert side):

* a Hugging Face folder or a missing path as `--source` gets a message that says so;
* the export names the checkpoint it took (step, val_loss), whether adapters were merged, the dtype;
* a checkpoint saved in float32 from a bfloat16 source comes back in bfloat16 (`--dtype` to change);
* `--adapter_only` writes a PEFT folder that `AutoPeftModelForCausalLM.from_pretrained` loads by
  itself (base_model_name_or_path set, tokenizer included) with files of mode 0644.

Oracles: transformers and peft loading the results; torch's own bf16 rounding of the saved weights.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from shoal.checkpoint.format import read_metadata, read_model_config, write_metadata  # noqa: E402
from shoal.checkpoint.model_state import load_model_state, save_model_state  # noqa: E402
from shoal.cli import main as shoal  # noqa: E402
from shoal.models import build_model  # noqa: E402
from tests.helpers.hf_models import save_hf_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    """A bf16 tiny Llama (HF folder) and its import."""
    root = tmp_path_factory.mktemp("imported")
    save_hf_checkpoint(root / "hf", "llama", dtype=torch.bfloat16, tie_word_embeddings=False)
    assert shoal(["import", "--source", str(root / "hf"), "--output_path", str(root / "ck")]) == 0
    return root / "hf", root / "ck"


def training_checkpoint(imported_ck: Path, dest: Path, made_by: dict, extra: dict | None = None,
                        lora: bool = False, step: int = 7) -> Path:
    """What training writes: fp32 weights, shoal.json dtype float32, optionally LoRA adapters."""
    cfg = read_model_config(imported_ck)
    model = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items()}
    load_model_state(state, imported_ck / "model")
    model = model.float()
    if lora:
        from shoal.peft import LoraConfig, apply_lora

        peft = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
        apply_lora(model, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.2 * torch.randn_like(param))
        (dest / "peft.json").parent.mkdir(parents=True, exist_ok=True)
        (dest / "peft.json").write_text(json.dumps(peft.to_dict()))
    save_model_state(model.state_dict(), dest / "model")
    shutil.copytree(imported_ck / "tokenizer", dest / "tokenizer")
    write_metadata(dest, cfg, "float32", progress={"step": step}, made_by=made_by, extra=extra)
    return dest


def test_a_hugging_face_folder_as_source_says_so(tmp_path, imported, capsys):
    code = shoal(["export", "--source", str(imported[0]), "--output_path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Hugging Face checkpoint" in err and "shoal import" in err, err


def test_a_missing_source_says_it_does_not_exist(tmp_path, capsys):
    code = shoal(["export", "--source", str(tmp_path / "nowhere"), "--output_path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "shoal.json" not in err, err


def test_export_reports_checkpoint_adapters_and_dtype(tmp_path, imported, capsys):
    exp = tmp_path / "results" / "exp" / "checkpoints"
    ckpt = exp / "step=000007-val_loss=1.234-last"
    training_checkpoint(imported[1], ckpt, made_by={"command": "shoal pretrain", "source_dtype": "bfloat16"})
    assert shoal(["export", "--source", str(tmp_path / "results" / "exp"), "--output_path", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert str(ckpt) in out and "step 7" in out and "val_loss 1.234" in out, out
    assert "no adapters" in out and "bfloat16" in out, out


def test_float32_training_checkpoint_of_a_bf16_model_exports_as_bf16(tmp_path, imported, capsys):
    ckpt = training_checkpoint(imported[1], tmp_path / "ck", made_by={"command": "shoal pretrain",
                                                                     "source_dtype": "bfloat16"})
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(tmp_path / "hf")]) == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    # bf16 -> fp32 (training) -> bf16 (export) is exact: the export equals the original weights.
    original = load_file(imported[0] / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(weights[name], tensor), name
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    # --dtype still decides when given.
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(tmp_path / "hf32"), "--dtype", "float32"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "hf32" / "model.safetensors").values()} == {torch.float32}


def test_source_dtype_may_sit_in_extra(tmp_path, imported):
    ckpt = training_checkpoint(imported[1], tmp_path / "ck", made_by={"command": "shoal finetune"},
                               extra={"source_dtype": "bfloat16"})
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(tmp_path / "hf")]) == 0
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}


def file_modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("made_by", [
    lambda hf: {"command": "shoal finetune", "hf_model_id": str(hf)},
    # What training records today: the command line, with --hf_model_id in it.
    lambda hf: {"command": f"shoal finetune --peft lora --hf_model_id {hf} --max_steps 3"},
], ids=["made_by_hf_model_id", "command_line"])
def test_adapter_only_loads_with_auto_peft_model(tmp_path, imported, capsys, made_by):
    from peft import AutoPeftModelForCausalLM

    hf, ck = imported
    ft = training_checkpoint(ck, tmp_path / "ft", made_by=made_by(hf), lora=True)
    old_umask = os.umask(0o022)
    try:
        assert shoal(["export", "--source", str(ft), "--output_path", str(tmp_path / "adapter"), "--adapter_only"]) == 0
        assert shoal(["export", "--source", str(ft), "--output_path", str(tmp_path / "merged"), "--dtype",
                      "float32"]) == 0
    finally:
        os.umask(old_umask)
    out = capsys.readouterr().out
    assert "adapters merged" in out and "adapters only" in out, out
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf)
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    modes = file_modes(adapter)
    assert set(modes.values()) == {0o644}, modes
    assert modes == {k: 0o644 for k in modes}

    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, merged(tokens).logits, rtol=1e-4, atol=1e-4)
    transformers.AutoTokenizer.from_pretrained(adapter)  # the tokenizer travels with the adapter


def test_adapter_only_base_model_flag_and_missing_base_warning(tmp_path, imported, capsys):
    hf, ck = imported
    ft = training_checkpoint(ck, tmp_path / "ft", made_by={"command": "shoal finetune"}, lora=True)
    assert shoal(["export", "--source", str(ft), "--output_path", str(tmp_path / "a1"), "--adapter_only"]) == 0
    assert "--base_model" in capsys.readouterr().err  # nothing recorded: say how to give it
    assert shoal(["export", "--source", str(ft), "--output_path", str(tmp_path / "a2"), "--adapter_only",
                  "--base_model", "meta-llama/Llama-3.2-1B"]) == 0
    config = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"


def test_adapter_only_of_an_import_takes_the_import_source(tmp_path, imported):
    """A checkpoint made by `shoal import` records its source folder: that is the base model."""
    hf, ck = imported
    ft = training_checkpoint(ck, tmp_path / "ft", lora=True,
                             made_by=read_metadata(ck)["made_by"])  # as if trained in place
    assert shoal(["export", "--source", str(ft), "--output_path", str(tmp_path / "a"), "--adapter_only"]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(hf.absolute())
