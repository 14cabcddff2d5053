"""`--fp8` without a GPU: the recipe mapping, the refusals, the layer filter, the config round trip
and the FP8 MFU, none of which needs torchao (CI has none). The GPU half is tests/gpu/test_float8_gpu.py.

Oracles: the mapping table written in the issue (seed name -> nearest torchao recipe), the shapes
of Llama-3.2-1B's layers worked out by hand against torchao's published break-even sizes, the
vendors' datasheet peaks, and (only where torchao is installed) torchao's own `Float8Linear`.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import yaml
from torch import nn

from shoal.config.flags import SEED_FLAGS, add_training_arguments
from shoal.config.loader import from_dict, to_dict
from shoal.config.recipe import Recipe
from shoal.distributed.float8 import (
    check_float8_device,
    float8_plan,
    float8_targets,
    resolve_float8_recipe,
    torchao_version,
    worth_float8,
)
from shoal.errors import ShoalError
from shoal.models.model import Transformer
from shoal.models.presets import get_preset
from shoal.peft import apply_lora
from shoal.train.metrics import FP8_PEAK_FLOPS, PEAK_FLOPS

# The table: NeMo's names and the torchao recipe each becomes.
SEED_TO_TORCHAO = {"delayed_scaling": "tensorwise", "current_scaling": "tensorwise", "subchannel_scaling": "rowwise"}


@pytest.mark.parametrize("seed_name, torchao_name", SEED_TO_TORCHAO.items())
def test_seed_recipes_map_to_the_nearest_torchao_recipe_and_say_so(seed_name, torchao_name):
    plan = float8_plan("hybrid", seed_name)
    assert plan.recipe == torchao_name
    assert seed_name in plan.describe() and repr(torchao_name) in plan.describe()


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_torchao_recipes_are_taken_as_they_are(name):
    assert resolve_float8_recipe(name) == (name, None)
    assert float8_plan("hybrid", name).describe().startswith(f"FP8 training with torchao's {name!r} recipe")


def test_default_recipe_is_tensorwise_and_fp8_off_means_no_plan():
    assert float8_plan("hybrid", None).recipe == "tensorwise"
    assert float8_plan(None, "rowwise") is None
    assert float8_plan(None, None) is None


def test_mxfp8_is_refused_naming_what_works():
    with pytest.raises(ShoalError) as err:
        float8_plan("hybrid", "mxfp8")
    assert "Blackwell" in str(err.value) and "tensorwise" in str(err.value) and "rowwise" in str(err.value)


@pytest.mark.parametrize("fp8, fp8_recipe, fragment", [
    ("hybrid", "blockwise", "--fp8_recipe 'blockwise'"),
    ("e5m2", None, "--fp8 'e5m2'"),
])
def test_bad_names_are_refused(fp8, fp8_recipe, fragment):
    with pytest.raises(ShoalError, match=fragment):
        float8_plan(fp8, fp8_recipe)


def test_fp8_all_gather_only_for_tensorwise_under_fsdp():
    assert float8_plan("hybrid", "tensorwise", fsdp_shard_size=4).fsdp_float8_all_gather
    assert not float8_plan("hybrid", "tensorwise", fsdp_shard_size=1).fsdp_float8_all_gather
    assert not float8_plan("hybrid", "rowwise", fsdp_shard_size=4).fsdp_float8_all_gather


def test_cpu_device_is_refused():
    with pytest.raises(ShoalError, match="needs a CUDA GPU of compute capability >= 8.9"):
        check_float8_device(torch.device("cpu"))


def test_filter_on_llama_3_2_1b_shapes():
    """Hand-worked: hidden 2048, 8 kv heads x 128 = 1024, MLP 8192. tensorwise skips (in <= 4096 and
    out <= 1024): k_proj, v_proj [2048 -> 1024]. rowwise skips out <= 2048 (q, o, down) and k, v."""
    with torch.device("meta"):
        model = Transformer(get_preset("llama32_1b"))
    converted, skipped = float8_targets(model, "tensorwise")
    leaves = lambda names: {n.rpartition(".")[2] for n in names}  # noqa: E731
    assert leaves(converted) == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert leaves(skipped) == {"k_proj", "v_proj", "lm_head"}
    assert len(converted) == 5 * 16
    converted, skipped = float8_targets(model, "rowwise")
    assert leaves(converted) == {"gate_proj", "up_proj"}
    assert "lm_head" in skipped


def test_filter_never_takes_the_output_head_or_odd_sizes():
    assert not worth_float8(8192, 8200, "tensorwise")  # 8200 is not a multiple of 16
    assert worth_float8(8192, 8192, "tensorwise") and worth_float8(8192, 8192, "rowwise")
    assert not worth_float8(256, 512, "tensorwise")
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(get_preset("llama32_1b"), num_layers=1, vocab_size=16384))
    assert "lm_head" in float8_targets(model, "tensorwise")[1]


@pytest.mark.parametrize("preset", ["llama32_1b", "llama32_3b", "llama31_8b", "qwen25_1_5b", "qwen25_7b", "qwen3_8b"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_filter_is_torchaos_own_auto_filter(preset, recipe):
    """Where torchao is installed: the layers shoal converts are those torchao's auto filter for the
    recipe picks (its H100 break-even sizes), less the output head, on the shapes shoal benchmarks."""
    pytest.importorskip("torchao")
    from torchao.float8 import _auto_filter_for_recipe

    with torch.device("meta"):
        model = Transformer(dataclasses.replace(get_preset(preset), num_layers=1))
    keep = _auto_filter_for_recipe(recipe, filter_fqns=["lm_head"])
    theirs = {name for name, module in model.named_modules() if keep(module, name)}
    converted, _ = float8_targets(model, recipe)
    assert set(converted) == theirs


def test_compiled_filter_judges_layers_that_share_an_input_together():
    """Hand-worked on Llama-3.2-3B's shapes (hidden 3072, 8 kv heads x 128 = 1024, MLP 8192). Alone,
    k_proj and v_proj [3072 -> 1024] are below tensorwise's break-even (in <= 4096, out <= 1024) and
    rowwise's (out <= 2048). Compiled, they share their input's cast with q_proj, and the group is
    the matmul [3072 -> 3072 + 1024 + 1024 = 5120]: above both. On the 1B (2048 -> 2048 + 512 + 512
    = 3072), rowwise still skips the group (out <= 4096 and in <= 2048)."""
    leaves = lambda names: {n.rpartition(".")[2] for n in names}  # noqa: E731
    with torch.device("meta"):
        small, big = (Transformer(dataclasses.replace(get_preset(p), num_layers=1)) for p in ("llama32_1b", "llama32_3b"))
    all_seven = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for recipe in ("tensorwise", "rowwise"):
        assert {"k_proj", "v_proj"} <= leaves(float8_targets(big, recipe)[1])  # alone (eager): skipped
        converted, skipped = float8_targets(big, recipe, shared_input_casts=True)
        assert leaves(converted) == all_seven and skipped == ["lm_head"]
    assert leaves(float8_targets(small, "tensorwise", shared_input_casts=True)[0]) == all_seven
    assert leaves(float8_targets(small, "rowwise", shared_input_casts=True)[0]) == {"gate_proj", "up_proj"}


def test_a_narrow_layer_without_its_group_is_judged_alone():
    """Only members that are there and read an input of the same width count: a k_proj with no
    q_proj beside it, or beside a q_proj of another input width, stays below break-even."""

    def block(q_in: int | None) -> nn.Module:
        attn = nn.Module()
        attn.k_proj = nn.Linear(3072, 1024, bias=False)
        if q_in is not None:
            attn.q_proj = nn.Linear(q_in, 3072, bias=False)
        root = nn.Module()
        root.self_attn = attn
        return root

    assert float8_targets(block(None), "tensorwise", shared_input_casts=True)[1] == ["self_attn.k_proj"]
    converted, skipped = float8_targets(block(2048), "tensorwise", shared_input_casts=True)
    assert skipped == ["self_attn.k_proj"] and converted == ["self_attn.q_proj"]
    assert float8_targets(block(3072), "tensorwise", shared_input_casts=True) == (["self_attn.k_proj", "self_attn.q_proj"], [])


def test_compiled_layers_reading_one_input_cast_it_once():
    """Where torchao is installed: the premise of the grouped filter. A tensorwise Float8Linear takes
    4 amaxes (|t|.max(), one per scale) in its forward and backward graphs: its input, its weight
    (reused by the input-gradient matmul), its output's gradient, and its input again for the
    weight gradient. Three layers on three inputs: 12. Traced as torch.compile traces them
    (AOTAutograd with inductor's partitioner; torchao's emulation on CPU), three layers on one
    input take the input's two once for the group: 12 - 2 x 2 = 8."""
    pytest.importorskip("torchao")
    from functorch.compile import min_cut_rematerialization_partition
    from torchao.float8.float8_linear import Float8Linear

    from shoal.distributed.float8 import float8_config
    from tests.helpers.matmuls import recording_backend

    config = dataclasses.replace(float8_config(float8_plan("hybrid", "tensorwise")), emulate=True)
    layers = [Float8Linear.from_float(nn.Linear(64, n, bias=False), config=config) for n in (64, 32, 32)]

    def amaxes(fn) -> int:
        graphs = []
        torch._dynamo.reset()
        backend = recording_backend(graphs, partition_fn=min_cut_rematerialization_partition)
        torch.compile(fn, backend=backend)(torch.randn(4, 64, requires_grad=True)).backward()
        assert len(graphs) == 2  # one forward, one backward: no graph break
        return sum(node.target is torch.ops.aten.abs.default for g in graphs for node in g.graph.nodes)

    # Squares, not plain sums: each output's gradient (2y) then differs, so none of those casts merge.
    shared = amaxes(lambda x: sum(layer(x).pow(2).sum() for layer in layers))
    separate = amaxes(lambda x: sum(layer(x + i).pow(2).sum() for i, layer in enumerate(layers)))
    assert (shared, separate) == (8, 12)


