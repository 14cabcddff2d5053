"""A training step that does not log reads nothing back from the device, and trains as before.

The step loop must let the host queue a step's work while the device still runs the previous one:
no `.item()`, `.tolist()`, `nonzero` or truth test of a tensor in shoal's code during a step that
does not log (the loss-token count and the document spans come from the host batch instead). On
CPU every tensor is a host tensor, so the check is on what shoal's own code asks for (torch's
internals, such as AdamW reading its CPU step counters, are host work by design; the data pipeline
too): tests/gpu/test_step_loop_sync_gpu.py checks the device itself under
`torch.cuda.set_sync_debug_mode("error")`.

Oracle for the numbers: `reference_run`, the step loop as it was before these changes, written out
here (the loss-token count read back from the batch, the divisor a Python float, the micro-batches
without host spans) and run on a twin of the run's engine over the same samples. fp32 on CPU,
one thread: losses and gradient norms must be equal bit for bit.

Flash varlen attention needs CUDA; `fake_varlen` stands in for it on CPU (SDPA with the mask the
spans describe), so the path that hands the host's spans to the model runs here too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import shoal
import shoal.models.document_attention as document_attention
import shoal.models.model as model_module
import shoal.train.trainer as trainer
from shoal.data.sampler import MicroBatchSampler
from shoal.train.schedule import lr_at
from tests.helpers.cli import shoal as run_shoal
from tests.helpers.training import TrainAssets, train_args, train_records

SHOAL_DIR = str(Path(shoal.__file__).parent)
HOST_ONLY_DIRS = (str(Path(shoal.__file__).parent / "data"),)  # runs in the loader (its workers)
SYNCING = [("item", torch.Tensor), ("tolist", torch.Tensor), ("nonzero", torch.Tensor),
           ("__bool__", torch.Tensor), ("__float__", torch.Tensor), ("__int__", torch.Tensor),
           ("nonzero", torch)]


def fake_varlen(q, k, v, spans):
    """What flash varlen computes, on CPU: causal attention within each span of the rows laid end to
    end, as SDPA with the mask the spans describe (built without reading them back)."""
    b, h, s, d = q.shape
    flat = torch.arange(b * s, device=q.device)
    span_of = torch.searchsorted(spans.cu_seqlens.long(), flat, right=True).view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    mask = (span_of[:, :, None] == span_of[:, None, :]) & causal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)  # [B, S, H, D]


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    monkeypatch.setattr(document_attention, "varlen_available", lambda hidden, head_dim: True)
    monkeypatch.setattr(model_module, "varlen_causal_attention", fake_varlen)


class SyncRecorder:
    """Records each syncing call made by shoal's code, with the step the loop was in (steps counted
    by the loop's calls to `micro_batches`; validation's calls do not start a step)."""

    def __init__(self, monkeypatch):
        self.step = 0
        self.calls: list[tuple[int, str, str]] = []
        for name, owner in SYNCING:
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))
        original = trainer.micro_batches

        def counting_micro_batches(*args, **kwargs):
            if sys._getframe(1).f_code.co_name == "_loop":
                self.step += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(trainer, "micro_batches", counting_micro_batches)

    def _wrap(self, name, method):
        def recorded(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(SHOAL_DIR) and not caller.startswith(HOST_ONLY_DIRS):
                self.calls.append((self.step, name, f"{caller}:{sys._getframe(1).f_lineno}"))
            return method(*args, **kwargs)

        return recorded


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_steps_that_do_not_log_read_nothing_back(stage, train_assets: TrainAssets, tmp_path: Path,
                                                 varlen_on_cpu, monkeypatch):
    # Steps 3 and 6 log; 6, the last, also validates and saves. Pretraining masks documents too.
    extra = ["--data.document_mask=true"] if stage == "pretrain" else []
    args = train_args(train_assets, stage, tmp_path, "sync", "--max_steps", 6, "--train.log_interval=3",
                      "--train.val_check_interval=100", "--checkpoint.save_interval=100", *extra)
    recorder = SyncRecorder(monkeypatch)
    assert run_shoal(*args) == 0
    assert recorder.step == 6
    assert sorted(train_records(tmp_path / "sync")) == [3, 6]
    quiet = [call for call in recorder.calls if call[0] not in (3, 6)]
    assert quiet == [], f"syncing calls on steps that do not log: {quiet}"
    assert any(call[0] == 3 for call in recorder.calls)  # the recorder does see the logging step's reads


def reference_run(engine, datasets, recipe) -> tuple[list[float], list[float]]:
    """The step loop before it stopped reading from the device, on one process: losses and norms."""
    t, data = recipe.train, recipe.data
    accum = t.global_batch_size // t.micro_batch_size
    sampler = MicroBatchSampler(datasets.max_steps * t.global_batch_size, t.micro_batch_size, 0, 1,
                                consumed_samples=0, dataset_size=len(datasets.train),
                                seed=data.seed if datasets.shuffle else None)
    batches = iter(DataLoader(datasets.train, batch_sampler=sampler, num_workers=0,
                              generator=torch.Generator().manual_seed(data.seed)))
    engine.train(True)
    losses, norms = [], []
    for step in range(datasets.max_steps):
        mbs = [next(batches) for _ in range(accum)]
        global_tokens = max(torch.stack([mb["loss_mask"].sum() for mb in mbs]).sum().double().item(), 1.0)
        total = torch.zeros(())
        for mb in mbs:
            inputs = {"position_ids": mb["position_ids"]}
            if engine.document_mask:
                inputs["document_ids"] = mb["document_ids"]  # spans, if any, found by the model itself
            loss_sum = engine._loss_sum(mb["tokens"], mb["labels"], mb["loss_mask"], inputs)
            (loss_sum / global_tokens).backward()
            total += loss_sum.detach()
        norms.append(engine.clip_and_step(t.grad_clip, lr_at(step, t, datasets.max_steps)).item())
        losses.append(total.double().item() / global_tokens)
    return losses, norms


@pytest.mark.parametrize("stage,varlen", [("pretrain", False), ("finetune", False), ("finetune", True)],
                         ids=["pretrain", "finetune-dense", "finetune-varlen"])
def test_training_equals_the_old_step_loop(stage, varlen, train_assets: TrainAssets, tmp_path: Path,
                                           monkeypatch, request):
    if varlen:
        request.getfixturevalue("varlen_on_cpu")
    built, seen = [], {}
    build_engine, loop = trainer.build_engine, trainer._loop

    def build_twins(*args, **kwargs):  # the run's engine, and an identical one for the reference
        built.append(build_engine(*args, **kwargs))
        return build_engine(*args, **kwargs)

    def capturing_loop(engine, datasets, recipe, *rest):
        seen.update(datasets=datasets, recipe=recipe)
        return loop(engine, datasets, recipe, *rest)

    monkeypatch.setattr(trainer, "build_engine", build_twins)
    monkeypatch.setattr(trainer, "_loop", capturing_loop)
    steps = 4
    assert run_shoal(*train_args(train_assets, stage, tmp_path, "run", "--max_steps", steps)) == 0
    records = train_records(tmp_path / "run")
    losses, norms = reference_run(built[0], seen["datasets"], seen["recipe"])
    assert [records[s]["loss"] for s in range(1, steps + 1)] == losses
    assert [records[s]["grad_norm"] for s in range(1, steps + 1)] == norms
    assert seen["recipe"].data.document_mask == (stage == "finetune")
