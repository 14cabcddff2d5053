"""Single-device model code: the decoder, its config and the named presets.

The config and presets import no torch (a conversion that only copies bytes reads them); the
model code, which does, is imported when `Transformer` or `build_model` is first asked for.
"""

from typing import Any

from shoal.models.config import ModelConfig, from_hf_config, to_hf_config
from shoal.models.presets import PRESETS, get_preset

__all__ = ["ModelConfig", "Transformer", "build_model", "from_hf_config", "to_hf_config", "PRESETS", "get_preset"]


def __getattr__(name: str) -> Any:
    if name in ("Transformer", "build_model"):
        from shoal.models import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
