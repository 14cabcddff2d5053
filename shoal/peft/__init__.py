"""Parameter-efficient fine-tuning: LoRA and DoRA applied to a built model, merged back, saved as
shoal adapter state or as a Hugging Face PEFT adapter folder. See docs/peft.md."""

from shoal.peft.adapter import load_peft_adapter, peft_adapter_config, save_peft_adapter
from shoal.peft.config import ALL_LINEAR, NEMO_TARGETS, LoraConfig, resolve_target_modules
from shoal.peft.lora import (
    LoraLinear,
    adapter_state_dict,
    apply_lora,
    init_lora_weights,
    load_adapter_state_dict,
    lora_config_dict,
    merge_adapter_state_dict,
    merge_lora,
    merged_weight,
)

__all__ = [
    "ALL_LINEAR", "NEMO_TARGETS", "LoraConfig", "LoraLinear", "adapter_state_dict", "apply_lora",
    "init_lora_weights", "load_adapter_state_dict", "load_peft_adapter", "lora_config_dict",
    "merge_adapter_state_dict", "merge_lora", "merged_weight", "peft_adapter_config",
    "resolve_target_modules", "save_peft_adapter",
]
