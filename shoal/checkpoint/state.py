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


def _saved_tensors(model_dir: Path) -> dict[str, torch.Size]:
    if not (model_dir / ".metadata").exists():
        raise ShoalError(f"{model_dir} is not a complete checkpoint (no DCP .metadata)")
    metadata = dcp.FileSystemReader(str(model_dir)).read_metadata()
    return {k: v.size for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def load_model_into(model: nn.Module, ckpt: Path, allow_missing: tuple[str, ...] = ("lora_",)) -> None:
    """Fill the model's parameters from `ckpt/model`, checking names and shapes first.

    Parameters whose names contain one of `allow_missing` (new adapters) may be absent from the
    checkpoint; any other difference means the checkpoint holds another model, and is refused.
    """
    saved = _saved_tensors(ckpt / "model")
    state = model_state(model)
    missing = [k for k in state if k not in saved and not any(m in k for m in allow_missing)]
    if missing:
        raise ShoalError(
            f"checkpoint {ckpt} does not match this model: it lacks {len(missing)} tensors, e.g. {missing[0]} "
            "(is it a checkpoint of another model?)"
        )
    wrong = [(k, tuple(saved[k]), tuple(v.shape)) for k, v in state.items() if k in saved and tuple(saved[k]) != tuple(v.shape)]
    if wrong:
        k, got, want = wrong[0]
        raise ShoalError(f"checkpoint {ckpt} does not match this model: {k} has shape {got}, expected {want}")
    target = {k: v for k, v in state.items() if k in saved}
    dcp.load(target, checkpoint_id=str(ckpt / "model"))
    set_model_state_dict(model, target, options=StateDictOptions(strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_into(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(ckpt / "optim"))
    set_optimizer_state_dict(model, optimizer, state)
