"""Single-device model code: the decoder, its config and the named presets."""

from shoal.models.config import ModelConfig, from_hf_config, to_hf_config
from shoal.models.presets import PRESETS, get_preset

__all__ = ["ModelConfig", "Transformer", "build_model", "from_hf_config", "to_hf_config", "PRESETS", "get_preset"]


def __getattr__(name: str):
    # The model imports torch (seconds); loaded on first use so that torch-free importers of this
    # package (config, presets, shapes: conversion's byte-copy path) do not pay for it.
    if name in ("Transformer", "build_model"):
        from shoal.models import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
