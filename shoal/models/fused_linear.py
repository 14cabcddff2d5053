"""Linear layers that read the same input, applied as one matmul: q/k/v, gate/up.

Shape legend: N tokens (any leading dims), I in features, O_i out features of layer i, r_i LoRA rank.

Hugging Face's layout keeps q/k/v and gate/up as separate weights (docs/model-contract.md), so
each runs its own matmul: small GEMMs, and on one GPU the host's time to launch them (a LoRA step
of the 8B shape makes ~1,200 `aten::mm` calls) can exceed the GPU's. `project` applies a group of
layers over one input as

    base:  x · cat(W_i)ᵀ + cat(b_i)         one matmul over the concatenated base weights
    LoRA:  h = x · cat(A_j)ᵀ                 one matmul over the concatenated A matrices
           y_j = base_j + s_j · h_j · B_jᵀ   each B on its own slice (ranks may differ)

and splits the output. Frozen base weights and trainable A matrices are never put in one matmul:
the weight gradient of that concatenation would be a full [ΣO, I] base-weight gradient, paid
every step for nothing. Where the base weights are packed (below) the concatenation is their
buffer; elsewhere it is made at each use and not kept for backward (`_ConcatenatedLinear` saves the
separate weights and concatenates them again), so autograd holds no more than the unfused layers
do; under autocast the operands are cast as `F.linear`'s autocast rule casts them.

Fusion is skipped, and each module called as it is, whenever it could change what runs:

* a module that is not exactly `nn.Linear` or a layer opting in through `fused_projection()`
  (shoal's `LoraLinear` without DoRA, without active dropout, with a plain `F.linear` base);
  FP8's `Float8Linear` subclasses, experts and wrappers therefore keep their own forward;
* any weight a DTensor (tensor parallelism shards the layers separately; FSDP2 hands the forward
  plain unsharded tensors, so fusion applies there);
* forward or backward hooks on any module of the group (or global module hooks): fusing would
  skip them;
* base weights (or A matrices) differing in dtype, device or requires_grad, or a bias on some only.

Where the base weights live decides the default. `pack_frozen_groups` (called by
`shoal.train.engine.store_frozen_in` on the one-device path, where a LoRA/DoRA base is frozen)
stores each group's frozen base weights, and biases, as the rows of one buffer; each module's
`weight` stays its own Parameter, a view of its rows, so names, state dicts and loading do not
change. A packed group is fused always: the buffer is the concatenation, and the matmul reads it
with no copy. An unpacked group (full fine-tuning, FSDP, weights replaced since packing) would
concatenate its weights again at every forward and backward: on an H200, LoRA on every linear layer
of the 8B shape gained 9-13% tokens/s that way but held 7.4-8.5 GiB more, so it is fused only when
`FUSED_PROJECTIONS` is on (env `SHOAL_FUSED_PROJECTIONS=1` at import, or set the attribute);
`bench/finetune.py --variants shoal_compile,shoal_compile_fused` measures it.

A packed group is recognised by the `PackedBase` record its modules carry, checked against their
current Parameters (identity, dtype, device) and, outside torch.compile, their addresses; torch.compile
cannot trace an address, and guards the identity, dtype and device instead. A weight replaced
through `param.data = ...` with the same dtype and device is the one change a compiled layer misses:
replace packed weights by assigning a new Parameter (that unpacks the group) or copy into them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.modules import module as _module_globals

FUSED_PROJECTIONS: bool = os.environ.get("SHOAL_FUSED_PROJECTIONS", "0") == "1"


@dataclass(frozen=True)
class Projection:
    """What one layer of a fused group computes: x Wᵀ + b (+ scaling · (x Aᵀ) Bᵀ when `lora_a` is set)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0


@dataclass(frozen=True, eq=False)
class PackedBase:
    """A group's frozen base stored as one buffer: `weight` [ΣO, I] (and `bias` [ΣO]), whose rows
    the members' Parameters `weights` (and `biases`) are views of, in the group's order."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    weights: tuple[nn.Parameter, ...]
    biases: tuple[nn.Parameter, ...]

    def __deepcopy__(self, memo: dict) -> None:
        # A deep copy of the model clones each Parameter on its own (Parameter.__deepcopy__): the
        # copy's weights are no longer rows of one buffer, so the copy carries no record.
        return None


@dataclass(frozen=True)
class _Fusion:
    parts: list[Projection]
    packed: PackedBase | None  # where the group's base weights are already one buffer


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _projection(module: nn.Module) -> Projection | None:
    """The module's fusable form, or None when it must run its own forward."""
    if any(_has_hooks(m) for m in module.modules()):
        return None
    if type(module) is nn.Linear:  # exactly: Float8Linear and other subclasses compute differently
        return Projection(module.weight, module.bias)
    opt_in = getattr(module, "fused_projection", None)
    return opt_in() if callable(opt_in) else None


