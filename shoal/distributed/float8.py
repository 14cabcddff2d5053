"""FP8 training through torchao: the seed's `--fp8`/`--fp8_recipe` resolved to a torchao recipe,
the checks that refuse what cannot work, and the conversion of a built model's linear layers.

FP8 is a way of computing, not of storing. `apply_float8` swaps each `nn.Linear` worth it for
torchao's `Float8Linear`, a subclass that keeps the same `weight`/`bias` Parameters, so the state
dict keeps its names, shapes and dtypes and a checkpoint moves freely between FP8 and BF16 runs.
The output head is never converted (its logits feed the loss and are the most sensitive matmul);
nor are linears too small for FP8 to pay for its casts. LoRA/DoRA layers keep their adapters in
the training dtype and compute only the frozen base matmul in FP8 (`FrozenFloat8Linear`).

torchao is an optional extra (`pip install 'shoal[fp8]'`), imported only inside the functions
that need it; everything above `apply_float8` works without it, which is what CI tests.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal.errors import ShoalError

# torchao's own recipe names (Float8LinearConfig.from_recipe_name).
TORCHAO_RECIPES: tuple[str, ...] = ("tensorwise", "rowwise", "rowwise_with_gw_hp")

# The seed's (NeMo / Transformer Engine) recipe names -> the nearest torchao recipe, and why.
SEED_RECIPES: dict[str, tuple[str, str]] = {
    "delayed_scaling": (
        "tensorwise",
        "NeMo's delayed scaling (scales from an amax history) has no torchao equivalent any more; "
        "tensorwise dynamic scaling (scales from the current tensor) is the nearest",
    ),
    "current_scaling": ("tensorwise", "NeMo's per-tensor current scaling is torchao's tensorwise recipe"),
    "subchannel_scaling": (
        "rowwise",
        "NeMo's sub-channel (block) scaling is closest to torchao's rowwise scaling (one scale per row)",
    ),
}
# NeMo's `fp8` values: "hybrid" (E4M3 forward, E5M2 gradients) and "e4m3" (E4M3 throughout).
FP8_FORMATS: tuple[str, ...] = ("hybrid", "e4m3")
TORCHAO_MIN_VERSION = (0, 17)
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores; Ampere does not


@dataclass(frozen=True)
class Float8Plan:
    """What `--fp8 ... --fp8_recipe ...` became: a torchao recipe and how to apply it."""

    recipe: str  # one of TORCHAO_RECIPES
    fp8_format: str  # one of FP8_FORMATS
    requested: str  # the recipe name the user gave (or the default)
    note: str | None = None  # how a seed name was mapped, for the log
    # FSDP2 all-gathers the weights already cast to FP8 (half the bytes of bf16); tensorwise only.
    fsdp_float8_all_gather: bool = False

    def describe(self) -> str:
        text = f"FP8 training with torchao's {self.recipe!r} recipe"
        if self.requested != self.recipe:
            text += f" (--fp8_recipe {self.requested}: {self.note})"
        if self.fp8_format == "e4m3" and self.recipe == "tensorwise":
            text += "; E4M3 for gradients too (--fp8 e4m3)"
        elif self.fp8_format == "hybrid" and self.recipe != "tensorwise":
            text += "; the rowwise recipes use E4M3 for gradients too (torchao's choice), not E5M2"
        if self.fsdp_float8_all_gather:
            text += "; FSDP2 all-gathers weights in FP8"
        return text


def resolve_float8_recipe(name: str | None) -> tuple[str, str | None]:
    """The torchao recipe for a seed or torchao recipe name (None: tensorwise), and the mapping note."""
    if name is None or name in TORCHAO_RECIPES:
        return name or "tensorwise", None
    if name in SEED_RECIPES:
        return SEED_RECIPES[name]
    if name == "mxfp8":
        raise ShoalError(
            "--fp8_recipe mxfp8: MXFP8 needs Blackwell tensor cores (compute capability 10.0) and is not "
            f"wired into shoal; on Hopper use one of {', '.join(TORCHAO_RECIPES)} "
            "(or the seed's delayed_scaling, current_scaling, subchannel_scaling)"
        )
    known = [*SEED_RECIPES, "mxfp8", *TORCHAO_RECIPES]
    raise ShoalError(f"--fp8_recipe {name!r}: expected one of {', '.join(known)}")


def float8_plan(fp8: str | None, fp8_recipe: str | None, fsdp_shard_size: int = 1) -> Float8Plan | None:
    """The plan for `train.fp8` / `train.fp8_recipe` (None when FP8 is off). Pure config: no torchao."""
    recipe, note = resolve_float8_recipe(fp8_recipe)  # a bad name is refused even without --fp8
    if fp8 is None or fp8 in ("", "none", "off"):
        return None
    if fp8 not in FP8_FORMATS:
        raise ShoalError(f"--fp8 {fp8!r}: expected {' or '.join(FP8_FORMATS)} (plain --fp8 means hybrid)")
    return Float8Plan(recipe, fp8, fp8_recipe or recipe, note,
                      fsdp_float8_all_gather=recipe == "tensorwise" and fsdp_shard_size > 1)


def torchao_version() -> tuple[int, ...] | None:
    """The installed torchao's (major, minor), or None when it is not installed."""
    try:
        text = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def check_torchao_installed() -> None:
    version = torchao_version()
    want = ".".join(map(str, TORCHAO_MIN_VERSION))
    if version is None:
        raise ShoalError(f"--fp8 needs torchao >= {want}, which is not installed: pip install 'shoal[fp8]'")
    if version < TORCHAO_MIN_VERSION:
        raise ShoalError(f"--fp8 needs torchao >= {want}; found {'.'.join(map(str, version))}: "
                         "pip install -U 'shoal[fp8]'")


