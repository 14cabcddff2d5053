"""The flags that name what a command reads: `--source`, `--checkpoint`, `--base_checkpoint`.

`shoal export`, `generate`, `chat` and `eval` take them alike; defined once so their spelling,
aliases and help never drift apart. No torch here: `--help` must stay fast.
"""

from __future__ import annotations

import argparse


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """`--source` (a checkpoint, an experiment or a Hugging Face folder), `--checkpoint latest|best`
    for an experiment, and `--base_checkpoint`."""
    parser.add_argument("--source", "--path", dest="source", required=True,
                        help="shoal checkpoint, experiment (its latest checkpoint) or Hugging Face model folder")
    parser.add_argument("--checkpoint", default="latest", choices=["latest", "best"],
                        help="for an experiment: its latest checkpoint (default) or the best by validation loss")
    add_base_checkpoint_argument(parser)


def add_base_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """`--base_checkpoint`: where an adapter-only checkpoint's base is now (export takes it too)."""
    parser.add_argument("--base_checkpoint", "--base-checkpoint", default=None, metavar="CKPT",
                        help="where the base checkpoint of an adapter-only (LoRA/DoRA training) checkpoint "
                             "now is, if it moved since training (it must be the same, unchanged)")
