"""Causal attention that keeps packed documents apart.

Packed fine-tuning sequences and pretraining with `reset_attention_mask` put several documents in
one row, each attending only to itself. Two ways to compute that:

- a dense boolean mask [B, 1, S, S] given to `scaled_dot_product_attention`: works everywhere,
  but an arbitrary mask rules out the flash kernel and computes every masked-out block;
- flash attention's variable-length form (`torch.nn.attention.varlen`): the rows are laid end to
  end and cut at document boundaries (`cu_seqlens`), so only the causal blocks inside each
  document are computed. CUDA only, bf16/fp16 only.

`document_attention_spec` picks the second where it can run and the first otherwise; both give
the same result (tests/gpu/test_document_attention_gpu.py checks outputs and gradients).
Documents are runs of equal `document_ids` in a row, as the GPT dataset and the SFT packer write them.

Training computes `cu_seqlens` on the host (`host_cu_seqlens`) while the batch is still in host
memory, and copies it with the batch: finding the document starts on the device (`document_spans`)
is a `nonzero`, which makes the host wait for the GPU to finish everything queued before it.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np
import torch

_FLASH_MAX_HEAD_DIM = 256


class DocumentSpans(NamedTuple):
    """Packed documents in varlen form: tokens of all rows end to end, document k being tokens
    cu_seqlens[k]:cu_seqlens[k+1]. A NamedTuple so `torch.compile`d layers take it as an input."""

    cu_seqlens: torch.Tensor  # int32 [N + 1]
    max_len: int  # an upper bound on a document's length (the row length: no device sync needed)


def attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that also keeps tokens of different documents apart: [B, 1, S, S], True = attend."""
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def document_spans(document_ids: torch.Tensor) -> DocumentSpans:
    """[B, S] document ids -> the cumulative start offsets of every document of every row."""
    b, s = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a row always starts a new document
    offsets = starts.nonzero().flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return DocumentSpans(torch.cat([offsets, end]).to(torch.int32), s)


def host_cu_seqlens(document_ids: torch.Tensor, fixed_shapes: bool = False) -> torch.Tensor:
    """`document_spans(document_ids).cu_seqlens` of a batch in host memory, computed on the host:
    [B, S] -> int32 [N + 1], with no device work (the data loader's batch, before its copy).

    `fixed_shapes` pads the spans to a power-of-two length (at least 16) with empty documents at
    the end (the total repeated), which attention skips: a CUDA graph is recorded for each input
    shape, and the number of documents in a batch changes from batch to batch."""
    if document_ids.device.type != "cpu" or document_ids.dim() != 2:
        raise ValueError(f"host_cu_seqlens takes [B, S] document ids in host memory, got "
                         f"{tuple(document_ids.shape)} on {document_ids.device}")
    s = document_ids.shape[1]
    flat = document_ids.numpy().reshape(-1)
    starts = np.ones(flat.size, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a row always starts a new document
    offsets = np.append(np.flatnonzero(starts), flat.size)
    if fixed_shapes:
        length = max(16, 1 << (offsets.size - 1).bit_length())
        offsets = np.pad(offsets, (0, length - offsets.size), constant_values=flat.size)
    return torch.from_numpy(offsets.astype(np.int32))


def attention_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in for activations like `hidden`: autocast's where it is on
    (fp32 master weights on one GPU give fp32 hidden states, but q/k/v reach attention in bf16,
    as SDPA casts them under autocast), else the activations' own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def varlen_available(hidden: torch.Tensor, head_dim: int) -> bool:
    """Whether flash varlen attention can run on activations like `hidden`."""
    return (hidden.is_cuda and attention_dtype(hidden) in (torch.bfloat16, torch.float16)
            and head_dim <= _FLASH_MAX_HEAD_DIM and _varlen_api() is not None)


def document_attention_spec(document_ids: torch.Tensor, hidden: torch.Tensor, head_dim: int,
                            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor | DocumentSpans:
    """What each attention layer needs to keep documents apart: spans for varlen, else a dense mask.
    `cu_seqlens`, when given, are `document_ids`' spans computed beforehand (`host_cu_seqlens`),
    already on hidden's device: the varlen path then needs no device sync."""
    if varlen_available(hidden, head_dim):
        if cu_seqlens is not None:
            return DocumentSpans(cu_seqlens, document_ids.shape[-1])
        return document_spans(document_ids)
    return attention_mask(document_ids)


def _load_varlen_api() -> tuple | None:
    """(varlen_attn, takes window_size, takes enable_gqa). torch 2.10 had `is_causal`, 2.11 has
    `window_size`, 2.13 adds `enable_gqa`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


_NOT_LOADED = object()
_VARLEN_API: tuple | None | object = _NOT_LOADED


def _varlen_api() -> tuple | None:
    """The varlen API, imported on first use: the import costs almost a second, which every command
    that never trains on a GPU (conversion, --help, CPU runs) would otherwise pay. The first use is
    outside compiled code (the model's forward asks `varlen_available` before its layers run)."""
    global _VARLEN_API
    if _VARLEN_API is _NOT_LOADED:
        _VARLEN_API = _load_varlen_api()
    return _VARLEN_API


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            spans: DocumentSpans) -> torch.Tensor:
    """q [B, H, S, D], k/v [B, K, S, D] -> [B, S, H, D], causal within each document."""
    b, h, s, d = q.shape
    varlen_attn, takes_window, takes_gqa = _varlen_api()
    dtype = attention_dtype(q)  # the custom op has no autocast rule: cast as SDPA would be cast
    q, k, v = (t.transpose(1, 2).reshape(b * s, -1, d).to(dtype) for t in (q, k, v))  # [B*S, heads, D]
    kwargs = {"window_size": (-1, 0)} if takes_window else {"is_causal": True}
    if takes_gqa:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != h:
        groups = h // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = varlen_attn(q, k, v, spans.cu_seqlens, spans.cu_seqlens, spans.max_len, spans.max_len, **kwargs)
    return out.view(b, s, h, d)


def varlen_ops_to_save() -> list:
    """The varlen forward op, for selective activation checkpointing to keep (none if unavailable)."""
    if _varlen_api() is None:
        return []
    op = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)
    return [op.default] if op is not None else []
