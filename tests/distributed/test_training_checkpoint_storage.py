"""A training checkpoint written by 2 ranks of FSDP2 (gloo) through shoal's safetensors storage,
in the step loop and in the background: each rank writes its own shards of `model/` and `optim/`
in files of its own, the coordinator one `.metadata` per folder, and the checkpoint loads in one
process equal to what the ranks held (their full, gathered weights and AdamW state), read by
shoal's reader and by torch's `HuggingFaceStorageReader` (no shoal code on the read side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import LR, build_layout, gathered_state, loss_sum, make_batch


def save_after_one_step(root: str, background: bool) -> dict[str, Any]:
    """One AdamW step on FSDP2 over the ranks, then a training checkpoint; returns the full
    (gathered) weights and optimizer tensors every rank held when it saved."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from shoal.checkpoint.training import CheckpointRecord, Progress, TrainingCheckpoints

    dims, _, cfg, parts, _ = build_layout({"parallel": {}})
    optimizer = torch.optim.AdamW(parts[0].parameters(), lr=LR, foreach=False)
    batch = make_batch(0, cfg, documents=False)
    rows = batch["tokens"].shape[0] // dims.dp_size
    mine = {k: v[dims.dp_rank * rows:(dims.dp_rank + 1) * rows] for k, v in batch.items()}
    loss_sum(parts[0](mine["tokens"]), mine["labels"], mine["loss_mask"]).backward()
    optimizer.step()

    record = CheckpointRecord(model_config=cfg, run_id="layout-test")
    with TrainingCheckpoints(Path(root), record, max_steps=1, save_top_k=1, background=background) as saves:
        saves.save(parts, [optimizer], Progress(step=1, consumed_samples=8, consumed_tokens=256), val_loss=None)
        path = saves.finish()
    full = get_optimizer_state_dict(parts[0], optimizer, options=StateDictOptions(
        flatten_optimizer_state_dict=True, full_state_dict=True))
    optim = {k: v.detach().cpu().clone() for k, v in full.items() if isinstance(v, torch.Tensor)}
    return {"path": str(path), "rank": dist.get_rank(), "model": gathered_state(parts), "optim": optim}


def read_folder(folder: Path, like: dict[str, torch.Tensor], reader: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from shoal.checkpoint.storage import CheckpointStorageReader

    loaded = {k: torch.full_like(v, float("nan")) for k, v in like.items()}
    storage = CheckpointStorageReader(folder) if reader == "shoal" else HuggingFaceStorageReader(str(folder))
    dcp.load(loaded, storage_reader=storage, no_dist=True)
    return loaded


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_two_rank_training_checkpoint_loads_in_one_process_as_saved(tmp_path, background: bool) -> None:
    results = run_distributed(save_after_one_step, 2, str(tmp_path / "checkpoints"), background)
    held = results[0]
    for other in results[1:]:  # FSDP's full state is the same on every rank: one expectation
        assert other["path"] == held["path"]
        for part in ("model", "optim"):
            assert other[part].keys() == held[part].keys()
    ckpt = Path(held["path"])
    assert ckpt.name == "step=000001-last"
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # no temporary folder left

    for folder in ("model", "optim"):
        names = sorted(p.name for p in (ckpt / folder).iterdir())
        assert ".metadata" in names and not [n for n in names if n.endswith(".distcp") or n.endswith(".tmp")]
        for rank in (0, 1):  # each rank wrote files of its own
            assert any(n.startswith(f"__{rank}_") and n.endswith(".safetensors") for n in names), (folder, names)

    from shoal.checkpoint.model_state import load_model_state, model_state_info

    on_disk = model_state_info(ckpt / "model")  # a tied head is stored once, under the embedding's name
    model = {k: v for k, v in held["model"].items() if k in on_disk}
    optim = held["optim"]
    assert any(k.endswith(".exp_avg_sq") for k in optim) and any(k.endswith(".step") for k in optim)
    for reader in ("shoal", "torch"):
        for folder, expected in (("model", model), ("optim", optim)):
            loaded = read_folder(ckpt / folder, expected, reader)
            for name, value in loaded.items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=f"{reader} {folder}: {name}")
    # What resume and export call: the whole model, head retied where it is.
    whole = {k: torch.full_like(v, float("nan")) for k, v in held["model"].items()}
    load_model_state(whole, ckpt / "model")
    for name, value in whole.items():
        torch.testing.assert_close(value, held["model"][name], rtol=0, atol=0, msg=name)


def rank_1_fails_before_rank_0_writes(root: str) -> str:
    """Rank 1 makes the folder, fails at its first write and cleans up; only then does rank 0 start
    writing its files into the same folder. Returns what this rank's save raised."""
    import errno
    import time

    import torch.distributed as dist

    import shoal.checkpoint.parallel_io as parallel_io
    import shoal.checkpoint.storage as storage
    from shoal.checkpoint.model_state import save_model_state

    rank, folder = dist.get_rank(), Path(root) / "model"
    cleaned = Path(root) / "rank1-cleaned-up"
    if rank == 1:
        def full_disk(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        real_remove = storage.SafetensorsStorageWriter._remove

        def remove_then_say(self, paths):
            real_remove(self, paths)
            cleaned.touch()

        parallel_io._pwrite = full_disk
        storage.SafetensorsStorageWriter._remove = remove_then_say
    else:
        real_prepare, real_lay_out = storage.SafetensorsStorageWriter.prepare_local_plan, storage._lay_out

        def prepare_later(self, plan):
            time.sleep(1.0)  # rank 1 makes the folder
            return real_prepare(self, plan)

        def lay_out_once_rank_1_is_done(*args):
            deadline = time.monotonic() + 60
            while not cleaned.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return real_lay_out(*args)

        storage.SafetensorsStorageWriter.prepare_local_plan = prepare_later
        storage._lay_out = lay_out_once_rank_1_is_done
    try:
        save_model_state({f"rank{rank}.weight": torch.ones(4, 4)}, folder,
                         storage_writer=storage.SafetensorsStorageWriter(folder))
    except BaseException as err:  # noqa: BLE001 - returned to the test
        return f"{type(err).__name__}: {err}"
    return "saved"


def test_the_first_failure_of_a_multi_rank_save_is_what_every_rank_reports(tmp_path) -> None:
    """A rank that fails leaves the shared folder alone: the others' writes go on into it, and the
    save fails everywhere with the failed rank's error, not with 'no such file or directory'."""
    said = run_distributed(rank_1_fails_before_rank_0_writes, 2, str(tmp_path))
    for rank, error in enumerate(said):
        assert "No space left on device" in error, (rank, error)
    assert not list((tmp_path / "model").glob("__1_*"))  # the failed rank removed its own files
