"""q/k/v and gate/up fused into one matmul (shoal.models.fused_linear) against the layers run one by one.

The oracle is each module's own forward (the path shoal takes by default), on the same
weights and input: outputs and every gradient must agree in fp32 to rounding, the fused layer must
run fewer matmuls and keep no more saved tensors, and every case where fusing would compute
something else (or skip a hook) must run the modules themselves. Weights not packed in one buffer
(as here) are fused only when `FUSED_PROJECTIONS` is on; these tests turn it on, and the parity
tests against transformers and PEFT (test_model_parity.py, tests/unit/peft/) check the unfused path
they compare with. Packed weights, fused by default: test_packed_projections.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.models import fused_linear, get_preset
from shoal.models.model import Transformer
from shoal.peft import apply_lora
from tests.helpers.distributed import run_distributed
from tests.helpers.matmuls import CountMatmuls, compiled_matmuls
from tests.helpers.peft_twins import randomize_adapters

QKV = ["q_proj", "k_proj", "v_proj"]
GATE_UP = ["gate_proj", "up_proj"]


@pytest.fixture(autouse=True)
def fusion_on(monkeypatch):
    """Unpacked weights fuse only with the switch; every test here is about the fused path (or its fallbacks)."""
    monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", True)


def _layer(family: str = "qwen2", targets: list[str] | None = None, dora: bool = False, dropout: float = 0.0):
    """Decoder layer 0 of a tiny model (qwen2: qkv bias, qwen3: q/k norm), LoRA on `targets` (None: a
    plain layer, every weight trains), with non-zero adapters; and an input, cos and sin for it."""
    torch.manual_seed(0)
    model = Transformer(get_preset(f"{family}_tiny"))
    model.init_weights()
    if targets is not None:
        apply_lora(model, rank=4, alpha=8, dropout=dropout, target_modules=targets, use_dora=dora)
        randomize_adapters(model)
    layer = model.model.layers["0"]
    x = torch.randn(2, 12, model.config.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(12)[None].expand(2, -1), torch.float32)
    return layer, x, cos, sin


def _run(layer: nn.Module, x: torch.Tensor, cos, sin, fused: bool, monkeypatch) -> tuple[torch.Tensor, dict]:
    """One forward and backward of the layer; its output and the gradients of x and every parameter."""
    monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", fused)
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = layer(x, cos, sin, None)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weight).sum().backward()
    grads = {"x": x.grad} | {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    # fp32 rounding only: a fused matmul sums the same products in another order, so entries that
    # nearly cancel differ by ~1e-7 of the tensor's largest entry, not of their own size.
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _assert_same(fused: tuple, unfused: tuple) -> None:
    _assert_close_to_scale(fused[0], unfused[0], "output")
    assert fused[1].keys() == unfused[1].keys()
    for name, grad in unfused[1].items():
        _assert_close_to_scale(fused[1][name], grad, name)


def _matmuls(layer, x, cos, sin, fused: bool, monkeypatch) -> int:
    with CountMatmuls() as counter:
        _run(layer, x, cos, sin, fused, monkeypatch)
    return counter.count


TARGETS = {
    "plain": None,                              # full training: base weights and biases train
    "lora_q": ["q_proj"],                        # LoRA on some of a group: A not concatenated
    "lora_kv_up": ["k_proj", "v_proj", "up_proj"],
    "lora_all": QKV + GATE_UP + ["o_proj", "down_proj"],
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_fused_layer_matches_unfused_outputs_and_gradients(family, targets, monkeypatch):
    layer, x, cos, sin = _layer(family, TARGETS[targets])
    _assert_same(_run(layer, x, cos, sin, True, monkeypatch), _run(layer, x, cos, sin, False, monkeypatch))


def _expected_saving(targets: list[str] | None) -> int:
    """Matmuls that fusing q/k/v and gate/up saves in one forward and backward.

    A group of n layers runs 1 base matmul instead of n in forward, 1 instead of n for the input's
    gradient and, when the base trains, 1 instead of n for the weights'. Its m LoRA layers (m >= 2)
    run 1 A matmul instead of m in forward, for the input's gradient and for A's gradient."""
    saved = 0
    for group in (QKV, GATE_UP):
        n = len(group)
        saved += (n - 1) * (2 if targets is not None else 3)
        m = sum(name in (targets or []) for name in group)
        if m >= 2:
            saved += 3 * (m - 1)
    return saved


@pytest.mark.parametrize("targets", list(TARGETS))
def test_fused_layer_runs_fewer_matmuls(targets, monkeypatch):
    layer, x, cos, sin = _layer("llama", TARGETS[targets])
    unfused = _matmuls(layer, x, cos, sin, False, monkeypatch)
    fused = _matmuls(layer, x, cos, sin, True, monkeypatch)
    assert unfused - fused == _expected_saving(TARGETS[targets])


def _saved_bytes(layer, x, cos, sin, fused: bool, monkeypatch, autocast: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward (a tensor saved twice counts once;
    parameters count too: they are what a frozen weight's F.linear saves)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", fused)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x, cos, sin, None)
    del out
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_fused_layer_saves_no_more_for_backward(family, targets, autocast, monkeypatch):
    # qwen3: its q/k norms save q and k as they come in fp32; llama's RoPE saves neither.
    layer, x, cos, sin = _layer(family, TARGETS[targets])
    unfused = _saved_bytes(layer, x, cos, sin, False, monkeypatch, autocast)
    fused = _saved_bytes(layer, x, cos, sin, True, monkeypatch, autocast)
    assert fused <= unfused
    if autocast and targets == "lora_all":
        # Unfused, each adapter's F.linear saves its own bf16 copy of x; fused, the group casts once.
        assert fused < unfused


def test_fused_layer_under_autocast_computes_in_autocast_dtype(monkeypatch):
    layer, x, cos, sin = _layer("qwen2", TARGETS["lora_kv_up"])
    results = []
    for fused in (True, False):
        monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", fused)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = fused_linear.project([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], x)
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16  # as F.linear under autocast
        (q.float().sum() + k.float().pow(2).sum() + v.float().mean()).backward()
        grads = {n: p.grad for n, p in layer.self_attn.named_parameters() if p.grad is not None}
        assert all(g.dtype == torch.float32 for g in grads.values())  # reached the fp32 masters
        results.append(((q, k, v), grads))
    (fused_out, fused_grads), (unfused_out, unfused_grads) = results
    for a, b in zip(fused_out, unfused_out):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert fused_grads.keys() == unfused_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], unfused_grads[name], atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_fused_layer_under_activation_checkpointing(mode, monkeypatch):
    from shoal.distributed.parallelize import apply_activation_checkpointing

    layer, x, cos, sin = _layer("qwen2", TARGETS["lora_all"])
    reference = _run(layer, x, cos, sin, False, monkeypatch)
    apply_activation_checkpointing([layer], mode)
    _assert_same(_run(layer, x, cos, sin, True, monkeypatch), reference)


def _compiled_matmuls(layer, x, cos, sin, fused: bool, monkeypatch) -> tuple[tuple, int]:
    """The layer compiled whole (fullgraph: a graph break fails), run forward and backward; its
    results and the matmuls in the forward and backward graphs AOTAutograd hands to the compiler."""
    return compiled_matmuls(layer, lambda: _run(layer, x, cos, sin, fused, monkeypatch))


def test_fused_layer_compiles_without_graph_break(monkeypatch):
    targets = TARGETS["lora_kv_up"]
    layer, x, cos, sin = _layer("qwen3", targets)
    reference = _run(layer, x, cos, sin, False, monkeypatch)
    compiled, fused = _compiled_matmuls(layer, x, cos, sin, True, monkeypatch)
    _assert_same(compiled, reference)
    _, unfused = _compiled_matmuls(layer, x, cos, sin, False, monkeypatch)
    assert unfused - fused == _expected_saving(targets)  # the compiled graphs keep the fusion


# --- the cases that must take the unfused path --------------------------------------------------


class _SubclassedLinear(nn.Linear):
    """Stands for FP8's Float8Linear: an nn.Linear subclass with a forward of its own."""

    def forward(self, x):
        return super().forward(x) * 2


