"""Bad inputs to `shoal import` / `shoal export`: exit status 2, a message naming the problem, and
no output (not even a temporary folder) left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.checkpoint.format import write_metadata
from shoal.checkpoint.model_state import save_model_state
from shoal.cli import main as shoal
from shoal.models import build_model, get_preset
from tests.helpers.hf_models import save_hf_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "hf"
    save_hf_checkpoint(path, "llama", tie_word_embeddings=False)
    return path


@pytest.fixture
def hf_dir(tmp_path, pristine) -> Path:
    """A fresh copy of a valid tiny HF checkpoint for each test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def run_import(tmp_path: Path, source: Path, capsys, *extra: str) -> tuple[int, str, Path]:
    out = tmp_path / "results" / "ckpt"
    code = shoal(["import", "--source", str(source), "--output_path", str(out), *extra])
    return code, capsys.readouterr().err, out


def assert_refused(code: int, err: str, out: Path, *phrases: str) -> None:
    assert code == 2, err
    assert err.startswith("shoal import: error:") or err.startswith("shoal export: error:"), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert not out.exists()
    if out.parent.exists():  # not even a hidden temporary folder
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def rewrite_weights(hf_dir: Path, change) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    change(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_config(tmp_path, hf_dir, capsys):
    (hf_dir / "config.json").unlink()
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "config.json is missing")


def test_missing_source(tmp_path, capsys):
    assert_refused(*run_import(tmp_path, tmp_path / "nowhere", capsys), "no such directory")


def test_invalid_config_json(tmp_path, hf_dir, capsys):
    (hf_dir / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "config.json: invalid JSON at line 3")


def test_unsupported_model_type(tmp_path, hf_dir, capsys):
    edit_config(hf_dir, model_type="gpt2")
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "config.json", "model_type 'gpt2' is not supported")


def test_unsupported_rope_type(tmp_path, hf_dir, capsys):
    edit_config(hf_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "config.json", "rope scaling type 'yarn'")


def test_missing_config_key(tmp_path, hf_dir, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["hidden_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "config.json", "'hidden_size'")


def test_tensor_missing(tmp_path, hf_dir, capsys):
    rewrite_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "lacks 1 tensor", "model.layers.1.mlp.up_proj.weight")


def test_tensor_wrong_shape(tmp_path, hf_dir, capsys):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]

    rewrite_weights(hf_dir, shrink)
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "model.layers.0.self_attn.k_proj.weight",
                   "shape [16, 64]", "[32, 64]")


def test_unexpected_tensor(tmp_path, hf_dir, capsys):
    rewrite_weights(hf_dir, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "model.layers.0.mlp.extra_proj.weight", "does not use")


def test_truncated_safetensors(tmp_path, hf_dir, capsys):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "model.safetensors", "truncated")


def test_corrupt_safetensors_header(tmp_path, hf_dir, capsys):
    weights = hf_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:8 + 20] = b"\x00garbage-not-json!!!"
    weights.write_bytes(bytes(data))
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "model.safetensors", "corrupt safetensors header")


def test_garbage_file(tmp_path, hf_dir, capsys):
    (hf_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "model.safetensors", "corrupt or truncated")


def test_index_names_missing_shard(tmp_path, hf_dir, capsys):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
    names = load_file(hf_dir / "model-00001-of-00002.safetensors").keys()
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "model.safetensors.index.json",
                   "model-00002-of-00002.safetensors")


def test_pickle_weights_refused(tmp_path, hf_dir, capsys):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
    assert_refused(*run_import(tmp_path, hf_dir, capsys), "pickle", "safetensors")


