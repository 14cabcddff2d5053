"""What a LoRA/DoRA adapter is: rank, alpha, dropout, which projections it targets, plain or DoRA.

`LoraConfig` is the one description shared by `apply_lora`, the `peft.json` of a shoal checkpoint
and the `adapter_config.json` of a Hugging Face PEFT adapter. Target names are resolved here, once:
shoal's model uses Hugging Face's module names (`q_proj`, ..., `down_proj`), and NeMo's names for
its fused projections, which users of the seed tutorial will type, map onto them:

    linear_qkv  -> q_proj, k_proj, v_proj
    linear_proj -> o_proj
    linear_fc1  -> gate_proj, up_proj
    linear_fc2  -> down_proj

NeMo puts one adapter on its fused QKV (and gate+up) matrix; shoal, like PEFT on a Hugging Face
model, puts one per projection. The targets are the same weights, the adapters are not
interchangeable tensor for tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ShoalError

# Every linear layer of a decoder block, in the order they appear in a layer; lm_head is not a
# target (with tied embeddings its weight is the embedding, which a merge would then change too).
ALL_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

NEMO_TARGETS: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}

# PEFT's spelling for "every linear layer but the output head".
SHORTCUTS: dict[str, tuple[str, ...]] = {"all-linear": ALL_LINEAR, "all_linear": ALL_LINEAR}


def valid_target_names() -> list[str]:
    return [*ALL_LINEAR, *NEMO_TARGETS, *SHORTCUTS]


def resolve_target_modules(names: str | Iterable[str], where: str = "target_modules") -> tuple[str, ...]:
    """Map user-typed target names (HF, NeMo, `all-linear`; a list or a comma-separated string)
    to the HF module names they stand for, deduplicated, in the order of `ALL_LINEAR`."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    wanted: set[str] = set()
    for raw in names:
        if not isinstance(raw, str):
            raise ShoalError(f"{where}: target module names must be strings, got {raw!r}")
        name = raw.strip()
        if name in ALL_LINEAR:
            wanted.add(name)
        elif name in NEMO_TARGETS:
            wanted.update(NEMO_TARGETS[name])
        elif name in SHORTCUTS:
            wanted.update(SHORTCUTS[name])
        else:
            raise ShoalError(
                f"{where}: unknown target module {raw!r}; valid names are {', '.join(valid_target_names())}"
            )
    if not wanted:
        raise ShoalError(f"{where}: no target modules given; valid names are {', '.join(valid_target_names())}")
    return tuple(n for n in ALL_LINEAR if n in wanted)


@dataclass(frozen=True)
class LoraConfig:
    """An adapter's settings. `target_modules` accepts any names `resolve_target_modules` does and
    holds the resolved HF names afterwards. `apply_lora(model, **dataclasses.asdict(cfg))` applies it."""

    # NeMo's LoRA defaults (the seed's): every linear layer of each block, dim 32, alpha 32, no dropout.
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=ALL_LINEAR)
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ShoalError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ShoalError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ShoalError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise ShoalError(f"use_dora must be true or false, got {self.use_dora!r}")
        # Frozen dataclass: normalise the fields in place once, at construction.
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", resolve_target_modules(self.target_modules))

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha / rank, as PEFT and the LoRA paper define it."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """The content of a shoal checkpoint's `peft.json`."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "peft.json") -> LoraConfig:
        """Read `to_dict()`'s output back, naming `where` and the key at fault on bad input."""
        if not isinstance(data, dict):
            raise ShoalError(f"{where}: expected a JSON object with the adapter settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ShoalError(f"{where}: unknown adapter keys {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except ShoalError as err:
            raise ShoalError(f"{where}: {err}") from None
