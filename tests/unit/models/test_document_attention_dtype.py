"""Attention's compute dtype under autocast (the varlen decision depends on it)."""

import torch

from shoal.models.document_attention import attention_dtype


def test_autocast_sets_the_attention_dtype_of_fp32_activations():
    hidden = torch.zeros(2, 3)
    assert attention_dtype(hidden) is torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_dtype(hidden) is torch.bfloat16
    assert attention_dtype(hidden.bfloat16()) is torch.bfloat16
