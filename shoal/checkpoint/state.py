"""Model and optimizer state between a live (possibly sharded) model and a checkpoint's DCP folders.

`torch.distributed.checkpoint.state_dict` gives canonical HF-named state dicts whatever wraps the
model (FSDP2, TP, compile, activation checkpointing), holding DTensor shards where parameters are
sharded; DCP then reads or writes only this rank's pieces. That is what lets a checkpoint saved
with one layout load into another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shoal.checkpoint.format import SafeFileSystemReader, load_model_state, model_state_info
from shoal.errors import ShoalError

TIED_HEAD = "lm_head.weight"


def _is_tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(config is not None and config.tie_word_embeddings)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state dict with HF names; a tied output head is stored once, as HF does."""
    state = get_model_state_dict(model)
    if _is_tied(model):
        state.pop(TIED_HEAD, None)
    return state


def load_model_into(model: nn.Module, ckpt: Path, allow_missing: tuple[str, ...] = ("lora_",)) -> None:
    """Fill the model's parameters from `ckpt/model`, checking names and shapes first.

    Parameters whose names contain one of `allow_missing` (new adapters) may be absent from the
    checkpoint; any other difference means the checkpoint holds another model, and is refused.
    """
    saved = model_state_info(ckpt / "model")
    state = model_state(model)
    target = {k: v for k, v in state.items() if k in saved or not any(m in k for m in allow_missing)}
    try:
        load_model_state(target, ckpt / "model")
    except ShoalError as err:
        raise ShoalError(f"{err} (is {ckpt} a checkpoint of another model?)") from None
    set_model_state_dict(model, target, options=StateDictOptions(strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_into(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt / "optim")))
    set_optimizer_state_dict(model, optimizer, state)
