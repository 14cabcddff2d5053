"""Background checkpoint saves on a GPU: the pinned staging buffers, reused from one save to the next.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_checkpoint_async_gpu.py`. On CPU the
staging copy is fresh at every save; on a GPU it goes into pinned buffers allocated at the first
save and refilled by the next ones, so a stale or shared buffer would write an earlier step's state.
The oracle: a synchronous save of the same live state, taken just before each background one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.checkpoint.training import CheckpointRecord, Progress, TrainingCheckpoints, save_training_checkpoint
from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import build_mesh
from shoal.models.presets import get_preset
from tests.helpers.training import read_dcp

pytestmark = pytest.mark.gpu

CFG = get_preset("llama_tiny")
MBS, SEQ = 2, 64


def test_background_saves_equal_synchronous_ones_save_after_save(tmp_path: Path):
    from shoal.train.engine import build_engine

    torch.manual_seed(0)
    parallel = ParallelConfig()
    engine = build_engine(CFG, train=TrainSection(micro_batch_size=MBS, global_batch_size=MBS), parallel=parallel,
                          peft=None, dims=build_mesh(parallel, 1, "cuda"), device=torch.device("cuda"),
                          compute_dtype=torch.bfloat16)
    record = CheckpointRecord(CFG, run_id="gpu")
    background = TrainingCheckpoints(tmp_path / "async", record, max_steps=4, save_top_k=10, background=True)

    def train_step() -> None:
        tokens = torch.randint(0, CFG.vocab_size, (MBS, SEQ + 1), device="cuda")
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MBS, SEQ, device="cuda"),
                 "position_ids": torch.arange(SEQ, device="cuda").expand(MBS, SEQ).contiguous(),
                 "document_ids": torch.zeros(MBS, SEQ, dtype=torch.long, device="cuda")}
        engine.forward_backward([batch], float(MBS * SEQ))
        engine.clip_and_step(1.0, 1e-2)

    with background:
        for step in range(1, 4):
            train_step()
            save_training_checkpoint(tmp_path / "sync", engine.parts, engine.optimizers, Progress(step), record,
                                     max_steps=4, val_loss=None, save_top_k=10)
            background.save(engine.parts, engine.optimizers, Progress(step), val_loss=None)
            train_step()  # changes the live tensors while the background write may still run
        background.finish()

    names = sorted(p.name for p in (tmp_path / "sync").iterdir())
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == names and len(names) == 3
    for name in names:
        for folder in ("model", "optim"):
            want = read_dcp(tmp_path / "sync" / name / folder, tmp_path / "a.pt")
            have = read_dcp(tmp_path / "async" / name / folder, tmp_path / "b.pt")
            assert want.keys() == have.keys()
            for key in want:
                assert torch.equal(torch.as_tensor(want[key]), torch.as_tensor(have[key])), (name, folder, key)
