"""Packed documents on GPU go through flash varlen attention and match each document run alone.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_document_attention_gpu.py`.
The oracle is independent of both mask implementations: every document of a packed batch run
through the model on its own (plain causal attention), in fp32. The bf16 packed forward through
varlen must be as close to it as the bf16 dense-mask path is, and the two paths' gradients agree
to bf16 rounding. A test also runs a compiled layer with selective checkpointing over varlen.
"""

from __future__ import annotations

import pytest
import torch

import shoal.models.document_attention as document_attention
from shoal.models import build_model
from shoal.models.config import ModelConfig
from shoal.models.document_attention import DocumentSpans

pytestmark = pytest.mark.gpu

CFG = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=512)
LENGTHS = [[37, 100, 19, 100], [256]]  # two rows of 256 tokens: four documents, then one


def packed_batch(device):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (len(LENGTHS), 256), generator=gen)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in LENGTHS])
    documents = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in LENGTHS])
    return tokens.to(device), positions.to(device), documents.to(device)


def per_document_logits(model, tokens):
    """fp32 logits of each document run alone, laid back in packed order."""
    rows = []
    for r, row in enumerate(LENGTHS):
        start, pieces = 0, []
        for n in row:
            pieces.append(model(tokens[r:r + 1, start:start + n]))
            start += n
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


@pytest.fixture
def models():
    torch.manual_seed(0)
    fp32 = build_model(CFG, device="cuda")
    bf16 = build_model(CFG, device="cuda", init=False).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    return fp32, bf16


def test_varlen_is_used_and_matches_documents_alone(models, monkeypatch):
    fp32, bf16 = models
    tokens, positions, documents = packed_batch("cuda")
    hidden = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    assert isinstance(document_attention.document_attention_spec(documents, hidden, CFG.head_dim), DocumentSpans)
    with torch.no_grad():
        reference = per_document_logits(fp32, tokens)
        varlen = bf16(tokens, position_ids=positions, document_ids=documents).float()
        monkeypatch.setattr(document_attention, "_VARLEN_API", None)  # force the dense-mask path
        dense = bf16(tokens, position_ids=positions, document_ids=documents).float()
    varlen_err, dense_err = (varlen - reference).abs().max().item(), (dense - reference).abs().max().item()
    print(f"max |logit - fp32 per document|: varlen {varlen_err:.4f}, dense mask {dense_err:.4f}")
    assert varlen_err <= 1.5 * dense_err + 1e-2
    # A mistake in the spans (a document seeing its neighbour) moves logits by O(1), far above this.
    assert varlen_err < 0.1


def test_fp32_weights_under_autocast_take_varlen_and_match_the_dense_mask(models, monkeypatch):
    """One GPU, full training: fp32 master weights under bf16 autocast give fp32 hidden states, but
    attention computes in bf16 and must take the varlen path (it once fell back to a dense mask)."""
    fp32, _ = models
    tokens, positions, documents = packed_batch("cuda")
    calls = {"varlen": 0}
    varlen_fn = document_attention.varlen_causal_attention

    def counted(*args, **kwargs):
        calls["varlen"] += 1
        return varlen_fn(*args, **kwargs)

    import shoal.models.model as model_module

    monkeypatch.setattr(model_module, "varlen_causal_attention", counted)

    def loss_and_grads():
        fp32.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fp32(tokens, position_ids=positions, document_ids=documents)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        return logits.float().detach(), {n: p.grad.clone() for n, p in fp32.named_parameters()}

    varlen_logits, varlen_grads = loss_and_grads()
    assert calls["varlen"] == CFG.num_layers, "fp32 weights under autocast did not take the varlen path"
    monkeypatch.setattr(document_attention, "_VARLEN_API", None)  # the dense-mask path, same autocast
    dense_logits, dense_grads = loss_and_grads()
    assert calls["varlen"] == CFG.num_layers
    assert (varlen_logits - dense_logits).abs().max().item() < 0.05
    for name in varlen_grads:
        scale = dense_grads[name].norm().item()
        assert (varlen_grads[name] - dense_grads[name]).norm().item() <= 3e-2 * scale + 1e-6, name


def test_varlen_gradients_match_dense_mask(models, monkeypatch):
    _, bf16 = models
    tokens, positions, documents = packed_batch("cuda")

    def grads():
        bf16.zero_grad()
        logits = bf16(tokens, position_ids=positions, document_ids=documents)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        return {n: p.grad.float().clone() for n, p in bf16.named_parameters()}

    varlen = grads()
    monkeypatch.setattr(document_attention, "_VARLEN_API", None)
    dense = grads()
    for name in varlen:
        scale = dense[name].norm().item()
        assert (varlen[name] - dense[name]).norm().item() <= 3e-2 * scale + 1e-6, name


def test_compiled_layer_with_selective_checkpointing_runs_varlen(models):
    from shoal.distributed.parallelize import apply_activation_checkpointing, apply_compile
    from shoal.models.parallel_plan import DECODER_PLAN

    _, bf16 = models
    tokens, positions, documents = packed_batch("cuda")
    eager = bf16(tokens, position_ids=positions, document_ids=documents).float()
    apply_activation_checkpointing(DECODER_PLAN.blocks(bf16), "selective")
    apply_compile(DECODER_PLAN.blocks(bf16))
    compiled = bf16(tokens, position_ids=positions, document_ids=documents).float()
    compiled.sum().backward()
    assert (compiled - eager).abs().max().item() < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16.parameters())
