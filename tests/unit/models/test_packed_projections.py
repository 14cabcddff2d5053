"""Frozen q/k/v and gate/up weights packed into one buffer per group (fused_linear.pack_frozen_groups),
and the projections fused automatically where they are packed.

Oracles: the same engine built without packing (which, with the switch off, runs every layer on its
own, as before), and for loading, transformers' Llama with PEFT's LoRA on the same weights. Packing
must cost no memory, change nothing a checkpoint sees, and compute what the unpacked model computes
(to bf16 rounding under autocast, fp32 rounding without), while actually taking the fused path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import build_mesh
from shoal.models import fused_linear, get_preset
from shoal.models.config import from_hf_config
from shoal.models.model import Transformer
from shoal.peft import apply_lora
from shoal.peft.config import LoraConfig
from shoal.train import engine as engine_module
from shoal.train.engine import build_engine
from tests.helpers.hf_models import tiny_peft_hf
from tests.helpers.matmuls import CountMatmuls, compiled_matmuls
from tests.helpers.peft_twins import VOCAB, copy_adapters_to_peft, peft_twin, randomize_adapters

TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(autouse=True)
def switch_off(monkeypatch):
    """The default: unpacked groups run unfused, so any fusion seen here is the packing's doing."""
    monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", False)


def _engine(targets: str, monkeypatch, packed: bool = True, family: str = "llama"):
    """A one-device LoRA engine on the tiny PEFT shape, compute dtype bf16 (so store_frozen_in runs);
    `packed=False` builds the same engine with the packing step left out."""
    hf = tiny_peft_hf(family)
    with monkeypatch.context() as patch:
        if not packed:
            patch.setattr(engine_module, "pack_frozen_groups", lambda model: 0)
        parallel = ParallelConfig()
        engine = build_engine(
            from_hf_config(hf.config.to_dict()), train=TrainSection(micro_batch_size=2, global_batch_size=2),
            parallel=parallel, peft=LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS[targets]),
            dims=build_mesh(parallel, 1, "cpu"), device=torch.device("cpu"), compute_dtype=torch.bfloat16,
        )
    randomize_adapters(engine.parts[0])  # the same values in both engines: B = 0 would hide the adapters
    return engine, hf


def _groups(model: nn.Module) -> list[list[nn.Module]]:
    return [group for m in model.modules() if hasattr(m, "projection_groups") for group in m.projection_groups()]


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.3).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(16).expand(2, 16)}


def _spy_fusion(monkeypatch) -> list[str]:
    """Records, for every `project` call, whether it ran packed, fused from copies, or unfused."""
    seen: list[str] = []
    fusable = fused_linear._fusable

    def spy(modules):
        fusion = fusable(modules)
        seen.append("unfused" if fusion is None else "packed" if fusion.packed is not None else "copied")
        return fusion

    monkeypatch.setattr(fused_linear, "_fusable", spy)
    return seen