def _with_hook(layer):
    layer.self_attn.k_proj.register_forward_hook(lambda m, args, out: out * 2)


def _with_pre_hook(layer):
    layer.self_attn.v_proj.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))


def _with_adapter_hook(layer):  # a hook deep inside a LoRA layer
    layer.self_attn.q_proj.lora_A.register_forward_hook(lambda m, args, out: out + 1)


def _with_subclass(layer):
    old = layer.self_attn.k_proj
    new = _SubclassedLinear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    layer.self_attn.k_proj = new


def _with_fp8_like_base(layer):  # LoraLinear.base_linear replaced, as shoal.distributed.float8 does
    layer.self_attn.q_proj.base_linear = lambda x, w, b=None: F.linear(x, w, b) * 1.5


def _with_mixed_dtypes(layer):  # runs under autocast, which casts each operand
    layer.mlp.up_proj.to(torch.bfloat16)


def _with_mixed_requires_grad(layer):
    layer.self_attn.q_proj.weight.requires_grad_(False)


def _with_bias_on_some(layer):
    layer.self_attn.k_proj.bias = None


FALLBACKS = {
    # name: (LoRA targets, extra arguments to _layer, change to the layer, the group it affects)
    "forward_hook": (None, {}, _with_hook, QKV),
    "forward_pre_hook": (None, {}, _with_pre_hook, QKV),
    "hook_on_adapter": (QKV, {}, _with_adapter_hook, QKV),
    "linear_subclass": (None, {}, _with_subclass, QKV),
    "dora": (QKV, {"dora": True}, None, QKV),
    "dropout_in_training": (QKV, {"dropout": 0.2}, None, QKV),
    "fp8_like_base": (QKV, {}, _with_fp8_like_base, QKV),
    "mixed_dtypes": (None, {}, _with_mixed_dtypes, GATE_UP),
    "mixed_requires_grad": (None, {}, _with_mixed_requires_grad, QKV),
    "bias_on_some": (None, {}, _with_bias_on_some, QKV),
}


