"""The "downloaded Hugging Face model" the demo starts from: a randomly initialised tiny Llama 3.

`write_tiny_hf_model(out_dir)` writes what `huggingface-cli download` would leave for a real Llama
3.x checkpoint: `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files,
here the demo tokenizer shipped in `shoal/demo/assets/tokenizer`. It is made with `transformers`
itself (`LlamaConfig` + `LlamaForCausalLM`), so the demo's import stage reads a genuine HF checkpoint
rather than something shoal wrote for itself.

The shape is chosen to learn the demo task on two CPU cores in a few minutes: 4 layers, hidden 128,
4 query heads sharing 2 key/value heads (GQA, as Llama 3), tied embeddings (as Llama 3.2 1B/3B) and
Llama 3's RoPE scaling.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from shoal.checkpoint.atomic import atomic_directory
from shoal.demo.tokenizer import BOS, END_OF_TEXT, EOT, PAD, TOKENIZER_DIR

# LlamaConfig keyword arguments of the demo model; vocabulary and special ids come from the tokenizer.
TINY_LLAMA_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    # Llama 3.1's scaling with the numbers shrunk to the tiny model's context.
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 1024},
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    return {"vocab_size": len(vocab["model"]["vocab"]) + len(ids), "bos": ids[BOS], "end_of_text": ids[END_OF_TEXT],
            "eot": ids[EOT], "pad": ids[PAD]}


def tiny_llama_config(tokenizer_dir: str | os.PathLike = TOKENIZER_DIR):
    """The `transformers.LlamaConfig` of the demo model, its vocabulary matching the tokenizer."""
    from transformers import LlamaConfig

    ids = _special_ids(Path(tokenizer_dir))
    return LlamaConfig(
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos"],
        # As in Llama 3 instruct configs: generation stops at the end of the text or of a turn.
        eos_token_id=[ids["end_of_text"], ids["eot"]],
        pad_token_id=ids["pad"],
        **TINY_LLAMA_SHAPE,
    )


def write_tiny_hf_model(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a randomly initialised tiny Llama with the demo tokenizer as a Hugging Face checkpoint."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    # A private RNG stream: the same seed gives the same weights whatever the caller did before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(TOKENIZER_DIR / name, tmp / name)
    return Path(out_dir)
