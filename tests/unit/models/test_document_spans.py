"""The varlen spans describe the same attention pattern as the dense document mask.

`document_spans` runs on any device (only the kernel that consumes it needs CUDA, see
tests/gpu/test_document_attention_gpu.py): the pattern it implies (token i attends to token j when
both lie in one span and j <= i, positions counted over the rows laid end to end) must equal
`attention_mask`, row by row, with nothing attending across rows.
"""

from __future__ import annotations

import torch

from shoal.models.document_attention import attention_mask, document_spans


def mask_from_spans(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    span_of = torch.zeros(total, dtype=torch.long)
    for k, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        assert end > start, "empty span"
        span_of[start:end] = k
    return (span_of[:, None] == span_of[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()


def test_spans_match_the_dense_mask():
    # Row 1 starts with the id row 0 ends with: rows must still be cut apart. Row 2 is one document.
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2],
                              [2, 2, 3, 3, 3, 3, 4, 5],
                              [7, 7, 7, 7, 7, 7, 7, 7]])
    b, s = documents.shape
    spans = document_spans(documents)
    assert spans.cu_seqlens.dtype == torch.int32 and spans.max_len == s
    assert spans.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 14, 15, 16, 24]
    flat = mask_from_spans(spans.cu_seqlens, b * s)
    dense = attention_mask(documents)[:, 0]
    for r in range(b):
        rows = slice(r * s, (r + 1) * s)
        assert torch.equal(flat[rows, rows], dense[r])
        assert not flat[rows, :r * s].any()  # nothing reaches into an earlier row
