"""On a GPU, a training step that does not log never makes the host wait for the device.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_step_loop_sync_gpu.py`.
`torch.cuda.set_sync_debug_mode("error")` makes every synchronising CUDA call raise (a read back
such as `.item()` or `nonzero`, a blocking copy); it is on from the start of each step that does
not log to the start of the next step, and off for the logging steps, which read the loss and the
gradient norm back on purpose. The packed fine-tuning run takes the flash varlen path (bf16) with
the document spans computed on the host; tests/unit/train/test_step_loop_host_sync.py checks the
same loop on CPU and that it trains exactly as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import shoal.models.document_attention as document_attention
import shoal.models.model as model_module
import shoal.train.trainer as trainer
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, train_args, train_records

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS, LOG_INTERVAL = 7, 3  # steps 3, 6 and 7 (the last) log


@pytest.fixture
def sync_errors_between_logs(monkeypatch):
    """Sync debug mode "error" for the steps that do not log; counts the loop's steps."""
    seen = {"steps": 0}
    original = trainer.micro_batches

    def micro_batches(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == "_loop":  # validation's reads do not start a step
            seen["steps"] += 1
            step = seen["steps"]
            quiet = step % LOG_INTERVAL != 0 and step != STEPS
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "micro_batches", micro_batches)
    yield seen
    torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def attention_calls(monkeypatch):
    """How often the forward found spans on the device, and how often varlen attention ran."""
    calls = {"device_spans": 0, "varlen": 0}
    spans, varlen = document_attention.document_spans, model_module.varlen_causal_attention

    def counted_spans(*args, **kwargs):
        calls["device_spans"] += 1
        return spans(*args, **kwargs)

    def counted_varlen(*args, **kwargs):
        calls["varlen"] += 1
        return varlen(*args, **kwargs)

    monkeypatch.setattr(document_attention, "document_spans", counted_spans)
    monkeypatch.setattr(model_module, "varlen_causal_attention", counted_varlen)
    return calls


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_steps_between_logs_never_sync(stage, train_assets: TrainAssets, tmp_path: Path, sync_errors_between_logs,
                                       attention_calls):
    extra = ["--data.document_mask=true"] if stage == "pretrain" else []
    args = train_args(train_assets, stage, tmp_path, "gpu_sync", "--max_steps", STEPS,
                      f"--train.log_interval={LOG_INTERVAL}", "--train.precision=bf16",
                      "--train.val_check_interval=100", "--checkpoint.save_interval=100", *extra)
    assert shoal(*args) == 0
    assert sync_errors_between_logs["steps"] == STEPS
    records = train_records(tmp_path / "gpu_sync")
    assert sorted(records) == [3, 6, 7]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    assert attention_calls["varlen"] > 0, "the run did not take the flash varlen path"
    assert attention_calls["device_spans"] == 0, "a forward found its document spans on the device"
