"""The training commands' flags: the seed's spellings, mapped onto recipe keys.

A user who pastes the seed's `pretrain.py`/`finetune.py` command line with `shoal pretrain` in
place of the script gets the run they meant. Precedence, lowest first: the recipe file, the
recipe's stage section (`pretrain:` / `finetune:`), the seed flags, then dotted overrides
(`--train.lr=1e-4` or `train.lr=1e-4`). Secrets (`--hf_token`, `--wandb_token`) never enter the
recipe, so they are never written into the saved `config.yaml`.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path
from typing import Any

from shoal.config.launch import add_launch_arguments
from shoal.config.loader import apply_overrides, from_dict, load_yaml, set_dotted
from shoal.config.recipe import Recipe
from shoal.errors import ShoalError
from shoal.models.presets import MODEL_SIZE_ALIASES

# (flags, recipe key, argparse options)
SEED_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--experiment", "-E"), "checkpoint.experiment", {"help": "experiment name (folder under --results_dir)"}),
    (("--results_dir",), "checkpoint.results_dir", {"help": "where experiments live (default: results)"}),
    (("--model", "-M"), "model.preset", {"help": "model preset, e.g. llama31_8b (see shoal.models.presets)"}),
    (("--model_size",), "model.preset", {"help": "the seed's size flag: 8B, 70B, 1B, 3B (Llama 3.x)"}),
    (("--hf_model_id",), "model.hf_model_id", {"help": "Hugging Face id or folder of the model"}),
    (("--nemo_model", "-n"), "model.checkpoint",
     {"nargs": "?", "help": "shoal checkpoint to start from (an import, or a pretraining checkpoint)"}),
    (("--seq_length", "-s"), "data.seq_length", {"type": int}),
    (("--fp8",), "train.fp8", {"nargs": "?", "const": "hybrid", "help": "not supported yet (refused)"}),
    (("--fp8_recipe",), None, {"help": "accepted for compatibility; FP8 is not supported yet"}),
    (("--peft",), "peft.method", {"choices": ["none", "lora", "dora"]}),
    (("--max_steps",), "train.max_steps", {"type": int, "help": "default: one epoch over the data"}),
    (("--global_batch_size", "-g"), "train.global_batch_size", {"type": int}),
    (("--micro_batch_size", "-m"), "train.micro_batch_size", {"type": int}),
    (("--lr",), "train.lr", {"type": float}),
    (("--tensor_model_parallel_size", "-T"), "parallel.tensor_model_parallel_size", {"type": int}),
    (("--pipeline_model_parallel_size", "-P"), "parallel.pipeline_model_parallel_size", {"type": int}),
    (("--context_parallel_size", "-C"), "parallel.context_parallel_size", {"type": int}),
    (("--dataset_path", "-D"), "data.dataset_path",
     {"nargs": "+", "help": "pretraining: folder or prefixes of .bin/.idx ([w1 p1 w2 p2] to blend); "
                            "finetuning: folder with training/validation/test.jsonl"}),
    (("--wandb",), "logging.wandb", {"action": "store_true", "default": None}),
    (("--wandb_project",), "logging.wandb_project", {}),
    (("--wandb_name",), "logging.wandb_name", {}),
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
    for flags, key, options in SEED_FLAGS:
        if flags[0] in STAGE_EXCLUDED_FLAGS.get(stage or "", set()):
            continue
        dest = flags[0].lstrip("-")
        parser.add_argument(*flags, dest=dest, **({"default": None} | options))
    parser.add_argument("--hf_token", help="Hugging Face token (or HF_TOKEN); never saved")
    parser.add_argument("--wandb_token", help="Weights & Biases API key (or WANDB_API_KEY); never saved")
    add_launch_arguments(parser)


def _default_recipe(args: argparse.Namespace) -> str:
    preset = args.model or (MODEL_SIZE_ALIASES.get(args.model_size, args.model_size) if args.model_size else None)
    if preset:
        try:
            return str(recipe_path(preset))
        except ShoalError:
            pass
    return str(recipe_path("default"))


def recipe_from_args(args: argparse.Namespace, stage: str) -> Recipe:
    """Resolve the recipe for `stage` ("pretrain" or "finetune") from file, flags and overrides."""
    path = recipe_path(args.recipe) if args.recipe else Path(_default_recipe(args))
    tree = load_yaml(path)
    stages = {name: tree.pop(name, None) or {} for name in ("pretrain", "finetune")}
    for key, value in _flatten(stages[stage]):
        set_dotted(tree, key, value)
    for flags, key, _ in SEED_FLAGS:
        value = getattr(args, flags[0].lstrip("-"), None)  # None too for a flag the stage leaves out
        if key is None or value is None:
            continue
        if flags[0] == "--model_size":
            value = MODEL_SIZE_ALIASES.get(value, value)
        set_dotted(tree, key, value)
    for key in ("num_nodes", "num_gpus"):
        if getattr(args, key, None) is not None:
            set_dotted(tree, f"parallel.{key}", getattr(args, key))
    apply_overrides(tree, getattr(args, "overrides", None) or [])
    recipe = from_dict(Recipe, tree, "")
    recipe.validate()
    return recipe


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def secret(value: str | None, env: str) -> str | None:
    """A secret from its flag or environment variable; the caller keeps it in memory only."""
    return value or os.environ.get(env) or None
