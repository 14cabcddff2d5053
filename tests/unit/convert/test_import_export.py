"""HF -> shoal -> HF through the `shoal` command line, with `transformers` as the oracle.

For each family: shoal's logits on the imported checkpoint equal the HF model's; the export loads
in `transformers` with no flags and gives the same logits; every tensor comes back bit-identical
in its dtype; the tokenizer gives the same ids and the same chat rendering.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from shoal.checkpoint.format import read_metadata, read_model_config
from shoal.checkpoint.model_state import load_model_state
from shoal.cli import main as shoal
from shoal.models import build_model
from tests.helpers.hf_models import FAMILY_CONFIGS, VOCAB_SIZE, save_hf_checkpoint

torch.set_num_threads(1)

MESSAGES = [
    {"role": "system", "content": "what is shoal"},
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, read with the safetensors library (the format's oracle)."""
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors = {}
    for file in files:
        tensors.update(load_file(model_dir / file))
    return tensors


def load_shoal(ckpt: Path) -> torch.nn.Module:
    model = build_model(read_model_config(ckpt), init=False)
    load_model_state(model.state_dict(), ckpt / "model")
    return model.eval()


def round_trip(tmp_path: Path, family: str, dtype=torch.float32, hf_shard=None, export_args=()):
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    hf_model = save_hf_checkpoint(hf_dir, family, dtype=dtype, max_shard_size=hf_shard)
    assert shoal(["import", "--source", str(hf_dir), "--output_path", str(ckpt)]) == 0
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(out), *export_args]) == 0
    return hf_model, hf_dir, ckpt, out


def assert_same_tokenizer(hf_dir: Path, out: Path) -> None:
    before, after = transformers.AutoTokenizer.from_pretrained(hf_dir), transformers.AutoTokenizer.from_pretrained(out)
    text = "hello world the quick brown fox swim together"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    for prompt in (False, True):
        rendered = before.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert after.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt) == rendered
        assert "<|start_header_id|>assistant<|end_header_id|>" in rendered


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_round_trip_fp32(tmp_path, family):
    hf_model, hf_dir, ckpt, out = round_trip(tmp_path, family)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        assert (load_shoal(ckpt)(tokens) - expected).abs().max().item() <= 1e-5
        exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert (exported.eval()(tokens).logits - expected).abs().max().item() <= 1e-5

    before, after = hf_tensors(hf_dir), hf_tensors(out)
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]), name
    assert_same_tokenizer(hf_dir, out)
    # The exported config describes the same model.
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert read_metadata(ckpt)["dtype"] == "float32"


