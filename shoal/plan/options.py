"""`shoal plan`'s flags, in a module without torch so `shoal plan --help` answers at once.

A stage takes exactly the flags of `shoal pretrain` / `shoal finetune` (from `shoal.config.flags`,
where those commands get theirs), plus the planning ones.
"""

from __future__ import annotations

import argparse

from shoal.config.flags import add_finetune_arguments, add_pretrain_arguments
from shoal.plan.hardware import GPUS

ACCEPTS_OVERRIDES = True  # dotted recipe overrides, as the training commands take them
STAGES = {"pretrain": add_pretrain_arguments, "finetune": add_finetune_arguments}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, add_stage_arguments in STAGES.items():
        sub = stages.add_parser(stage, help=f"plan a `shoal {stage}` command line (the same flags)")
        add_stage_arguments(sub)
        group = sub.add_argument_group("planning")
        group.add_argument("--gpu", default="h100", help=f"GPU kind: {', '.join(GPUS)} (default h100)")
        group.add_argument("--num_tokens", type=float,
                           help="training tokens for the run (default: --max_steps, or one epoch of --dataset_path)")
        group.add_argument("--json", action="store_true", help="print the plan as JSON")