def check_float8_device(device: torch.device) -> None:
    """FP8 matmuls need a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)."""
    if device.type != "cuda":
        raise ShoalError(f"--fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); this run is on "
                         f"{device.type}: drop --fp8")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ShoalError(
            f"--fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper); {torch.cuda.get_device_name(device)} "
            f"is {capability[0]}.{capability[1]}: drop --fp8 and train in bf16"
        )


# Below these sizes the casts to FP8 cost more than the faster matmul saves (torchao's measurements
# on H100 for a [16384, K] x [K, N] matmul, README "Performance"): (K, N) = (in, out) features.
def worth_float8(in_features: int, out_features: int, recipe: str) -> bool:
    """Whether a linear layer of this shape gains from FP8 (and can run it: dims divisible by 16)."""
    if in_features % 16 or out_features % 16:
        return False  # _scaled_mm's requirement
    if recipe == "tensorwise":
        return not (in_features <= 4096 and out_features <= 1024)
    # rowwise recipes: scales per row cost more, so the break-even shapes are larger
    if out_features <= 2048 or in_features <= 1024:
        return False
    return not (out_features <= 4096 and in_features <= 2048)


# Linear layers of one block that read the same input. Compiled, their FP8 casts of that input
# (amax, scale and cast, in the forward and again for the weight gradient) are one computation
# (AOTAutograd merges the identical subgraphs), so a member's own cost is only its output
# gradient's and its weight's casts. torchao's break-even sizes were measured for a lone matmul
# that casts its input itself; such a group is judged as the one matmul it shares a cast with:
# the input features by the summed output features. Llama's k/v projections (3B: 3072 -> 1024) are
# too narrow alone but not beside q (3072 -> 5120 together).
SHARED_INPUT_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
)


def float8_targets(model: nn.Module, recipe: str, shared_input_casts: bool = False) -> tuple[list[str], list[str]]:
    """(converted, skipped) names of the model's linear layers (plain or LoRA-adapted) under `recipe`.

    `shared_input_casts` (the model will be compiled): layers of a `SHARED_INPUT_GROUPS` group are
    judged by the group's summed output features; otherwise each alone, as torchao's auto filter.
    """
    from shoal.peft.lora import LoraLinear

    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, LoraLinear)) and not _is_adapter_part(name)}
    converted, skipped = [], []
    for name, module in linears.items():
        parent, _, leaf = name.rpartition(".")
        out = _group_out_features(linears, parent, leaf, module) if shared_input_casts else module.out_features
        keep = (leaf != "lm_head" and module.out_features % 16 == 0
                and worth_float8(module.in_features, out, recipe))
        (converted if keep else skipped).append(name)
    return converted, skipped