def _uniform(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(t.dtype == first.dtype and t.device == first.device and t.requires_grad == first.requires_grad
               for t in tensors)


def _fusable(modules: list[nn.Module]) -> _Fusion | None:
    if len(modules) < 2 or _global_hooks():
        return None
    parts = [_projection(m) for m in modules]
    if any(p is None for p in parts):
        return None
    tensors = [t for p in parts for t in (p.weight, p.bias, p.lora_a, p.lora_b) if t is not None]
    if any(isinstance(t, DTensor) for t in tensors):
        return None
    biases = [p.bias for p in parts if p.bias is not None]
    if biases and len(biases) != len(parts):
        return None
    if not _uniform([p.weight for p in parts] + biases):
        return None
    lora_a = [p.lora_a for p in parts if p.lora_a is not None]
    if lora_a and not _uniform(lora_a):
        return None
    packed = _packed(modules, parts)
    if packed is None and not FUSED_PROJECTIONS:
        return None  # unpacked, fusing costs a copy of the base weights per step: only on request
    return _Fusion(parts, packed)


def _packed(modules: list[nn.Module], parts: list[Projection]) -> PackedBase | None:
    """The group's packed base, if `pack_frozen_groups` packed exactly these weights and they are
    still where it put them."""
    packed = getattr(modules[0], "packed_base", None)
    if packed is None or any(getattr(m, "packed_base", None) is not packed for m in modules[1:]):
        return None
    if len(packed.weights) != len(parts) or any(p.weight is not w for p, w in zip(parts, packed.weights)):
        return None  # a weight replaced since (merged, assigned, another group's order)
    if len(packed.biases) != sum(p.bias is not None for p in parts) or any(
            p.bias is not b for p, b in zip(parts, packed.biases)):
        return None
    members = [*packed.weights, *packed.biases]
    if any(t.dtype != packed.weight.dtype or t.device != packed.weight.device for t in members):
        return None  # converted or moved since (`module.to` swaps `.data`): the buffer was left behind
    if not torch.compiler.is_compiling() and not (_rows_of(packed.weight, packed.weights)
                                                  and _rows_of(packed.bias, packed.biases)):
        return None
    return packed


def _rows_of(whole: torch.Tensor | None, rows: tuple[torch.Tensor, ...]) -> bool:
    """Whether `rows` lie end to end in `whole`'s memory, from its start (no tensors: trivially)."""
    if whole is None:
        return not rows
    address = whole.data_ptr()
    for t in rows:
        if not t.is_contiguous() or t.data_ptr() != address:
            return False
        address += t.numel() * t.element_size()
    return address == whole.data_ptr() + whole.numel() * whole.element_size()


@torch.no_grad()
def pack_frozen_groups(model: nn.Module) -> int:
    """Store the frozen base weights (and biases) of each group a module of `model` names in
    `projection_groups()` as rows of one new buffer, and make each member's `weight` (`bias`) a
    Parameter viewing its rows; returns how many groups were packed. The copies are dropped as the
    Parameters are replaced, so memory does not grow. Groups that could never fuse are left alone:
    a member that is not a plain `nn.Linear` or a layer that `can_fuse()` (FP8, DoRA, experts), a
    trainable or DTensor weight, differing dtypes, devices or in features, a bias on some only, or
    a weight shared with another module (tying it would be undone)."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    packed = 0
    for module in model.modules():
        groups = getattr(module, "projection_groups", None)
        for group in groups() if callable(groups) else ():
            packed += _pack(group, uses)
    return packed


def _packable(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    can_fuse = getattr(module, "can_fuse", None)
    return callable(can_fuse) and can_fuse()


def _pack(group: list[nn.Module], uses: dict[int, int]) -> bool:
    if len(group) < 2 or not all(_packable(m) for m in group):
        return False
    weights = [m.weight for m in group]
    biases = [m.bias for m in group if m.bias is not None]
    if biases and len(biases) != len(group):
        return False
    tensors = weights + biases
    if any(isinstance(t, DTensor) or t.requires_grad or uses[id(t)] > 1 for t in tensors):
        return False
    if not _uniform(tensors) or any(w.ndim != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        return False
    whole = torch.cat([w.detach() for w in weights])  # [ΣO, I], contiguous: one new allocation
    whole_bias = torch.cat([b.detach() for b in biases]) if biases else None
    for t in (whole, whole_bias):
        if t is not None:
            # Parameters keep their address, and compiled code may rely on it; these buffers are not
            # Parameters, so say so: CUDA graphs (parallel.cuda_graphs) would otherwise copy them
            # into the graph's own inputs at every replay. No guard on the address: the layers are
            # alike and one compiled graph serves every layer's buffer.
            torch._dynamo.mark_static_address(t, guard=False)
    sizes = [w.shape[0] for w in weights]
    for module, rows in zip(group, whole.split(sizes)):
        module.weight = nn.Parameter(rows, requires_grad=False)
    if whole_bias is not None:
        for module, rows in zip(group, whole_bias.split(sizes)):
            module.bias = nn.Parameter(rows, requires_grad=False)
    record = PackedBase(whole, whole_bias, tuple(m.weight for m in group),
                        tuple(m.bias for m in group) if whole_bias is not None else ())
    for module in group:
        module.packed_base = record
    return True


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs `F.linear` in here, None when it is off."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def project(modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in modules], with the matmuls fused where that computes the same (see the module doc)."""
    fusion = _fusable(modules)
    if fusion is None:
        return [m(x) for m in modules]
    parts, packed = fusion.parts, fusion.packed
    weights = [p.weight for p in parts]
    biases = [p.bias for p in parts if p.bias is not None]
    lora = [p for p in parts if p.lora_a is not None]
    lora_a = [p.lora_a for p in lora]
    dtype = _autocast_dtype(x)
    if dtype is not None and any(t.dtype == torch.float64 for t in [x, *weights, *lora_a]):
        return [m(x) for m in modules]  # autocast leaves float64 alone: not a case worth copying its rule for
    if dtype is not None:
        # F.linear's autocast rule: every operand in autocast's dtype. Cast here, before the
        # Function, so its forward and its backward (which autocast does not cover) see one dtype,
        # and the gradients reach the fp32 masters through these casts. torch.amp.custom_fwd
        # (cast_inputs=...) would do the same but fixes device type and dtype where the class is
        # defined. x is cast once for the whole group, not once per layer.
        x = x.to(dtype)
        lora_a = [a.to(dtype) for a in lora_a]
        if packed is None:
            weights, biases = [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
    if packed is not None:
        # The buffer is the concatenation: one F.linear over it, no copy (nor a cast under autocast
        # when it is stored in autocast's dtype, as store_frozen_in stores it). Its weights are
        # frozen, so autograd saves no more than the separate F.linear calls would.
        base = F.linear(x, packed.weight, packed.bias)
    else:
        base = _ConcatenatedLinear.apply(x, len(biases) > 0, *weights, *biases)
    outs = list(base.split([w.shape[0] for w in weights], dim=-1))
    if not lora:
        # Views of one buffer: no copy, which is what autograd keeps when every one of them is
        # saved downstream (gate and up); a caller saving only some copies those (see Attention).
        return outs
    if len(lora) == 1:
        hidden = [F.linear(x, lora_a[0])]
    else:
        hidden = _ConcatenatedLinear.apply(x, False, *lora_a).split([a.shape[0] for a in lora_a], dim=-1)
    adapter_inputs = iter(hidden)
    for i, p in enumerate(parts):
        if p.lora_a is not None:
            h = next(adapter_inputs)
            # As LoraLinear.forward: base + B(A x) · scaling, B applied by F.linear (autocast casts it).
            outs[i] = outs[i] + F.linear(h, p.lora_b) * p.scaling
        else:
            # A plain member's output is a view of the base buffer; saved downstream (SiLU saves
            # gate), it would keep the adapted members' base outputs alive too, which unfused
            # would be gone: its own copy keeps only itself.
            outs[i] = outs[i].contiguous()
    return outs


class _ConcatenatedLinear(torch.autograd.Function):
    """y = x · cat(W_i)ᵀ (+ cat(b_i)), saving x and the separate W_i, never their concatenation.

    Called with operands of one dtype (`project` casts them under autocast), so it needs no
    autocast handling of its own: inside, every op sees inputs already in the compute dtype.
    What it saves is what the separate F.linear calls would save: x only when a weight needs a
    gradient, the weights only when x does (the frozen base of a LoRA run saves no activation).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, has_bias: bool, *params: torch.Tensor) -> torch.Tensor:
        n = len(params) // 2 if has_bias else len(params)
        weights, biases = params[:n], params[n:]
        needs = ctx.needs_input_grad
        weights_need_grad = any(needs[2:2 + n])
        ctx.has_bias, ctx.sizes = has_bias, [w.shape[0] for w in weights]
        ctx.save_for_backward(x if weights_need_grad else None, *(weights if needs[0] else ()))
        bias = torch.cat(biases) if has_bias else None
        return F.linear(x, torch.cat(weights), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *weights = ctx.saved_tensors
        n = len(ctx.sizes)
        needs = ctx.needs_input_grad
        grad_x = grad @ torch.cat(weights) if needs[0] else None  # [N, ΣO] · [ΣO, I]
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_weights: tuple = (None,) * n
        if any(needs[2:2 + n]):
            whole = grad_rows.t() @ x.reshape(-1, x.shape[-1])  # [ΣO, I]: one matmul for every W_i
            grad_weights = whole.split(ctx.sizes, dim=0)
        grad_biases: tuple = ()
        if ctx.has_bias:
            grad_biases = grad_rows.sum(0).split(ctx.sizes) if any(needs[2 + n:]) else (None,) * n
        return (grad_x, None, *grad_weights, *grad_biases)
