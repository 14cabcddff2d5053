"""The varlen spans describe the same attention pattern as the dense document mask.

`document_spans` runs on any device (only the kernel that consumes it needs CUDA, see
tests/gpu/test_document_attention_gpu.py): the pattern it implies (token i attends to token j when
both lie in one span and j <= i, positions counted over the rows laid end to end) must equal
`attention_mask`, row by row, with nothing attending across rows. `host_cu_seqlens`, the same
spans computed on the host for training, must equal `document_spans` and the dense mask too.
"""

from __future__ import annotations

import pytest
import torch

from shoal.models.document_attention import attention_mask, document_spans, host_cu_seqlens


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


def assert_spans_match_the_dense_mask(cu_seqlens: torch.Tensor, documents: torch.Tensor) -> None:
    b, s = documents.shape
    flat = mask_from_spans(cu_seqlens, b * s)
    dense = attention_mask(documents)[:, 0]
    for r in range(b):
        rows = slice(r * s, (r + 1) * s)
        assert torch.equal(flat[rows, rows], dense[r])
        assert not flat[rows, :r * s].any()


HAND_BUILT = {
    # Row 1 starts mid-document (the id row 0 ends with); row 2 is one document.
    "mid-document rows": [[0, 0, 0, 1, 1, 2, 2, 2], [2, 2, 3, 3, 3, 3, 4, 5], [7, 7, 7, 7, 7, 7, 7, 7]],
    "single-token documents": [[0, 1, 2, 3, 4, 5], [5, 6, 6, 7, 8, 8]],
    "one document per row": [[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 3]],
    "one row": [[0, 0, 1, 1, 1, 2]],
}


@pytest.mark.parametrize("rows", HAND_BUILT.values(), ids=HAND_BUILT.keys())
def test_host_spans_equal_device_spans_on_hand_built_rows(rows):
    documents = torch.tensor(rows)
    host = host_cu_seqlens(documents)
    assert host.dtype == torch.int32 and host.device.type == "cpu"
    assert torch.equal(host, document_spans(documents).cu_seqlens)
    assert_spans_match_the_dense_mask(host, documents)


def test_host_spans_cut_where_the_id_changes():
    # An id coming back later in a row starts a new document for both span functions (the dense mask
    # would join the two runs; the GPT dataset and the packer never write that: ids only grow in a row).
    documents = torch.tensor([[0, 0, 1, 1, 0, 0, 1]])
    assert host_cu_seqlens(documents).tolist() == document_spans(documents).cu_seqlens.tolist() == [0, 2, 4, 6, 7]


def test_host_spans_by_hand():
    # Worked out by hand: rows of 4 laid end to end; row 1 continues row 0's last id but is cut.
    assert host_cu_seqlens(torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2]])).tolist() == [0, 2, 4, 5, 8]


def test_host_spans_equal_device_spans_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        b, s = torch.randint(1, 5, (2,), generator=gen).tolist()
        s *= 7
        # A document id changes after a token with probability p: many short documents or few long ones.
        p = [0.05, 0.3, 0.9][trial % 3]
        changes = (torch.rand(b, s, generator=gen) < p).long()
        documents = changes.cumsum(1) + torch.randint(0, 3, (b, 1), generator=gen)  # rows start at any id
        host = host_cu_seqlens(documents)
        assert torch.equal(host, document_spans(documents).cu_seqlens), documents
        assert_spans_match_the_dense_mask(host, documents)


def test_host_spans_refuse_a_device_tensor():
    with pytest.raises(ValueError, match="host memory"):
        host_cu_seqlens(torch.zeros(2, 4, dtype=torch.long, device="meta"))


def test_fixed_shape_spans_pad_with_empty_documents():
    """For CUDA graphs the spans come in a few lengths (powers of two, at least 16): the padding is
    empty documents at the end, so the real spans and what they cover are unchanged."""
    rng = torch.Generator().manual_seed(0)
    for documents_per_row in (1, 3, 15, 16, 17, 40):
        lengths = torch.randint(1, 9, (documents_per_row,), generator=rng)
        row = torch.repeat_interleave(torch.arange(documents_per_row), lengths)[None]
        exact = host_cu_seqlens(row)
        padded = host_cu_seqlens(row, fixed_shapes=True)
        size = padded.numel()
        assert size >= 16 and size & (size - 1) == 0 and size >= exact.numel() and size < 2 * max(exact.numel(), 9)
        assert padded.dtype == torch.int32
        assert padded[:exact.numel()].tolist() == exact.tolist()
        assert (padded[exact.numel():] == row.numel()).all()  # empty: start == end == the total
