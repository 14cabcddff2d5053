"""The output layer and the loss over the loss tokens alone, their positions found on the host.

Oracles: the chunked head over every token (`linear_cross_entropy_sum` on the whole [B, S]) and,
independent of it, the plain logits `F.linear` then `masked_cross_entropy_sum`. Sending only the
rows at `with_loss_positions`' indices through the head must give the same loss and the same
gradients of the hidden states and the weight: padding, a mask of zeros and labels of -100 inside
the mask included. The engine must train the same with and without the positions, run its head on
fewer rows with them, and the step loop must hand them over exactly when the engine takes them.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import shoal.train.step as step_module
import shoal.train.trainer as trainer
from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import ParallelDims, build_mesh
from shoal.models import get_preset
from shoal.peft.config import LoraConfig
from shoal.train.engine import Engine, build_engine
from shoal.train.linear_cross_entropy import chunk_loss_and_grad, gather_loss_rows, linear_cross_entropy_sum
from shoal.train.step import masked_cross_entropy_sum, with_loss_positions
from tests.helpers.cli import shoal as run_shoal
from tests.helpers.training import TrainAssets, train_args, train_records
from tests.unit.train.test_step_loop_host_sync import SyncRecorder

B, S, E, V = 3, 13, 16, 40


def _mask(b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """Instruction-tuning rows: a prompt (mask 0) of a third to most of the row, then the answer (mask 1)."""
    prompt = torch.randint(s // 3, s - 2, (b, 1), generator=gen)
    return (torch.arange(s)[None, :] >= prompt).float()


def _inputs(seed: int, mask: str):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, E, generator=gen, requires_grad=True)
    weight = (torch.randn(V, E, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=gen)
    loss_mask = _mask(B, S, gen) if mask == "prompts" else torch.zeros(B, S)
    labels[0, -3:] = -100  # ignored labels inside the mask: weighted 0 all the same
    return hidden, weight, labels, loss_mask


def _loss_and_grads(loss_fn, hidden, weight):
    hidden.grad = weight.grad = None
    loss = loss_fn()
    loss.backward(torch.tensor(0.7))  # a non-unit upstream gradient, as the 1/tokens scaling gives
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_tokens", [4, 1000])  # ragged chunks; one chunk
@pytest.mark.parametrize("mask", ["prompts", "all_zero"])
def test_selected_rows_give_the_loss_and_gradients_of_every_row(mask, chunk_tokens):
    hidden, weight, labels, loss_mask = _inputs(0, mask)
    positions = with_loss_positions({"loss_mask": loss_mask}, bucket=6)["loss_positions"]
    loss_tokens = int((loss_mask != 0).sum())
    assert loss_tokens < len(positions) < B * S  # padding is there, and fewer rows than tokens

    def selected():
        rows, row_labels, row_mask = gather_loss_rows(hidden, labels, loss_mask, positions)
        return linear_cross_entropy_sum(rows, weight, row_labels, row_mask, chunk_tokens=chunk_tokens)

    got = _loss_and_grads(selected, hidden, weight)
    chunked = _loss_and_grads(lambda: linear_cross_entropy_sum(hidden, weight, labels, loss_mask,
                                                               chunk_tokens=chunk_tokens), hidden, weight)
    plain = _loss_and_grads(lambda: masked_cross_entropy_sum(F.linear(hidden, weight), labels, loss_mask),
                            hidden, weight)
    for want in (chunked, plain):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-5)
    # Rows outside the loss (padding points at one of them) get exactly nothing.
    assert got[1][loss_mask == 0].abs().max() == 0
    if mask == "all_zero":
        assert got[0].item() == 0.0 and got[2].abs().max() == 0


def test_loss_positions_are_the_loss_tokens_padded_with_a_token_of_no_loss():
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    batch = {"loss_mask": loss_mask, "tokens": torch.zeros(2, 6, dtype=torch.long)}
    got = with_loss_positions(batch, bucket=3)
    assert got["loss_positions"].dtype == torch.int64
    assert got["loss_positions"].tolist() == [2, 3, 5, 6, 0, 0]  # 4 rounded up to 6; token 0 has no loss
    assert got["tokens"] is batch["tokens"] and "loss_positions" not in batch  # the input is left as it was
    assert with_loss_positions(batch, bucket=4)["loss_positions"].tolist() == [2, 3, 5, 6]  # a whole bucket

    starts_with_answers = torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    assert with_loss_positions({"loss_mask": starts_with_answers}, bucket=4)["loss_positions"].tolist() == [0, 1, 2, 2]
    assert with_loss_positions({"loss_mask": torch.zeros(2, 6)}, bucket=4)["loss_positions"].tolist() == [0] * 4
    # Rounded up to every token (or all of them carry loss): gathering would save nothing.
    assert "loss_positions" not in with_loss_positions(batch, bucket=12)
    assert "loss_positions" not in with_loss_positions({"loss_mask": torch.ones(2, 6)}, bucket=4)


def test_default_bucket_rounds_the_count_to_multiples_of_256_and_pads_with_no_loss():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        loss_mask = _mask(4, 512, gen)
        positions = with_loss_positions({"loss_mask": loss_mask})["loss_positions"]
        count = int(loss_mask.sum())
        assert len(positions) % 256 == 0 and count <= len(positions) < count + 256
        flat = loss_mask.flatten()
        assert torch.equal(positions[:count], flat.nonzero().flatten())
        assert (flat[positions[count:]] == 0).all()


def _engine(peft: LoraConfig | None) -> Engine:
    parallel = ParallelConfig()
    return build_engine(get_preset("llama_tiny"), train=TrainSection(micro_batch_size=2, global_batch_size=4),
                        parallel=parallel, peft=peft, dims=build_mesh(parallel, 1, "cpu"),
                        device=torch.device("cpu"), compute_dtype=torch.float32)


def _batch(seed: int, s: int = 48) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (2, s + 1), generator=gen)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": _mask(2, s, gen),
            "position_ids": torch.arange(s).expand(2, s)}


def _step(engine: Engine, mbs: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in engine.parameters():
        p.grad = None
    loss = engine.forward_backward(mbs, float(sum(mb["loss_mask"].sum() for mb in mbs)))
    return loss, [p.grad.clone() for p in engine.parameters()]


@pytest.mark.parametrize("head", ["chunked", "plain"])  # plain: the head of FSDP, FP8 or an adapted lm_head
@pytest.mark.parametrize("peft", [None, LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])],
                         ids=["full", "lora"])
def test_engine_trains_the_same_with_and_without_loss_positions(peft, head):
    engine = _engine(peft)
    if head == "plain":
        engine.head_loss_fn = None
    assert engine.takes_loss_positions
    plain = [_batch(1), _batch(2)]
    selected = [with_loss_positions(mb, bucket=16) for mb in plain]
    assert all("loss_positions" in mb for mb in selected)
    want_loss, want_grads = _step(engine, plain)
    got_loss, got_grads = _step(engine, selected)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(engine.loss_sum(selected), engine.loss_sum(plain), atol=1e-5, rtol=1e-6)


def test_the_head_runs_on_the_loss_rows_alone():
    engine = _engine(None)
    rows: list[int] = []

    def recording_chunk_fn(logits, labels, mask):
        rows.append(logits.shape[0])
        return chunk_loss_and_grad(logits, labels, mask)

    engine.head_loss_fn = functools.partial(linear_cross_entropy_sum, chunk_fn=recording_chunk_fn)
    mb = with_loss_positions(_batch(3), bucket=16)
    engine.forward_backward([mb], float(mb["loss_mask"].sum()))
    assert sum(rows) == len(mb["loss_positions"]) < mb["tokens"].numel()
    rows.clear()
    engine.forward_backward([_batch(3)], 1.0)
    assert sum(rows) == _batch(3)["tokens"].numel()


def test_the_plain_head_runs_on_the_loss_rows_alone():
    engine = _engine(None)
    engine.head_loss_fn = None
    rows: list[int] = []
    engine.parts[0].lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[-2]))
    mb = with_loss_positions(_batch(3), bucket=16)
    engine.forward_backward([mb], float(mb["loss_mask"].sum()))
    assert rows == [len(mb["loss_positions"])] and rows[0] < mb["tokens"].numel()
    rows.clear()
    engine.forward_backward([_batch(3)], 1.0)
    assert rows == [_batch(3)["tokens"].shape[1]]  # [B, S, E]: every token


def test_engine_takes_loss_positions_where_its_rows_are_whole_and_its_head_is_called_alone():
    engine = _engine(None)
    assert engine.takes_loss_positions
    assert dataclasses.replace(engine, head_loss_fn=None).takes_loss_positions  # plain head, one process
    assert not dataclasses.replace(engine, pipeline=object()).takes_loss_positions
    # Context parallelism: each rank holds a slice of the sequence, which the positions do not index.
    assert not dataclasses.replace(engine, dims=ParallelDims(world_size=2, cp=2)).takes_loss_positions
    # Tensor (sequence) parallelism: the hidden states' sequence shards are gathered whole first
    # (tests/distributed/test_commands_across_layouts.py runs it against one process).
    assert dataclasses.replace(engine, dims=ParallelDims(world_size=2, tp=2)).takes_loss_positions
    # FSDP: only an output layer that is its own unit (not so here: a tied one would be the root's).
    assert not dataclasses.replace(engine, dims=ParallelDims(world_size=2, dp_shard=2)).takes_loss_positions


def test_micro_batches_carry_positions_where_the_engine_takes_them():
    batches = [_batch(4, s=512), _batch(5, s=512)]  # 1,024 tokens: the default bucket leaves some out
    engine = _engine(None)
    with_positions = trainer.micro_batches(iter(batches), 2, torch.device("cpu"), engine.prepare_on_host)
    pipelined = dataclasses.replace(engine, pipeline=object())
    without = trainer.micro_batches(iter(batches), 2, torch.device("cpu"), pipelined.prepare_on_host)
    for mb, host in zip(with_positions.micro_batches, batches, strict=True):
        assert torch.equal(mb["loss_positions"], with_loss_positions(host)["loss_positions"])
    assert all("loss_positions" not in mb for mb in without.micro_batches)
    assert with_positions.loss_tokens == without.loss_tokens == sum(float(b["loss_mask"].sum()) for b in batches)


def test_finetune_hands_positions_to_the_engine_reads_nothing_back_and_trains_the_same(
        train_assets: TrainAssets, tmp_path: Path, monkeypatch):
    # The test runs' micro-batches hold 128 tokens: a bucket of 16 makes positions worth taking.
    monkeypatch.setattr(step_module, "LOSS_POSITION_BUCKET", 16)
    seen: list[bool] = []  # for each micro-batch of training and validation: did the engine get positions?
    loss_sum = Engine._loss_sum

    def recording_loss_sum(self, *args):
        seen.append(len(args) > 4 and args[4] is not None)
        return loss_sum(self, *args)

    monkeypatch.setattr(Engine, "_loss_sum", recording_loss_sum)
    args = ("--max_steps", 6, "--train.log_interval=3", "--train.val_check_interval=3",
            "--checkpoint.save_interval=100")
    recorder = SyncRecorder(monkeypatch)
    assert run_shoal(*train_args(train_assets, "finetune", tmp_path, "positions", *args)) == 0
    assert seen and all(seen)
    quiet = [call for call in recorder.calls if call[0] not in (3, 6)]
    assert quiet == [], f"syncing calls on steps that do not log: {quiet}"

    seen.clear()
    monkeypatch.setattr(Engine, "takes_loss_positions", property(lambda self: False))
    assert run_shoal(*train_args(train_assets, "finetune", tmp_path, "rows", *args)) == 0
    assert seen and not any(seen)
    got, want = train_records(tmp_path / "positions"), train_records(tmp_path / "rows")
    assert sorted(got) == sorted(want) == [3, 6]
    for s in (3, 6):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5)
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4)
