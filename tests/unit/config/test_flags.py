"""Recipes, the seed's flags and dotted overrides resolve into the recipe the user meant.

Oracles: the shipped YAML files read with PyYAML (each key of a recipe, with its stage section on
top, must reach the resolved recipe), and the seed's own shell scripts expanded by bash (so an
empty `NEMO_MODEL=` really produces `--nemo_model --max_steps 100`).
"""

from __future__ import annotations

import importlib
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

from shoal.checkpoint.format import write_metadata
from shoal.checkpoint.model_state import save_model_state
from shoal.config.loader import to_dict
from shoal.config.recipe import Recipe
from shoal.config.resolve import resolve_recipe
from shoal.models.presets import get_preset
from tests.helpers.cli import shoal


@pytest.fixture(autouse=True)
def pretraining_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A complete pretraining checkpoint under ./results, where fine-tuning without --nemo_model looks."""
    monkeypatch.chdir(tmp_path)
    ckpt = Path("results/pre/checkpoints/step=000002-last")
    save_model_state({"w": __import__("torch").zeros(2)}, ckpt / "model")
    write_metadata(ckpt, get_preset("llama_tiny"), "float32")
    (ckpt.parents[1] / "config.yaml").write_text("stage: pretrain\n")
    return ckpt


RECIPES = sorted(p.name[:-5] for p in (resources.files("shoal") / "recipes").iterdir() if p.name.endswith(".yaml"))

# The seed's scripts (seed-README.zh-TW.md, "預訓練過程" and "指令微調"), variables and command as
# written there, with `python X.py` replaced by a printer of the arguments bash passes.
SEED_PRETRAIN = """
JOB_NAME=llama31_pretraining
NUM_NODES=1
NUM_GPUS=8
HF_MODEL_ID=Llama-3.1-8B-Instruct
NEMO_MODEL=nemo_ckpt/${HF_MODEL_ID}
HF_TOKEN=hf_seed_SECRET_token
TP=2
PP=1
CP=1
GBS=2048
MAX_STEPS=100
DATASET_PATH=data/custom_dataset/preprocessed/
printf '%s\\n' pretrain \\
    --executor local \\
    --experiment ${JOB_NAME} \\
    --num_nodes ${NUM_NODES} \\
    --num_gpus ${NUM_GPUS} \\
    --model_size 8B \\
    --hf_model_id meta-llama/${HF_MODEL_ID} \\
    --nemo_model ${NEMO_MODEL} \\
    --hf_token ${HF_TOKEN} \\
    --max_steps ${MAX_STEPS} \\
    --global_batch_size ${GBS} \\
    --tensor_model_parallel_size ${TP} \\
    --pipeline_model_parallel_size ${PP} \\
    --context_parallel_size ${CP} \\
    --dataset_path ${DATASET_PATH}
"""
SEED_FINETUNE = """
JOB_NAME=llama31_finetuning
NUM_NODES=1
NUM_GPUS=8
HF_MODEL_ID=meta-llama/Llama-3.1-8B-Instruct
NEMO_MODEL= # [Optional]
HF_TOKEN=hf_seed_SECRET_token
TP=2
PP=1
CP=1
MAX_STEPS=100
GBS=128
DATASET_PATH=data/alpaca
printf '%s\\n' finetune \\
    --executor local \\
    --experiment ${JOB_NAME} \\
    --num_nodes ${NUM_NODES} \\
    --num_gpus ${NUM_GPUS} \\
    --model_size 8B \\
    --hf_model_id ${HF_MODEL_ID} \\
    --hf_token ${HF_TOKEN} \\
    --nemo_model ${NEMO_MODEL} \\
    --max_steps ${MAX_STEPS} \\
    --global_batch_size ${GBS} \\
    --tensor_model_parallel_size ${TP} \\
    --pipeline_model_parallel_size ${PP} \\
    --context_parallel_size ${CP} \\
    --dataset_path ${DATASET_PATH}
"""


def bash_argv(script: str) -> list[str]:
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def resolve(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Recipe:
    """Parse argv exactly as `shoal` does, then resolve the stage's recipe (nothing is run)."""
    stage = argv[0]
    module = importlib.import_module(f"shoal.train.{stage}")
    captured = {}

    def capture(args):
        captured["args"] = args
        return 0

    monkeypatch.setattr(module, "main", capture)
    assert shoal(*argv) == 0
    return resolve_recipe(captured["args"], stage)


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_resolves(monkeypatch: pytest.MonkeyPatch, name: str, stage: str):
    # With --peft the recipe's adapter settings apply (without it, recipe.peft is None).
    recipe = resolve(monkeypatch, [stage, "--recipe", name, *(["--peft", "lora"] if stage == "finetune" else [])])
    tree = yaml.safe_load((resources.files("shoal") / "recipes" / f"{name}.yaml").read_text())
    expected = leaves({k: v for k, v in tree.items() if k not in ("pretrain", "finetune")})
    expected.update(leaves(tree.get(stage) or {}))  # the stage's section wins
    if stage == "pretrain":
        expected = {k: v for k, v in expected.items() if not k.startswith("peft.")}
    resolved = leaves(to_dict(recipe))
    for key, value in expected.items():
        assert resolved[key] == value, f"{name}.yaml, {stage}: {key} = {resolved[key]!r}, file says {value!r}"
    if recipe.model.preset:
        get_preset(recipe.model.preset)  # names a preset that exists


