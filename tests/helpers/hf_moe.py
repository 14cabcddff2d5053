"""Tiny Qwen3-MoE checkpoints made by `transformers` itself (the oracle), for the MoE tests.

The router and the experts are drawn wider than Hugging Face's init (std 0.02 would route almost
uniformly, so a wrong top-k could hide) and the norms are randomised, so that a dropped or swapped
tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB_SIZE = 256
MOE_SHAPE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                 num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, router_aux_loss_coef=0.01)


def make_hf_moe(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> transformers.Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**{**MOE_SHAPE, **overrides})
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):
                param.copy_(0.5 * torch.randn_like(param))
            elif ".experts." in name:
                param.copy_(0.1 * torch.randn_like(param))
    return model.to(dtype).eval()


def save_hf_moe(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """`save_pretrained` of a tiny MoE (per-expert tensors on disk, as the Hub's Qwen3-30B-A3B)."""
    from tests.helpers.tokenizers import word_level_tokenizer as make_tokenizer

    model = make_hf_moe(seed, dtype, **overrides)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return model


def imported_moe(tmp_path: Path, **overrides):
    """(the transformers model, shoal's model built from `shoal import` of its save_pretrained)."""
    from shoal.checkpoint.format import read_model_config
    from shoal.checkpoint.state import load_model_into
    from shoal.cli import main as shoal
    from shoal.models import build_model

    hf = save_hf_moe(tmp_path / "hf", **overrides)
    assert shoal(["import", "--source", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ckpt")]) == 0
    model = build_model(read_model_config(tmp_path / "ckpt"), init=False)
    load_model_into(model, tmp_path / "ckpt")
    return hf, model
