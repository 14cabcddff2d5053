"""Hugging Face PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

What PEFT writes with `save_pretrained` and reads with `PeftModel.from_pretrained` (checked against
peft 0.21): tensor keys are the module path inside `PeftModelForCausalLM`, i.e.
`base_model.model.` + the HF parameter name, without the adapter name:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          [out, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  [out]   (DoRA)

shoal's adapter names are the same without the prefix, so both directions are a rename, except
for the routed experts of a mixture-of-experts model: shoal holds their adapters grouped
(`mlp.experts.lora.gate_proj.lora_A.weight` [X, r, in], see shoal.peft.experts) and the folder
holds one slice per expert, named as PEFT names the adapter of transformers v4's per-expert
linear layers (`mlp.experts.{x}.gate_proj.lora_A.weight` [r, in]); PEFT on transformers 5 fuses
them into its `gate_up_proj`/`down_proj` parameter adapters as it loads them. The config is a `LoraConfig` (`peft_type: LORA`, `r`, `lora_alpha`, `lora_dropout`, `target_modules`,
`use_dora`); PEFT features that change the maths and that shoal does not implement (rsLoRA,
per-module ranks, bias training, ...) are refused when reading, never dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.checkpoint.atomic import atomic_directory
from shoal.errors import ShoalError
from shoal.peft.config import ALL_LINEAR, LoraConfig
from shoal.peft.lora import adapter_state_dict, group_adapter_tensors, is_adapter_key, split_adapter_key

PEFT_PREFIX = "base_model.model."
# One expert's adapter factor in a PEFT folder: (experts module, expert index, projection, factor).
_PER_EXPERT_FACTOR = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(lora_A\.weight|lora_B\.weight)$")
_GROUPED_FACTOR = re.compile(r"^(.*\.experts)\.lora\.(gate_proj|up_proj|down_proj)\.(lora_A\.weight|lora_B\.weight)$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys whose non-empty values change what the adapter computes or where it
# sits, in ways shoal does not reproduce. Missing, null, false, {} and [] are all fine.
_UNSUPPORTED_KEYS = (
    "use_rslora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
    "layers_to_transform", "layers_pattern", "layer_replication", "target_parameters", "use_qalora",
    "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config",
    "monteclora_config", "kasa_config", "mica", "exclude_modules",
)


def peft_adapter_config(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` PEFT needs to rebuild this adapter on a Hugging Face model."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "use_dora": config.use_dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft_adapter(
    model_or_adapter_state: nn.Module | Mapping[str, torch.Tensor],
    peft_config: LoraConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter folder that `PeftModel.from_pretrained(hf_model, out_dir)` loads as is.

    `model_or_adapter_state` is a model carrying adapters or an `adapter_state_dict` (shoal names;
    other keys are ignored). `peft_config` is a `LoraConfig` or its dict (a checkpoint's
    `peft.json`). The folder appears only when complete.
    """
    config = peft_config if isinstance(peft_config, LoraConfig) else LoraConfig.from_dict(dict(peft_config))
    if isinstance(model_or_adapter_state, nn.Module):
        state = adapter_state_dict(model_or_adapter_state)
    else:
        state = {k: v for k, v in model_or_adapter_state.items() if is_adapter_key(k)}
    if not state:
        raise ShoalError("no adapter tensors to save (expected names ending in lora_A.weight, lora_B.weight"
                         " or lora_magnitude_vector)")
    group_adapter_tensors(state, config, "adapter to save")  # PEFT would reject, or silently skip, the rest
    _refuse_dense_mlp_beside_experts(state)
    # safetensors wants contiguous CPU tensors that share no storage.
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu").contiguous().clone()
               for name, t in sorted(_split_expert_factors(state).items())}
    from safetensors.torch import save

    out = Path(out_dir)
    with atomic_directory(out, overwrite) as tmp:
        # Bytes written by Python, not safetensors' save_file, which creates its file with mode 0600:
        # the adapter gets the same permissions (the umask's) as the config beside it. Adapters are small.
        (tmp / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        text = json.dumps(peft_adapter_config(config, base_model_name_or_path), indent=2, sort_keys=True)
        (tmp / CONFIG_FILE).write_text(text + "\n")
    return out


def _refuse_dense_mlp_beside_experts(state: Mapping[str, torch.Tensor]) -> None:
    """PEFT (0.21, transformers 5) turns the gate_proj/up_proj/down_proj targets of a Qwen3-MoE
    model into adapters on the fused experts only: a dense MLP layer's adapters (`mlp_only_layers`,
    `decoder_sparse_step`) would be left out when it loads the folder, without an error."""
    experts = any(_GROUPED_FACTOR.match(name) for name in state)
    dense = sorted({split_adapter_key(name)[0] for name in state if re.search(r"\.mlp\.(gate|up|down)_proj\.", name)})
    if experts and dense:
        raise ShoalError(f"cannot write a PEFT adapter for {dense[0]} (and {len(dense) - 1} more dense MLP "
                         "projections) beside adapters on the routed experts: PEFT on transformers 5 maps the "
                         "gate_proj/up_proj/down_proj targets of a mixture-of-experts model onto its experts only and "
                         "would skip them; export the merged model instead")


def _split_expert_factors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Grouped expert adapter factors [X, ...] -> one [...] tensor per expert under PEFT's per-expert name."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _GROUPED_FACTOR.match(name)
        if match is None:
            out[name] = tensor
            continue
        experts, proj, factor = match.groups()
        for index, piece in enumerate(tensor.unbind(0)):
            out[f"{experts}.{index}.{proj}.{factor}"] = piece
    return out


def _stack_expert_factors(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The inverse of `_split_expert_factors`: per-expert factors stacked into shoal's grouped ones
    (every expert 0..X-1 present, of one shape)."""
    out: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _PER_EXPERT_FACTOR.match(name)
        if match is None:
            out[name] = tensor
            continue
        experts, index, proj, factor = match.groups()
        grouped.setdefault(f"{experts}.lora.{proj}.{factor}", {})[int(index)] = tensor
    for name, by_index in grouped.items():
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        if missing:
            raise ShoalError(f"{where}: the adapter lacks experts {missing} of {name.replace('.lora.', '.{x}.')}")
        pieces = [by_index[i] for i in range(len(by_index))]
        if len({tuple(p.shape) for p in pieces}) > 1:
            raise ShoalError(f"{where}: the experts' adapters for {name.replace('.lora.', '.{x}.')} differ in shape")
        out[name] = torch.stack(pieces)
    return out


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ShoalError(f"{path} not found: a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShoalError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ShoalError(f"{path}: expected a JSON object")
    return data


def _config_from_peft(data: dict[str, Any], state: Mapping[str, torch.Tensor], where: Path) -> LoraConfig:
    """Check a PEFT adapter config for what shoal can reproduce and turn it into a LoraConfig.

    The targets come from the tensors actually present: PEFT allows a regex there, and the file
    is the truth about which layers carry adapters.
    """
    if data.get("peft_type") != "LORA":
        raise ShoalError(f"{where}: peft_type is {data.get('peft_type')!r}; shoal reads LoRA/DoRA adapters ('LORA')")
    bias = data.get("bias", "none")
    if bias != "none":
        raise ShoalError(f"{where}: bias={bias!r} is not supported (shoal adapters train no biases; expected 'none')")
    for key in _UNSUPPORTED_KEYS:
        if data.get(key):
            raise ShoalError(f"{where}: {key}={data[key]!r} is not supported by shoal's LoRA/DoRA")
    leaves = sorted({split_adapter_key(name)[0].rpartition(".")[2] for name in state})
    unknown = [leaf for leaf in leaves if leaf not in ALL_LINEAR]
    if unknown:
        raise ShoalError(f"{where}: adapters on {unknown}; shoal adapts only {list(ALL_LINEAR)}")
    try:
        return LoraConfig(
            rank=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),  # PEFT's own defaults for absent keys
            dropout=data.get("lora_dropout", 0.0),
            target_modules=leaves,
            use_dora=bool(data.get("use_dora", False)),
        )
    except ShoalError as err:
        raise ShoalError(f"{where}: {err}") from None


def load_peft_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT adapter folder into shoal's terms: its settings and its tensors with shoal names.

    Use: `apply_lora(model, **dataclasses.asdict(cfg))` then `load_adapter_state_dict(model, state)`.
    """
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    data = _read_config(config_path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ShoalError(f"{folder} holds adapter_model.bin, a pickle, which shoal does not load; "
                             f"save the adapter as safetensors ({WEIGHTS_FILE})")
        raise ShoalError(f"{weights} not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ShoalError(f"{weights}: not a readable safetensors file ({err})") from None
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if not key.startswith(PEFT_PREFIX) or not is_adapter_key(key):
            raise ShoalError(f"{weights}: unexpected tensor {key!r}; expected {PEFT_PREFIX}<module>.lora_A.weight, "
                             "lora_B.weight or lora_magnitude_vector")
        state[key[len(PEFT_PREFIX):]] = tensor
    if not state:
        raise ShoalError(f"{weights}: holds no adapter tensors")
    state = _stack_expert_factors(state, weights)
    config = _config_from_peft(data, state, config_path)
    group_adapter_tensors(state, config, str(weights))
    return config, state
