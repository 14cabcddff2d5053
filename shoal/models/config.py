"""The model configuration, and its two-way mapping to a Hugging Face `config.json`.

One dataclass describes every decoder shoal supports (Llama 3.x, Mistral, Qwen2/2.5, Qwen3 dense,
Qwen3-MoE); the differences between families are a handful of flags (`attention_bias`, `qk_norm`,
`tie_word_embeddings`, the RoPE scaling) and, for mixture-of-experts models, the `num_experts`
group of fields (0 experts: a dense model). A field of an HF config that would change the model's
maths and that shoal does not implement is refused, never dropped: a silently wrong model is the
worst outcome a conversion tool can have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ShoalError

# model_type in config.json -> family name used by shoal (and the HF architecture class it exports as).
FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

@dataclass
class ModelConfig:
    """Everything needed to rebuild a model. Field names follow Hugging Face's where they exist."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None, or the HF "llama3" scaling parameters: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2/2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Mixture of experts (Qwen3-MoE). A layer i is sparse when num_experts > 0, i is not in
    # mlp_only_layers and (i + 1) % decoder_sparse_step == 0 (HF's rule); the other layers keep the
    # dense MLP of width intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # experts routed per token (top-k)
    moe_intermediate_size: int = 0  # width of each expert's SwiGLU
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added in training
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ShoalError(f"unknown model family {self.family!r}; shoal supports {sorted(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ShoalError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers]
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ShoalError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                                 f"num_experts ({self.num_experts})")
            if self.moe_intermediate_size <= 0:
                raise ShoalError("moe_intermediate_size must be positive for a mixture-of-experts model")
            if self.decoder_sparse_step < 1:
                raise ShoalError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
            outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            if outside:
                raise ShoalError(f"mlp_only_layers {outside} are not layers of a {self.num_layers}-layer model")

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` holds routed experts (Hugging Face's Qwen3-MoE rule)."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def is_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_layers))

    def _count_params(self, experts_per_layer: int) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        total = 0
        for i in range(self.num_layers):
            if self.is_moe_layer(i):  # the router, plus the experts counted
                mlp = self.num_experts * h + experts_per_layer * 3 * h * self.moe_intermediate_size
            else:
                mlp = 3 * h * self.intermediate_size
            total += attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + embed + h

    @property
    def num_params(self) -> int:
        """All parameters, a tied embedding counted once (the N of DESIGN §7's MFU formula)."""
        return self._count_params(self.num_experts)

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses: all of a dense model; only the routed experts of an MoE one."""
        return self._count_params(self.num_experts_per_tok)

    def flops_per_token(self, seq_length: int, frozen_params: int = 0, loss_token_fraction: float = 1.0) -> float:
        """Training FLOPs per token: 6N + 12·L·H·Dh·S (DESIGN §7), N the active parameters (an MoE
        token goes through num_experts_per_tok experts, not all of them). `frozen_params` of N (the
        base of a LoRA/DoRA run) need no weight-gradient matmul: 4 FLOPs per parameter instead of 6;
        the adapters' own FLOPs are not counted (a fraction of a percent at the usual ranks).
        `loss_token_fraction` of the tokens carry loss: the output layer (V·E) is needed for those
        only (a prompt token's logits feed nothing), so the rest do without its FLOPs."""
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_length
        head = (4 if frozen_params else 6) * self.vocab_size * self.hidden_size
        unused_head = (1.0 - min(max(loss_token_fraction, 0.0), 1.0)) * head
        return 6 * self.num_active_params - 2 * frozen_params + attention - unused_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ShoalError(f"unknown model config keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)


def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """Read RoPE base and scaling from either the classic (`rope_theta` + `rope_scaling`) or the
    transformers>=5 (`rope_parameters`) spelling; refuse any scaling other than llama3."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.pop("rope_theta", None))
    if scaling is None and params:
        scaling = params
    if theta is None:
        theta = 10000.0
    if scaling:
        scaling = dict(scaling)
        scaling.pop("rope_theta", None)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            return float(theta), None
        if rope_type != "llama3":
            raise ShoalError(
                f"{where}: rope scaling type {rope_type!r} is not supported "
                "(shoal implements the default RoPE and 'llama3' scaling)"
            )
        needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in needed if k not in scaling]
        if missing:
            raise ShoalError(f"{where}: llama3 rope scaling lacks {missing}")
        scaling = {"rope_type": "llama3", **{k: scaling[k] for k in needed}}
    return float(theta), scaling or None


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed HF `config.json`, refusing what shoal cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ShoalError(
            f"{where}: model_type {model_type!r} is not supported; shoal supports {sorted(FAMILIES)}"
        )
    sliding = hf.get("sliding_window")
    uses_sliding = hf.get("use_sliding_window", model_type == "mistral")
    if sliding is not None and uses_sliding:
        raise ShoalError(
            f"{where}: sliding_window={sliding} is not supported (shoal uses full causal attention); "
            "Mistral v0.3 style checkpoints set it to null"
        )
    if hf.get("mlp_bias"):
        raise ShoalError(f"{where}: mlp_bias=true is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ShoalError(f"{where}: hidden_act {act!r} is not supported (expected 'silu')")
    if model_type in ("llama", "mistral") and hf.get("attention_bias"):
        raise ShoalError(f"{where}: attention_bias=true is not supported for {model_type}")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ShoalError(f"{where}: partial_rotary_factor != 1 is not supported")

    if model_type == "qwen3_moe" and hf.get("attention_bias"):
        # HF's Qwen3-MoE then puts a bias on o_proj as well, which shoal's attention does not hold.
        raise ShoalError(f"{where}: attention_bias=true is not supported for qwen3_moe")

    theta, scaling = _rope_from_hf(hf, where)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    moe = _moe_from_hf(hf, where) if model_type == "qwen3_moe" else {}
    return ModelConfig(
        family=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or (model_type == "qwen3" and bool(hf.get("attention_bias"))),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        **moe,
    )


def _moe_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE config.json (`save_pretrained` in transformers 5
    writes `num_local_experts`, the Hub's checkpoints `num_experts`)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    mlp_only = hf.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ShoalError(f"{where}: mlp_only_layers must be a list of layer indices, got {mlp_only!r}")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=list(mlp_only),
    )


def to_hf_config(cfg: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """The `config.json` that makes `transformers` build the same model."""
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.family in ("llama", "qwen3", "qwen3_moe"):
        hf["attention_bias"] = cfg.attention_bias
    if cfg.family == "llama":
        hf["mlp_bias"] = False
    if cfg.family in ("mistral", "qwen2", "qwen3", "qwen3_moe"):
        hf["sliding_window"] = None
    if cfg.family in ("qwen2", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = False
    if cfg.family == "qwen3_moe":
        hf.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                  moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                  router_aux_loss_coef=cfg.router_aux_loss_coef, decoder_sparse_step=cfg.decoder_sparse_step,
                  mlp_only_layers=list(cfg.mlp_only_layers), output_router_logits=False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)
    return hf
