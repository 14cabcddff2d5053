"""LoRA and DoRA as a module swap on an already-built model, the merge back, and adapter state dicts.

Shape legend: I in features, O out features, r rank.

`apply_lora` replaces each targeted `nn.Linear` by a `LoraLinear` that keeps the frozen base
parameters under their own names (`...q_proj.weight`, `...q_proj.bias`) and adds ordinary
submodules and parameters beside them:

    ...q_proj.lora_A.weight          [r, I]   kaiming-uniform, as PEFT initialises it
    ...q_proj.lora_B.weight          [O, r]   zero, so a fresh adapter leaves the model unchanged
    ...q_proj.lora_magnitude_vector  [O]      DoRA only: the row norms of the base weight

These are PEFT's names minus its `base_model.model.` prefix and adapter name, so converting to a
PEFT adapter file is a prefix (`shoal.peft.adapter`). Nothing here uses hooks or wrappers:
`fully_shard` and DCP see plain parameters, and a model built on the meta device can be swapped,
sharded, materialised, loaded and only then initialised with `init_lora_weights`.

The maths follows PEFT (`peft/tuners/lora/layer.py`, `dora.py`):

    LoRA:  y = x Wᵀ + b + s · B A drop(x),                         s = alpha / r
    DoRA:  y = m / ‖W + s·B A‖ ⊙ (x Wᵀ + s · B A x) + b           (row norms, no gradient through them)

with dropout, DoRA feeds the dropped input to the adapter path only:
    y = x Wᵀ + (m/‖·‖ - 1) ⊙ drop(x) Wᵀ + m/‖·‖ ⊙ s · B A drop(x) + b.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from shoal.errors import ShoalError
from shoal.models.fused_linear import Projection
from shoal.peft.config import ALL_LINEAR, LoraConfig
from shoal.peft.experts import (
    EXPERT_PROJECTIONS,
    adapter_module_of,
    apply_expert_lora,
    expert_adapters,
    grouped_weight_of,
    merge_expert_lora,
)
from shoal.peft.tensor_parallel import lora_style

# Name endings of adapter tensors, in shoal's and (after the prefix) PEFT's naming.
ADAPTER_SUFFIXES: tuple[str, ...] = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

# Wrappers that insert themselves into parameter names (activation checkpointing, torch.compile,
# FSDP1); adapter state dicts are keyed without them so they match the checkpoint's model keys.
_WRAPPER_PARTS: tuple[str, ...] = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def clean_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B A‖ per output row [O], computed and returned in fp32.

    Computed without gradient: DoRA (section 4.3 of the paper, and PEFT) treats it as a constant.
    Kept in fp32 whatever W's dtype: it divides the fp32 magnitude, and a frozen base stored in
    bf16 would otherwise round every row's scale m/‖·‖ by up to 0.4%, in steps as B A moves.
    """
    combined = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(combined, dim=1)