def _step(engine) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = _batch()
    tokens = float(batch["loss_mask"].sum())
    loss = engine.forward_backward([batch], tokens) / tokens
    grads = {n: p.grad for n, p in engine.parts[0].named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize("targets", list(TARGETS))
def test_packed_groups_share_one_storage_and_no_extra_memory(targets, monkeypatch):
    model = _engine(targets, monkeypatch)[0].parts[0]
    groups = _groups(model)
    assert len(groups) == 2 * model.config.num_layers
    for group in groups:
        storages = {m.weight.untyped_storage().data_ptr() for m in group}
        assert len(storages) == 1, [type(m).__name__ for m in group]
        weights = [m.weight for m in group]
        assert weights[0].untyped_storage().nbytes() == sum(w.numel() * w.element_size() for w in weights)
        assert all(w.dtype == torch.bfloat16 and not w.requires_grad for w in weights)
    # Every frozen parameter's memory is its own bytes: the copies packing made replaced the originals.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in frozen}
    assert sum(held.values()) == sum(p.numel() * p.element_size() for p in frozen)


@pytest.mark.parametrize("targets", list(TARGETS))
def test_packed_engine_matches_unpacked_under_autocast(targets, monkeypatch):
    packed, _ = _engine(targets, monkeypatch)
    unpacked, _ = _engine(targets, monkeypatch, packed=False)
    seen = _spy_fusion(monkeypatch)
    loss, grads = _step(packed)
    assert seen and set(seen) == {"packed"}
    seen.clear()
    ref_loss, ref_grads = _step(unpacked)
    assert seen and set(seen) == {"unfused"}
    assert grads.keys() == ref_grads.keys() and grads and all("lora_" in n for n in grads)
    # Against the layers run one by one: bf16 rounding. Fused, each group's input gradient is
    # summed inside one matmul and rounded once, not rounded per layer and then added, which moves
    # the smallest adapter gradients of the first layer by up to ~3%.
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for name, expected in ref_grads.items():
        assert (grads[name] - expected).norm() <= 5e-2 * expected.norm() + 1e-6, name
    # Against the fusion that concatenates copies (the switch, unpacked): the same matmuls on the
    # same values, bit for bit.
    unpacked.parts[0].zero_grad(set_to_none=True)
    monkeypatch.setattr(fused_linear, "FUSED_PROJECTIONS", True)
    seen.clear()
    copied_loss, copied_grads = _step(unpacked)
    assert seen and set(seen) == {"copied"}
    torch.testing.assert_close(loss, copied_loss, atol=0, rtol=0)
    for name, expected in copied_grads.items():
        torch.testing.assert_close(grads[name], expected, atol=0, rtol=0, msg=name)


def _fp32_layer(targets: list[str]):
    """Layer 0 of a tiny llama with LoRA on `targets` (base frozen, fp32), its packed twin, an input."""
    torch.manual_seed(0)
    model = Transformer(get_preset("llama_tiny"))
    model.init_weights()
    apply_lora(model, rank=4, alpha=8, target_modules=targets)
    randomize_adapters(model)
    packed = copy.deepcopy(model)
    assert fused_linear.pack_frozen_groups(packed) == 2 * model.config.num_layers
    x = torch.randn(2, 12, model.config.hidden_size)
    cos, sin = model.rope(torch.arange(12)[None].expand(2, -1), torch.float32)
    return model.model.layers["0"], packed.model.layers["0"], x, cos, sin


def _layer_step(layer, x, cos, sin):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = layer(x, cos, sin, None)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    return out.detach(), {"x": x.grad} | {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


def _assert_same(got, expected):
    for name in ["output", *expected[1]]:
        a, b = (got[0], expected[0]) if name == "output" else (got[1][name], expected[1][name])
        scale = float(b.abs().max()) or 1.0  # fp32 sums in another order: rounding relative to the tensor
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("targets", list(TARGETS))
def test_packed_layer_matches_unpacked_without_autocast(targets, monkeypatch):
    unpacked, packed, x, cos, sin = _fp32_layer(TARGETS[targets])
    seen = _spy_fusion(monkeypatch)
    got = _layer_step(packed, x, cos, sin)
    assert seen == ["packed", "packed"]
    assert got[1].keys() == {"x"} | {n for n, _ in packed.named_parameters() if "lora_" in n}
    _assert_same(got, _layer_step(unpacked, x, cos, sin))


@pytest.mark.parametrize("targets", list(TARGETS))
def test_state_dict_is_unchanged_by_packing(targets, monkeypatch):
    packed = _engine(targets, monkeypatch)[0].parts[0].state_dict()
    unpacked = _engine(targets, monkeypatch, packed=False)[0].parts[0].state_dict()
    assert list(packed) == list(unpacked)
    for name, value in unpacked.items():
        assert packed[name].dtype == value.dtype == torch.float32, name
        torch.testing.assert_close(packed[name], value, atol=0, rtol=0, msg=name)
    assert "model.layers.0.self_attn.q_proj.weight" in packed  # HF's name, as before packing


def test_loading_after_packing_lands_in_the_buffer(monkeypatch):
    # Built from the engine's own random init, then loaded with the HF model's weights (as a resume
    # loads a checkpoint, shoal.checkpoint.state.load_model_into): the fused forward, which reads the
    # packed buffers and not the parameters, must then compute what transformers + PEFT compute.
    engine, hf = _engine("all", monkeypatch)
    model = engine.parts[0]
    before = [group[0].packed_base.weight.clone() for group in _groups(model)]
    set_model_state_dict(model, hf.state_dict(), options=StateDictOptions(strict=False))  # adapters stay
    assert all(not torch.equal(old, g[0].packed_base.weight) for old, g in zip(before, _groups(model)))
    theirs = peft_twin(hf.to(torch.bfloat16), 4, 8.0, 0.0, TARGETS["all"], False)
    copy_adapters_to_peft(model, theirs)
    tokens = _batch()["tokens"]
    seen = _spy_fusion(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model.eval()(tokens)
        reference = theirs(input_ids=tokens).logits
    assert seen and set(seen) == {"packed"}
    # bf16 through 2 layers: within a few bf16 steps of the logits' scale, far below what the
    # engine's own random weights would give.
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours.float(), reference.float(), atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("targets", list(TARGETS))
def test_packed_groups_run_fewer_matmuls_and_unpacked_none_fewer(targets, monkeypatch):
    unpacked, packed, x, cos, sin = _fp32_layer(TARGETS[targets])
    counts = {}
    for name, layer in (("packed", packed), ("unpacked", unpacked)):
        seen = _spy_fusion(monkeypatch)
        with CountMatmuls() as counter:
            _layer_step(layer, x, cos, sin)
        counts[name] = counter.count
        assert seen == [name if name == "packed" else "unfused"] * 2
    # Frozen base: a group of n layers saves n - 1 matmuls in forward and n - 1 for the input's
    # gradient; m >= 2 adapted layers in it save m - 1 A matmuls in forward, input and A gradient.
    saved = 0
    for group in (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]):
        m = sum(name in TARGETS[targets] for name in group)
        saved += 2 * (len(group) - 1) + (3 * (m - 1) if m >= 2 else 0)
    assert counts["unpacked"] - counts["packed"] == saved


def test_compiled_layer_keeps_the_packed_fusion():
    # torch.compile cannot trace a storage address: the packed check must hold without one, and
    # the compiled graphs keep the fused matmuls (fullgraph: a graph break fails).
    unpacked, packed, x, cos, sin = _fp32_layer(TARGETS["all"])
    counts = {}
    for name, layer in (("packed", packed), ("unpacked", unpacked)):
        result, counts[name] = compiled_matmuls(layer, lambda layer=layer: _layer_step(layer, x, cos, sin))
        if name == "packed":
            _assert_same(result, _layer_step(unpacked, x, cos, sin))
    assert counts["unpacked"] - counts["packed"] == 2 * 2 + 2 + 3 * 2 + 3


def test_projection_groups_are_what_forward_fuses(monkeypatch):
    from shoal.models import model as model_module

    model = Transformer(get_preset("qwen2_tiny"))  # q/k/v biases: packed too
    model.init_weights()
    called = []
    project = model_module.project
    monkeypatch.setattr(model_module, "project", lambda modules, x: called.append(modules) or project(modules, x))
    model(torch.randint(0, model.config.vocab_size, (1, 5)))
    assert [[id(m) for m in g] for g in called] == [[id(m) for m in g] for g in _groups(model)]


def _frozen_qwen2():
    torch.manual_seed(0)
    model = Transformer(get_preset("qwen2_tiny"))
    model.init_weights()
    model.requires_grad_(False)
    return model


def test_biases_are_packed_with_their_weights():
    model = _frozen_qwen2()
    expected = model(torch.arange(6)[None])
    fused_linear.pack_frozen_groups(model)
    attn = model.model.layers["0"].self_attn
    record = attn.q_proj.packed_base
    assert record.bias is not None and attn.v_proj.bias.untyped_storage().data_ptr() == record.bias.data_ptr()
    torch.testing.assert_close(model(torch.arange(6)[None]), expected, atol=1e-5, rtol=1e-5)


class _SubclassedLinear(nn.Linear):
    """Stands for FP8's Float8Linear: an nn.Linear subclass with a forward of its own."""


def _lora_fp8_base(model):
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj"])
    model.model.layers["0"].self_attn.q_proj.base_linear = lambda x, w, b=None: F.linear(x, w, b)


def _subclass(model):
    attn = model.model.layers["0"].self_attn
    old = attn.k_proj
    attn.k_proj = _SubclassedLinear(old.in_features, old.out_features, bias=True)
    attn.k_proj.load_state_dict(old.state_dict())
    attn.k_proj.requires_grad_(False)


def _trainable(model):
    model.model.layers["0"].self_attn.v_proj.weight.requires_grad_(True)


def _dora(model):
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj"], use_dora=True)


def _tied(model):
    model.model.layers["1"].self_attn.k_proj.weight = model.model.layers["0"].self_attn.k_proj.weight


@pytest.mark.parametrize("change", [_lora_fp8_base, _subclass, _trainable, _dora, _tied])
def test_groups_that_cannot_fuse_are_not_packed(change):
    model = _frozen_qwen2()
    change(model)
    fused_linear.pack_frozen_groups(model)
    attn = model.model.layers["0"].self_attn
    assert not any(hasattr(m, "packed_base") for m in attn.projection_groups()[0])
    assert hasattr(model.model.layers["0"].mlp.gate_proj, "packed_base")  # the other groups still are


def test_a_weight_replaced_after_packing_is_used_unfused(monkeypatch):
    model = _frozen_qwen2()
    fused_linear.pack_frozen_groups(model)
    attn = model.model.layers["0"].self_attn
    x = torch.randn(1, 4, model.config.hidden_size)
    attn.k_proj.weight = nn.Parameter(torch.randn_like(attn.k_proj.weight), requires_grad=False)
    seen = _spy_fusion(monkeypatch)
    q, k, v = fused_linear.project(attn.projection_groups()[0], x)
    assert seen == ["unfused"]
    torch.testing.assert_close(k, attn.k_proj(x), atol=0, rtol=0)
    # Moved or converted in place (`module.to` swaps `.data`), the buffer is left behind: unfused too.
    mlp = model.model.layers["0"].mlp
    mlp.double()
    x = x.double()
    seen.clear()
    gate, up = fused_linear.project(mlp.projection_groups()[0], x)
    assert seen == ["unfused"]
    torch.testing.assert_close(up, mlp.up_proj(x), atol=0, rtol=0)


def test_data_swapped_in_place_is_used_unfused(monkeypatch):
    # `param.data = ...` keeps the Parameter object: outside torch.compile the addresses tell.
    model = _frozen_qwen2()
    fused_linear.pack_frozen_groups(model)
    attn = model.model.layers["0"].self_attn
    attn.v_proj.weight.data = torch.randn_like(attn.v_proj.weight)
    x = torch.randn(1, 4, model.config.hidden_size)
    seen = _spy_fusion(monkeypatch)
    q, k, v = fused_linear.project(attn.projection_groups()[0], x)
    assert seen == ["unfused"]
    torch.testing.assert_close(v, attn.v_proj(x), atol=0, rtol=0)


def test_a_deep_copy_is_not_packed(monkeypatch):
    # Parameters deep-copy one by one: a copied record would point at a buffer the copy's weights
    # are not rows of, which a compiled layer (no address check) would read.
    model = _frozen_qwen2()
    fused_linear.pack_frozen_groups(model)
    attn = copy.deepcopy(model).model.layers["0"].self_attn
    assert attn.q_proj.packed_base is None
    seen = _spy_fusion(monkeypatch)
    fused_linear.project(attn.projection_groups()[0], torch.randn(1, 3, model.config.hidden_size))
    assert seen == ["unfused"]
