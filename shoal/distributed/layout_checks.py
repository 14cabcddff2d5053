"""Every refusal of a parallel layout, made before data, model or process groups exist.

A layout is the `parallel:` section plus the world size (num_nodes × num_gpus). Whether it can run
depends only on numbers known from the command line: the model's shape (its config), the sequence
length and the batch sizes. So the whole check runs in one process, before anything is built: at
the start of a run, and from `--dryrun` for an N-GPU command line on a laptop. The functions that
apply a layout (`build_mesh`, `parallelize_model`, `pipeline_model`) trust what passed here.
"""

from __future__ import annotations

from shoal.config.parallel import ParallelConfig
from shoal.errors import ShoalError
from shoal.models.config import ModelConfig

# Model sizes that tensor parallelism splits over its ranks, and what each rank must hold whole.
TP_SPLIT_SIZES = {
    "num_heads": "attention heads",
    "num_kv_heads": "key/value heads",
    "intermediate_size": "MLP columns",
    "vocab_size": "vocabulary rows",
}


def data_parallel_sizes(parallel: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(replicas, shards) of data parallelism: what remains of the world after tensor, pipeline
    and context parallelism, split into HSDP replicas and FSDP shards within each."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ShoalError(
            f"world size {world_size} is not divisible by tensor ({tp}) × pipeline ({pp}) × context ({cp}) "
            f"parallel sizes = {model_parallel}; data parallelism takes what remains, so the product must divide "
            "the number of processes (num_nodes × num_gpus)"
        )
    dp = world_size // model_parallel
    replicas = parallel.replicate_size
    if dp % replicas:
        raise ShoalError(
            f"data-parallel size {dp} (world {world_size} / tp·pp·cp {model_parallel}) is not divisible by "
            f"the {replicas} data-parallel replicas (parallel.data_parallel_replicate_size or hsdp)"
        )
    return replicas, dp // replicas


def check_parallel_layout(
    parallel: ParallelConfig,
    world_size: int,
    model: ModelConfig | None = None,
    *,
    seq_length: int | None = None,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
) -> None:
    """Refuse a layout that cannot run, with the numbers and what to change. Checks what it is
    given: without `model`, the model's shape is not checked; without the batch sizes, the
    micro-batch counts are not."""
    replicas, shards = data_parallel_sizes(parallel, world_size)
    _check_pipeline_with_context(parallel)
    _check_expert_layout(parallel, replicas, shards)
    if model is not None:
        _check_model_split(parallel, model)
        _check_expert_split(parallel, model)
    if seq_length is not None:
        _check_sequence_split(parallel, seq_length)
    if global_batch_size is not None and micro_batch_size is not None:
        _check_micro_batches(parallel, replicas * shards, global_batch_size, micro_batch_size)


def _check_pipeline_with_context(parallel: ParallelConfig) -> None:
    pp, cp = parallel.pipeline_model_parallel_size, parallel.context_parallel_size
    if pp > 1 and cp > 1:
        # The pipeline schedule splits each batch into micro-batches inside the step, while context
        # parallelism shards every micro-batch's sequence (and its document mask) before the forward.
        raise ShoalError(
            f"pipeline parallelism (pipeline_model_parallel_size {pp}) and context parallelism "
            f"(context_parallel_size {cp}) together are not supported yet; set one of them to 1"
        )


def _check_expert_layout(parallel: ParallelConfig, replicas: int, shards: int) -> None:
    """Expert parallelism is carved out of the FSDP shards: what the numbers alone must allow."""
    ep = parallel.expert_model_parallel_size
    if ep == 1:
        return
    others = {
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "context_parallel_size": parallel.context_parallel_size,
        "data_parallel_replicate_size": replicas,
    }
    combined = {key: value for key, value in others.items() if value > 1}
    if combined:
        # Only expert × data (FSDP) × tensor parallelism is tested against one process so far.
        settings = ", ".join(f"{key} {value}" for key, value in combined.items())
        raise ShoalError(
            f"expert_model_parallel_size {ep} runs with FSDP data parallelism and tensor parallelism only "
            f"for now; got {settings}: set them to 1 (hsdp off)"
        )
    if shards % ep:
        raise ShoalError(
            f"expert_model_parallel_size {ep} does not divide the data-parallel size {shards}: expert-parallel "
            "ranks are data-parallel ranks that share out the experts, so use a size that divides "
            f"{shards} (num_nodes × num_gpus / tensor·pipeline·context)"
        )


