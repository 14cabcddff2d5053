"""LoRA/DoRA fine-tuning through `shoal finetune`, then `shoal export`, checked against independent readers.

Oracles: torch's own DCP converter reads the start and fine-tuned checkpoints (only adapter tensors
may differ); `transformers` loads the merged export, and `peft.PeftModel` loads the PEFT-format
adapter on the export of the starting checkpoint; both must give the logits of the adapted model
as shoal computes it (fp32, 2e-5 absolute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_dcp, train_args

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # attention and MLP projections
RANK, ALPHA = 4, 8.0


def shoal_adapted_logits(ckpt: Path, method: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of shoal's model with adapters swapped in and the fine-tuned checkpoint loaded."""
    from shoal.checkpoint.format import read_model_config
    from shoal.checkpoint.state import load_model_into
    from shoal.models import build_model
    from shoal.peft import apply_lora

    model = build_model(read_model_config(ckpt))
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, use_dora=method == "dora")
    load_model_into(model, ckpt)
    model.eval()
    with torch.no_grad():
        return model(tokens)


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_finetune_changes_only_adapters_and_exports(train_assets: TrainAssets, tmp_path: Path, method: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = train_args(train_assets, "finetune", tmp_path / "res", "ft", "--max_steps", 3, "--peft", method,
                      f"--peft.rank={RANK}", f"--peft.alpha={ALPHA}", "--peft.dropout=0.0",
                      f"--peft.target_modules=[{','.join(TARGETS)}]", "--train.lr=1e-2")
    assert shoal(*args) == 0
    (final,) = (tmp_path / "res" / "ft" / "checkpoints").glob("step=000003*-last")
    assert json.loads((final / "peft.json").read_text())["use_dora"] is (method == "dora")

    # The checkpoint holds what trains only, and names the start checkpoint as its base.
    tuned = read_dcp(final / "model", tmp_path / "tuned.pt")
    adapters = set(tuned)
    assert json.loads((final / "shoal.json").read_text())["base"]["resolved"] == str(train_assets.checkpoint.resolve())
    expected = {f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'v_proj') else 'mlp'}.{t}.{part}"
                for i in range(2) for t in TARGETS
                for part in ("lora_A.weight", "lora_B.weight",
                             *(["lora_magnitude_vector"] if method == "dora" else []))}
    assert adapters == expected
    # B starts at zero: non-zero values show the adapters were trained and saved.
    assert all(tuned[k].abs().sum() > 0 for k in adapters if "lora_B" in k)

    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    expected_logits = shoal_adapted_logits(final, method, tokens)
    base_logits = hf_logits(AutoModelForCausalLM.from_pretrained(train_assets.hf_model, dtype=torch.float32), tokens)
    assert (expected_logits - base_logits).abs().max() > 1e-3  # the adapters do change the model

    # The merged export is a plain Hugging Face model with the adapters folded in.
    assert shoal("export", "--source", tmp_path / "res" / "ft", "--output_path", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(hf_logits(merged, tokens), expected_logits, rtol=0, atol=2e-5)

    # The adapters alone (`--adapter_only`, PEFT's format), on top of the exported starting model.
    assert shoal("export", "--source", train_assets.checkpoint, "--output_path", tmp_path / "base") == 0
    assert shoal("export", "--source", final, "--output_path", tmp_path / "adapter", "--adapter_only") == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(hf_logits(peft_model, tokens), expected_logits, rtol=0, atol=2e-5)
