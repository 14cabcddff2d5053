"""One-process checks of shoal.distributed: layout validation, sequence sharding for context
parallelism, pipeline stage splitting, parameter names after checkpointing/compile, clipping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from shoal.config.loader import from_dict
from shoal.config.parallel import ParallelConfig
from shoal.distributed import (
    build_mesh,
    check_parallel_layout,
    clip_grad_norm_,
    context_parallel_context,
    init_distributed,
    parallelize_model,
)
from shoal.distributed.context_parallel import load_balanced_indices, shard_sequence
from shoal.errors import ShoalError
from shoal.models import build_model, get_preset
from shoal.models.parallel_plan import DECODER_PLAN

TINY = get_preset("llama_tiny")  # 4 heads, 2 kv heads, 2 layers, vocab 512, intermediate 128


def _layout(**kw) -> ParallelConfig:
    return ParallelConfig(**kw)


@pytest.mark.parametrize(
    "kwargs,world,model_kw,check_kw,message",
    [
        ({"tensor_model_parallel_size": 3}, 6, {}, {}, "num_heads"),
        ({"tensor_model_parallel_size": 4}, 4, {"num_heads": 8}, {}, "num_kv_heads"),
        ({"tensor_model_parallel_size": 2}, 3, {}, {}, "world size 3 is not divisible"),
        ({"pipeline_model_parallel_size": 4}, 4, {}, {}, "2 layers cannot be split evenly over 4"),
        ({"pipeline_model_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b"}, 2, {}, {},
         "over 4 pipeline stages"),
        ({"pipeline_model_parallel_size": 2}, 2, {"tie_word_embeddings": True}, {}, "tied"),
        ({"context_parallel_size": 2}, 2, {}, {"seq_length": 30}, "2 × context_parallel_size = 4"),
        ({"tensor_model_parallel_size": 2}, 2, {}, {"seq_length": 33}, "sequence parallelism"),
        ({}, 4, {}, {"global_batch_size": 6, "micro_batch_size": 1}, "not divisible by micro_batch_size 1 × "
                                                                    "data-parallel size 4"),
        ({"pipeline_model_parallel_size": 2}, 2, {}, {"global_batch_size": 1, "micro_batch_size": 1},
         "at least as many micro-batches"),
        ({"data_parallel_replicate_size": 3}, 4, {}, {}, "not divisible by the 3 data-parallel replicas"),
    ],
)
def test_impossible_layouts_are_refused_with_the_reason(kwargs, world, model_kw, check_kw, message) -> None:
    model_cfg = dataclasses.replace(TINY, **model_kw)
    with pytest.raises(ShoalError, match=message):
        check_parallel_layout(_layout(**kwargs), world, model_cfg, **check_kw)


def test_a_layout_that_fits_passes_and_gives_data_parallel_what_remains() -> None:
    cfg = _layout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, data_parallel_replicate_size=2)
    check_parallel_layout(cfg, 32, TINY, seq_length=64, global_batch_size=64, micro_batch_size=2)
    cfg = dataclasses.replace(cfg, pipeline_model_parallel_size=1, context_parallel_size=2)
    check_parallel_layout(cfg, 32, TINY, seq_length=64, global_batch_size=64, micro_batch_size=2)
    dims = build_mesh(dataclasses.replace(cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                          context_parallel_size=1, data_parallel_replicate_size=1), 1, "cpu")
    assert (dims.dp_size, dims.dp_rank, dims.mesh) == (1, 0, None)
    assert not dims.dp_enabled and dims.pp_rank == 0


def test_config_refuses_bad_values_and_loads_from_a_recipe_mapping() -> None:
    with pytest.raises(ShoalError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ShoalError, match="needs parallel.pipeline_schedule=interleaved_1f1b"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)
    # HSDP's replica count is the launch's node count, decided when the recipe is resolved.
    from shoal.config.launch import LaunchConfig
    from shoal.config.resolve import build_recipe

    with pytest.raises(ShoalError, match="hsdp"):
        build_recipe("pretrain", "tiny", {"parallel.hsdp": True, "parallel.data_parallel_replicate_size": 4},
                     launch=LaunchConfig(executor="slurm", num_nodes=2))
    recipe = build_recipe("pretrain", "tiny", {"parallel.hsdp": True, "parallel.pipeline_schedule": "interleaved_1f1b",
                                               "parallel.param_dtype": "bfloat16"},
                          launch=LaunchConfig(executor="slurm", num_nodes=4))
    cfg = recipe.parallel
    assert (cfg.replicate_size, cfg.stages_per_rank, cfg.param_dtype) == (4, 2, "bfloat16")
    with pytest.raises(ShoalError, match="activation_checkpointing"):
        from_dict(ParallelConfig, {"activation_checkpointing": "sometimes"})


def test_a_world_larger_than_one_needs_torchrun(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed("cpu") == (0, 1, 0)
    with pytest.raises(ShoalError, match="torchrun"):
        build_mesh(ParallelConfig(), 2, "cpu")


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_context_parallel_shards_partition_the_sequence_and_balance_causal_work(cp: int) -> None:
    seq = 48
    shards = [load_balanced_indices(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(seq))
    # Under a causal mask token i attends i + 1 keys: every rank must get the same total.
    work = {int((s + 1).sum()) for s in shards}
    assert len(work) == 1
    x = torch.arange(2 * seq).view(2, seq)
    for r in range(cp):
        torch.testing.assert_close(shard_sequence(x, 1, cp, r), x[:, shards[r]])


def test_context_parallel_context_is_a_no_op_without_context_parallelism() -> None:
    dims = build_mesh(ParallelConfig(), 1, "cpu")
    tokens, labels = torch.arange(8).view(1, 8), torch.ones(1, 8)
    with context_parallel_context(dims, [tokens, labels], [1, 1]) as (t, lab):
        assert t is tokens and lab is labels
    with pytest.raises(ShoalError, match="2 buffers but 1 seq_dims"):
        with context_parallel_context(dims, [tokens, labels], [1]):
            pass


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_pipeline_stages_keep_their_layers_under_the_full_models_names(stages: int) -> None:
    cfg = dataclasses.replace(TINY, num_layers=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    full = model.state_dict()
    seen: dict[str, torch.Tensor] = {}
    for index in range(stages):
        stage = DECODER_PLAN.pipeline_stage(model, index, stages)
        sd = stage.state_dict()
        assert not set(sd) & set(seen), "a parameter on two stages"
        assert (stage.model.embed_tokens is not None) == (index == 0)
        assert (stage.lm_head is not None) == (index == stages - 1)
        assert len(stage.model.layers) == 4 // stages
        seen.update(sd)
    assert sorted(seen) == sorted(full)
    for name, value in full.items():
        torch.testing.assert_close(seen[name], value, rtol=0, atol=0)
    # The split copied what it kept: the original model is untouched and independent.
    assert len(model.model.layers) == 4 and model.model.embed_tokens is not None


def test_checkpointing_and_compile_keep_hugging_face_names() -> None:
    reference = build_model(TINY)
    model = build_model(TINY)
    dims = build_mesh(ParallelConfig(), 1, "cpu")
    parallelize_model(model, dims, ParallelConfig(activation_checkpointing="selective", compile=True), "cpu")
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert sorted(get_model_state_dict(model)) == sorted(reference.state_dict())


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode: str) -> None:
    """Recomputation changes when activations are computed, not what: gradients stay bit-close.
    (Compiled layers run on the GPU machine, tests/gpu: inductor on CPU is too slow for CI.)"""
    torch.manual_seed(0)
    reference = build_model(TINY)
    model = build_model(TINY)
    model.load_state_dict(reference.state_dict())
    dims = build_mesh(ParallelConfig(), 1, "cpu")
    parallelize_model(model, dims, ParallelConfig(activation_checkpointing=mode), "cpu")
    # Counted on entry: recomputation stops as soon as it has what backward needs, which can be
    # before the module returns.
    calls = {"reference": 0, "model": 0}
    for key, m in (("reference", reference), ("model", model)):
        m.model.layers["0"].mlp.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for m in (reference, model):
        m(tokens).float().square().mean().backward()
    assert calls == {"reference": 1, "model": 2}  # the layer really ran again in backward
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_clipping_matches_torch_on_one_process() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, clones):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(clones, 1.0)
    got = clip_grad_norm_(params, 1.0, build_mesh(ParallelConfig(), 1, "cpu"))
    torch.testing.assert_close(got, expected)
    for p, q in zip(params, clones):
        torch.testing.assert_close(p.grad, q.grad)