@torch.no_grad()
def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain weight [O, I] equal to an adapted layer: W + s·B A, or for DoRA that matrix with
    each row rescaled to the learned magnitude. Computed in fp32, returned in W's dtype."""
    combined = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        combined = combined * (magnitude.float() / torch.linalg.vector_norm(combined, dim=1))[:, None]
    return combined.to(weight.dtype)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (and DoRA's magnitude vector).

    Not a subclass of `nn.Linear` on purpose: code that swaps or shards `nn.Linear` by type
    (tensor-parallel styles, float8 conversion) must not mistake it for a plain matmul.
    `replaces_linear` tells the model's `init_weights` to initialise `weight`/`bias` as a linear
    layer's (docs/model-contract.md); the adapters start in `reset_lora_parameters`.
    """

    replaces_linear = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, use_dora: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        self.scaling = alpha / rank
        # The base layer's own Parameter objects: same names, same storage, still tied if tied.
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = (
            nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None
        )
        # How the frozen base weight is applied: F.linear, or an FP8 matmul that
        # shoal.distributed.float8 sets (a plain callable, so parameter names do not change).
        self.base_linear = F.linear
        if not base.weight.is_meta:
            self.reset_lora_parameters()

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default start: A like nn.Linear's own init, B zero, DoRA magnitude = ‖W‖ per row,
        so the layer computes exactly the base layer until training moves it.

        A is drawn whole on the CPU (from `generator`, else the global stream) and then cut to this
        rank's shard: drawn into a sharded DTensor, every rank would fill its shard with the start
        of its own copy of the stream, and the adapters would depend on the parallel layout."""
        a = self.lora_A.weight
        whole_a = torch.empty(a.shape, dtype=a.dtype)
        nn.init.kaiming_uniform_(whole_a, a=math.sqrt(5), generator=generator)
        _copy_whole_into(a, whole_a)
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_magnitude_vector is not None:
            norm = dora_weight_norm(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
            self.lora_magnitude_vector.copy_(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropping = self.training and self.dropout_p > 0
        x_adapter = self.lora_dropout(x) if dropping else x
        lora = self.lora_B(self.lora_A(x_adapter)) * self.scaling
        if self.lora_magnitude_vector is None:
            return self.base_linear(x, self.weight, self.bias) + lora
        norm = dora_weight_norm(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
        magnitude = self.lora_magnitude_vector
        # [O], in the magnitude's dtype (fp32 masters, or bf16 under FSDP's mixed precision), so the
        # output keeps the dtype it had; the gradient reaches the magnitude only.
        scale = magnitude / norm.to(magnitude.dtype)
        base = self.base_linear(x, self.weight)
        if dropping:
            out = base + (scale - 1) * self.base_linear(x_adapter, self.weight) + scale * lora
        else:
            out = scale * (base + lora)
        out = out.to(base.dtype)  # the fp32 magnitude must not promote bf16 activations (PEFT casts back too)
        return out if self.bias is None else out + self.bias

    def can_fuse(self) -> bool:
        """Whether `fused_projection` can ever describe this layer, so its frozen base is worth
        packing with its group's (`shoal.models.fused_linear.pack_frozen_groups`): not for DoRA
        (its norm scales the whole output), an FP8 base (`base_linear` is not F.linear) or a
        subclass with a forward of its own. Dropout only declines while training, so it does not count."""
        return type(self) is LoraLinear and not self.use_dora and self.base_linear is F.linear

    def fused_projection(self) -> Projection | None:
        """What this layer computes, for `shoal.models.fused_linear.project` to fuse with the
        layers that read the same input; None where fusing would not compute `forward`: where it
        cannot fuse at all (`can_fuse`), and under active dropout (the adapter reads another input)."""
        if not self.can_fuse() or (self.training and self.dropout_p > 0):
            return None
        return Projection(self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing what this layer computes in eval mode (bias shared)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        weight = merged_weight(
            self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.lora_magnitude_vector
        )
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def tensor_parallel_style(self, style: ParallelStyle, compiled: bool) -> ParallelStyle:
        """How tensor parallelism splits this layer where the model's plan says `style` (the
        `SplitsItself` protocol of shoal.distributed.plan): the LoRA version of that style."""
        return lora_style(style, self.dropout_p, compiled)

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind} rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}"
        )


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, module) of every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)  # a fresh module is in train mode; keep the model's mode
    setattr(parent, child, new)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | tuple[str, ...] | list[str] = ALL_LINEAR,
    use_dora: bool = False,
) -> nn.Module:
    """Swap every targeted linear layer for a LoRA (or DoRA) one and freeze all other parameters.

    Target names may be HF's (`q_proj`), NeMo's (`linear_qkv`) or `all-linear` (see
    `shoal.peft.config`). The default targets every linear layer of each block, as NeMo's LoRA does.
    On a mixture-of-experts model, gate_proj/up_proj/down_proj also adapt the routed experts'
    grouped weights, each expert its own adapter (`shoal.peft.experts`).
    On the meta device the adapters are left uninitialised: call `init_lora_weights` once the
    model is materialised and its base weights are loaded (DoRA starts from their norms).
    Returns the same model object, changed in place.
    """
    cfg = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, use_dora=use_dora)
    if any(True for _ in lora_modules(model)) or expert_adapters(model):
        raise ShoalError("the model already carries LoRA adapters; merge_lora() it before applying new ones")
    targets = set(cfg.target_modules)
    expert_targets = _expert_targets(model, cfg)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets
    ]
    if not chosen and not expert_targets:
        raise ShoalError(
            f"no linear layer of the model is named one of {sorted(targets)}; "
            f"the model's linear layers end in {sorted(_linear_leaf_names(model))}"
        )
    for name, module in chosen:
        _replace(model, name, LoraLinear(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_dora))
    apply_expert_lora(model, expert_targets, cfg.rank, cfg.alpha)
    if not any(p.is_meta for p in model.parameters()):
        for _, adapter in expert_adapters(model):
            adapter.reset_lora_parameters()
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    return model


