"""Model and optimizer state between a live (possibly sharded) model and a checkpoint's DCP folders.

`torch.distributed.checkpoint.state_dict` gives canonical HF-named state dicts whatever wraps the
model (FSDP2, TP, compile, activation checkpointing), holding DTensor shards where parameters are
sharded; DCP then reads or writes only this rank's pieces. That is what lets a checkpoint saved
with one layout load into another. A model may come in several parts (this rank's pipeline
stages), each with its own optimizer; their states are the union of the parts'.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shoal.checkpoint.format import MODEL_DIR, OPTIM_DIR, SafeFileSystemReader, load_model_state, model_state_info
from shoal.errors import ShoalError

TIED_HEAD = "lm_head.weight"
# Optimizer state keyed by parameter name, not by position: loads into any layout.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _is_tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(config is not None and config.tie_word_embeddings)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state dict with HF names; a tied output head is stored once, as HF does."""
    state = get_model_state_dict(model)
    if _is_tied(model):
        state.pop(TIED_HEAD, None)
    return state


def parts_model_state(parts: Sequence[nn.Module]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for part in parts:
        state.update(model_state(part))
    return state


def load_model_into(model: nn.Module, ckpt: Path, allow_missing: tuple[str, ...] = ("lora_",)) -> None:
    """Fill the model's parameters from `ckpt/model`, checking names and shapes first.

    Parameters whose names contain one of `allow_missing` (new adapters) may be absent from the
    checkpoint; any other difference means the checkpoint holds another model, and is refused.
    """
    saved = model_state_info(ckpt / MODEL_DIR)
    state = model_state(model)
    target = {k: v for k, v in state.items() if k in saved or not any(m in k for m in allow_missing)}
    try:
        load_model_state(target, ckpt / MODEL_DIR)
    except ShoalError as err:
        raise ShoalError(f"{err} (is {ckpt} a checkpoint of another model?)") from None
    set_model_state_dict(model, target, options=StateDictOptions(strict=False))


def parts_optimizer_state(parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Only the tensors (moments, step counts): DCP would pickle anything else, and a pickle
    must never be loaded from a checkpoint. Hyperparameters come from the recipe on resume."""
    state: dict[str, Any] = {}
    for part, optimizer in zip(parts, optimizers):
        flat = get_optimizer_state_dict(part, optimizer, options=_OPTIM_OPTIONS)
        state.update({k: v for k, v in flat.items() if isinstance(v, torch.Tensor)})
    return state


def load_optimizers_into(parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], ckpt: Path) -> None:
    states = [get_optimizer_state_dict(p, o, options=_OPTIM_OPTIONS) for p, o in zip(parts, optimizers)]
    tensors = {k: v for s in states for k, v in s.items() if isinstance(v, torch.Tensor)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(ckpt / OPTIM_DIR)),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    for part, optimizer, state in zip(parts, optimizers, states):
        state.update({k: tensors[k] for k in state if k in tensors})
        set_optimizer_state_dict(part, optimizer, state, options=_OPTIM_OPTIONS)
