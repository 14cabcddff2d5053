"""LoRA on the routed experts of Qwen3-MoE in training checkpoints: the grouped expert adapters
are saved (adapter-only form: adapters and their AdamW moments, nothing of the frozen experts) and
a run resumed from step 2 continues the uninterrupted run's curve.

Oracle: the uninterrupted run of the same command (its records at steps 3-4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.distributed.test_commands_across_layouts import rewound_to_step_2
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_dcp, read_metrics, train_records
from tests.unit.train.test_train_moe import make_moe_checkpoint, moe_args

STEPS = 4
EXPERT_LORA = ["--max_steps", STEPS, "--peft", "lora", "--peft.rank=4", "--peft.alpha=8", "--train.lr=1e-2",
               "--peft.target_modules=all-linear", "--checkpoint.save_interval=2", "--checkpoint.save_top_k=2"]


@pytest.fixture(scope="module")
def sparse_moe(tmp_path_factory: pytest.TempPathFactory, train_assets: TrainAssets) -> Path:
    return make_moe_checkpoint(tmp_path_factory.mktemp("sparse_moe"), mlp_only_layers=[])[1]


def test_expert_adapters_are_saved_and_resume_the_same_curve(train_assets, sparse_moe, tmp_path):
    res = tmp_path / "res"
    assert shoal(*moe_args(train_assets, sparse_moe, "finetune", res, "full_run", *EXPERT_LORA)) == 0
    (step2,) = (res / "full_run" / "checkpoints").glob("step=000002*")
    held = read_dcp(step2 / "model", tmp_path / "model.pt")
    experts = {k for k in held if ".mlp.experts." in k}
    assert experts == {f"model.layers.{layer}.mlp.experts.lora.{proj}.lora_{ab}.weight"
                       for layer in range(3) for proj in ("gate_proj", "up_proj", "down_proj") for ab in "AB"}
    assert all(".lora" in k for k in held)

    resumed = rewound_to_step_2(res / "full_run", res / "resumed")
    assert shoal(*moe_args(train_assets, sparse_moe, "finetune", res, "resumed", *EXPERT_LORA)) == 0
    mine, theirs = train_records(resumed), train_records(res / "full_run")
    # One record per step: the run went on from step 2 rather than starting again.
    steps = [r["step"] for r in read_metrics(resumed) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    for step in (3, 4):
        for key in ("loss", "grad_norm", "aux_loss"):
            assert math.isclose(mine[step][key], theirs[step][key], rel_tol=1e-6), (step, key)
