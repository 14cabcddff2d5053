"""Mean loss and perplexity of a model on a split of pretraining or fine-tuning data.

The samples are the ones training sees: Megatron GPT samples of a `.bin/.idx` prefix (split,
shuffle and document handling of `shoal.data.gpt_dataset`), or the rows of an SFT split (chat
template, answer-only loss mask, packing of `shoal.data.sft`). The loss is the trainer's: the sum
of `masked_cross_entropy_sum` over the samples divided by their loss tokens, so it equals the
`val_loss` a run records when both read the same samples (the first N of the split, in order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shoal.errors import ShoalError
from shoal.train.step import masked_cross_entropy_sum

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GPT_SPLITS = {"train": 0, "training": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}
_SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


@dataclass(frozen=True)
class DataSpec:
    """Which samples to score: the dataset, the split, and the options training built them with."""

    dataset_path: tuple[str, ...]
    split_name: str = "validation"
    seq_length: int = 2048
    split: str = "998,1,0"  # pretraining: Megatron's document split
    seed: int = 1234
    document_mask: bool = False  # pretraining: keep documents apart (fine-tuning packs always do)
    eod_mask_loss: bool = False
    pack_sequences: bool = True  # fine-tuning
    prompt_template: str | None = None
    system_prompt: str | None = None
    max_samples: int | None = None  # the first N samples; None: the whole split


@dataclass(frozen=True)
class LossResult:
    mean_loss: float
    perplexity: float
    loss_tokens: int
    samples: int
    kind: str  # "pretraining" or "fine-tuning"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def is_sft_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f"{name}.jsonl").is_file() for name in ("training", "validation", "test"))


def build_eval_dataset(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.utils.data.Dataset, str, bool]:
    """(dataset, kind, whether documents are kept apart) for the split `spec` names."""
    if len(spec.dataset_path) == 1 and is_sft_folder(Path(spec.dataset_path[0])):
        from shoal.data.sft import build_sft_dataset, sft_split_path

        path = sft_split_path(spec.dataset_path[0], spec.split_name)
        dataset = build_sft_dataset(path, tokenizer, spec.seq_length, pack=spec.pack_sequences,
                                    prompt_template=spec.prompt_template, system_prompt=spec.system_prompt)
        # Packed examples must not see each other, as in `shoal finetune`.
        return dataset, "fine-tuning", spec.pack_sequences
    from shoal.data.gpt_dataset import build_pretrain_datasets

    if spec.split_name not in GPT_SPLITS:
        raise ShoalError(f"--split_name {spec.split_name!r}: expected one of train, validation, test")
    index = GPT_SPLITS[spec.split_name]
    sizes = [0, 0, 0]
    sizes[index] = spec.max_samples
    splits = build_pretrain_datasets(
        list(spec.dataset_path), spec.seq_length, spec.seed, split=spec.split, num_samples=sizes,
        eod_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        reset_position_ids=spec.document_mask, eod_mask_loss=spec.eod_mask_loss,
    )
    if splits[index] is None:
        raise ShoalError(f"the {spec.split_name} split ({spec.split!r}) of {' '.join(spec.dataset_path)} holds no "
                         f"sample of {spec.seq_length + 1} tokens")
    return splits[index], "pretraining", spec.document_mask


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: torch.utils.data.Dataset, document_mask: bool, kind: str,
                  max_samples: int | None = None, batch_size: int = 4) -> LossResult:
    """Mean loss per loss token over the first `max_samples` samples (all when None), in order."""
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    if count == 0:
        raise ShoalError("no sample to evaluate")
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, count, batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, count))]
        batch = {key: torch.stack([row[key] for row in rows]).to(device) for key in _SAMPLE_KEYS}
        inputs = {"position_ids": batch["position_ids"]}
        if document_mask:
            inputs["document_ids"] = batch["document_ids"]
        logits = model(batch["tokens"], **inputs)
        loss_sum += masked_cross_entropy_sum(logits, batch["labels"], batch["loss_mask"]).double()
        tokens += batch["loss_mask"].sum().double()
    if tokens.item() == 0:
        raise ShoalError("the samples hold no loss token (every answer truncated away?)")
    mean = (loss_sum / tokens).item()
    return LossResult(mean, math.exp(mean) if mean < 700 else math.inf, int(tokens.item()), count, kind)
