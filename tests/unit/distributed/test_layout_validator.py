"""Every refusal of `check_parallel_layout`, in one process with no process group: the layout of an
N-GPU command line is judged from its numbers alone (as `--dryrun` does on a laptop).

Expected sizes are worked by hand from the rules in docs/parallelism.md: data parallelism is what
the world leaves after tp·pp·cp, split into replicas × shards; the step's micro-batches per rank are
global_batch / (micro_batch × data-parallel size).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist

from shoal.config.parallel import ParallelConfig
from shoal.distributed import check_parallel_layout
from shoal.distributed.layout_checks import data_parallel_sizes
from shoal.errors import ShoalError
from shoal.models import get_preset

TINY = get_preset("llama_tiny")  # 4 heads, 2 kv heads, 2 layers, vocab 512, intermediate 128
LLAMA_8B = get_preset("llama31_8b")  # 32 heads, 8 kv heads, 32 layers, vocab 128256, intermediate 14336
MOE_TINY = get_preset("qwen3_moe_tiny")  # 8 experts, 2 per token
QWEN3_30B = get_preset("qwen3_30b_a3b")  # 128 experts, 48 layers


def _model(**changes):
    return dataclasses.replace(TINY, **changes)


# (parallel section, world size, model, keyword arguments, the message's words, in order)
REFUSALS = {
    "world_not_divisible_by_model_parallel": (
        {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 6, None, {},
        ["world size 6", "tensor (2) × pipeline (2) × context (1)", "= 4", "num_nodes × num_gpus"]),
    "replicas_do_not_divide_data_parallel": (
        {"data_parallel_replicate_size": 3}, 4, None, {},
        ["data-parallel size 4", "world 4 / tp·pp·cp 1", "3 data-parallel replicas"]),
    "hsdp_replicas_per_node_do_not_divide": (
        {"data_parallel_replicate_size": 4, "tensor_model_parallel_size": 4}, 8, None, {},
        ["data-parallel size 2", "world 8 / tp·pp·cp 4", "4 data-parallel replicas"]),
    "pipeline_with_context": (
        {"pipeline_model_parallel_size": 2, "context_parallel_size": 2}, 4, None, {},
        ["pipeline_model_parallel_size 2", "context_parallel_size 2", "not supported", "set one of them to 1"]),
    "tp_splits_heads": (
        {"tensor_model_parallel_size": 3}, 3, TINY, {}, ["tensor_model_parallel_size 3", "num_heads (4)",
                                                       "whole attention heads"]),
    "tp_splits_kv_heads": (
        {"tensor_model_parallel_size": 4}, 4, _model(num_heads=8), {}, ["num_kv_heads (2)", "key/value heads"]),
    "tp_splits_mlp": (
        {"tensor_model_parallel_size": 2}, 2, _model(intermediate_size=129), {},
        ["intermediate_size (129)", "MLP columns"]),
    "tp_splits_vocabulary": (
        {"tensor_model_parallel_size": 2}, 2, _model(vocab_size=511), {}, ["vocab_size (511)", "vocabulary rows"]),
    "tp_on_a_real_shape": (
        {"tensor_model_parallel_size": 16}, 16, LLAMA_8B, {}, ["num_kv_heads (8)"]),
    "layers_over_stages": (
        {"pipeline_model_parallel_size": 4}, 4, TINY, {}, ["2 layers", "over 4 pipeline stages", "× 1 stages"]),
    "layers_over_virtual_stages": (
        {"pipeline_model_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b"}, 2, TINY, {},
        ["2 layers", "over 4 pipeline stages", "pipeline_model_parallel_size 2 × 2 stages per rank"]),
    "tied_embeddings_under_pp": (
        {"pipeline_model_parallel_size": 2}, 2, _model(tie_word_embeddings=True), {},
        ["tied input/output embeddings", "different stages"]),
    "sequence_over_context_chunks": (
        {"context_parallel_size": 2}, 2, None, {"seq_length": 30}, ["seq_length 30", "2 × context_parallel_size = 4"]),
    "sequence_over_sequence_parallel": (
        {"tensor_model_parallel_size": 4, "context_parallel_size": 2}, 8, None, {"seq_length": 36},
        ["seq_length 36 / context_parallel_size 2", "tensor_model_parallel_size 4", "sequence_parallel=false"]),
    "global_batch_over_micro_batches": (
        {"tensor_model_parallel_size": 2}, 8, None, {"global_batch_size": 6, "micro_batch_size": 1},
        ["global_batch_size 6", "micro_batch_size 1 × data-parallel size 4"]),
    "one_f_one_b_needs_micro_batches": (
        {"pipeline_model_parallel_size": 4}, 8, None, {"global_batch_size": 6, "micro_batch_size": 1},
        ["1F1B", "(micro_batch_size 1 × data-parallel 2) = 3", "< 4 stages", "at least 8"]),
    # Expert parallelism: carved out of the FSDP shards, so it must divide them (8 / (tp 1) = 8 here
    # would pass; 6 ranks leave 6, which 4 does not divide), and each rank holds whole experts.
    "ep_divides_data_parallel": (
        {"expert_model_parallel_size": 4}, 6, None, {},
        ["expert_model_parallel_size 4", "data-parallel size 6", "divides 6"]),
    "ep_splits_experts": (
        {"expert_model_parallel_size": 3}, 3, MOE_TINY, {}, ["expert_model_parallel_size 3", "num_experts (8)"]),
    "ep_needs_experts": (
        {"expert_model_parallel_size": 2}, 2, TINY, {}, ["expert_model_parallel_size 2", "mixture-of-experts",
                                                       "llama", "dense"]),
    "ep_out_of_what_tensor_parallel_leaves": (
        # 8 ranks / tp 2 leave 4 data-parallel ranks, which 8 expert-parallel ones cannot come from.
        {"expert_model_parallel_size": 8, "tensor_model_parallel_size": 2}, 8, None, {},
        ["expert_model_parallel_size 8", "data-parallel size 4"]),
    "ep_with_pipeline": (
        {"expert_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 4, None, {},
        ["expert_model_parallel_size 2", "pipeline_model_parallel_size 2", "set them to 1"]),
    "ep_with_context": (
        {"expert_model_parallel_size": 2, "context_parallel_size": 2}, 4, None, {},
        ["expert_model_parallel_size 2", "context_parallel_size 2"]),
    "ep_with_hsdp": (
        {"expert_model_parallel_size": 2, "data_parallel_replicate_size": 2}, 4, None, {},
        ["expert_model_parallel_size 2", "data_parallel_replicate_size 2", "hsdp"]),
    "interleaved_rounds": (
        # 10 micro-batches over pp=4: torch's schedule makes 10 // 4 = 2 rounds, and 10 % 2 == 0 would
        # pass, so take 9: 2 rounds, 9 % 2 = 1.
        {"pipeline_model_parallel_size": 4, "pipeline_schedule": "interleaved_1f1b"}, 4, None,
        {"global_batch_size": 9, "micro_batch_size": 1},
        ["9 micro-batches", "2 equal rounds", "9 // 4 stages", "not a multiple of 2", "multiple of 4"]),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_impossible_layout_is_refused_with_its_numbers(name: str) -> None:
    parallel, world, model, kwargs, words = REFUSALS[name]
    with pytest.raises(ShoalError) as refused:
        check_parallel_layout(ParallelConfig(**parallel), world, model, **kwargs)
    message = str(refused.value)
    positions = [message.find(word) for word in words]
    assert -1 not in positions and positions == sorted(positions), (words, message)
    assert not dist.is_initialized()  # judged from numbers alone


@pytest.mark.parametrize(
    "parallel,world,expected",
    [
        ({}, 1, (1, 1)),
        ({}, 8, (1, 8)),
        ({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 32, (1, 8)),
        ({"tensor_model_parallel_size": 2, "data_parallel_replicate_size": 2}, 16, (2, 4)),
        ({"data_parallel_replicate_size": 4}, 32, (4, 8)),  # hsdp on 4 nodes, as resolve_recipe sets it
        ({"context_parallel_size": 4, "data_parallel_replicate_size": 2}, 16, (2, 2)),
        ({"data_parallel_replicate_size": 8}, 8, (8, 1)),  # plain replication
    ],
)
def test_data_parallelism_takes_what_the_world_leaves(parallel: dict, world: int, expected: tuple) -> None:
    assert data_parallel_sizes(ParallelConfig(**parallel), world) == expected


@pytest.mark.parametrize(
    "parallel,world,kwargs",
    [
        # The seed's 8B pretraining line on one node of 8 GPUs (TP=2), 2048 sequences of 8192 tokens.
        ({"tensor_model_parallel_size": 2}, 8,
         {"seq_length": 8192, "global_batch_size": 2048, "micro_batch_size": 1}),
        # 1F1B with exactly as many micro-batches as stages: 8 / (1 × 2) = 4 = pp.
        ({"pipeline_model_parallel_size": 4}, 8, {"seq_length": 8192, "global_batch_size": 8, "micro_batch_size": 1}),
        # Interleaved with 10 micro-batches over pp=4: 2 rounds of 5.
        ({"pipeline_model_parallel_size": 4, "pipeline_schedule": "interleaved_1f1b"}, 4,
         {"global_batch_size": 10, "micro_batch_size": 1}),
        # Fewer micro-batches than stages is fine for the interleaved schedule (one round).
        ({"pipeline_model_parallel_size": 4, "pipeline_schedule": "interleaved_1f1b"}, 4,
         {"global_batch_size": 3, "micro_batch_size": 1}),
        # Context parallelism: 8192 = 2·cp·1024; sequence parallelism over 8192/4 = 2048 tokens.
        ({"context_parallel_size": 4, "tensor_model_parallel_size": 2}, 16,
         {"seq_length": 8192, "global_batch_size": 4, "micro_batch_size": 2}),
        # Without sequence parallelism the sequence need not split over tensor-parallel ranks.
        ({"tensor_model_parallel_size": 2, "sequence_parallel": False}, 2, {"seq_length": 33}),
    ],
)
def test_layouts_that_fit_pass(parallel: dict, world: int, kwargs: dict) -> None:
    check_parallel_layout(ParallelConfig(**parallel), world, LLAMA_8B, **kwargs)
    assert not dist.is_initialized()


@pytest.mark.parametrize("ep,tp,world", [(8, 1, 8), (8, 1, 16), (2, 1, 8), (128, 1, 128), (4, 2, 8)])
def test_expert_layouts_that_fit_pass(ep: int, tp: int, world: int) -> None:
    """Qwen3-30B-A3B's 128 experts over ep ranks of a data-parallel world (EP8 on one node: 16
    experts per GPU; EP8 on 16 GPUs: two groups of 8 holding the same experts; TP2 leaves 4
    data-parallel ranks of 8, all of them expert-parallel)."""
    parallel = ParallelConfig(expert_model_parallel_size=ep, tensor_model_parallel_size=tp)
    check_parallel_layout(parallel, world, QWEN3_30B, seq_length=4096, global_batch_size=world, micro_batch_size=1)
    assert not dist.is_initialized()


def test_expert_parallel_size_must_be_positive() -> None:
    with pytest.raises(ShoalError, match="expert_model_parallel_size must be a positive integer"):
        ParallelConfig(expert_model_parallel_size=0)


def test_only_what_is_given_is_checked() -> None:
    """Without a model the head counts are not judged; without batch sizes the micro-batches are not."""
    wide_tp = ParallelConfig(tensor_model_parallel_size=8)
    check_parallel_layout(wide_tp, 8)
    with pytest.raises(ShoalError, match="num_heads"):
        check_parallel_layout(wide_tp, 8, TINY)
    pipeline = ParallelConfig(pipeline_model_parallel_size=4)
    check_parallel_layout(pipeline, 4, seq_length=64)
    with pytest.raises(ShoalError, match="1F1B"):
        check_parallel_layout(pipeline, 4, global_batch_size=2, micro_batch_size=1)
