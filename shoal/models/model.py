"""The decoder-only transformer behind every family shoal supports, in plain single-device PyTorch.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim, E hidden size,
V vocabulary.

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE uses
HF's rotate-half convention, so converting a checkpoint is a rename at most (see `shoal.convert`).
Nothing here knows about parallelism; `docs/model-contract.md` lists the few concessions that let
`shoal.distributed` split it from outside:

* layers live in a `ModuleDict` keyed by their index, so names survive when a pipeline stage drops some;
* `embed_tokens`, `norm` and `lm_head` may be set to None on pipeline stages that do not own them;
  the forward pass then takes or returns hidden states;
* reshapes use `-1` for the head count, so a tensor-parallel shard with fewer local heads just works.

Generation passes a `KVCache` to `forward` (prefill, then one token per step); training passes none
and runs exactly the code it ran before the cache existed: one `is None` test per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shoal.models.config import ModelConfig
from shoal.models.document_attention import DocumentSpans, document_attention_spec, varlen_causal_attention
from shoal.models.fused_linear import project
from shoal.models.moe import GroupedExperts, MoE, Router, load_balancing_loss


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 and scaled in the input dtype, as Hugging Face does it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inverse_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The RoPE inverse frequencies [D/2], with Llama 3.1's long-context scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    # llama3 scaling: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [B, 1, S, D]."""
    return x * cos + rotate_half(x) * sin