def test_round_trip_bf16_tied_is_bit_identical(tmp_path):
    hf_model, hf_dir, ckpt, out = round_trip(tmp_path, "llama", dtype=torch.bfloat16)  # llama: tied
    before, after = hf_tensors(hf_dir), hf_tensors(out)
    assert "lm_head.weight" not in before and "lm_head.weight" not in after  # tied: stored once, as HF does
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == torch.bfloat16
        assert torch.equal(after[name].view(torch.int16), before[name].view(torch.int16)), name
    assert read_metadata(ckpt)["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert exported.dtype == torch.bfloat16
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


def test_sharded_source_and_sharded_export(tmp_path):
    """A source spread over several safetensors files imports; a small --max_shard_size exports
    several files whose index maps every tensor to the file holding it."""
    max_bytes = 60_000
    hf_model, hf_dir, ckpt, out = round_trip(tmp_path, "qwen2", hf_shard="50KB",
                                             export_args=("--max_shard_size", str(max_bytes)))
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    total = 0
    for file in files:
        with safe_open(file, "pt") as handle:
            names = list(handle.keys())
            assert all(index["weight_map"][n] == file.name for n in names)
            sizes = [handle.get_tensor(n).nbytes for n in names]
        total += sum(sizes)
        assert sum(sizes) <= max_bytes or len(names) == 1
        assert file.name.endswith(f"-of-{len(files):05d}.safetensors")
    assert index["metadata"]["total_size"] == total
    before, after = hf_tensors(hf_dir), hf_tensors(out)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    tokens = torch.randint(0, VOCAB_SIZE, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (exported(tokens).logits - hf_model(tokens).logits).abs().max().item() <= 1e-5


def test_export_dtype_conversion(tmp_path):
    hf_model, hf_dir, ckpt, out = round_trip(tmp_path, "mistral", export_args=("--dtype", "bfloat16"))
    before, after = hf_tensors(hf_dir), hf_tensors(out)
    for name in before:
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], before[name].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_nemo_style_arguments(tmp_path, capsys):
    """The seed's `nemo llm import -y model=... source=... output_path=... overwrite=false` form."""
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    save_hf_checkpoint(hf_dir, "llama")
    argv = ["import", "-y", "model=llama3_8b", f"source={hf_dir}", f"output_path={ckpt}", "overwrite=false"]
    assert shoal(argv) == 0
    # llama3_8b's shape is not the tiny model's: warned about, config.json wins.
    assert "--model llama3_8b does not match" in capsys.readouterr().err
    assert shoal(argv) == 2  # overwrite=false: the output exists now
    assert "already exists" in capsys.readouterr().err
    assert shoal(["import", f"source={hf_dir}", f"output_path={ckpt}", "overwrite=true"]) == 0
    assert shoal(["export", "-y", f"path={ckpt}", f"output_path={out}", "target=hf"]) == 0
    assert (out / "config.json").is_file()


def test_export_picks_latest_checkpoint_of_an_experiment(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_checkpoint(hf_dir, "qwen3")
    checkpoints = tmp_path / "exp" / "checkpoints"
    for name in ("step=000010-val_loss=2.000", "step=000200-val_loss=1.500-last", "step=000020-val_loss=1.000"):
        assert shoal(["import", "--source", str(hf_dir), "--output_path", str(checkpoints / name)]) == 0
    # Mark which one is which: the exported generation config carries the checkpoint's own.
    for path in checkpoints.iterdir():
        meta = json.loads((path / "shoal.json").read_text())
        meta["extra"]["generation_config"] = {"chosen": path.name}
        (path / "shoal.json").write_text(json.dumps(meta))
    # An unfinished save (hidden temp name, no shoal.json) with a higher step is never chosen.
    (checkpoints / ".step=000900-val_loss=0.100.tmp-1234").mkdir()
    for source in (tmp_path / "exp", checkpoints):
        out = tmp_path / f"out-{source.name}"
        assert shoal(["export", "--source", str(source), "--output_path", str(out)]) == 0
        assert json.loads((out / "generation_config.json").read_text()) == {"chosen": "step=000200-val_loss=1.500-last"}


def test_hub_source_downloads_with_token_and_never_saves_it(tmp_path, monkeypatch, capsys):
    """hf://ORG/NAME goes through huggingface_hub.snapshot_download (replaced here by a local copy:
    no network in tests) with the token from --hf_token, which appears in no output or file."""
    import huggingface_hub

    hf_dir = tmp_path / "hub" / "0123abcd"
    save_hf_checkpoint(hf_dir, "mistral")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    secret = "hf_SECRETtoken123"
    ckpt = tmp_path / "ckpt"
    assert shoal(["import", "--source", "hf://org/tiny-mistral", "--output_path", str(ckpt), "--hf_token", secret]) == 0
    (repo_id, kwargs), = calls
    assert repo_id == "org/tiny-mistral" and kwargs["token"] == secret
    assert "*.bin" not in kwargs["allow_patterns"] and "config.json" in kwargs["allow_patterns"]
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    for file in ckpt.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
    meta = read_metadata(ckpt)
    assert meta["made_by"]["source"] == "hf://org/tiny-mistral" and meta["made_by"]["revision"] == "0123abcd"

    monkeypatch.setenv("HF_TOKEN", "hf_fromEnvironment")
    assert shoal(["import", "--source", "hf://org/tiny-mistral", "--output_path", str(tmp_path / "c2")]) == 0
    assert calls[-1][1]["token"] == "hf_fromEnvironment"


def test_hub_source_offline_says_so(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "ckpt"
    assert shoal(["import", "--source", "hf://no-such-org/no-such-model", "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hf://no-such-org/no-such-model" in err and "offline" in err
    assert not out.exists()


def test_tied_checkpoint_carrying_lm_head_and_rope_buffers_imports(tmp_path):
    """Some tied checkpoints also save lm_head.weight, and older ones saved rotary inv_freq buffers;
    transformers ignores both, and so does the import (the export then matches transformers' own)."""
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    save_hf_checkpoint(hf_dir, "llama")  # tied
    tensors = load_file(hf_dir / "model.safetensors")
    original = dict(tensors)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    from safetensors.torch import save_file

    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert shoal(["import", "--source", str(hf_dir), "--output_path", str(ckpt)]) == 0
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(out)]) == 0
    after = hf_tensors(out)
    assert after.keys() == original.keys() and all(torch.equal(after[n], original[n]) for n in original)


def test_export_hooks_for_adapters(tmp_path, monkeypatch):
    """A checkpoint with peft.json is exported through the adapter merge's weights (never as if it
    had no adapters); the weight_reader / finalize hooks of the Python API do the same job."""
    import shoal.convert.exporter as exporter
    from shoal.convert.streaming import DCPWeightReader

    class Doubled(DCPWeightReader):  # stands in for a LoRA merge
        def load(self, names):
            return {name: tensor * 2 for name, tensor in super().load(names).items()}

    hf_model, hf_dir, ckpt, _ = round_trip(tmp_path, "qwen2")
    before = hf_tensors(hf_dir)
    seen = []
    exporter.export_checkpoint(ckpt, tmp_path / "hooked", weight_reader=lambda c: Doubled(c / "model"),
                               finalize=lambda c, tmp: seen.append((c, tmp.name.startswith(".hooked.tmp"))))
    assert seen == [(ckpt, True)]
    after = hf_tensors(tmp_path / "hooked")
    assert all(torch.equal(after[n], before[n] * 2) for n in before)

    # A checkpoint with peft.json goes through the adapter merge (stood in for by a tripling reader).
    class Tripled(DCPWeightReader):
        def load(self, names):
            return {name: tensor * 3 for name, tensor in super().load(names).items()}

    (ckpt / "peft.json").write_text(json.dumps({"rank": 8}))
    import shoal.peft.export as peft_export  # where the exporter takes the merging reader from

    monkeypatch.setattr(peft_export, "merged_weight_reader", lambda c: Tripled(c / "model"))
    assert shoal(["export", "--source", str(ckpt), "--output_path", str(tmp_path / "merged")]) == 0
    after = hf_tensors(tmp_path / "merged")
    assert all(torch.equal(after[n], before[n] * 3) for n in before)


def test_default_output_path_is_under_shoal_home(tmp_path, monkeypatch):
    import huggingface_hub

    hf_dir = tmp_path / "snapshot"
    save_hf_checkpoint(hf_dir, "qwen3")
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(hf_dir))
    assert shoal(["import", "source=hf://org/tiny-qwen3"]) == 0
    assert read_metadata(tmp_path / "home" / "models" / "org" / "tiny-qwen3")["family"] == "qwen3"
    assert shoal(["import", "--source", str(hf_dir)]) == 0
    assert read_metadata(tmp_path / "home" / "models" / "snapshot")["family"] == "qwen3"
