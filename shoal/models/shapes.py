"""Names and shapes of a model's weights, from its config alone, without importing torch.

`weight_shapes(cfg)` lists every tensor of `Transformer(cfg).state_dict()` in the same order, so
conversion can plan and check a checkpoint without paying torch's import (seconds, more than
copying a small model's bytes). It mirrors `shoal.models.model` and `shoal.models.moe` by hand;
tests/unit/models/test_shapes.py compares it with the model itself for every preset, so the two
cannot drift apart unnoticed.
"""

from __future__ import annotations

from shoal.models.config import ModelConfig


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of `Transformer(cfg).state_dict()`, in its order. `lm_head.weight` is listed
    even when tied to the embedding (the state dict holds both names); callers drop it if needed."""
    e, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, e)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (e,)
        # nn.Linear registers weight before bias.
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out, e)
            if cfg.attention_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (e, q)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (e,)
        if cfg.is_moe_layer(i):
            x, m = cfg.num_experts, cfg.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (x, e)  # the router
            shapes[p + "mlp.experts.gate_proj"] = (x, m, e)
            shapes[p + "mlp.experts.up_proj"] = (x, m, e)
            shapes[p + "mlp.experts.down_proj"] = (x, e, m)
        else:
            f = cfg.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (f, e)
            shapes[p + "mlp.up_proj.weight"] = (f, e)
            shapes[p + "mlp.down_proj.weight"] = (e, f)
    shapes["model.norm.weight"] = (e,)
    shapes["lm_head.weight"] = (v, e)
    # (inv_freq is a non-persistent buffer: not in the state dict.)
    return shapes