def _forbid_fusion(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fused a group that must run unfused")

    monkeypatch.setattr(fused_linear._ConcatenatedLinear, "apply", refuse)


def _group(layer, names: list[str]) -> list[nn.Module]:
    parent = layer.self_attn if names == QKV else layer.mlp
    return [getattr(parent, n) for n in names]


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsafe_groups_run_each_module(case, monkeypatch):
    targets, extra, change, names = FALLBACKS[case]
    layer, x, _, _ = _layer("qwen2", targets)
    assert fused_linear._fusable(_group(layer, names)) is not None  # the same layer as plain LoRA fuses
    layer, x, _, _ = _layer("qwen2", targets, **extra)
    if change is not None:
        change(layer)
    group = _group(layer, names)
    assert fused_linear._fusable(group) is None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "mixed_dtypes")
    x = x.detach()
    with autocast:
        torch.manual_seed(9)  # the same dropout masks both times
        reference = [m(x) for m in group]
        _forbid_fusion(monkeypatch)
        torch.manual_seed(9)
        got = fused_linear.project(group, x)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the modules themselves ran: bit for bit


def test_dropout_adapters_fuse_in_eval_mode():
    layer, x, cos, sin = _layer("qwen2", QKV, dropout=0.2)
    group = [getattr(layer.self_attn, n) for n in QKV]
    assert fused_linear._fusable(group) is None
    layer.eval()
    assert fused_linear._fusable(group) is not None


def test_switch_turns_fusion_off(monkeypatch):
    layer, x, cos, sin = _layer("llama", TARGETS["lora_all"])
    monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", False)
    _forbid_fusion(monkeypatch)
    layer(x, cos, sin, None).sum().backward()


def test_global_module_hook_turns_fusion_off(monkeypatch):
    layer, x, cos, sin = _layer("llama")
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
    try:
        _forbid_fusion(monkeypatch)
        layer(x, cos, sin, None)
    finally:
        handle.remove()
    assert layer.self_attn.q_proj in seen and layer.mlp.up_proj in seen


# --- tensor parallelism: DTensor weights run unfused ---------------------------------------------


def _tp_worker() -> dict:
    fused_linear.FUSED_PROJECTIONS = True  # another process: the autouse fixture does not reach it
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    layer, x, cos, sin = _layer("qwen2")
    group = [getattr(layer.self_attn, n) for n in QKV]
    assert fused_linear._fusable(group) is not None  # plain weights fuse: DTensors are what stops it
    expected = [m(x.detach()) for m in group]
    mesh = init_device_mesh("cpu", (1,))
    for module in group:
        parallelize_module(module, mesh, ColwiseParallel())
    got = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in fused_linear.project(group, x.detach())]
    # Without the styles' hooks too: a DTensor weight alone keeps a group unfused.
    mlp = _group(layer, GATE_UP)
    for module in mlp:
        module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Replicate()]))
    return {"fusable": [fused_linear._fusable(g) is not None for g in (group, mlp)],
            "close": all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))}


def test_tensor_parallel_weights_run_unfused():
    (result,) = run_distributed(_tp_worker, 1)
    assert result["fusable"] == [False, False] and result["close"]
