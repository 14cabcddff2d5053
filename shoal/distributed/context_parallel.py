"""Context parallelism: each of cp ranks holds 1/cp of every sequence, attention spans all of it.

Causal attention costs more for late tokens than early ones, so the sequence is cut into 2·cp
chunks and rank r takes chunks r and 2·cp-1-r (one early, one late): every rank does the same work.
Everything indexed by sequence position (tokens, labels, loss mask, positions) is cut the same way
by `context_parallel_context`, which also swaps attention for a context-parallel one while active.

Two attention backends, chosen per batch:

* "ring": PyTorch's ring attention (`torch.distributed.tensor.experimental.context_parallel`):
  key/value chunks rotate between ranks and partial results merge through the flash/efficient
  kernels' log-sum-exp. CUDA only (PyTorch has no CPU kernel for it); plain causal attention only.
* "allgather": each rank gathers the whole sequence's keys and values (small with grouped-query
  attention; Llama 3 was trained this way) and attends its own queries to them under an explicit
  mask built from global positions, which can also keep packed documents apart. Any device; the mask
  costs (S/cp) × S booleans per batch row.

"auto" uses ring attention on CUDA for plain causal batches and the all-gather otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shoal.distributed.mesh import ParallelDims
from shoal.errors import ShoalError

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def load_balanced_indices(
    seq_length: int, cp_size: int, cp_rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global positions held by `cp_rank`: chunk r then chunk 2·cp-1-r of 2·cp equal chunks."""
    if seq_length % (2 * cp_size):
        raise ShoalError(
            f"sequence length {seq_length} is not divisible by 2 × context_parallel_size = {2 * cp_size}"
        )
    chunk = seq_length // (2 * cp_size)
    early = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    late_start = (2 * cp_size - 1 - cp_rank) * chunk
    late = torch.arange(late_start, late_start + chunk, device=device)
    return torch.cat([early, late])