def test_seed_pretrain_command(monkeypatch: pytest.MonkeyPatch):
    argv = bash_argv(SEED_PRETRAIN)
    recipe = resolve(monkeypatch, argv)
    assert recipe.model.preset == "llama31_8b"  # --model_size 8B
    assert recipe.model.checkpoint == "nemo_ckpt/Llama-3.1-8B-Instruct"
    assert recipe.model.hf_model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert recipe.checkpoint.experiment == "llama31_pretraining"
    assert recipe.train.max_steps == 100 and recipe.train.global_batch_size == 2048
    assert (recipe.launch.num_nodes, recipe.launch.num_gpus) == (1, 8)
    p = recipe.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size) == (2, 1, 1)
    assert recipe.data.dataset_path == ["data/custom_dataset/preprocessed/"]
    assert recipe.data.split == "998,1,0"  # the seed's validation split for pretraining
    assert recipe.peft is None
    assert "hf_seed_SECRET_token" not in yaml.safe_dump(to_dict(recipe))


def test_seed_finetune_command_with_empty_nemo_model(monkeypatch: pytest.MonkeyPatch, pretraining_experiment: Path):
    argv = bash_argv(SEED_FINETUNE)
    assert argv[argv.index("--nemo_model") + 1] == "--max_steps"  # what the empty variable leaves
    recipe = resolve(monkeypatch, argv)
    assert recipe.model.checkpoint == str(pretraining_experiment)  # the latest pretraining checkpoint
    assert recipe.model.preset == "llama31_8b"
    assert recipe.model.hf_model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert recipe.checkpoint.experiment == "llama31_finetuning"
    assert recipe.train.max_steps == 100 and recipe.train.global_batch_size == 128
    assert recipe.parallel.tensor_model_parallel_size == 2 and recipe.launch.num_gpus == 8
    assert recipe.data.dataset_path == ["data/alpaca"]
    assert "hf_seed_SECRET_token" not in yaml.safe_dump(to_dict(recipe))


def test_precedence_recipe_then_stage_then_flags_then_overrides(monkeypatch: pytest.MonkeyPatch):
    tiny = yaml.safe_load((resources.files("shoal") / "recipes" / "tiny.yaml").read_text())
    assert resolve(monkeypatch, ["pretrain", "--recipe", "tiny"]).train.lr == tiny["train"]["lr"]
    assert resolve(monkeypatch, ["finetune", "--recipe", "tiny"]).train.lr == tiny["finetune"]["train"]["lr"]
    assert resolve(monkeypatch, ["finetune", "--recipe", "tiny", "--lr", "0.5"]).train.lr == 0.5
    recipe = resolve(monkeypatch, ["finetune", "--recipe", "tiny", "--lr", "0.5", "--train.lr=0.25", "-g", "8",
                                   "--train.global_batch_size=64"])
    assert recipe.train.lr == 0.25 and recipe.train.global_batch_size == 64
    # NeMo's key=value spelling, and exponents without a dot (a string to YAML 1.1) as numbers.
    recipe = resolve(monkeypatch, ["finetune", "--recipe", "tiny", "train.lr=1e-4", "--train.min_lr=1e-5", "--peft",
                                   "lora", "--peft.target_modules=q_proj,v_proj", "--checkpoint.save_interval=null"])
    assert recipe.train.lr == 1e-4 and recipe.train.min_lr == 1e-5
    assert recipe.peft.target_modules == ("q_proj", "v_proj")
    assert recipe.checkpoint.save_interval is None


def test_recipe_file_from_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: 0.125\n  max_steps: 7\nfinetune:\n  train:\n    max_steps: 3\n")
    assert resolve(monkeypatch, ["pretrain", "--recipe", str(path)]).train.max_steps == 7
    recipe = resolve(monkeypatch, ["finetune", "--recipe", str(path)])
    assert recipe.train.max_steps == 3 and recipe.train.lr == 0.125


def test_expert_parallel_flag_sets_the_recipe_key(monkeypatch: pytest.MonkeyPatch):
    """NeMo's --expert_model_parallel_size with the seed's MoE model: the parallel section gets it."""
    recipe = resolve(monkeypatch, ["pretrain", "--model", "qwen3_30b_a3b", "--num_gpus", "8",
                                   "--expert_model_parallel_size", "8", "--max_steps", "1"])
    assert recipe.parallel.expert_model_parallel_size == 8
    assert resolve(monkeypatch, ["pretrain", "--model", "qwen3_30b_a3b", "--max_steps", "1"]
                   ).parallel.expert_model_parallel_size == 1
