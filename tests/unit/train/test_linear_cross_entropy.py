"""The chunked output layer + loss against the plain one: logits made whole, then F.cross_entropy.

The reference is written here with torch's own cross-entropy (not shoal's loss): per-token CE,
ignored labels (-100) counting nothing, times the loss mask, summed; autograd gives its gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.train.linear_cross_entropy import chunk_loss_and_grad, linear_cross_entropy_sum

B, S, E, V = 3, 11, 16, 40


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, E, generator=gen, requires_grad=True)
    weight = (torch.randn(V, E, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :4] = -100  # ignored tokens
    labels[2, -1] = -100
    mask = (torch.rand(B, S, generator=gen) > 0.25).float()
    mask[1, 3] = 0.0
    return hidden, weight, labels, mask


def _reference(hidden, weight, labels, mask):
    logits = hidden @ weight.T
    losses = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1)).sum()


@pytest.mark.parametrize("chunk_tokens", [1, 7, 33, 1000])  # 33 = B·S: one chunk; 7: a ragged last chunk
def test_loss_and_gradients_equal_the_plain_loss(chunk_tokens):
    hidden, weight, labels, mask = _inputs()
    expected = _reference(hidden, weight, labels, mask)
    expected.backward(torch.tensor(0.7))  # a non-unit upstream gradient (the 1/tokens scaling)
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    loss = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    loss.backward(torch.tensor(0.7))
    torch.testing.assert_close(hidden.grad, want_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, want_w, atol=1e-6, rtol=1e-5)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_none():
    hidden, weight, labels, mask = _inputs(1)
    weight.requires_grad_(False)
    loss = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_tokens=5)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        value = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_tokens=5)
    torch.testing.assert_close(value, _reference(hidden, weight, labels, mask).detach(), atol=1e-5, rtol=1e-6)
    assert not value.requires_grad


def test_all_tokens_masked_gives_zero_loss_and_gradients():
    hidden, weight, labels, mask = _inputs(2)
    loss = linear_cross_entropy_sum(hidden, weight, labels, torch.zeros_like(mask), chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_under_bf16_autocast_matches_the_plain_path_within_bf16_tolerance():
    hidden, weight, labels, mask = _inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(hidden, weight, labels, mask)
        loss = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_tokens=8)
    torch.testing.assert_close(loss, expected.float(), atol=0.2, rtol=2e-2)
    (g_h, g_w) = torch.autograd.grad(loss, (hidden, weight))
    (r_h, r_w) = torch.autograd.grad(expected, (hidden, weight))
    assert g_w.dtype == weight.dtype and g_h.dtype == hidden.dtype
    assert (g_h - r_h).norm() <= 0.02 * r_h.norm() and (g_w - r_w).norm() <= 0.02 * r_w.norm()


def test_compiled_chunk_function_gives_the_same_result():
    hidden, weight, labels, mask = _inputs(4)
    eager = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_tokens=11)
    compiled = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_tokens=11,
                                        chunk_fn=torch.compile(chunk_loss_and_grad))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-6)
