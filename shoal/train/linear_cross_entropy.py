"""The output layer and the masked cross-entropy together, a chunk of tokens at a time.

Shape legend: N tokens, E hidden size, V vocabulary, C tokens per chunk.

The plain path makes the logits [N, V] (bf16), then the loss upcasts them to fp32 and autograd
keeps what the softmax backward needs: with V = 128k and N = 8k that is several GiB, more than a
decoder layer's activations. Here the logits of C tokens exist at a time: for each chunk the
forward computes the loss and, when gradients are wanted, the gradient of the logits
(softmax − one-hot, times the mask), which it turns at once into the chunk's gradient of the
hidden states (grad_logits · W) and adds into the weight's (grad_logitsᵀ · h). Backward then only
scales those by the incoming gradient: nothing of size [N, V] survives the forward.

The matmuls run in the compute dtype (autocast's, as the plain path would), the softmax and the
loss in fp32; `chunk_loss_and_grad` is the element-wise part, which `torch.compile` fuses into a
couple of kernels per chunk. The result is Σ CE · mask over the tokens, as
`shoal.train.step.masked_cross_entropy_sum`; labels equal to -100 count for nothing, as there.

In fine-tuning the prompt tokens carry no loss: `gather_loss_rows` keeps the rows of the loss
tokens alone (positions found on the host), so their logits are never computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Replicate

IGNORE_INDEX = -100  # F.cross_entropy's default, which the plain path relies on
# Elements of one chunk's logits: 2^27 (for a 128k vocabulary about 1,000 tokens: 256 MiB of bf16
# logits and 512 MiB of fp32 softmax), large enough for the matmuls to run at full speed.
CHUNK_ELEMENTS = 2**27


def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ CE·mask of one chunk [C, V] and d(that)/d(logits), in the logits' dtype."""
    weight = mask.float() * (labels != IGNORE_INDEX)
    safe = labels.clamp(min=0)[:, None]  # ignored rows point at class 0 with weight 0
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, safe).squeeze(1)) * weight).sum()
    grad = torch.exp(x - lse[:, None])
    grad = grad.scatter_add(1, safe, -torch.ones_like(safe, dtype=grad.dtype))
    return loss, (grad * weight[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk, compute_dtype, grads, chunk_fn):
        want_hidden, want_weight = grads
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_hidden else None
            grad_w = None  # fp32 [V, E], the sum of the chunks' (compute-dtype) products
            for start in range(0, h.shape[0], chunk):
                h_c = h[start:start + chunk]
                loss, grad_logits = chunk_fn(h_c @ w.T, labels[start:start + chunk], mask[start:start + chunk])
                total += loss
                if grad_h is not None:
                    grad_h[start:start + chunk] = grad_logits @ w
                if want_weight:
                    part = grad_logits.T @ h_c
                    # The first chunk's product upcast, then each next one added in place: one pass
                    # over [V, E] per chunk, no zero-filled buffer and no fp32 copy of each product.
                    grad_w = part.float() if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_tokens: int | None = None,
    chunk_fn: Callable = chunk_loss_and_grad,
) -> torch.Tensor:
    """Σ CE(hidden · weightᵀ, labels) · mask. hidden [B, S, E]; weight [V, E]; labels, mask [B, S]
    (or any leading shape, such as the [M, E] rows of the loss tokens alone, see Engine._loss_sum).

    Gradients reach `hidden` and `weight` when they require them (and grad mode is on).
    `chunk_tokens` defaults to CHUNK_ELEMENTS / V; `chunk_fn` may be a compiled
    `chunk_loss_and_grad`."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    device_type = hidden.device.type
    compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    grad_on = torch.is_grad_enabled()
    grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, labels.reshape(-1), loss_mask.reshape(-1), chunk_tokens, compute,
                                     grads, chunk_fn)


def gather_loss_rows(hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens at `positions` (flat indices into B·S, see shoal.train.step.with_loss_positions):
    hidden [M, E], labels [M], mask [M]. A gather with an index made on the host reads nothing back
    from the device, unlike boolean indexing; its backward gives every other row a zero gradient.
    Sequence-parallel hidden states (a DTensor split along the sequence under tensor parallelism)
    are gathered whole first, and the rows come back replicated over the same mesh, the layout a
    tensor-parallel output layer takes them in; its input gradient is summed over that mesh."""
    if isinstance(hidden, DTensor):
        mesh, whole = hidden.device_mesh, [Replicate()] * hidden.device_mesh.ndim
        rows, labels, loss_mask = gather_loss_rows(hidden.redistribute(placements=whole).to_local(),
                                                   labels, loss_mask, positions)
        return DTensor.from_local(rows, mesh, whole, run_check=False), labels, loss_mask
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return rows, labels.reshape(-1).index_select(0, positions), loss_mask.reshape(-1).index_select(0, positions)