class LayerCache:
    """One layer's keys and values [B, K, L, D] in buffers preallocated for the whole generation."""

    def __init__(self, owner: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.owner, self.keys, self.values = owner, keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, K, S, D]; return every key and value so far [B, K, start+S, D]."""
        start, end = self.owner.length, self.owner.length + k.shape[2]
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of the tokens already seen, so that each new token costs one position.

    Rows of a batch may hold prompts of different lengths, left-padded: `attention_mask` marks the
    real tokens, padding is never attended to, and each row's positions count its real tokens only
    (as Hugging Face's generate does), so a padded row computes what it computes alone.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype):
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        self.layers = {
            str(i): LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype))
            for i in range(cfg.num_layers)
        }
        self.max_length = max_length
        self.length = 0  # positions filled, the same for every row (padding included)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)  # real tokens
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)

    def begin(self, attention_mask: torch.Tensor | None, s: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record S new tokens (attention_mask [B, S], True for real ones); return their positions
        [B, S] and the attention mask [B, 1, S, start+S] (None where plain causal attention is right)."""
        b, start, end = self.valid.shape[0], self.length, self.length + s
        if end > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} positions; {end} requested")
        device = self.valid.device
        real = torch.ones(b, s, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        self.valid[:, start:end] = real
        positions = self.next_position[:, None] + real.long().cumsum(1) - 1
        positions = positions.clamp(min=0)  # padding before a row's first token: any valid position
        self.next_position += real.long().sum(1)
        if start == 0 and (attention_mask is None or bool(real.all())):  # (no device sync when unpadded)
            return positions, None  # a first chunk without padding: causal attention as in training
        query = torch.arange(start, end, device=device)
        key = torch.arange(end, device=device)
        causal = key[None, :] <= query[:, None]  # [S, start+S]
        # Padding is never a key, except for itself: a padding query must see something (no NaN).
        visible = self.valid[:, None, :end] | (key[None, None, :] == query[None, :, None])
        return positions, (causal[None] & visible)[:, None]

    def advance(self, s: int) -> None:
        self.length += s


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d = cfg.hidden_size, cfg.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(e, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(e, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(e, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, e, bias=False)
        # Qwen3 normalises each head of q and k before RoPE.
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def projection_groups(self) -> list[list[nn.Module]]:
        """The layers `forward` passes to one `project` call: their frozen weights may be stored
        as one buffer (shoal.models.fused_linear.pack_frozen_groups)."""
        return [[self.q_proj, self.k_proj, self.v_proj]]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | DocumentSpans | None,
        kv: LayerCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        # One matmul for the three where that computes the same (shoal.models.fused_linear). Fused
        # without adapters they are views of one buffer: attention saves v (and the q/k norms, in
        # fp32, q and k), which would keep all of it alive; own copies keep what unfused keeps.
        q, k, v = (t.contiguous() for t in project([self.q_proj, self.k_proj, self.v_proj], x))
        q = q.view(b, s, -1, self.head_dim)  # [B, S, H, D]
        k = k.view(b, s, -1, self.head_dim)  # [B, S, K, D]
        v = v.view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)
        if isinstance(mask, DocumentSpans):
            return self.o_proj(varlen_causal_attention(q, k, v, mask).reshape(b, s, -1))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def projection_groups(self) -> list[list[nn.Module]]:
        """As Attention's: the layers `forward` passes to `project`."""
        return [[self.gate_proj, self.up_proj]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project([self.gate_proj, self.up_proj], x)  # one matmul where possible
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Qwen3-MoE: routed experts in the layers the config makes sparse (shoal.models.moe).
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | DocumentSpans | None,
        kv: LayerCache | None = None,
    ) -> torch.Tensor:
        # kv by keyword: tensor-parallel input plans describe the four positional inputs only.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv=kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, layers and final norm: HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """A causal language model: token ids [B, S] -> logits [B, S, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Not persistent: derived from the config, rebuilt by init_buffers() after `to_empty`.
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def tie_weights(self) -> None:
        """Make the output head share the embedding's Parameter (Llama 3.2 1B/3B, small Qwen)."""
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device, recurse: bool = True):
        # Materialising converts each module's parameters separately, which unties shared ones.
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute derived buffers; call after `to_empty()` on a model built on the meta device."""
        self.inv_freq.copy_(rope_inverse_frequencies(self.config, device=self.inv_freq.device))

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place initial values are set: HF's normal(0, initializer_range), zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            # A module swapped in for an nn.Linear from outside (LoRA's) keeps `weight`/`bias` and
            # sets `replaces_linear`; without this its base weight would stay as `to_empty` left it.
            if isinstance(module, (nn.Linear, nn.Embedding)) or getattr(module, "replaces_linear", False):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (Router, GroupedExperts)):
                module.reset_parameters(std)
        self.init_buffers()

    def moe_blocks(self) -> list[MoE]:
        """The sparse layers' MoE blocks (none in a dense model), in layer order."""
        return [layer.mlp for layer in self.model.layers.values() if isinstance(layer.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last forward's routing (None for a dense model or stage);
        training adds `router_aux_loss_coef` times it to the loss."""
        return load_balancing_loss(self.moe_blocks())

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, S, D] for the given positions, computed in fp32 as HF does."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        head: bool = True,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: ids [B, S], or hidden states [B, S, E] on a pipeline stage without the embedding.

        position_ids [B, S] default to 0..S-1; pass them restarting per document for packed sequences.
        document_ids [B, S], when given, keep tokens from attending across documents.
        cu_seqlens [N + 1] int32, optional with document_ids: their document starts over the rows laid
        end to end (`shoal.models.document_attention.host_cu_seqlens`), computed on the host, so the
        varlen path finds no boundaries on the device (a sync); the dense-mask path ignores them.
        cache (generation): the tokens follow those already in it; positions come from it, and
        attention_mask [B, S] (True for real tokens) marks left padding.
        head=False stops before `lm_head` (a loss that applies it itself, chunk by chunk).
        Returns logits [B, S, V], or hidden states on a stage without `lm_head` or with head=False.
        """
        emb = self.model.embed_tokens
        h = emb(tokens) if emb is not None else tokens
        b, s = h.shape[:2]
        mask = None
        if cache is not None:
            position_ids, mask = cache.begin(attention_mask, s)
        elif position_ids is None:
            position_ids = torch.arange(s, device=h.device)[None].expand(b, s)
        cos, sin = self.rope(position_ids, h.dtype)
        if document_ids is not None:
            mask = document_attention_spec(document_ids, h, self.config.head_dim, cu_seqlens)
        for name, layer in self.model.layers.items():
            h = layer(h, cos, sin, mask, kv=cache.layers[name] if cache is not None else None)
        if cache is not None:
            cache.advance(s)
        if self.model.norm is not None:
            h = self.model.norm(h)
        return self.lm_head(h) if self.lm_head is not None and head else h


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", init: bool = True) -> Transformer:
    """Build on the meta device (no memory), materialise on `device`, then initialise once.

    With init=False the weights are left uninitialised for a checkpoint load to fill.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        model.init_buffers()
    return model
