"""The PEFT tests' side by side: a tiny Hugging Face model (the oracle side, from
`tests.helpers.hf_models.tiny_peft_hf`), its shoal twin and its PEFT twin, plus adapter-copying helpers.

The correspondence between shoal's adapter names and PEFT's in-memory parameter names is written
out here by hand (`peft_param_to_shoal`), independently of `shoal.peft.adapter`'s file mapping,
which the format tests check through PEFT's own loader instead.
"""

from __future__ import annotations

import copy

import peft
import torch

from shoal.models.config import from_hf_config
from shoal.models.model import Transformer, build_model
from tests.helpers.hf_models import PEFT_SHAPE

VOCAB = PEFT_SHAPE["vocab_size"]


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