def test_apply_float8_converts_the_groups_only_when_compiled():
    """Where torchao is installed: the engine's `compiled` reaches the filter, for plain layers and
    for the frozen base of LoRA layers."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from shoal.distributed.float8 import FrozenFloat8Linear, apply_float8

    def k_proj(compiled: bool, lora: bool) -> object:
        with torch.device("meta"):
            model = Transformer(dataclasses.replace(get_preset("llama32_3b"), num_layers=1))
        if lora:
            apply_lora(model, rank=16, target_modules="all-linear")
        apply_float8(model, float8_plan("hybrid", "tensorwise"), compiled=compiled)
        layer = model.get_submodule("model.layers.0.self_attn.k_proj")
        return type(layer.base_linear) if lora else type(layer)

    assert k_proj(compiled=True, lora=False) is Float8Linear and k_proj(compiled=False, lora=False) is nn.Linear
    assert k_proj(compiled=True, lora=True) is FrozenFloat8Linear
    assert k_proj(compiled=False, lora=True) is not FrozenFloat8Linear


@pytest.mark.parametrize("compiled", [False, True])
def test_the_engine_tells_the_conversion_whether_it_compiles(monkeypatch, compiled):
    """build_engine hands parallel.compile to the FP8 conversion (recorded here, not run: no torchao
    or GPU needed)."""
    from shoal.config.parallel import ParallelConfig
    from shoal.config.recipe import TrainSection
    from shoal.distributed import build_mesh
    from shoal.train import engine as engine_module

    seen = []
    monkeypatch.setattr(engine_module, "_apply_float8", lambda model, plan, device, compiled: seen.append(compiled))
    parallel = ParallelConfig(compile=compiled)
    engine_module.build_engine(get_preset("llama_tiny"), train=TrainSection(micro_batch_size=1, global_batch_size=1, fp8="hybrid"),
                               parallel=parallel, peft=None, dims=build_mesh(parallel, 1, "cpu"),
                               device=torch.device("cpu"), compute_dtype=torch.float32)
    assert seen == [compiled]


def test_filter_sees_lora_layers_but_never_their_adapters():
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(get_preset("llama32_1b"), num_layers=1))
    apply_lora(model, rank=16, target_modules="all-linear")
    converted, skipped = float8_targets(model, "tensorwise")
    assert "model.layers.0.mlp.up_proj" in converted
    assert not any("lora_" in n for n in converted + skipped)


def test_lora_layers_apply_their_base_with_f_linear_by_default():
    """The hook FP8 uses changes nothing without --fp8: the same output and state-dict keys."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"q_proj": nn.Linear(16, 8)})
    reference = model["q_proj"](torch.ones(2, 16))
    keys = set(model.state_dict())
    apply_lora(model, rank=4, target_modules=["q_proj"])
    assert model["q_proj"].base_linear is torch.nn.functional.linear
    assert torch.equal(model["q_proj"](torch.ones(2, 16)), reference)
    assert set(model.state_dict()) == keys | {"q_proj.lora_A.weight", "q_proj.lora_B.weight"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    return parser.parse_args(list(argv))


def test_seed_flags_reach_the_recipe_keys():
    keys = {flags[0]: key for flags, key, _ in SEED_FLAGS}
    assert keys["--fp8"] == "train.fp8" and keys["--fp8_recipe"] == "train.fp8_recipe"
    args = parse("--fp8", "--fp8_recipe", "current_scaling")
    assert (args.fp8, args.fp8_recipe) == ("hybrid", "current_scaling")  # the seed's plain --fp8
    assert parse("--fp8", "e4m3").fp8 == "e4m3"


def test_config_round_trip_through_yaml():
    tree = {"train": {"fp8": "hybrid", "fp8_recipe": "subchannel_scaling"}}
    recipe = from_dict(Recipe, tree, "")
    again = from_dict(Recipe, yaml.safe_load(yaml.safe_dump(to_dict(recipe))), "")
    assert (again.train.fp8, again.train.fp8_recipe) == ("hybrid", "subchannel_scaling")
    assert again == recipe


def test_validate_takes_every_layout_and_refuses_only_without_torchao():
    recipe = from_dict(Recipe, {"train": {"fp8": "hybrid"}, "parallel": {"tensor_model_parallel_size": 2,
                                                                        "pipeline_model_parallel_size": 2,
                                                                        "context_parallel_size": 2},
                                "launch": {"num_gpus": 8}}, "")
    if torchao_version() is None:
        with pytest.raises(ShoalError, match=r"torchao >= 0\.17.*pip install 'shoal\[fp8\]'"):
            recipe.validate()
    else:
        recipe.validate()
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, fp8=None, fp8_recipe="mxfp8"))
    with pytest.raises(ShoalError, match="mxfp8"):  # a bad recipe name is refused even without --fp8
        recipe.validate()