def _expert_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The routed experts' projections to adapt (none for a dense model), after refusing what
    PEFT could not load or compute: DoRA or dropout on experts, gate without up or the reverse."""
    from shoal.models.moe import GroupedExperts

    mlp = [name for name in EXPERT_PROJECTIONS if name in cfg.target_modules]
    if not mlp or not any(isinstance(m, GroupedExperts) for m in model.modules()):
        return []
    named = ", ".join(mlp)
    if cfg.use_dora:
        raise ShoalError(f"target_modules {named}: DoRA on the routed experts of a mixture-of-experts model is not "
                         "supported (nor by PEFT); use LoRA, or target the attention projections only: q_proj, "
                         "k_proj, v_proj, o_proj (NeMo's linear_qkv, linear_proj)")
    if cfg.dropout > 0:
        raise ShoalError(f"target_modules {named}: LoRA dropout ({cfg.dropout:g}) on the routed experts is not "
                         "supported (nor by PEFT: the adapters are folded into the grouped weights); set "
                         "peft.dropout=0, or target the attention projections only")
    if ("gate_proj" in mlp) != ("up_proj" in mlp):
        raise ShoalError(f"target_modules {named}: the experts' gate_proj and up_proj are one fused weight in "
                         "Hugging Face's Qwen3-MoE (gate_up_proj), which PEFT adapts whole; target both "
                         "(NeMo's linear_fc1) or neither")
    return mlp


def _linear_leaf_names(model: nn.Module) -> set[str]:
    return {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def init_lora_weights(model: nn.Module, seed: int | None = None) -> None:
    """(Re)initialise every adapter to its starting values; for a model built on the meta device,
    call it after `to_empty()` and after the base weights are loaded.

    With `seed`, each layer draws from a generator seeded by `seed` and the layer's name, so a
    pipeline stage holding only some layers gives them the values one process would: the adapters
    then start the same in every layout."""
    for name, module in [*lora_modules(model), *expert_adapters(model)]:
        generator = None if seed is None else torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        module.reset_lora_parameters(generator)


def _copy_whole_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a full-size tensor into `param`, or into this rank's shard of it when it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(param.device)
    if isinstance(param, DTensor):
        # Every rank holds the same whole tensor: each keeps its own piece, no communication.
        whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(whole)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `nn.Linear` layers back, so the
    model's state dict has exactly the original HF keys. Parameters keep requires_grad as they
    were (frozen by `apply_lora`). Run on an unsharded model; for a gathered state dict use
    `merge_adapter_state_dict`. Returns the same model object, changed in place."""
    for name, module in list(lora_modules(model)):
        _replace(model, name, module.merged())
    merge_expert_lora(model)
    return model


