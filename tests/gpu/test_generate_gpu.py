"""Generation on one GPU in bf16 (run on the GPU machine): shoal's KV-cached decoding against
transformers on the same weights (built by bench/generate.py). Random tiny models have nearly tied
logits, where bf16 rounding picks either token, so the check is on logits, to bf16 precision: the
prefill and each cached step against transformers' full forward over the same tokens."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("shape", ["llama_tiny", "qwen2_tiny", "qwen3_tiny", "mistral_tiny"])
def test_bf16_cached_decoding_matches_transformers(shape):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # a script, not a package
    from generate import build_models

    from shoal.models.model import KVCache

    device = torch.device("cuda")
    cfg, hf, ours = build_models(shape, device, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen).to(device)
    steps = torch.randint(0, cfg.vocab_size, (2, 4), generator=gen).to(device)
    with torch.no_grad():
        expected = hf(torch.cat([prompt, steps], dim=1)).logits.float()[:, 23:27]
        cache = KVCache(cfg, 2, 28, device, torch.bfloat16)
        got = [ours(prompt, cache=cache)[:, -1]]
        got += [ours(steps[:, i:i + 1], cache=cache)[:, -1] for i in range(3)]
    got = torch.stack(got, dim=1).float()
    assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
