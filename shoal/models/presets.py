"""Named model shapes ("flavors"): one dict per family, the seed's models plus a tiny one each.

Presets give the architecture only; a real run starts from imported weights whose `shoal.json`
carries the exact config. The tiny flavors (2 layers, hidden 64) are for tests and the demo.
"""

from __future__ import annotations

import dataclasses

from shoal.errors import ShoalError
from shoal.models.config import ModelConfig

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}


def _llama(**kw) -> ModelConfig:
    base = dict(
        family="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE, head_dim=128,
        bos_token_id=128000, eos_token_id=128001,
    )
    return ModelConfig(**{**base, **kw})


LLAMA = {
    "llama3_8b": _llama(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        rope_scaling=None, max_position_embeddings=8192),
    "llama31_8b": _llama(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8),
    "llama31_70b": _llama(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
    "llama31_405b": _llama(hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128,
                           num_kv_heads=8),
    "llama33_70b": _llama(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
    "llama32_1b": _llama(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                         head_dim=64, rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama32_3b": _llama(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
                         rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama_tiny": _llama(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=None,
                         eos_token_id=None, rope_scaling={**_LLAMA32_ROPE, "original_max_position_embeddings": 256}),
}

MISTRAL = {
    "mistral_7b": ModelConfig(family="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=1000000.0, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    "mistral_tiny": ModelConfig(family="mistral", vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                rope_theta=1000000.0, max_position_embeddings=1024),
}

QWEN2 = {
    "qwen25_7b": ModelConfig(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                             rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True,
                             bos_token_id=151643, eos_token_id=151645),
    "qwen25_1_5b": ModelConfig(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                               num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                               rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True,
                               tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "qwen2_tiny": ModelConfig(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=1024, attention_bias=True),
}

QWEN3 = {
    "qwen3_8b": ModelConfig(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
                            bos_token_id=151643, eos_token_id=151645),
    "qwen3_tiny": ModelConfig(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=1024, qk_norm=True, tie_word_embeddings=True),
}

# Qwen3-MoE: the numbers of Qwen/Qwen3-30B-A3B's config.json (30.5B parameters, 3.3B active).
QWEN3_MOE = {
    "qwen3_30b_a3b": ModelConfig(family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                 num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                                 rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
                                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                 norm_topk_prob=True, router_aux_loss_coef=0.001,
                                 bos_token_id=151643, eos_token_id=151645),
    "qwen3_moe_tiny": ModelConfig(family="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                  rope_theta=1000000.0, max_position_embeddings=1024, qk_norm=True,
                                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                  norm_topk_prob=True, router_aux_loss_coef=0.001),
}

PRESETS: dict[str, ModelConfig] = {**LLAMA, **MISTRAL, **QWEN2, **QWEN3, **QWEN3_MOE}

# The seed's older `--model_size` flag names Llama 3.1 sizes.
MODEL_SIZE_ALIASES = {"8B": "llama31_8b", "70B": "llama31_70b", "405B": "llama31_405b",
                      "1B": "llama32_1b", "3B": "llama32_3b"}
# NeMo's recipe names, as in `nemo llm import model=llama3_8b`.
NEMO_ALIASES = {"llama3_8b": "llama3_8b", "llama31_8b": "llama31_8b", "llama3_70b": "llama31_70b"}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (accepts the seed's `8B`/`70B` sizes too)."""
    key = MODEL_SIZE_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ShoalError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[key])
