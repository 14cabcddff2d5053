"""From what the user names to a model ready to generate: a shoal checkpoint, an experiment (its
latest checkpoint) or a Hugging Face model folder (converted in memory, nothing written).

A checkpoint that carries LoRA/DoRA adapters (`peft.json`) is built with the adapters swapped in,
loaded, then merged in memory: the same weights `shoal export` would write, with no file written
(an adapter-only training checkpoint reads its frozen weights from its base checkpoint, checked).
Weights are loaded straight into the model's dtype on its device (built on the meta device first,
so no copy is made in another dtype).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoal.checkpoint.format import METADATA_FILE, is_checkpoint, parse_dtype, read_metadata, read_model_config
from shoal.errors import ShoalError
from shoal.models.config import ModelConfig
from shoal.models.model import Transformer, rope_inverse_frequencies

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens that end an assistant turn in the chat templates of the families shoal supports (Llama 3's
# <|eot_id|>, Qwen's <|im_end|>); in chat mode generation stops there even when a base model's
# generation_config names only its end-of-text token.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|eom_id|>")


@dataclass
class LoadedModel:
    """A model ready to generate, its tokenizer and generation defaults, and what was loaded."""

    model: Transformer
    tokenizer: PreTrainedTokenizerBase
    generation_config: dict[str, Any]
    description: str  # one line for the user: which checkpoint, adapters, device, dtype
    checkpoint: Path | None = None  # the shoal checkpoint read (None for a Hugging Face folder)
    notes: list[str] = field(default_factory=list)

    def stop_token_ids(self, chat: bool = False) -> list[int]:
        """Every end token named by generation_config.json, the tokenizer and the model config;
        in chat mode also the template's end-of-turn token."""
        ids: list[int] = []
        for value in (self.generation_config.get("eos_token_id"), self.tokenizer.eos_token_id,
                      self.model.config.eos_token_id):
            ids += [value] if isinstance(value, int) else list(value or [])
        if chat:
            vocab = self.tokenizer.get_vocab()
            ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
        return sorted(set(int(i) for i in ids))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShoalError(f"--device {name}: no CUDA device is available on this machine")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU, unless asked otherwise."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name, where="--dtype")


def resolve_source_checkpoint(path: Path, which: str = "latest") -> Path:
    """The checkpoint an experiment (or checkpoints/ folder) stands for: its latest or best one."""
    from shoal.checkpoint.catalog import resolve_checkpoint

    return resolve_checkpoint(path, which=which)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / METADATA_FILE).is_file()


def empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, peft: Any = None) -> Transformer:
    """The model (with adapters when `peft` is a LoraConfig) in `dtype` on `device`, weights unset."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if peft is not None:
        from shoal.peft import apply_lora

        apply_lora(model, rank=peft.rank, alpha=peft.alpha, dropout=0.0, target_modules=peft.target_modules,
                   use_dora=peft.use_dora)
    model.to(dtype).to_empty(device=device)
    # RoPE frequencies stay fp32 whatever the weights' dtype, as Hugging Face keeps them.
    model.inv_freq = rope_inverse_frequencies(cfg, device=device)
    return model


def _load_hf_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, dict]:
    """A Hugging Face folder through the import adapter, tensor by tensor, into memory only."""
    from shoal.checkpoint.format import TensorInfo
    from shoal.convert.adapters import get_adapter
    from shoal.convert.importer import read_hf_config, read_json
    from shoal.convert.safetensors_io import find_weight_files, read_tensor

    _, cfg = read_hf_config(folder)
    entries = find_weight_files(folder)
    adapter = get_adapter(cfg)
    plan = adapter.import_plan({n: TensorInfo(e.shape, e.dtype) for n, e in entries.items()}, where=folder)
    model = empty_model(cfg, device, dtype)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for shoal_name, hf_name in plan.items():
            params[shoal_name].copy_(adapter.to_shoal(hf_name, read_tensor(entries[hf_name])))
    model.tie_weights()
    generation = {}
    if (folder / "generation_config.json").is_file():
        generation = read_json(folder / "generation_config.json", "generation defaults")
    return model, generation


def _load_checkpoint(ckpt: Path, device: torch.device, dtype: torch.dtype,
                     base: str | os.PathLike | None = None) -> tuple[Transformer, dict, bool]:
    from shoal.checkpoint.state import load_model_into
    from shoal.convert.exporter import generation_config

    meta = read_metadata(ckpt)
    cfg = read_model_config(ckpt)
    peft = None
    if (ckpt / "peft.json").is_file():
        from shoal.peft.export import read_peft_config

        peft = read_peft_config(ckpt)
    if not (ckpt / "model").is_dir():
        raise ShoalError(f"{ckpt}: model/ is missing (an incomplete checkpoint?)")
    model = empty_model(cfg, device, dtype, peft)
    # Adapters too: every tensor must be there (an adapter-only checkpoint's base gives the rest).
    load_model_into(model, ckpt, allow_missing=(), base=base)
    if peft is not None:
        from shoal.peft import merge_lora

        merge_lora(model)
    return model, generation_config(meta), peft is not None


def load_for_generation(source: str | os.PathLike, device: str = "auto", dtype: str | None = None,
                        which: str = "latest", base: str | os.PathLike | None = None) -> LoadedModel:
    """Load what `--source` names for generation; `description` says what was picked.
    `base`: where an adapter-only checkpoint's base checkpoint is, when it moved (checked)."""
    from shoal.data.tokenizer import load_tokenizer

    path = Path(source).expanduser()
    target = pick_device(device)
    weights_dtype = pick_dtype(dtype, target)
    notes = []
    if is_hf_folder(path):
        model, generation = _load_hf_folder(path, target, weights_dtype)
        tokenizer = load_tokenizer(path)
        what, ckpt = f"Hugging Face model {path} (converted in memory)", None
    else:
        ckpt = resolve_source_checkpoint(path, which)
        if not is_checkpoint(path):
            notes.append(f"{path} is an experiment; using its {which} checkpoint {ckpt.name}")
        model, generation, adapted = _load_checkpoint(ckpt, target, weights_dtype, base)
        if not (ckpt / "tokenizer").is_dir():
            raise ShoalError(f"{ckpt} has no tokenizer/ folder, so its prompts cannot be tokenized")
        tokenizer = load_tokenizer(ckpt)
        what = f"checkpoint {ckpt}" + (" with its LoRA/DoRA adapters (merged in memory)" if adapted else "")
    model.eval()
    description = f"{what} on {target} in {str(weights_dtype).removeprefix('torch.')}"
    return LoadedModel(model, tokenizer, dict(generation), description, ckpt, notes)