def lora_config_dict(model: nn.Module) -> dict:
    """The adapter settings of a model carrying adapters (the content of `peft.json`)."""
    layers = [*lora_modules(model), *expert_adapters(model)]
    if not layers:
        raise ShoalError("the model carries no LoRA adapters")
    settings = {(m.rank, m.alpha, m.dropout_p, m.use_dora) for _, m in layers}
    if len(settings) > 1:
        raise ShoalError(f"the model's adapters differ in (rank, alpha, dropout, use_dora): {sorted(settings)}")
    rank, alpha, dropout, use_dora = settings.pop()
    targets = sorted({n.rpartition(".")[2] for n, _ in layers})
    return LoraConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=targets, use_dora=use_dora).to_dict()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 / tensor parallel) gathered to the whole tensor; a collective, so every rank calls it."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed by shoal's (HF-style) names, detached and unsharded.

    Under FSDP2 or tensor parallel every rank must call it (the gather is a collective).
    """
    return {
        clean_name(name): _full(param.detach())
        for name, param in model.named_parameters()
        if is_adapter_key(name)
    }


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], where: str = "adapter state dict"
) -> None:
    """Copy adapter tensors into a model that carries adapters; the key sets must match exactly."""
    params = {clean_name(n): p for n, p in model.named_parameters() if is_adapter_key(n)}
    if not params:
        raise ShoalError("the model carries no LoRA adapters; apply_lora() it before loading adapter weights")
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ShoalError(
            f"{where}: adapter keys do not match the model's; missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    for name, param in params.items():
        value = state[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ShoalError(f"{where}: {name} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
        value = value.to(device=param.device, dtype=param.dtype)
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:  # a DTensor parameter: hand each rank its own shard
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value, mesh, param.placements)
        param.copy_(value)


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def base_weight_name(adapter_module: str) -> str:
    """The weight an adapter module adapts: `...q_proj` -> `...q_proj.weight`,
    `...experts.lora.gate_proj` -> the grouped `...experts.gate_proj`."""
    return grouped_weight_of(adapter_module) or adapter_module + ".weight"


def adapter_module_for(weight_name: str) -> str:
    """The inverse of `base_weight_name`: where the adapters of a weight would be."""
    return adapter_module_of(weight_name) or weight_name.removesuffix(".weight")


def split_adapter_key(name: str) -> tuple[str, str]:
    """`model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, `lora_A.weight`)."""
    for suffix in ADAPTER_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    raise ShoalError(f"{name!r} is not an adapter tensor name (expected one ending in {', '.join(ADAPTER_SUFFIXES)})")


def group_adapter_tensors(
    state: Mapping[str, torch.Tensor], config: LoraConfig, where: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter tensors grouped by the layer they adapt, checked for completeness, rank, shapes and
    targets against `config`. Non-adapter keys are ignored."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if is_adapter_key(name):
            module, suffix = split_adapter_key(name)
            layers.setdefault(module, {})[suffix] = tensor
    for module, parts in layers.items():
        leaf = module.rpartition(".")[2]
        if leaf not in config.target_modules:
            raise ShoalError(f"{where}: adapter for {module}, but {leaf!r} is not among the target modules "
                             f"{list(config.target_modules)}")
        needed = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if config.use_dora else set())
        if set(parts) != needed:
            raise ShoalError(f"{where}: {module} has adapter tensors {sorted(parts)}, expected {sorted(needed)} "
                             f"(use_dora={config.use_dora})")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if grouped_weight_of(module) is not None:  # the routed experts': one adapter per expert
            if config.use_dora:
                raise ShoalError(f"{where}: {module}: DoRA on the routed experts is not supported")
            if (a.dim() != 3 or b.dim() != 3 or a.shape[1] != config.rank or b.shape[2] != config.rank
                    or a.shape[0] != b.shape[0]):
                raise ShoalError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                 f"expected [experts, r, in] and [experts, out, r] with r={config.rank}")
        elif a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise ShoalError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             f"expected [r, in] and [out, r] with r={config.rank}")
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
            raise ShoalError(f"{where}: {module}.lora_magnitude_vector has shape {tuple(magnitude.shape)}, "
                             f"expected ({b.shape[0]},)")
    return layers


def merge_adapter_state_dict(
    state: Mapping[str, torch.Tensor], config: LoraConfig, where: str = "state dict"
) -> dict[str, torch.Tensor]:
    """A full state dict (base + adapter tensors, shoal names) -> the merged HF state dict.

    The path for exporting a checkpoint without building the model: same maths as `merge_lora`.
    """
    layers = group_adapter_tensors(state, config, where)
    merged = {name: tensor for name, tensor in state.items() if not is_adapter_key(name)}
    for module, parts in layers.items():
        key = base_weight_name(module)
        if key not in merged:
            raise ShoalError(f"{where}: adapter tensors for {module} but no base weight {key}")
        weight, a, b = merged[key], parts["lora_A.weight"], parts["lora_B.weight"]
        update_shape = (*b.shape[:-1], a.shape[-1])  # [out, in], or [experts, out, in]
        if update_shape != tuple(weight.shape):
            raise ShoalError(f"{where}: {module} adapters give a {list(update_shape)} update "
                             f"for a weight of shape {tuple(weight.shape)}")
        merged[key] = merged_weight(weight, a, b, config.scaling, parts.get("lora_magnitude_vector"))
    return merged
