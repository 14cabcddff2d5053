"""Tiny models of every family for the generation tests, made as a user makes them: a Hugging Face
folder written by `transformers`, then `shoal import`. `transformers` is the oracle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.helpers.hf_models import FAMILY_CONFIGS, save_hf_checkpoint
from tests.helpers.tokenizers import SPECIAL_TOKENS

FAMILIES = sorted(FAMILY_CONFIGS)
EOT_ID = SPECIAL_TOKENS.index("<|eot_id|>")
END_OF_TEXT_ID = SPECIAL_TOKENS.index("<|end_of_text|>")


@dataclass(frozen=True)
class TinyModel:
    family: str
    hf_dir: Path  # the Hugging Face folder (the oracle loads it)
    checkpoint: Path  # its shoal import


def shoal(*args: object) -> int:
    from shoal.cli import main

    return main([str(a) for a in args])


def write_model(root: Path, family: str, **config) -> TinyModel:
    """An HF folder written by transformers (config.json changes in `config`) and its shoal import."""
    hf_dir = root / f"{family}-hf"
    # A wide initialisation: at HF's default (0.02) a random tiny model repeats one token forever,
    # which would let a wrong cache or wrong positions go unseen; at 0.3 every step's choice depends
    # on the whole context.
    save_hf_checkpoint(hf_dir, family, **{"initializer_range": 0.3, **config})
    assert shoal("import", "--source", hf_dir, "--output_path", root / f"{family}-ckpt") == 0
    return TinyModel(family, hf_dir, root / f"{family}-ckpt")