def test_fp8_peaks_are_the_datasheets_dense_figures():
    # H100/H200 SXM: 989.4 TFLOP/s dense BF16, 1978.9 dense FP8 (NVIDIA H100 datasheet); no FP8 on A100.
    assert FP8_PEAK_FLOPS["H100"] == FP8_PEAK_FLOPS["H200"] == pytest.approx(2 * PEAK_FLOPS["H100"], rel=1e-3)
    assert "A100" not in FP8_PEAK_FLOPS


def test_frozen_base_matches_torchaos_float8_linear_in_emulation():
    """Where torchao is installed: the LoRA base's FP8 matmul gives torchao's Float8Linear output and
    input gradient exactly (torchao's emulation mode runs the same casts on CPU)."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from shoal.distributed.float8 import FrozenFloat8Linear, float8_config

    for name in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
        config = dataclasses.replace(float8_config(float8_plan("hybrid", name)), emulate=True)
        torch.manual_seed(0)
        plain = nn.Linear(64, 48)
        reference = Float8Linear.from_float(nn.Linear(64, 48), config=config)
        reference.load_state_dict(plain.state_dict())
        x = torch.randn(2, 5, 64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out = FrozenFloat8Linear(config)(x, plain.weight.detach(), plain.bias.detach())
        out_ref = reference(x_ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_ref.backward(grad)
        assert torch.equal(out, out_ref) and torch.equal(x.grad, x_ref.grad), name


def test_frozen_base_compiles_without_a_graph_break():
    """Where torchao is installed: torch.compile traces the LoRA base's FP8 matmul in one graph (a
    break there once left every cast uncompiled, and FP8 LoRA ran 2.6x slower than BF16)."""
    pytest.importorskip("torchao")
    from shoal.distributed.float8 import FrozenFloat8Linear, float8_config

    config = dataclasses.replace(float8_config(float8_plan("hybrid", "tensorwise")), emulate=True)
    base, weight = FrozenFloat8Linear(config), torch.randn(48, 64)
    explained = torch._dynamo.explain(lambda x: base(x, weight).relu())(torch.randn(4, 64, requires_grad=True))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_fp8_runs_report_mfu_against_both_peaks(monkeypatch):
    """Hand-worked: 10,000 tokens/s x 1e9 FLOPs/token = 1e13 FLOP/s, 1.01% of 989 and 0.505% of 1979 TFLOP/s."""
    from shoal.train.metrics import mfu_fields

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    gpu = torch.device("cuda", 0)
    fields = mfu_fields(10_000, 1e9, gpu, fp8=True)
    assert fields["mfu"] == pytest.approx(1e13 / 989e12) and fields["mfu_fp8_peak"] == pytest.approx(1e13 / 1979e12)
    assert "mfu_fp8_peak" not in mfu_fields(10_000, 1e9, gpu, fp8=False)
    assert mfu_fields(10_000, 1e9, torch.device("cpu"), fp8=True) == {"mfu": None, "mfu_fp8_peak": None}


def test_progress_line_labels_both_mfus(tmp_path, capsys):
    from shoal.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, True, False, None, total_steps=2, start_step=0)
    logger.progress(1, {"loss": 1.0, "mfu": 0.6, "mfu_fp8_peak": 0.3})
    logger.progress(2, {"loss": 1.0, "mfu": 0.5})
    logger.close()
    fp8_line, bf16_line = capsys.readouterr().err.splitlines()
    assert "MFU 60.0% of bf16 peak, 30.0% of fp8 peak" in fp8_line
    assert "MFU 50.0%" in bf16_line and "fp8" not in bf16_line


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("recipe, shards", [("tensorwise", 1), ("tensorwise", 8), ("rowwise", 1)])
def test_conversion_keeps_every_state_dict_key_shape_and_dtype(peft, recipe, shards):
    """Where torchao is installed: what a checkpoint stores is the same with and without FP8 (also
    with the FSDP FP8 all-gather weight wrapper), so checkpoints move between FP8 and BF16 runs."""
    pytest.importorskip("torchao")
    from shoal.distributed.float8 import apply_float8

    with torch.device("meta"):
        model = Transformer(dataclasses.replace(get_preset("llama32_1b"), num_layers=2))
    if peft != "none":
        apply_lora(model, rank=16, target_modules="all-linear")
    def stored(m: nn.Module) -> dict:
        return {k: (v.shape, v.dtype) for k, v in m.state_dict().items()}

    before, trainable = stored(model), {k for k, v in model.named_parameters() if v.requires_grad}
    conversion = apply_float8(model, float8_plan("hybrid", recipe, fsdp_shard_size=shards))
    assert conversion.converted and "lm_head" in conversion.skipped
    assert stored(model) == before
    assert {k for k, v in model.named_parameters() if v.requires_grad} == trainable
