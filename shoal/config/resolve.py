"""From a recipe file, the seed's flags and dotted overrides to one frozen `Recipe`.

Precedence, lowest first: the recipe file, its stage section (`pretrain:` / `finetune:`), the seed
flags, then dotted overrides (`--train.lr=1e-4` or `train.lr=1e-4`). Every decision derived from
several inputs is made here, once: the launch section from the launch flags, HSDP's replica count
from the node count, document masking for packed fine-tuning, fine-tuning's start checkpoint when
`--nemo_model` is unset. The result is what `config.yaml` records and what every stage reads;
nothing changes it later. From Python: `build_recipe("finetune", "tiny", {"train.lr": 1e-4})`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal.config.flags import SEED_FLAGS, default_recipe_name, recipe_path
from shoal.config.launch import LaunchConfig, launch_config_from_args
from shoal.config.loader import apply_overrides, from_dict, load_yaml, set_dotted
from shoal.config.recipe import Recipe
from shoal.errors import ShoalError
from shoal.models.presets import MODEL_SIZE_ALIASES
from shoal.peft.config import LoraConfig

STAGES = ("pretrain", "finetune")


def resolve_recipe(args: argparse.Namespace, stage: str, locate_start: bool = True) -> Recipe:
    """The frozen recipe of a parsed `shoal pretrain|finetune` command line. `locate_start` False
    (`shoal plan`) leaves fine-tuning's start checkpoint unset instead of looking for it here."""
    return build_recipe(
        stage,
        args.recipe or default_recipe_name(args.model, args.model_size),
        settings=settings_from_flags(args),
        overrides=getattr(args, "overrides", None) or [],
        launch=launch_config_from_args(args),
        locate_start=locate_start,
    )


def settings_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """{recipe key: value} for the seed flags given on the command line (unset flags are absent)."""
    settings: dict[str, Any] = {}
    for flags, key, _ in SEED_FLAGS:
        value = getattr(args, flags[0].lstrip("-"), None)
        if key is None or value is None:
            continue
        if flags[0] == "--model_size":
            value = MODEL_SIZE_ALIASES.get(value, value)
        settings[key] = value
    if getattr(args, "pretrain_experiment", None):
        settings["model.pretrain_experiment"] = args.pretrain_experiment
    return settings


def build_recipe(
    stage: str,
    recipe: str | Path = "default",
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    launch: LaunchConfig | None = None,
    locate_start: bool = True,
) -> Recipe:
    """The frozen recipe for `stage` from a recipe name or file, {dotted key: value} settings and
    `key=value` override strings; `launch` None means one local process."""
    if stage not in STAGES:
        raise ShoalError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    path = recipe_path(str(recipe))
    tree = load_yaml(path)
    if "launch" in tree:
        raise ShoalError(f"recipe file {path}: `launch` is not a recipe section; how many processes run and where "
                         "comes from the command line (--num_gpus, --num_nodes, --executor, ...)")
    tree.pop("stage", None)  # a config.yaml used as a recipe: the command decides the stage
    sections = {name: tree.pop(name, None) or {} for name in STAGES}
    for key, value in _flatten(sections[stage]):
        set_dotted(tree, key, value)
    for key, value in (settings or {}).items():
        set_dotted(tree, key, value)
    apply_overrides(tree, list(overrides))
    peft = _peft_config(tree.pop("peft", None))
    recipe = from_dict(Recipe, {**tree, "stage": stage}, "")
    recipe = _derive(dataclasses.replace(recipe, peft=peft), launch or LaunchConfig(), locate_start)
    recipe.validate()
    return recipe


def experiment_dir(recipe: Recipe) -> Path:
    return Path(recipe.checkpoint.results_dir) / recipe.checkpoint.experiment


def _derive(recipe: Recipe, launch: LaunchConfig, locate_start: bool) -> Recipe:
    exp = experiment_dir(recipe)
    launch = dataclasses.replace(launch, experiment_dir=str(exp.absolute()))
    parallel = recipe.parallel
    if parallel.hsdp:  # one replica per node
        if parallel.data_parallel_replicate_size not in (1, launch.num_nodes):
            raise ShoalError(
                f"parallel.hsdp replicates across the {launch.num_nodes} nodes, but "
                f"parallel.data_parallel_replicate_size is {parallel.data_parallel_replicate_size}; set one of them"
            )
        parallel = dataclasses.replace(parallel, data_parallel_replicate_size=launch.num_nodes)
    data, model = recipe.data, recipe.model
    if recipe.stage == "finetune":
        if data.pack_sequences:  # packed examples must not see each other
            data = dataclasses.replace(data, document_mask=True)
        if locate_start and model.checkpoint is None and not _has_checkpoints(exp):
            # Fine-tuning starts from trained weights, never from a random preset.
            model = dataclasses.replace(model, checkpoint=str(find_pretraining_checkpoint(recipe)))
    return dataclasses.replace(recipe, launch=launch, parallel=parallel, data=data, model=model)


def _has_checkpoints(exp: Path) -> bool:
    from shoal.checkpoint.catalog import latest_checkpoint

    return latest_checkpoint(exp / "checkpoints") is not None


def find_pretraining_checkpoint(recipe: Recipe) -> Path:
    """The latest checkpoint of the named pretraining experiment, or of the newest one found."""
    import yaml

    from shoal.checkpoint.catalog import latest_checkpoint

    results = Path(recipe.checkpoint.results_dir)
    if recipe.model.pretrain_experiment:
        candidates = [results / recipe.model.pretrain_experiment]
    else:
        candidates = []
        for exp in results.iterdir() if results.is_dir() else []:
            config = exp / "config.yaml"
            if config.exists() and (yaml.safe_load(config.read_text()) or {}).get("stage") == "pretrain":
                candidates.append(exp)
        candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for exp in candidates:
        found = latest_checkpoint(exp / "checkpoints")
        if found is not None:
            return found.path
    where = candidates[0] if recipe.model.pretrain_experiment else results
    raise ShoalError(
        f"no model to fine-tune: --nemo_model is unset and no pretraining checkpoint was found in {where}; "
        "pass --nemo_model CKPT (an imported or pretrained checkpoint)"
    )


def _peft_config(section: Any) -> LoraConfig | None:
    """`peft:` holds the adapter settings; `method` (the seed's --peft) says whether they apply."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ShoalError(f"peft: expected a mapping of adapter settings, got {section!r}")
    section = dict(section)
    method = section.pop("method", None)
    if method is None and "use_dora" in section:  # a resolved config.yaml: adapters were on
        method = "dora" if section["use_dora"] else "lora"
    if method in (None, "none"):
        return None
    if method not in ("lora", "dora"):
        raise ShoalError(f"peft.method: {method!r} is not one of none, lora, dora")
    return from_dict(LoraConfig, {**section, "use_dora": method == "dora"}, "peft")


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out
