"""Tiny Hugging Face models built by the tests themselves, one builder for every family.

`make_hf_model(family, ...)` is a random model of a family ("llama", "mistral", "qwen2", "qwen3")
with the features that make the family special (FAMILY_CONFIGS) on a small shape that keyword
overrides change; the named shapes below are those the test folders use. Norms and biases can be
randomised so that a dropped or swapped one shows. Nothing is downloaded: `transformers` is the
oracle that shoal's model and converted checkpoints are compared with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.helpers.tokenizers import SPECIAL_TOKENS, word_level_tokenizer

VOCAB_SIZE = 256  # the word-level tokenizer's ids fit; shapes that pass their own vocab_size differ

# Per family: the config kwargs that exercise what is special about it.
FAMILY_CONFIGS = {
    # Llama 3.2 style: llama3 RoPE scaling and tied embeddings.
    "llama": dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=True, head_dim=16,
    ),
    "mistral": dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),  # q/k/v biases
    # Qwen3: q/k norm, head_dim (32) != hidden / heads (16).
    "qwen3": dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
}


def make_hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    tok_ids = dict(bos_token_id=SPECIAL_TOKENS.index("<|begin_of_text|>"),
                   eos_token_id=SPECIAL_TOKENS.index("<|eot_id|>"))
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  **tok_ids)
    kwargs.update(FAMILY_CONFIGS[family])
    kwargs.update(overrides)
    return CONFIG_CLASSES[family](**kwargs)


def make_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, random_norms: bool = True,
                  **overrides):
    """A random tiny model. Biases are randomised (HF starts them at zero, which would hide a bias
    mistake), and norms too unless `random_norms=False`, so a dropped or swapped one shows."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_hf_config(family, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and random_norms:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.to(dtype).eval()


def save_hf_checkpoint(path: Path, family: str, dtype: torch.dtype = torch.float32,
                       max_shard_size: str | None = None, seed: int = 0, **overrides):
    """Save a tiny model and tokenizer as `save_pretrained` does; returns the model (the oracle)."""
    model = make_hf_model(family, seed=seed, dtype=dtype, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    word_level_tokenizer().save_pretrained(path)
    return model


# The PEFT tests' shape: smaller still, plain RoPE, norms left at one (only biases randomised).
PEFT_SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, head_dim=8, max_position_embeddings=64,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tiny_peft_hf(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model in PEFT_SHAPE: "llama" (untied), "llama_tied" or "qwen2" (q/k/v biases)."""
    base = "qwen2" if family == "qwen2" else "llama"
    return make_hf_model(base, seed=seed, random_norms=False, tie_word_embeddings=family == "llama_tied",
                         **PEFT_SHAPE)


# The training tests' model: the demo tokenizer (vocabulary 1024, Llama 3 specials) on a smaller
# Llama than the demo's, so each training step takes milliseconds. Fresh HF init (no randomising).
SMALL_LLAMA_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def write_small_hf_model(out_dir: Path, seed: int = 0, **shape_changes) -> Path:
    """A randomly initialised small Llama with the demo tokenizer, written by `transformers`."""
    from shoal.demo.tiny_model import tiny_llama_config
    from shoal.demo.tokenizer import TOKENIZER_DIR

    ids = tiny_llama_config()  # only for the tokenizer's vocabulary size and special ids
    config = make_hf_config("llama", vocab_size=ids.vocab_size, bos_token_id=ids.bos_token_id,
                            eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
                            **{**SMALL_LLAMA_SHAPE, **shape_changes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).float()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    return out_dir
