"""Tiny Hugging Face checkpoints built by the tests themselves: a random model of each family saved
with `transformers.save_pretrained`, and a small word-level tokenizer with a Llama-3-like chat template.

Nothing is downloaded; `transformers` is the oracle the converted checkpoints are compared with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

VOCAB_SIZE = 256

# A Llama-3 style template: a header per message, <|eot_id|> after each, optional generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<unk>"]
WORDS = ("hello world the a quick brown fox jumps over lazy dog user assistant system how are you "
         "fine thanks what is shoal fish swim together in water").split()

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


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = vocab["<|begin_of_text|>"]
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    tok_ids = dict(bos_token_id=SPECIAL_TOKENS.index("<|begin_of_text|>"),
                   eos_token_id=SPECIAL_TOKENS.index("<|eot_id|>"))
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  **tok_ids)
    kwargs.update(FAMILY_CONFIGS[family])
    kwargs.update(overrides)
    return CONFIG_CLASSES[family](**kwargs)


def make_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random tiny model; norms and biases are randomised too, so a dropped or swapped one shows."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_hf_config(family, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
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
    make_tokenizer().save_pretrained(path)
    return model