def _check_expert_split(parallel: ParallelConfig, model: ModelConfig) -> None:
    ep = parallel.expert_model_parallel_size
    if ep == 1:
        return
    if not model.is_moe:
        raise ShoalError(
            f"expert_model_parallel_size {ep} needs a mixture-of-experts model; {model.family} is dense: "
            "set it to 1"
        )
    if model.num_experts % ep:
        raise ShoalError(
            f"expert_model_parallel_size {ep} does not divide the model's num_experts ({model.num_experts}); "
            f"each expert-parallel rank holds whole experts: use a size that divides {model.num_experts}"
        )


def _check_model_split(parallel: ParallelConfig, model: ModelConfig) -> None:
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    if model.is_moe and max(pp, cp) > 1:
        # The load-balancing loss does not cross pipeline stages, and context parallelism would
        # split its token statistics (issue 18).
        raise ShoalError(
            f"mixture-of-experts models ({model.family}, {model.num_experts} experts) run with data and tensor "
            f"parallelism only for now; got pipeline_model_parallel_size {pp}, context_parallel_size {cp}: "
            "set them to 1"
        )
    for key, what in TP_SPLIT_SIZES.items():
        value = getattr(model, key)
        if value % tp:
            raise ShoalError(
                f"tensor_model_parallel_size {tp} does not divide the model's {key} ({value}); each "
                f"tensor-parallel rank must hold whole {what}: use a tensor_model_parallel_size that divides {value}"
            )
    stages = pp * parallel.stages_per_rank
    if model.num_layers % stages:
        raise ShoalError(
            f"the model's {model.num_layers} layers cannot be split evenly over {stages} pipeline stages "
            f"(pipeline_model_parallel_size {pp} × {parallel.stages_per_rank} stages per rank)"
        )
    if pp > 1 and model.tie_word_embeddings:
        raise ShoalError(
            "pipeline parallelism with tied input/output embeddings (tie_word_embeddings, e.g. Llama 3.2 1B/3B, "
            "Qwen2.5 1.5B) is not supported: the embedding and the output layer live on different stages; "
            "use tensor/data parallelism for this model"
        )


def _check_sequence_split(parallel: ParallelConfig, seq_length: int) -> None:
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    if cp > 1 and seq_length % (2 * cp):
        raise ShoalError(
            f"seq_length {seq_length} is not divisible by 2 × context_parallel_size = {2 * cp}: context "
            "parallelism splits each sequence into 2·cp chunks to balance causal attention across ranks"
        )
    if tp > 1 and parallel.sequence_parallel and (seq_length // cp) % tp:
        raise ShoalError(
            f"seq_length {seq_length} / context_parallel_size {cp} is not divisible by "
            f"tensor_model_parallel_size {tp}, which sequence parallelism splits each sequence over "
            "(or set parallel.sequence_parallel=false)"
        )


def _check_micro_batches(parallel: ParallelConfig, dp: int, global_batch_size: int, micro_batch_size: int) -> None:
    pp = parallel.pipeline_model_parallel_size
    if global_batch_size % (micro_batch_size * dp):
        raise ShoalError(
            f"global_batch_size {global_batch_size} is not divisible by micro_batch_size {micro_batch_size} × "
            f"data-parallel size {dp}"
        )
    micro_batches = global_batch_size // (micro_batch_size * dp)
    if pp == 1:
        return
    if parallel.pipeline_schedule == "1f1b" and micro_batches < pp:
        raise ShoalError(
            f"the 1F1B pipeline needs at least as many micro-batches per step as stages: global_batch_size "
            f"{global_batch_size} / (micro_batch_size {micro_batch_size} × data-parallel {dp}) = {micro_batches} "
            f"< {pp} stages; raise global_batch_size to at least {pp * micro_batch_size * dp}"
        )
    # torch's interleaved schedule cuts the step into micro_batches // pp rounds of equal size.
    rounds = max(1, micro_batches // pp)
    if parallel.pipeline_schedule == "interleaved_1f1b" and micro_batches % rounds:
        raise ShoalError(
            f"the interleaved pipeline splits the step's {micro_batches} micro-batches into {rounds} equal rounds "
            f"({micro_batches} // {pp} stages), and {micro_batches} is not a multiple of {rounds}; use a multiple "
            f"of {pp} micro-batches per step (global_batch_size / (micro_batch_size × data-parallel {dp}))"
        )
