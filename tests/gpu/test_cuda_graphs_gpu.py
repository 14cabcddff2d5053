"""parallel.cuda_graphs: compiled layers replayed as CUDA graphs train exactly as without them.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_cuda_graphs_gpu.py`.
The oracle is the same engine compiled without CUDA graphs, on the same weights and batches
(gradient accumulation over two micro-batches whose documents differ in number, so the padded
spans take more than one shape): the losses and the trained parameters must agree. The padded
spans themselves are checked against the unpadded ones through flash varlen attention.
"""

from __future__ import annotations

import pytest
import torch

from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import build_mesh
from shoal.models.config import ModelConfig
from shoal.models.document_attention import DocumentSpans, host_cu_seqlens, varlen_causal_attention
from shoal.peft.config import LoraConfig
from shoal.train.engine import build_engine
from shoal.train.step import to_device, with_document_spans

pytestmark = pytest.mark.gpu

CFG = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=512)
SEQ = 256
# documents per row of each micro-batch: 4, 1, 19 and 2 documents (spans of 16 and 32 entries padded)
LENGTHS = [[[37, 100, 19, 100]], [[256]], [[13] * 18 + [22]], [[200, 56]]]


def host_batch(lengths: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (len(lengths), SEQ + 1), generator=gen)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    documents = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in lengths])
    loss_mask = (torch.rand(len(lengths), SEQ, generator=gen) > 0.3).float()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": positions, "document_ids": documents}


def test_padded_spans_give_the_same_attention():
    torch.manual_seed(0)
    documents = host_batch(LENGTHS[2], 0)["document_ids"]
    exact, padded = host_cu_seqlens(documents), host_cu_seqlens(documents, fixed_shapes=True)
    assert exact.numel() == 20 and padded.numel() == 32
    q, k, v = (torch.randn(1, h, SEQ, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    grads = []
    outs = []
    for spans in (exact, padded):
        out = varlen_causal_attention(q, k, v, DocumentSpans(spans.cuda(), SEQ))
        outs.append(out)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # the same blocks, computed alike
    for a, b in zip(grads[1], grads[0]):
        # flash's backward adds dq up with atomics, in no fixed order: bf16 rounding apart
        torch.testing.assert_close(a, b)


def train(cuda_graphs: bool, peft: LoraConfig | None, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    train_cfg = TrainSection(micro_batch_size=1, global_batch_size=2, weight_decay=0.1, seed=3)
    parallel = ParallelConfig(compile=True, cuda_graphs=cuda_graphs)
    dims = build_mesh(parallel, 1, "cuda")
    torch._dynamo.reset()
    engine = build_engine(CFG, train=train_cfg, parallel=parallel, peft=peft, dims=dims,
                          device=torch.device("cuda"), compute_dtype=torch.bfloat16, document_mask=True,
                          seq_length=SEQ)
    losses = []
    for step in range(steps):
        k = (2 * step) % len(LENGTHS)  # steps 0 and 2 (1 and 3) see the same micro-batches
        hosts = [host_batch(LENGTHS[k + i], seed=k + i) for i in range(2)]
        tokens = float(sum(h["loss_mask"].sum() for h in hosts))
        mbs = [to_device(with_document_spans(h, fixed_shapes=cuda_graphs), torch.device("cuda")) for h in hosts]
        loss = engine.forward_backward(mbs, tokens)
        engine.clip_and_step(1.0, 1e-3)
        losses.append(loss.item() / tokens)
    params = {n: p.detach().float().clone() for n, p in engine.parts[0].named_parameters() if p.requires_grad}
    return losses, params


@pytest.mark.parametrize("peft", [None, LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                                    "gate_proj", "up_proj", "down_proj"))],
                         ids=["full", "lora"])
def test_training_with_cuda_graphs_matches_without(peft):
    plain_losses, plain_params = train(False, peft)
    graph_losses, graph_params = train(True, peft)
    assert plain_losses[2] < plain_losses[0]  # it trains: step 2 sees step 0's data again
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-4)
    assert graph_params.keys() == plain_params.keys()
    for name in plain_params:
        # Element-wise would be flaky: the backward's atomics differ from run to run, and AdamW's
        # first steps turn a near-zero gradient's sign into a full ±lr step. Each tensor's change
        # from one run to the other must be small against the tensor.
        gap = (graph_params[name] - plain_params[name]).norm() / plain_params[name].norm().clamp(min=1e-12)
        assert gap < 2e-2, (name, float(gap))


def test_steps_replay_graphs():
    """After the recording steps, a step launches CUDA graphs rather than each layer's kernels."""
    from torch.profiler import ProfilerActivity, profile

    train_cfg = TrainSection(micro_batch_size=1, global_batch_size=1)
    parallel = ParallelConfig(compile=True, cuda_graphs=True)
    torch._dynamo.reset()
    engine = build_engine(CFG, train=train_cfg, parallel=parallel, peft=LoraConfig(rank=8, alpha=16),
                          dims=build_mesh(parallel, 1, "cuda"), device=torch.device("cuda"),
                          compute_dtype=torch.bfloat16, document_mask=True, seq_length=SEQ)
    mb = to_device(with_document_spans(host_batch(LENGTHS[0], 0), fixed_shapes=True), torch.device("cuda"))
    for _ in range(3):
        engine.forward_backward([mb], 100.0)
        engine.clip_and_step(1.0, 1e-3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # CUDA: runtime calls are CUPTI's
        engine.forward_backward([mb], 100.0)
        engine.clip_and_step(1.0, 1e-3)
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.key == "cudaGraphLaunch")
    assert launches >= 2 * CFG.num_layers, [e.key for e in prof.key_averages()][:40]
