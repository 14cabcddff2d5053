"""Conversion as a copy (issue 19): a dense model's import and export copy every tensor's bytes,
and neither imports torch (its start-up alone is longer than copying a 1B model on a small machine).

Oracles: the `safetensors` library (the files shoal writes hold the source's values), transformers
(the exported model, and what a tokenizer's size is), and a subprocess's `sys.modules` (whether
torch was imported).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from shoal.cli import main as shoal
from shoal.convert.importer import tokenizer_size
from tests.helpers.hf_models import save_hf_checkpoint
from tests.helpers.hf_moe import save_hf_moe
from tests.helpers.tokenizers import llama3_bpe_tokenizer, word_level_tokenizer

REPO = Path(__file__).resolve().parents[3]
DEMO_TOKENIZER = REPO / "shoal" / "demo" / "assets" / "tokenizer"

RUN_AND_REPORT_MODULES = """
import json, sys
from shoal.cli import main
codes = [main(args) for args in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def run_fresh(*commands: list[str]) -> dict:
    """Run shoal commands in one fresh interpreter; their exit codes and what it imported."""
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_MODULES, json.dumps(list(commands))],
                          capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def _moe(path: Path, dtype: torch.dtype, max_shard_size: str | None = None) -> torch.nn.Module:
    model = save_hf_moe(path, dtype=dtype, mlp_only_layers=[1])  # a dense layer between two sparse ones
    return model


@pytest.mark.parametrize("family, shards", [("llama", None), ("qwen3", "40KB"), ("qwen3_moe", None)])
def test_import_and_export_copy_bytes_without_torch(tmp_path, family, shards):
    """Dense tensors are copied as they lie; an MoE model's per-expert tensors are stacked into
    grouped ones by copying each expert's bytes after the last, and sliced back the same way."""
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ck", tmp_path / "out"
    save = _moe if family == "qwen3_moe" else lambda path, **kw: save_hf_checkpoint(path, family, **kw)
    save(hf, dtype=torch.bfloat16, max_shard_size=shards)
    assert shards is None or (hf / "model.safetensors.index.json").is_file()

    report = run_fresh(["import", "--source", str(hf), "--output_path", str(ckpt)],
                       ["export", "--source", str(ckpt), "--output_path", str(out)])

    assert report["codes"] == [0, 0]
    assert not report["torch"] and not report["transformers"]
    # model/ is safetensors data files with no DCP pickle; together they hold the source's tensors.
    assert not (ckpt / "model" / ".metadata").exists()
    source = all_tensors(hf)
    stored = all_tensors(ckpt / "model")
    for name, tensor in stored.items():
        if name not in source:  # a grouped [X, out, in] tensor: the experts' tensors stacked
            prefix, _, proj = name.rpartition(".")
            tensor = torch.stack([source.pop(f"{prefix}.{x}.{proj}.weight") for x in range(tensor.shape[0])])
            assert family == "qwen3_moe" and torch.equal(stored[name], tensor), name
        else:
            assert torch.equal(tensor, source.pop(name)), name
    assert not source  # nothing left out
    source = all_tensors(hf)
    assert json.loads((ckpt / "shoal.json").read_text())["format_version"] == 3
    # The export is the source model again, bit for bit, and transformers loads it as such.
    exported = all_tensors(out)
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = [transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()(ids).logits
                  for folder in (hf, out)]
    assert torch.equal(*logits)


def test_an_export_that_converts_dtypes_still_works_from_a_copied_import(tmp_path):
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ck", tmp_path / "out"
    save_hf_checkpoint(hf, "llama", dtype=torch.bfloat16)
    assert shoal(["import", "--source", str(hf), "--output_path", str(ckpt)]) == 0
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(out), "--dtype", "float32"]) == 0
    source, exported = all_tensors(hf), all_tensors(out)
    for name, tensor in source.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], tensor.float()), name
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


