"""Model and optimizer state between a live (possibly sharded) model and a checkpoint's DCP folders.

`torch.distributed.checkpoint.state_dict` gives canonical HF-named state dicts whatever wraps the
model (FSDP2, TP, compile, activation checkpointing), holding DTensor shards where parameters are
sharded; DCP then reads or writes only this rank's pieces. That is what lets a checkpoint saved
with one layout load into another. A model may come in several parts (this rank's pipeline
stages), each with its own optimizer; their states are the union of the parts'.

A LoRA/DoRA run saves only what trains (`trained_only`): the frozen base weights are read back
from the base checkpoint the run started from (`shoal.checkpoint.base`), never saved from the
training copy, which may hold them in another dtype than the base.
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

from shoal.checkpoint.format import MODEL_DIR, OPTIM_DIR
from shoal.checkpoint.model_state import load_model_state, model_state_info
from shoal.checkpoint.storage import CheckpointStorageReader
from shoal.errors import ShoalError

TIED_HEAD = "lm_head.weight"
# Optimizer state keyed by parameter name, not by position: loads into any layout.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _is_tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(config is not None and config.tie_word_embeddings)


def trained_names(model: nn.Module) -> set[str]:
    """State-dict names (wrapper prefixes removed) of the parameters that train (requires_grad)."""
    from shoal.peft.lora import clean_name

    return {clean_name(name) for name, param in model.named_parameters() if param.requires_grad}


def model_state(model: nn.Module, trained_only: bool = False) -> dict[str, Any]:
    """The model's state dict with HF names; a tied output head is stored once, as HF does.
    `trained_only`: just the parameters that train (an adapter-only checkpoint's `model/`)."""
    state = get_model_state_dict(model)
    if _is_tied(model):
        state.pop(TIED_HEAD, None)
    if trained_only:
        keep = trained_names(model)
        state = {k: v for k, v in state.items() if k in keep}
    return state


def parts_model_state(parts: Sequence[nn.Module], trained_only: bool = False) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for part in parts:
        state.update(model_state(part, trained_only))
    return state


def load_model_into(model: nn.Module, ckpt: Path, allow_missing: tuple[str, ...] = ("lora_",),
                    base: str | Path | None = None) -> None:
    """Fill the model's parameters from `ckpt/model`, checking names and shapes first.

    Parameters whose names contain one of `allow_missing` (new adapters) may be absent from the
    checkpoint; any other difference means the checkpoint holds another model, and is refused.
    An adapter-only checkpoint gives what it holds and its base checkpoint the rest; the base is
    checked first (`shoal.checkpoint.base.resolve_base`; `base` overrides its recorded place).
    """
    from shoal.checkpoint.base import resolve_base

    base_ckpt = resolve_base(ckpt, base)
    saved = model_state_info(ckpt / MODEL_DIR)
    from_base = model_state_info(base_ckpt / MODEL_DIR) if base_ckpt is not None else {}
    state = model_state(model)
    if TIED_HEAD in state and TIED_HEAD not in from_base and "model.embed_tokens.weight" in from_base:
        from_base = {**from_base, TIED_HEAD: from_base["model.embed_tokens.weight"]}  # retied on load
    target = {k: v for k, v in state.items()
              if k in saved or k in from_base or not any(m in k for m in allow_missing)}
    own = {k: v for k, v in target.items() if k in saved or k not in from_base}
    rest = {k: v for k, v in target.items() if k not in own}
    for part, folder in ((own, ckpt), (rest, base_ckpt)):
        if not part:
            continue
        try:
            load_model_state(part, folder / MODEL_DIR)
        except ShoalError as err:
            raise ShoalError(f"{err} (is {folder} a checkpoint of another model?)") from None
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
        # Either kind of data file: safetensors (shoal's writer) or torch.save records (older shoal).
        dcp.load(tensors, storage_reader=CheckpointStorageReader(ckpt / OPTIM_DIR),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    for part, optimizer, state in zip(parts, optimizers, states):
        state.update({k: tensors[k] for k in state if k in tensors})
        set_optimizer_state_dict(part, optimizer, state, options=_OPTIM_OPTIONS)