def _group_out_features(linears: dict[str, nn.Module], parent: str, leaf: str, module: nn.Module) -> int:
    """The summed output features of `module`'s shared-input group (its own when it has none):
    the group's members present beside it that read inputs of the same width."""
    group = next((g for g in SHARED_INPUT_GROUPS if leaf in g), None)
    if group is None:
        return module.out_features
    members = [linears.get(f"{parent}.{member}" if parent else member) for member in sorted(group)]
    return sum(m.out_features for m in members if m is not None and m.in_features == module.in_features)


def _is_adapter_part(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf in ("lora_A", "lora_B")


def float8_config(plan: Float8Plan) -> Any:
    """torchao's Float8LinearConfig for the plan."""
    from torchao.float8 import CastConfig, Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(plan.recipe)
    changes: dict[str, Any] = {}
    if plan.recipe == "tensorwise" and plan.fp8_format == "e4m3":
        # The config derives the grad-weight cast from this one when it is None.
        changes["cast_config_grad_output"] = CastConfig(target_dtype=torch.float8_e4m3fn)
        changes["cast_config_grad_output_for_grad_weight"] = None
    if plan.fsdp_float8_all_gather:
        changes["enable_fsdp_float8_all_gather"] = True
    return dataclasses.replace(config, **changes) if changes else config


@dataclass(frozen=True)
class Float8Conversion:
    converted: list[str]  # names of the linear layers now computing in FP8
    skipped: list[str]  # the output head and the layers too small to gain

    def summary(self, plan: Float8Plan) -> str:
        text = f"{plan.describe()}; {len(self.converted)} linear layers in FP8"
        if self.skipped:
            text += f", {len(self.skipped)} not (the output head, and those too small to gain: {_fold(self.skipped)})"
        if not self.converted:
            text += "; warning: no layer of this model is large enough, so it trains as without --fp8"
        return text


def _fold(names: list[str]) -> str:
    """Layer names with the layer index folded: model.layers.{i}.self_attn.k_proj, lm_head."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".{i}.", n) for n in names}))


def apply_float8(model: nn.Module, plan: Float8Plan, compiled: bool = False) -> Float8Conversion:
    """Convert the model's linear layers worth it to FP8 compute, in place.

    Call on the built model (meta device is fine) after LoRA/DoRA are applied and before tensor
    parallelism, compile and FSDP2, as torchao requires. `compiled`: the layers will run under
    torch.compile, where layers reading one input share its cast (see `SHARED_INPUT_GROUPS`).
    """
    check_torchao_installed()
    from torchao.float8 import convert_to_float8_training

    from shoal.peft.lora import LoraLinear

    config = float8_config(plan)
    converted, skipped = float8_targets(model, plan.recipe, shared_input_casts=compiled)
    chosen = set(converted)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _m, fqn: fqn in chosen)
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and name in chosen:
            # A callable attribute, not a submodule: parameter names stay the same.
            module.base_linear = FrozenFloat8Linear(config)
    return Float8Conversion(converted, skipped)


def gathers_in_float8(layers: list[nn.Module]) -> bool:
    """Whether tensor parallelism may cast these layers' shared input to FP8 before gathering it
    (and their output gradient before its all-gather): each a torchao `Float8Linear` whose input
    and output-gradient scales are tensorwise and dynamic, what torchao's `Float8ColwiseParallel`
    family assumes (one scale per tensor, so the cast commutes with the gather)."""
    if "torchao.float8" not in sys.modules:  # nothing was converted to FP8
        return False
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_linear import Float8Linear

    def tensorwise(layer: nn.Module) -> bool:
        casts = (layer.config.cast_config_input, layer.config.cast_config_grad_output)
        return all(c.scaling_type is ScalingType.DYNAMIC and c.scaling_granularity is ScalingGranularity.TENSORWISE
                   for c in casts)

    return bool(layers) and all(isinstance(layer, Float8Linear) and tensorwise(layer) for layer in layers)


def float8_parallel_style(style: Any) -> Any:
    """torchao's FP8 counterpart of a plain tensor-parallel style, with the same layouts: the
    input is cast to FP8 where it lies and then redistributed, so gathers carry FP8 bytes."""
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    if type(style) in (ColwiseParallel, RowwiseParallel):
        kind = Float8ColwiseParallel if type(style) is ColwiseParallel else Float8RowwiseParallel
        return kind(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                    use_local_output=style.use_local_output)
    if type(style) is PrepareModuleInput:
        return PrepareFloat8ModuleInput(
            input_layouts=style.input_layouts, desired_input_layouts=style.desired_input_layouts,
            input_kwarg_layouts=style.input_kwarg_layouts or None,
            desired_input_kwarg_layouts=style.desired_input_kwarg_layouts or None, use_local_output=style.use_local_output)
    raise TypeError(f"no FP8 counterpart of {type(style).__name__}")


def precompute_float8_scales(parts: list[nn.Module], plan: Float8Plan | None) -> None:
    """After the optimizer step: the FP8 scales of every FSDP-sharded weight in one all-reduce, so
    each all-gather sends FP8 bytes already scaled (tensorwise with FSDP2 only)."""
    if plan is None or not plan.fsdp_float8_all_gather:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in parts:
        precompute_float8_dynamic_scale_for_fsdp(part)


class FrozenFloat8Linear:
    """`F.linear(x, weight, bias)` with the matmul in FP8 for a frozen weight (LoRA/DoRA's base).

    torchao's Float8Linear always computes a weight gradient; a frozen base needs only the input's
    gradient, so this runs two FP8 matmuls per step instead of three and saves no activation for
    the weight gradient. The casts follow the same torchao recipe config as the converted layers.
    """

    def __init__(self, config: Any):
        self.config = config
        self.mm_config = _linear_mm_config(config)
        # Looked up once here: torch.compile cannot trace a call through functools.cache (a graph
        # break per layer that left the casts uncompiled: LoRA on the 8B shape ran 2.6x slower).
        self.matmul = _frozen_weight_matmul()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_autocast_enabled():
            x = x.to(torch.get_autocast_gpu_dtype())  # as Float8Linear: outputs in the autocast dtype
        out = self.matmul.apply(x, weight, self.mm_config, self.config)
        return out if bias is None else out + bias.to(out.dtype)


def _linear_mm_config(config: Any) -> Any:
    from torchao.float8 import LinearMMConfig, ScaledMMConfig

    def gemm(gemm_config: Any) -> Any:
        return ScaledMMConfig(config.emulate, gemm_config.use_fast_accum, False, config.pad_inner_dim)

    return LinearMMConfig(gemm(config.gemm_config_output), gemm(config.gemm_config_grad_input),
                          gemm(config.gemm_config_grad_weight))


@functools.cache
def _frozen_weight_matmul() -> type:
    """The autograd function, built on first use so that importing this module needs no torchao."""
    from torchao.float8 import GemmInputRole, ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic

    def cast(t: torch.Tensor, cast_config: Any, role: Any, mm_config: Any, config: Any, dim: int) -> torch.Tensor:
        axiswise = cast_config.scaling_granularity is ScalingGranularity.AXISWISE
        return hp_tensor_to_float8_dynamic(
            t, cast_config.target_dtype, mm_config, gemm_input_role=role,
            scaling_granularity=cast_config.scaling_granularity, axiswise_dim=dim if axiswise else None,
            round_scales_to_power_of_2=config.round_scales_to_power_of_2,
        )

    @torch._dynamo.allow_in_graph
    class _FrozenWeightFloat8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, mm_config, config):  # x [..., I], weight [O, I] -> [..., O]
            ctx.save_for_backward(weight)
            ctx.mm_config, ctx.config = mm_config, config
            x2 = x.reshape(-1, x.shape[-1])
            x8 = cast(x2, config.cast_config_input, GemmInputRole.INPUT, mm_config, config, -1)
            w8_t = cast(weight.t(), config.cast_config_weight, GemmInputRole.WEIGHT, mm_config, config, 0)
            return torch.mm(x8, w8_t).reshape(*x.shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad_out):  # only the input's gradient: the weight is frozen
            (weight,) = ctx.saved_tensors
            c = ctx.config
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            g8 = cast(g2, c.cast_config_grad_output, GemmInputRole.GRAD_OUTPUT, ctx.mm_config, c, -1)
            w8_t = cast(weight.t(), c.cast_config_weight_for_grad_input, GemmInputRole.WEIGHT, ctx.mm_config, c, -1)
            grad_x = torch.mm(g8, w8_t.t())
            return grad_x.reshape(*grad_out.shape[:-1], weight.shape[1]), None, None, None

    return _FrozenWeightFloat8Matmul