def test_output_exists(tmp_path, hf_dir, capsys):
    out = tmp_path / "results" / "ckpt"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    code, err, _ = run_import(tmp_path, hf_dir, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    code, err, _ = run_import(tmp_path, hf_dir, capsys, "--overwrite")
    assert code == 0 and (out / "shoal.json").is_file() and not (out / "keep.txt").exists()


def test_output_not_writable(tmp_path, hf_dir, capsys):
    """Tests run as root, for whom permission bits do not stop a write: use an output whose parent
    is an existing file, which nobody can create a folder under."""
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    code, err, out = run_import(tmp_path, hf_dir, capsys)
    assert code == 2 and "is a file, not a directory" in err
    assert blocker.read_text() == "a file, not a folder"


def test_failure_midway_leaves_nothing(tmp_path, hf_dir, capsys, monkeypatch):
    """A failure while weights are being written (after the checks passed) leaves no output."""
    import shoal.checkpoint.parallel_io as parallel_io
    import shoal.convert.importer as importer

    calls = []
    original = parallel_io._copy_file_range

    def failing_copy(src, *args):  # the copy of a tensor's bytes out of the source shard
        calls.append(src)
        if len(calls) == 5:
            raise OSError(5, "disk on fire", str(hf_dir / "model.safetensors"))
        return original(src, *args)

    monkeypatch.setattr(parallel_io, "_copy_file_range", failing_copy)
    out = tmp_path / "results" / "ckpt"
    from shoal.errors import ShoalError

    with pytest.raises(ShoalError, match="input/output error"):  # an I/O failure is named, not a traceback
        importer.import_checkpoint(hf_dir, out)
    assert len(calls) >= 5  # midway (the other writer thread may have copied one more before stopping)
    assert not out.exists() and not out.parent.exists()  # the folder made for the output is gone too


def test_output_overlapping_source_refused(tmp_path, hf_dir, capsys):
    code = shoal(["import", "--source", str(hf_dir), "--output_path", str(hf_dir.parent), "--overwrite"])
    assert code == 2 and "holds the input" in capsys.readouterr().err
    assert (hf_dir / "config.json").is_file()


# -- export ---------------------------------------------------------------------------------------


def test_export_of_a_non_checkpoint(tmp_path, hf_dir, capsys):
    out = tmp_path / "out"
    code = shoal(["export", "--source", str(hf_dir), "--output_path", str(out)])
    assert_refused(code, capsys.readouterr().err, out, "is not a shoal checkpoint")


def test_export_checkpoint_missing_a_tensor(tmp_path, capsys):
    cfg = get_preset("llama_tiny")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    state = build_model(cfg).state_dict()
    del state["model.layers.1.self_attn.o_proj.weight"]
    save_model_state(state, ckpt / "model")
    write_metadata(ckpt, cfg, "float32")
    code = shoal(["export", "--source", str(ckpt), "--output_path", str(out)])
    assert_refused(code, capsys.readouterr().err, out, "model.layers.1.self_attn.o_proj.weight", "lacks")


def test_export_checkpoint_from_newer_shoal(tmp_path, capsys):
    cfg = get_preset("llama_tiny")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    save_model_state(build_model(cfg).state_dict(), ckpt / "model")
    write_metadata(ckpt, cfg, "float32")
    meta = json.loads((ckpt / "shoal.json").read_text())
    meta["format_version"] = 99
    (ckpt / "shoal.json").write_text(json.dumps(meta))
    code = shoal(["export", "--source", str(ckpt), "--output_path", str(out)])
    assert_refused(code, capsys.readouterr().err, out, "shoal.json", "format_version 99", "newer shoal")


def test_export_bad_dtype_and_shard_size(tmp_path, capsys):
    cfg = get_preset("llama_tiny")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    save_model_state(build_model(cfg).state_dict(), ckpt / "model")
    write_metadata(ckpt, cfg, "float32")
    code = shoal(["export", "--source", str(ckpt), "--output_path", str(out), "--dtype", "int8"])
    assert_refused(code, capsys.readouterr().err, out, "--dtype", "'int8'")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error for a malformed size
        shoal(["export", "--source", str(ckpt), "--output_path", str(out), "--max_shard_size", "lots"])
    assert exit_info.value.code == 2 and "expected a size" in capsys.readouterr().err
