"""Training checkpoints through shoal's safetensors DCP storage (issue 19): what the folders hold,
a failure in any writer thread of a training save (in the step loop or in the background), and
checkpoints written by the shoal before it (torch's FileSystemWriter, `.distcp` records), which
still resume on the same curve and export to the same bytes.

Oracles: the `safetensors` library and torch's `HuggingFaceStorageReader` read the new files
without shoal; an uninterrupted run of the same command gives the losses a resumed run must
reproduce; the export of the same step written by the new writer gives the bytes the old
checkpoint's export must have.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import shoal.checkpoint.training as training
from tests.helpers.checkpoint_faults import fail_writes_into
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_dcp, train_args, train_records


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_and_optimizer_state_are_safetensors_files(train_assets: TrainAssets, tmp_path: Path):
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    assert shoal(*train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 2)) == 0
    (ckpt,) = (tmp_path / "res" / "e" / "checkpoints").iterdir()
    for folder in ("model", "optim"):
        names = sorted(p.name for p in (ckpt / folder).iterdir())
        assert names[0] == ".metadata" and names[1:] and all(
            n.startswith("__0_") and n.endswith(".safetensors") for n in names[1:]), names
        keys = set()
        for name in names[1:]:
            with safe_open(str(ckpt / folder / name), "pt") as f:  # valid safetensors files
                keys |= set(f.keys())
        assert keys
    # Read back without shoal: AdamW's step count is 2 for every parameter after 2 steps.
    with safe_open(str(next((ckpt / "optim").glob("*.safetensors"))), "pt") as f:
        steps = [k for k in f.keys() if k.endswith(".step")]
    assert steps
    loaded = {k: torch.zeros(()) for k in steps}
    dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(ckpt / "optim")), no_dist=True)
    assert all(v.item() == 2.0 for v in loaded.values()), loaded


@pytest.mark.parametrize("save, folder, thread", [
    ("sync", "model", 1), ("sync", "optim", 0), ("async", "model", 0), ("async", "optim", 1),
])
def test_an_error_in_a_writer_thread_fails_the_training_save(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch, save: str,
                                                             folder: str, thread: int):
    """The step-4 save fails inside the writer thread of data file `__0_<thread>` of `folder`
    (file 0 is written by the thread that called the writer, file 1 by one it started)."""
    exp = tmp_path / "res" / "e"
    ckpts = exp / "checkpoints"
    seen: dict[str, dict[str, str]] = {}

    def failure() -> None:
        if not seen:
            (previous,) = ckpts.glob("step=000002*")
            seen[previous.name] = tree_digest(previous)
        raise OSError(errno.EIO, "simulated write failure in a writer thread")

    struck = fail_writes_into(monkeypatch, lambda path: "step=000004" in str(path) and path.parent.name == folder
                              and path.name.startswith(f"__0_{thread}."), failure)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 6,
                      "--checkpoint.save_interval=2", f"--checkpoint.async_save={save == 'async'}")
    assert shoal(*args) == 2
    err = capsys.readouterr().err
    for fragment in ("error:", "could not write checkpoint", "step=000004", "simulated write failure"):
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err
    assert struck and (struck[0] != "MainThread" if thread == 1 or save == "async" else struck[0] == "MainThread")
    # No temporary folder, no half checkpoint; the step-2 checkpoint is as it was.
    (name,) = seen
    assert [p.name for p in ckpts.iterdir()] == [name]
    assert tree_digest(ckpts / name) == seen[name]

    monkeypatch.undo()  # and the run resumes from it
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err
    assert max(train_records(exp)) == 6


def todays_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training saves as the shoal before this storage wrote them: torch's FileSystemWriter."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.setattr(training, "SafetensorsStorageWriter", lambda path: dcp.FileSystemWriter(str(path)))


def test_a_checkpoint_of_todays_writer_resumes_and_exports(train_assets: TrainAssets, tmp_path: Path,
                                                          capsys, monkeypatch: pytest.MonkeyPatch):
    common = ["--max_steps", "4", "--checkpoint.save_interval=2", "--checkpoint.save_top_k=5"]
    assert shoal(*train_args(train_assets, "pretrain", tmp_path / "ref", "e", *common)) == 0
    ref = tmp_path / "ref" / "e"

    # The same run written by today's writer, then cut back to its step-2 checkpoint (as if it had
    # been killed after it): its model/ and optim/ hold torch.save records.
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", *common)
    todays_writer(monkeypatch)
    assert shoal(*args) == 0
    monkeypatch.undo()
    exp = tmp_path / "res" / "e"
    (later,) = (exp / "checkpoints").glob("step=000004*")
    shutil.rmtree(later)
    (old,) = (exp / "checkpoints").glob("step=000002*")
    for folder in ("model", "optim"):
        data = [p.name for p in (old / folder).iterdir() if p.name != ".metadata"]
        assert data and all(n.endswith(".distcp") for n in data), data
    metrics = exp / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line).get("step", 0) <= 2))

    # Exported, it is the same model as the new writer's checkpoint of the same step.
    (new,) = (ref / "checkpoints").glob("step=000002*")
    for source, out in ((old, "hf_old"), (new, "hf_new")):
        assert shoal("export", "--source", source, "--output_path", tmp_path / out) == 0
    assert (tmp_path / "hf_old" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf_new" / "model.safetensors").read_bytes()

    # Resumed (its next checkpoint in the new form), it continues the uninterrupted run's curve.
    capsys.readouterr()
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err
    resumed, reference = train_records(exp), train_records(ref)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == reference[step][key], (step, key)
    (latest,) = (exp / "checkpoints").glob("step=000004*")
    (want,) = (ref / "checkpoints").glob("step=000004*")
    for folder in ("model", "optim"):
        assert list((latest / folder).glob("*.safetensors")) and not list((latest / folder).glob("*.distcp"))
        have, expected = read_dcp(latest / folder, tmp_path / "a.pt"), read_dcp(want / folder, tmp_path / "b.pt")
        assert have.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(have[key], value), (folder, key)


def test_every_per_parameter_optimizer_entry_is_stored_and_nothing_else_is_needed(tmp_path: Path):
    """optim/ holds every per-parameter entry of shoal's AdamW (moments and step counts, all
    tensors); what the flattened state dict has beside them is only the parameter groups'
    hyperparameters, which the recipe gives back on resume (docs/checkpoint-format.md, `optim/`).
    They round-trip exactly through the storage (read back by torch's reader); a non-tensor
    item is refused by name, leaving no folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from shoal.checkpoint.model_state import save_model_state
    from shoal.checkpoint.state import parts_optimizer_state
    from shoal.checkpoint.storage import SafetensorsStorageWriter
    from shoal.errors import ShoalError
    from shoal.models import build_model, get_preset
    from shoal.train.step import build_optimizer

    torch.manual_seed(0)
    model = build_model(get_preset("llama_tiny"))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    stored = parts_optimizer_state([model], [optimizer])
    assert set(stored) == {k for k in full if k.startswith("state.")}
    assert {k.split(".")[0] for k in set(full) - set(stored)} == {"param_groups"}
    assert all(isinstance(v, torch.Tensor) for v in stored.values())
    names = {name for name, _ in model.named_parameters()}
    assert {f"state.{n}.{kind}" for n in names for kind in ("exp_avg", "exp_avg_sq", "step")} == set(stored)

    save_model_state(stored, tmp_path / "optim", storage_writer=SafetensorsStorageWriter(tmp_path / "optim"))
    loaded = {k: torch.full_like(v, float("nan")) for k, v in stored.items()}
    dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(tmp_path / "optim")), no_dist=True)
    for key, value in stored.items():
        assert torch.equal(loaded[key], value), key

    bad = tmp_path / "bad"
    with pytest.raises(ShoalError, match=r"param_groups\.model\.norm\.weight\.lr: .*tensors only"):
        save_model_state({"state.model.norm.weight.step": torch.ones(()), "param_groups.model.norm.weight.lr": 1e-3},
                         bad, storage_writer=SafetensorsStorageWriter(bad))
    assert not bad.exists()
