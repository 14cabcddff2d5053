"""Single-device model code: the decoder, its config and the named presets."""

from shoal.models.config import ModelConfig, from_hf_config, to_hf_config
from shoal.models.model import Transformer, build_model
from shoal.models.presets import PRESETS, get_preset

__all__ = ["ModelConfig", "Transformer", "build_model", "from_hf_config", "to_hf_config", "PRESETS", "get_preset"]
