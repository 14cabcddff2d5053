"""Tiny Hugging Face models (the oracle side) and their shoal twins, plus adapter-copying helpers.

The correspondence between shoal's adapter names and PEFT's in-memory parameter names is written
out here by hand (`peft_param_to_shoal`), independently of `shoal.peft.adapter`'s file mapping,
which the format tests check through PEFT's own loader instead.
"""

from __future__ import annotations

import copy

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from shoal.models.config import from_hf_config
from shoal.models.model import Transformer, build_model

VOCAB = 96


def tiny_hf(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer HF model; "llama", "llama_tied" or "qwen2" (q/k/v biases, made non-zero here
    because HF initialises them to zero and a zero bias would hide bias mistakes)."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=family == "llama_tied"))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return hf.eval()


def shoal_twin(hf: torch.nn.Module) -> Transformer:
    model = build_model(from_hf_config(hf.config.to_dict()), init=False)
    model.load_state_dict(hf.state_dict())
    return model.eval()


def peft_twin(hf: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], dora: bool):
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_dora=dora)
    return peft.get_peft_model(copy.deepcopy(hf), config).eval()


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_param_to_shoal(name: str) -> str:
    """`base_model.model.X.lora_A.default.weight` -> `X.lora_A.weight`;
    `...lora_magnitude_vector.default.weight` -> `...lora_magnitude_vector`."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


def peft_adapter_params(peft_model) -> dict[str, torch.nn.Parameter]:
    return {peft_param_to_shoal(n): p for n, p in peft_model.named_parameters() if "lora_" in n}


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    """Non-zero, non-trivial adapter values (a fresh adapter is the identity and would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(("lora_A.weight", "lora_B.weight")):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        elif name.endswith("lora_magnitude_vector"):
            param.mul_(0.5 + torch.rand(param.shape, generator=gen))


@torch.no_grad()
def copy_adapters_to_peft(shoal_model: torch.nn.Module, peft_model) -> None:
    ours = {n: p for n, p in shoal_model.named_parameters() if "lora_" in n}
    theirs = peft_adapter_params(peft_model)
    assert sorted(ours) == sorted(theirs)
    for name, param in theirs.items():
        param.copy_(ours[name])