def shard_sequence(tensor: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's load-balanced part of `tensor` along `seq_dim`."""
    index = load_balanced_indices(tensor.shape[seq_dim], cp_size, cp_rank, tensor.device)
    return tensor.index_select(seq_dim, index)


class _GatherKeys(torch.autograd.Function):
    """All-gather along a new leading axis; backward sums each rank's gradient share back to it."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        local = local.contiguous()
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        _all_gather(out, local, group=group)
        return out.view(size, *local.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[1:])
        _reduce_scatter(out, grad.view(-1, *grad.shape[2:]), group=ctx.group)
        return out, None, None


@dataclass
class _AllGatherAttention:
    """State of the all-gather backend while a `context_parallel_context` is active."""

    group: dist.ProcessGroup
    size: int
    mask: torch.Tensor  # [B or 1, 1, 2·chunk, S]: may local query i attend global key j

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Local [B, heads, 2·chunk, D] (early chunk, late chunk) -> [B, heads, S, D] in global order."""
        gathered = _GatherKeys.apply(local, self.group, self.size)  # [cp, B, heads, 2·chunk, D]
        cp = self.size
        b, h, two_chunk, d = local.shape
        halves = gathered.view(cp, b, h, 2, two_chunk // 2, d)
        early = halves[:, :, :, 0]  # rank r's early chunk is global chunk r
        late = halves[:, :, :, 1].flip(0)  # rank r's late chunk is global chunk 2cp-1-r
        ordered = torch.cat([early, late], dim=0)  # [2cp, B, heads, chunk, D]
        return ordered.permute(1, 2, 0, 3, 4).reshape(b, h, -1, d)

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or not is_causal:
            raise ShoalError(
                "context-parallel attention handles causal attention only; pass document_ids to "
                "context_parallel_context rather than an attention mask to the model"
            )
        if self.mask.shape[0] not in (1, query.shape[0]):
            raise ShoalError(
                f"document_ids were given for {self.mask.shape[0]} sequences but attention runs on "
                f"{query.shape[0]}: enter context_parallel_context once per micro-batch (packed documents "
                "cannot combine with context and pipeline parallelism, whose schedule splits the batch)"
            )
        keys, values = self.gather(key), self.gather(value)
        return _ORIGINAL_SDPA(
            query, keys, values, attn_mask=self.mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
        )


_ORIGINAL_SDPA = F.scaled_dot_product_attention
_active: _AllGatherAttention | None = None


def _dispatch_sdpa(*args, **kwargs) -> torch.Tensor:
    # Stands in for F.scaled_dot_product_attention while the all-gather backend is active; the
    # model looks the function up on F at call time, so it needs no change.
    if _active is None:
        return _ORIGINAL_SDPA(*args, **kwargs)
    return _active.attention(*args, **kwargs)


def _expand_kv_heads_for_fp32(sdpa: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, *args: Any, enable_gqa: bool = False, **kwargs: Any) -> torch.Tensor:
    """Ring attention runs on the flash or memory-efficient kernel. Flash (bf16/fp16) handles
    grouped-query attention itself; the efficient kernel (the one fp32 gets) does not, so there
    each key/value head is repeated for the query heads that share it."""
    groups = query.shape[1] // key.shape[1]
    if enable_gqa and groups > 1 and query.dtype not in (torch.bfloat16, torch.float16):
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        enable_gqa = False
    return sdpa(query, key, value, *args, enable_gqa=enable_gqa, **kwargs)


@contextlib.contextmanager
def _allgather_backend(
    parallel_dims: ParallelDims, seq_length: int, device: torch.device, document_ids: torch.Tensor | None
) -> Iterator[None]:
    global _active
    if _active is not None:
        raise ShoalError("context_parallel_context cannot be nested")
    cp, rank = parallel_dims.cp, parallel_dims.rank_in("cp")
    query_pos = load_balanced_indices(seq_length, cp, rank, device)
    key_pos = torch.arange(seq_length, device=device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, 2·chunk, S]
    if document_ids is not None:
        local_docs = document_ids.index_select(1, query_pos)
        mask = mask & (local_docs[:, None, :, None] == document_ids[:, None, None, :])
    _active = _AllGatherAttention(parallel_dims.group("cp"), cp, mask)
    F.scaled_dot_product_attention = _dispatch_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
        _active = None


@contextlib.contextmanager
def context_parallel_context(
    parallel_dims: ParallelDims,
    buffers: Sequence[torch.Tensor],
    seq_dims: Sequence[int],
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> Iterator[list[torch.Tensor]]:
    """Shard `buffers` over the context-parallel ranks and run attention context-parallel inside.

    Wrap the forward *and* backward pass (checkpointed layers recompute attention in backward)::

        with context_parallel_context(dims, [tokens, labels, loss_mask, position_ids], [1, 1, 1, 1],
                                      document_ids=doc_ids) as (tokens, labels, loss_mask, position_ids):
            loss = loss_fn(model(tokens, position_ids=position_ids), labels, loss_mask)
            loss.backward()

    Pass position_ids always (each rank's positions are not 0..S/cp-1) and document_ids here, not
    to the model. Yields the sharded buffers (new tensors; the inputs are left as they are). Without
    context parallelism it yields the buffers unchanged and does nothing else.
    """
    if len(buffers) != len(seq_dims):
        raise ShoalError(f"context_parallel_context got {len(buffers)} buffers but {len(seq_dims)} seq_dims")
    if not parallel_dims.cp_enabled:
        yield list(buffers)
        return
    if not buffers:
        raise ShoalError("context_parallel_context needs the batch tensors to shard (tokens, labels, ...)")
    seq_length = buffers[0].shape[seq_dims[0]]
    for buffer, dim in zip(buffers, seq_dims):
        if buffer.shape[dim] != seq_length:
            raise ShoalError(
                "context_parallel_context: buffers disagree on the sequence length "
                f"({buffer.shape[dim]} vs {seq_length})"
            )
    if document_ids is not None and document_ids.shape[-1] != seq_length:
        raise ShoalError(f"document_ids have length {document_ids.shape[-1]}, the batch {seq_length}")
    device = buffers[0].device
    if backend == "auto":
        backend = "ring" if device.type == "cuda" and document_ids is None else "allgather"
    if backend == "ring":
        if device.type != "cuda":
            raise ShoalError("context-parallel ring attention needs CUDA; use backend='allgather' on CPU")
        if document_ids is not None:
            raise ShoalError("ring attention cannot mask documents; use backend='allgather' for packed sequences")
        from torch.distributed.tensor.experimental import context_parallel

        # torch's API shards its buffers in place; give it copies so the caller's tensors stay whole.
        shards = [buffer.clone() for buffer in buffers]
        with context_parallel(
            parallel_dims.submesh("cp"), buffers=shards, buffer_seq_dims=list(seq_dims), no_restore_buffers=set(shards)
        ):
            ring_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = functools.partial(_expand_kv_heads_for_fp32, ring_sdpa)
            try:
                yield shards
            finally:
                F.scaled_dot_product_attention = ring_sdpa
        return
    if backend != "allgather":
        raise ShoalError(f"context-parallel backend {backend!r}: expected auto, ring or allgather")
    rank = parallel_dims.rank_in("cp")
    shards = [shard_sequence(buffer, dim, parallel_dims.cp, rank) for buffer, dim in zip(buffers, seq_dims)]
    with _allgather_backend(parallel_dims, seq_length, device, document_ids):
        yield shards
