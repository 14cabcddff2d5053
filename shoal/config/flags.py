"""The training commands' flags: the seed's spellings, mapped onto recipe keys.

A user who pastes the seed's `pretrain.py`/`finetune.py` command line with `shoal pretrain` in
place of the script gets the run they meant; `shoal.config.resolve` turns the parsed flags into the
recipe. Secrets (`--hf_token`, `--wandb_token`, see `shoal.config.secrets`) never enter the recipe,
so they are never written into the saved `config.yaml`.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from shoal.config.launch import add_launch_arguments
from shoal.errors import ShoalError

# `shoal pretrain|finetune --help` builds its parser from this module: keep it free of torch
# (shoal.models imports it), so the help and a flag's error come at once.
ACCEPTS_OVERRIDES = True  # the training commands take dotted recipe overrides beside these flags

# (flags, recipe key, argparse options)
SEED_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--experiment", "-E"), "checkpoint.experiment", {"help": "experiment name (folder under --results_dir)"}),
    (("--results_dir",), "checkpoint.results_dir", {"help": "where experiments live (default: results)"}),
    (("--model", "-M"), "model.preset", {"help": "model preset, e.g. llama31_8b (see shoal.models.presets)"}),
    (("--model_size",), "model.preset", {"help": "the seed's size flag: 8B, 70B, 1B, 3B (Llama 3.x)"}),
    (("--hf_model_id",), "model.hf_model_id", {"help": "Hugging Face id or folder of the model"}),
    (("--nemo_model", "-n"), "model.checkpoint",
     {"nargs": "?", "help": "shoal checkpoint to start from (an import, or a pretraining checkpoint)"}),
    (("--seq_length", "-s"), "data.seq_length",
     {"type": int, "help": "tokens per training sequence (recipe default 8192, the seed's)"}),
    (("--fp8",), "train.fp8", {"nargs": "?", "const": "hybrid",
                               "help": "FP8 matmuls through torchao (GPU of compute capability >= 8.9): "
                                       "hybrid (the default) or e4m3"}),
    (("--fp8_recipe",), "train.fp8_recipe",
     {"help": "tensorwise (default), rowwise, rowwise_with_gw_hp, or the seed's delayed_scaling, "
              "current_scaling, subchannel_scaling (mapped to the nearest, see docs/training.md)"}),
    (("--peft",), "peft.method", {"choices": ["none", "lora", "dora"], "type": str.lower,
                                  "help": "fine-tune adapters instead of every weight: LoRA or DoRA on every linear "
                                          "layer, dim 32, alpha 32 (NeMo's default; --peft.rank=... to change)"}),
    (("--max_steps",), "train.max_steps", {"type": int, "help": "default: one epoch over the data"}),
    (("--global_batch_size", "-g"), "train.global_batch_size",
     {"type": int, "help": "sequences per optimizer step, over all ranks (micro batch × data-parallel × accumulation)"}),
    (("--micro_batch_size", "-m"), "train.micro_batch_size",
     {"type": int, "help": "sequences per forward/backward pass on each data-parallel rank (default 1)"}),
    (("--lr",), "train.lr", {"type": float, "help": "peak learning rate (the seed's: 1e-5 pretraining, 5e-6 fine-tuning)"}),
    (("--tensor_model_parallel_size", "-T"), "parallel.tensor_model_parallel_size",
     {"type": int, "help": "split each layer's matrices over this many GPUs (Megatron-style, with sequence parallel)"}),
    (("--pipeline_model_parallel_size", "-P"), "parallel.pipeline_model_parallel_size",
     {"type": int, "help": "split the layers into this many pipeline stages (1F1B schedule)"}),
    (("--context_parallel_size", "-C"), "parallel.context_parallel_size",
     {"type": int, "help": "split each sequence over this many GPUs (for long sequences)"}),
    # NeMo's name; no short form (-E is the seed's --experiment).
    (("--expert_model_parallel_size",), "parallel.expert_model_parallel_size",
     {"type": int, "help": "mixture of experts: split each sparse layer's experts over this many of the "
                           "data-parallel GPUs; tokens reach their experts by all-to-all"}),
    (("--dataset_path", "-D"), "data.dataset_path",
     {"nargs": "+", "help": "pretraining: folder or prefixes of .bin/.idx ([w1 p1 w2 p2] to blend); "
                            "finetuning: folder with training/validation/test.jsonl"}),
    (("--wandb",), "logging.wandb", {"action": "store_true", "default": None,
                                     "help": "log to Weights & Biases too (needs `pip install shoal[wandb]`)"}),
    (("--wandb_project",), "logging.wandb_project", {"help": "W&B project (default: shoal)"}),
    (("--wandb_name",), "logging.wandb_name", {"help": "W&B run name (default: the experiment name)"}),
]


def recipe_path(name: str) -> Path:
    """A recipe file: a path, or the name of one shipped in shoal/recipes/."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ShoalError(f"recipe file {path} does not exist")
        return path
    shipped = resources.files("shoal") / "recipes" / f"{name}.yaml"
    if not shipped.is_file():
        names = sorted(p.name[:-5] for p in (resources.files("shoal") / "recipes").iterdir() if p.name.endswith(".yaml"))
        raise ShoalError(f"unknown recipe {name!r}; shipped recipes: {', '.join(names)}")
    return Path(str(shipped))


# Seed flags a stage does not offer: pretraining trains no adapters.
STAGE_EXCLUDED_FLAGS: dict[str, set[str]] = {"pretrain": {"--peft"}}


def add_training_arguments(parser: argparse.ArgumentParser, stage: str | None = None) -> None:
    parser.add_argument("--recipe", "-r", help="recipe name (shoal/recipes/NAME.yaml) or YAML file; "
                                               "default: the --model preset's recipe")
    for flags, _key, options in SEED_FLAGS:
        if flags[0] in STAGE_EXCLUDED_FLAGS.get(stage or "", set()):
            continue
        dest = flags[0].lstrip("-")
        parser.add_argument(*flags, dest=dest, **({"default": None} | options))
    parser.add_argument("--hf_token", help="Hugging Face token (or HF_TOKEN); never saved")
    parser.add_argument("--wandb_token", help="Weights & Biases API key (or WANDB_API_KEY); never saved")
    add_launch_arguments(parser)


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """`shoal pretrain`'s flags."""
    add_training_arguments(parser, stage="pretrain")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """`shoal finetune`'s flags: the training flags, and the pretraining experiment to start from."""
    add_training_arguments(parser, stage="finetune")
    parser.add_argument("--pretrain_experiment", help="experiment whose latest checkpoint to fine-tune when "
                        "--nemo_model is unset (default: the newest pretraining experiment under --results_dir)")


def default_recipe_name(model: str | None, model_size: str | None) -> str:
    """The recipe of the --model (or --model_size) preset when one is shipped, else `default`."""
    from shoal.models.presets import MODEL_SIZE_ALIASES  # imports torch (the models package)

    preset = model or (MODEL_SIZE_ALIASES.get(model_size, model_size) if model_size else None)
    if preset:
        try:
            recipe_path(preset)
            return preset
        except ShoalError:
            pass
    return "default"