def _saved(tokenizer, folder: Path) -> Path:
    tokenizer.save_pretrained(folder)
    return folder


def _with_declared_token(folder: Path) -> Path:
    """A tokenizer whose tokenizer_config.json declares an added token that tokenizer.json lacks."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.setdefault("added_tokens_decoder", {})["1500"] = {
        "content": "<|declared_only|>", "special": True, "lstrip": False, "rstrip": False,
        "normalized": False, "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("make", [
    lambda d: _saved(word_level_tokenizer(), d),
    lambda d: _saved(llama3_bpe_tokenizer(), d),
    lambda d: DEMO_TOKENIZER,
    lambda d: _with_declared_token(_saved(word_level_tokenizer(), d)),
], ids=["word_level", "bpe_llama3_specials", "demo", "declared_in_config_only"])
def test_the_tokenizer_is_counted_as_transformers_counts_it(tmp_path, make):
    folder = make(tmp_path / "tok")
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    highest = max(reference.get_vocab().values())
    assert tokenizer_size(folder) == (len(reference), reference.vocab_size, highest)


def test_a_folder_with_only_a_chat_template_has_no_tokenizer_to_count(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert tokenizer_size(tmp_path) is None


def test_an_import_that_lost_a_data_file_is_incomplete(tmp_path, capsys):
    """The copied model/ has no .metadata to list its files: each header says how many files its
    save wrote, so a folder missing one is incomplete, not a model short of some tensors."""
    hf, ckpt = tmp_path / "hf", tmp_path / "ck"
    save_hf_checkpoint(hf, "llama", dtype=torch.bfloat16)
    assert shoal(["import", "--source", str(hf), "--output_path", str(ckpt)]) == 0
    files = sorted((ckpt / "model").glob("*.safetensors"))
    assert len(files) == 2
    files[1].unlink()
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(tmp_path / "out")]) == 2
    assert f"checkpoint {ckpt} is incomplete" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_family_whose_tensors_change_on_the_way_is_streamed_through_dcp(tmp_path, monkeypatch):
    """No family transforms a tensor today; one that did (a fused or permuted projection) would be
    read, transformed and written through DCP, and exported through the inverse: stood in for here
    by negating q_proj on import and again on export."""
    from shoal.checkpoint.model_state import load_model_state
    from shoal.convert import adapters

    negate = (lambda t, cfg: -t, lambda t, cfg: -t)
    monkeypatch.setattr(adapters.LlamaAdapter, "transforms", {"model.layers.{}.self_attn.q_proj.weight": negate})
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ck", tmp_path / "out"
    save_hf_checkpoint(hf, "llama", dtype=torch.bfloat16)
    assert shoal(["import", "--source", str(hf), "--output_path", str(ckpt)]) == 0
    assert (ckpt / "model" / ".metadata").is_file()  # written by DCP, not copied
    source = all_tensors(hf)
    name = "model.layers.0.self_attn.q_proj.weight"
    stored = {name: torch.empty_like(source[name]), "model.norm.weight": torch.empty_like(source["model.norm.weight"])}
    load_model_state(stored, ckpt / "model")
    assert torch.equal(stored[name], -source[name])
    assert torch.equal(stored["model.norm.weight"], source["model.norm.weight"])
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(out)]) == 0
    exported = all_tensors(out)
    assert exported.keys() == source.keys()
    for key, tensor in source.items():
        assert torch.equal(exported[key], tensor), key


def test_a_tokenizer_config_that_is_not_json_is_refused_with_its_line(tmp_path, capsys):
    hf = tmp_path / "hf"
    save_hf_checkpoint(hf, "llama", dtype=torch.bfloat16)
    (hf / "tokenizer_config.json").write_text('{\n  "model_max_length": 8,\n  oops\n}\n')
    assert shoal(["import", "--source", str(hf), "--output_path", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert f"{hf / 'tokenizer_config.json'}: invalid JSON at line 3" in err, err
    assert not (tmp_path / "ck").exists()
