"""shoal's checkpoint directory (`shoal.checkpoint.format`): metadata, DCP weights, tied embeddings,
resharding between an FSDP2 layout and one process, and refusing what is not a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shoal.checkpoint.format import FORMAT_VERSION, copy_tokenizer, read_metadata, read_model_config, write_metadata
from shoal.checkpoint.model_state import load_model_state, model_state_info, model_state_keys, save_model_state
from shoal.errors import ShoalError
from shoal.models import build_model, get_preset

torch.set_num_threads(1)


def tiny(seed: int, tied: bool = True) -> torch.nn.Module:
    cfg = get_preset("qwen3_tiny" if tied else "qwen2_tiny")
    torch.manual_seed(seed)
    return build_model(cfg)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# -- shoal.json --------------------------------------------------------------------------------


def test_metadata_round_trip(tmp_path):
    cfg = get_preset("llama_tiny")
    write_metadata(tmp_path, cfg, torch.bfloat16,
                   progress={"step": 7, "consumed_samples": 56, "consumed_tokens": 57344},
                   made_by={"command": "shoal pretrain", "source": "/data/x"}, extra={"note": "hi"})
    meta = read_metadata(tmp_path)
    assert meta["format_version"] == FORMAT_VERSION and meta["family"] == "llama" and meta["dtype"] == "bfloat16"
    assert meta["progress"] == {"step": 7, "consumed_samples": 56, "consumed_tokens": 57344}
    assert meta["made_by"]["command"] == "shoal pretrain" and meta["made_by"]["shoal_version"]
    assert meta["made_by"]["time"] and meta["extra"] == {"note": "hi"}
    assert read_model_config(tmp_path) == cfg
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@pytest.mark.parametrize("breakage, message", [
    (lambda m: "{\n  broken", "invalid JSON at line 2"),
    (lambda m: json.dumps({**m, "format": "nemo"}), "not a shoal checkpoint"),
    (lambda m: json.dumps({**m, "format_version": FORMAT_VERSION + 1}), "newer shoal"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "dtype"}), "'dtype'"),
    (lambda m: json.dumps({**m, "progress": {**m["progress"], "step": -1}}), "progress.step"),
    (lambda m: json.dumps({**m, "dtype": "int8"}), "'int8'"),
    (lambda m: json.dumps({**m, "model": {**m["model"], "num_layer": 3}}), "num_layer"),
])
def test_bad_metadata_is_refused_with_its_key(tmp_path, breakage, message):
    write_metadata(tmp_path, get_preset("llama_tiny"), "float32")
    path = tmp_path / "shoal.json"
    path.write_text(breakage(json.loads(path.read_text())))
    with pytest.raises(ShoalError, match=message) as err:
        read_model_config(tmp_path)
    assert "shoal.json" in str(err.value) or "nemo" in str(err.value)


def test_missing_metadata(tmp_path):
    with pytest.raises(ShoalError, match="shoal.json is missing"):
        read_metadata(tmp_path)


# -- model/ (DCP) -------------------------------------------------------------------------------


def test_tied_embedding_stored_once_and_retied(tmp_path):
    model = tiny(seed=1, tied=True)
    save_model_state(model.state_dict(), tmp_path / "model")
    keys = model_state_keys(tmp_path / "model")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    info = model_state_info(tmp_path / "model")
    assert info["model.layers.0.self_attn.q_norm.weight"].shape == (model.config.head_dim,)

    fresh = tiny(seed=2, tied=True)
    load_model_state(fresh.state_dict(), tmp_path / "model")
    assert_same_weights(fresh, model)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight

    # An untied lm_head asked of a tied checkpoint gets the embedding's values.
    untied = {"lm_head.weight": torch.zeros_like(model.lm_head.weight)}
    load_model_state(untied, tmp_path / "model")
    assert torch.equal(untied["lm_head.weight"], model.model.embed_tokens.weight)


def test_load_converts_dtype_and_reads_partially(tmp_path):
    model = tiny(seed=3, tied=False).to(torch.bfloat16)
    save_model_state(model.state_dict(), tmp_path / "model")
    assert model_state_info(tmp_path / "model")["model.norm.weight"].dtype == torch.bfloat16
    target = {"model.layers.1.mlp.down_proj.weight": torch.empty(64, 128, dtype=torch.float32)}
    load_model_state(target, tmp_path / "model")
    assert torch.equal(target["model.layers.1.mlp.down_proj.weight"],
                       model.model.layers["1"].mlp.down_proj.weight.float())


def test_load_reports_missing_and_misshapen_tensors(tmp_path):
    model = tiny(seed=4, tied=False)
    state = model.state_dict()
    del state["model.layers.1.self_attn.v_proj.bias"]
    save_model_state(state, tmp_path / "model")
    with pytest.raises(ShoalError, match=r"lacks 1 tensor\(s\): model.layers.1.self_attn.v_proj.bias"):
        load_model_state(tiny(seed=5, tied=False).state_dict(), tmp_path / "model")
    with pytest.raises(ShoalError, match=r"model.norm.weight has shape \[64\].*expects \[32\]"):
        load_model_state({"model.norm.weight": torch.empty(32)}, tmp_path / "model")


def test_malicious_dcp_metadata_is_not_unpickled(tmp_path):
    """`.metadata` is a pickle; one that names anything but DCP's metadata classes is refused
    before it can run (here it would create a file)."""
    save_model_state(tiny(seed=6).state_dict(), tmp_path / "model")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "model" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ShoalError, match="refusing to load"):
        model_state_keys(tmp_path / "model")
    with pytest.raises(ShoalError, match="refusing to load"):
        load_model_state(tiny(seed=6).state_dict(), tmp_path / "model")
    assert not marker.exists()


# -- finding checkpoints and tokenizers ---------------------------------------------------------


def test_resolve_checkpoint(tmp_path):
    from shoal.checkpoint.catalog import resolve_checkpoint

    cfg = get_preset("llama_tiny")
    root = tmp_path / "exp" / "checkpoints"
    for name in ("step=000100-val_loss=1.000", "step=000100-val_loss=1.100-last", "step=000099-val_loss=0.500"):
        save_model_state({"w": torch.zeros(2)}, root / name / "model")
        write_metadata(root / name, cfg, "float32")
    (root / "step=000500-val_loss=0.100").mkdir()  # incomplete: no shoal.json
    assert resolve_checkpoint(tmp_path / "exp").name == "step=000100-val_loss=1.100-last"
    assert resolve_checkpoint(root).name == "step=000100-val_loss=1.100-last"
    assert resolve_checkpoint(root / "step=000099-val_loss=0.500").name == "step=000099-val_loss=0.500"
    with pytest.raises(ShoalError, match="not a shoal checkpoint"):
        resolve_checkpoint(root / "step=000500-val_loss=0.100")
    with pytest.raises(ShoalError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")


def test_copy_tokenizer_copies_only_tokenizer_files_byte_for_byte(tmp_path):
    src = tmp_path / "hf"
    (src / "additional_chat_templates").mkdir(parents=True)
    files = {"tokenizer.json": b'{"a": 1}', "tokenizer_config.json": b"{}", "chat_template.jinja": b"{{ x }}\n",
             "additional_chat_templates/tool.jinja": b"T", "config.json": b"{}", "model.safetensors": b"w"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    copied = copy_tokenizer(src, tmp_path / "ckpt")
    assert sorted(copied) == [
        "additional_chat_templates", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
    ]
    for name in (
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "additional_chat_templates/tool.jinja",
    ):
        assert (tmp_path / "ckpt" / "tokenizer" / name).read_bytes() == files[name]
    assert not (tmp_path / "ckpt" / "tokenizer" / "config.json").exists()
    assert copy_tokenizer(tmp_path / "empty-does-not-exist", tmp_path / "c2") == []


# -- FSDP2 layout <-> one process ----------------------------------------------------------------

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_worker(rank: int, port: int, ckpt: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        reference = tiny(seed=11)
        model = tiny(seed=11)
        for layer in model.model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = model.state_dict()
        assert isinstance(state["model.layers.0.mlp.up_proj.weight"], DTensor)
        save_model_state(state, Path(ckpt) / "model")  # every rank writes its shards

        # Load back into another sharded model, and into a different layout (Shard(-1), like a
        # row-parallel TP plan) built straight from DTensors.
        other = tiny(seed=12)
        for layer in other.model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(other, mesh=mesh)
        load_model_state(other.state_dict(), Path(ckpt) / "model")
        for name, value in other.state_dict().items():
            assert torch.equal(value.full_tensor(), reference.state_dict()[name]), name
        resharded = {name: distribute_tensor(torch.zeros_like(t), mesh, [Shard(t.dim() - 1)])
                     for name, t in reference.state_dict().items() if name != "lm_head.weight"}
        load_model_state(resharded, Path(ckpt) / "model")
        for name, value in resharded.items():
            assert torch.equal(value.full_tensor(), reference.state_dict()[name]), name
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_sharded_checkpoint_loads_in_one_process_and_reshards(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert "lm_head.weight" not in model_state_keys(tmp_path / "model")  # tied, stored once
    single = build_model(get_preset("qwen3_tiny"), init=False)
    load_model_state(single.state_dict(), tmp_path / "model")
    assert_same_weights(single, tiny(seed=11))
