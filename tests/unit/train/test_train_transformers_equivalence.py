"""`shoal pretrain` trains as `transformers` + `torch.optim.AdamW` would on the same batches.

Oracle: the Hugging Face model the checkpoint was imported from, trained by a plain loop written
here: global batch k is samples [k·GBS, (k+1)·GBS) of the Megatron GPT dataset (Megatron's
sequential pretraining sampler), split into micro batches whose summed loss is divided by the
global batch's loss-token count; AdamW with weight decay on matrices only (shoal's documented
rule), constant learning rate, no warmup, clipping too loose to act. Tolerance: fp32 on both
sides, the per-step losses within 1e-5 relative, gradient norms within 1e-4 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, train_args, train_records

STEPS, GBS, MBS, SEQ = 5, 4, 2, 32
LR, WEIGHT_DECAY, BETAS, EPS = 5e-3, 0.5, (0.9, 0.95), 1e-8  # a large decay, so its rule shows in the loss


def transformers_losses(assets: TrainAssets, samples: list[dict[str, torch.Tensor]]) -> tuple[list[float], list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.hf_model, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    losses, norms = [], []
    for step in range(STEPS):
        batch = samples[step * GBS:(step + 1) * GBS]
        loss_tokens = sum(s["loss_mask"].sum() for s in batch).item()
        total = 0.0
        for first in range(0, GBS, MBS):
            micro = {k: torch.stack([s[k] for s in batch[first:first + MBS]])
                     for k in ("tokens", "labels", "loss_mask")}
            logits = model(input_ids=micro["tokens"]).logits
            per_token = F.cross_entropy(logits.flatten(0, 1).float(), micro["labels"].flatten(), reduction="none")
            loss_sum = (per_token * micro["loss_mask"].flatten()).sum()
            (loss_sum / loss_tokens).backward()
            total += loss_sum.item()
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm=1e9).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / loss_tokens)
    return losses, norms


def test_pretrain_matches_transformers_adamw(train_assets: TrainAssets, tmp_path: Path):
    from transformers import AutoTokenizer

    from shoal.data.gpt_dataset import build_pretrain_datasets

    args = train_args(train_assets, "pretrain", tmp_path, "pre", "--max_steps", STEPS,
                      f"--train.lr={LR}", "--train.lr_schedule=constant", f"--train.weight_decay={WEIGHT_DECAY}",
                      f"--train.adam_beta1={BETAS[0]}", f"--train.adam_beta2={BETAS[1]}", f"--train.adam_eps={EPS}",
                      "--train.grad_clip=1e9")
    assert shoal(*args) == 0
    shoal_records = train_records(tmp_path / "pre")

    # The samples shoal's trainer reads: the same data, seed, split and token ids as the run.
    tokenizer = AutoTokenizer.from_pretrained(train_assets.checkpoint / "tokenizer")
    train, _, _ = build_pretrain_datasets([str(train_assets.data_dir / "corpus_text_document")], SEQ, 1234,
                                          split="95,5,0", num_samples=(STEPS * GBS, None, 0),
                                          eod_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    samples = [train[i] for i in range(STEPS * GBS)]
    assert all(torch.equal(s["position_ids"], torch.arange(SEQ)) for s in samples)  # plain positions, as HF uses
    losses, norms = transformers_losses(train_assets, samples)

    assert sorted(shoal_records) == list(range(1, STEPS + 1))
    for step, (loss, norm) in enumerate(zip(losses, norms), start=1):
        assert shoal_records[step]["lr"] == LR
        assert shoal_records[step]["loss"] == pytest.approx(loss, rel=1e-5), f"step {step}"
        assert shoal_records[step]["grad_norm"] == pytest.approx(norm, rel=1e-4), f"step {step}"
    assert losses[-1] < losses[0]  # the run really trained
