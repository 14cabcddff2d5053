"""One two-way Hugging Face adapter per model family: names, expected shapes, transforms.

shoal's model uses Hugging Face's parameter names and rotate-half RoPE, so for the families here
the key map is the identity and no tensor needs transforming: no q/k permutation (HF checkpoints
already hold rotate-half weights), no fused qkv or gate/up. The adapter is still the one place
that knows this, so that a family that does need a rename or a transform (a fused projection, a
different norm layout) changes only its own adapter, and every import, export and online load
goes through the same checks:

* every weight the model needs is present, with the shape its ModelConfig implies;
* nothing unexpected is silently dropped (a weight the model would ignore means a wrong model);
* a tied `lm_head.weight` is not stored (HF omits it; `model.embed_tokens.weight` serves both).

Mixture-of-experts families store one tensor per expert in Hugging Face checkpoints
(`mlp.experts.{x}.gate_proj.weight`, as the Hub's Qwen3-30B-A3B and `save_pretrained` write them)
and one grouped `[X, out, in]` tensor per projection in shoal (`mlp.experts.gate_proj`). The
adapter sees the Hugging Face side through `group_experts`, which stacks the per-expert entries
into the grouped name; `expert_members` and `split_experts` say which on-disk tensors a grouped
one is made of, for the importer to stack and the exporter to slice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.checkpoint.format import TensorInfo
from shoal.errors import ShoalError
from shoal.models.config import ModelConfig
from shoal.models.shapes import weight_shapes

if TYPE_CHECKING:  # torch only for annotations: names, plans and checks run without it
    import torch

    Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor]

_LAYER = re.compile(r"(?<=\.layers\.)\d+(?=\.)")

# HF name -> shoal name for the parts every family shares; "{}" stands for the layer index.
_DECODER_KEYS = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_QKV_BIAS_KEYS = {
    "model.layers.{}.self_attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
}
_QK_NORM_KEYS = {
    "model.layers.{}.self_attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}

# Buffers some older HF checkpoints saved; derived from the config, so safe to skip on import.
_DERIVED_HF_KEYS = ("model.rotary_emb.inv_freq", "model.layers.{}.self_attn.rotary_emb.inv_freq")

# Qwen3-MoE: the grouped shoal tensors, named the same on the adapter's HF side (see group_experts).
_ROUTER_KEYS = {"model.layers.{}.mlp.gate.weight": "model.layers.{}.mlp.gate.weight"}
_GROUPED_EXPERT_KEYS = {
    f"model.layers.{{}}.mlp.experts.{proj}": f"model.layers.{{}}.mlp.experts.{proj}"
    for proj in ("gate_proj", "up_proj", "down_proj")
}
# One expert's weight in a Hugging Face checkpoint -> (grouped name, expert index).
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _template(name: str) -> str:
    return _LAYER.sub("{}", name, count=1)


def _fill(template: str, name: str) -> str:
    """Put `name`'s layer index into `template`'s "{}"."""
    match = _LAYER.search(name)
    return template.format(match.group(0)) if match else template


class StateDictAdapter:
    """The two-way map for one family. Subclasses set `family` and `key_map`, and `transforms` if
    a tensor must change on the way (none do today); the inverse is derived, never written."""

    family: str = ""
    key_map: dict[str, str] = {}
    # HF template -> (HF tensor -> shoal tensor, shoal tensor -> HF tensor). Empty: see the module docstring.
    transforms: dict[str, tuple[Transform, Transform]] = {}
    # Matches a per-expert HF tensor name, for families whose experts shoal groups (None: no experts).
    per_expert: re.Pattern | None = None

    def __init__(self, cfg: ModelConfig):
        if cfg.family != self.family:
            raise ValueError(f"{type(self).__name__} is for {self.family}, not {cfg.family}")
        self.cfg = cfg
        self.inverse = {shoal: hf for hf, shoal in self.key_map.items()}
        if len(self.inverse) != len(self.key_map):
            raise ValueError(f"{type(self).__name__}.key_map is not one-to-one")
        self._expected = self._expected_shoal_shapes()

    def _expected_shoal_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the model's weights, from the config without torch (`weight_shapes`,
        tested against the model built on the meta device for every preset)."""
        shapes = {}
        for name, shape in weight_shapes(self.cfg).items():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # stored once, as model.embed_tokens.weight
            if _template(name) not in self.inverse:
                raise ValueError(f"{type(self).__name__}: model parameter {name} has no entry in key_map")
            shapes[name] = shape
        return shapes

    # -- names -------------------------------------------------------------------------------
    def to_shoal_name(self, hf_name: str) -> str | None:
        template = self.key_map.get(_template(hf_name))
        return _fill(template, hf_name) if template is not None else None

    def to_hf_name(self, shoal_name: str) -> str | None:
        template = self.inverse.get(_template(shoal_name))
        return _fill(template, shoal_name) if template is not None else None

    # -- tensors -----------------------------------------------------------------------------
    def to_shoal(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        transform = self.transforms.get(_template(hf_name))
        return transform[0](tensor, self.cfg) if transform else tensor

    def to_hf(self, shoal_name: str, tensor: torch.Tensor) -> torch.Tensor:
        transform = self.transforms.get(self.inverse.get(_template(shoal_name), ""))
        return transform[1](tensor, self.cfg) if transform else tensor

    def keeps_bytes(self, hf_name: str) -> bool:
        """Whether the tensor is stored as the file holds it (no transform, no stacking of experts),
        so a conversion may copy its bytes without reading them into memory."""
        return _template(hf_name) not in self.transforms and self.expert_members(hf_name) is None

    def copies_bytes(self, hf_name: str) -> bool:
        """Whether the stored tensor is the file's bytes, or its experts' bytes one after another
        (stacking along a new first dimension moves no byte), so an import may copy it as it lies."""
        return _template(hf_name) not in self.transforms

    # -- grouped experts ---------------------------------------------------------------------
    def group_experts(self, found: dict[str, TensorInfo], where: str | Path) -> dict[str, TensorInfo]:
        """An HF checkpoint's tensors with each projection's per-expert tensors replaced by one
        grouped entry [X, out, in] (the experts must be 0..X-1, of one shape and dtype)."""
        if self.per_expert is None:
            return dict(found)
        grouped: dict[str, dict[int, str]] = {}
        view: dict[str, TensorInfo] = {}
        for name, info in found.items():
            match = self.per_expert.match(name)
            if match is None:
                view[name] = info
                continue
            grouped.setdefault(f"{match.group(1)}.{match.group(3)}", {})[int(match.group(2))] = name
        self._members = {}
        for group, by_index in grouped.items():
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if missing:
                raise ShoalError(f"{where}: experts {missing} of {group} are missing from the checkpoint")
            names = [by_index[i] for i in range(len(by_index))]
            first = found[names[0]]
            for name in names[1:]:
                if (found[name].shape, found[name].dtype) != (first.shape, first.dtype):
                    raise ShoalError(f"{where}: tensor {name} is {list(found[name].shape)} {found[name].dtype}, "
                                     f"but {names[0]} is {list(first.shape)} {first.dtype}; experts must agree")
            view[group] = TensorInfo((len(names), *first.shape), first.dtype)
            self._members[group] = names
        return view

    def expert_members(self, hf_name: str) -> list[str] | None:
        """The on-disk per-expert tensors, in expert order, that `group_experts` stacked into `hf_name`."""
        return getattr(self, "_members", {}).get(hf_name)

    def split_experts(self, hf_name: str, num_experts: int) -> list[tuple[str, int | None]]:
        """The on-disk tensors an export writes for `hf_name`: (name, expert index) per expert of a
        grouped tensor, else (hf_name, None)."""
        if self.per_expert is None or not hf_name.endswith(("experts.gate_proj", "experts.up_proj",
                                                           "experts.down_proj")):
            return [(hf_name, None)]
        prefix, _, proj = hf_name.rpartition(".")
        return [(f"{prefix}.{x}.{proj}.weight", x) for x in range(num_experts)]

    # -- validation --------------------------------------------------------------------------
    def expected_shoal(self) -> dict[str, tuple[int, ...]]:
        """{shoal name: shape} of every tensor a checkpoint of this model stores, in model order."""
        return dict(self._expected)

    def expected_hf(self) -> dict[str, tuple[int, ...]]:
        """{HF name: shape} of every tensor an HF checkpoint of this model stores, in HF order."""
        return {self.to_hf_name(name): shape for name, shape in self._expected.items()}

    def import_plan(self, found: dict[str, TensorInfo], where: str | Path) -> dict[str, str]:
        """Check an HF checkpoint's tensors {HF name: info}; return {shoal name: HF name} to import."""
        expected = self.expected_hf()
        derived = {t for t in _DERIVED_HF_KEYS}
        unexpected = sorted(
            name for name in found
            if name not in expected and _template(name) not in derived
            and not (name == "lm_head.weight" and self.cfg.tie_word_embeddings)  # tied: HF ignores it too
        )
        _check(found, expected, unexpected, where, "the Hugging Face checkpoint", self.cfg)
        return {self.to_shoal_name(hf): hf for hf in expected}

    def export_plan(self, found: dict[str, TensorInfo], where: str | Path) -> dict[str, str]:
        """Check a shoal checkpoint's tensors {shoal name: info}; return {HF name: shoal name}, in HF order."""
        expected = self.expected_shoal()
        unexpected = sorted(name for name in found if name not in expected
                            and not (name == "lm_head.weight" and self.cfg.tie_word_embeddings))
        _check(found, expected, unexpected, where, "the shoal checkpoint", self.cfg)
        return {self.to_hf_name(name): name for name in expected}


def _check(found: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], unexpected: list[str],
           where: str | Path, what: str, cfg: ModelConfig) -> None:
    def listing(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    missing = [name for name in expected if name not in found]
    if missing:
        raise ShoalError(f"{where}: {what} lacks {len(missing)} tensor(s) the {cfg.family} config needs: "
                         f"{listing(missing)}")
    for name, shape in expected.items():
        if found[name].shape != shape:
            raise ShoalError(f"{where}: tensor {name} has shape {list(found[name].shape)}, but the config "
                             f"implies {list(shape)}")
        if not found[name].dtype.is_floating_point:
            raise ShoalError(f"{where}: tensor {name} is {found[name].dtype}; shoal expects floating-point "
                             "weights (quantized checkpoints are not supported)")
    if unexpected:
        raise ShoalError(f"{where}: {what} holds {len(unexpected)} tensor(s) a {cfg.family} model with this "
                         f"config does not use: {listing(unexpected)}")


class LlamaAdapter(StateDictAdapter):
    """Llama 3.x (tied embeddings in 3.2 1B/3B; llama3 RoPE scaling lives in the config, not the weights)."""

    family = "llama"
    key_map = dict(_DECODER_KEYS)


class MistralAdapter(StateDictAdapter):
    """Mistral: Llama's layout under another name."""

    family = "mistral"
    key_map = dict(_DECODER_KEYS)


class Qwen2Adapter(StateDictAdapter):
    """Qwen2/2.5: biases on the q, k and v projections."""

    family = "qwen2"
    key_map = {**_DECODER_KEYS, **_QKV_BIAS_KEYS}


class Qwen3Adapter(StateDictAdapter):
    """Qwen3 dense: per-head RMSNorm of q and k (weights [head_dim]); q/k/v biases only if configured."""

    family = "qwen3"
    key_map = {**_DECODER_KEYS, **_QKV_BIAS_KEYS, **_QK_NORM_KEYS}


class Qwen3MoeAdapter(StateDictAdapter):
    """Qwen3-MoE: Qwen3's attention; sparse layers hold a router (`mlp.gate.weight`) and per-expert
    SwiGLU weights that shoal stacks into grouped tensors (no transform beyond the stacking); dense
    layers (`mlp_only_layers`, `decoder_sparse_step`) keep the dense MLP's names."""

    family = "qwen3_moe"
    key_map = {**_DECODER_KEYS, **_QKV_BIAS_KEYS, **_QK_NORM_KEYS, **_ROUTER_KEYS, **_GROUPED_EXPERT_KEYS}
    per_expert = _PER_EXPERT


ADAPTERS: dict[str, type[StateDictAdapter]] = {
    cls.family: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Qwen3MoeAdapter)
}


def get_adapter(cfg: ModelConfig) -> StateDictAdapter:
    """The adapter for a config's family."""
    if cfg.family not in ADAPTERS:
        raise ShoalError(f"no Hugging Face adapter for model family {cfg.family!r}")
    return ADAPTERS[cfg.family](cfg)
