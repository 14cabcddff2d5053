"""The demo's closing lines tell a new user how to look at the runs: a TensorBoard command that a
shell runs as printed, and the extra to install for it (checked against pyproject.toml)."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

from shoal.demo.run import closing_summary, demo_paths

ROOT = Path(__file__).resolve().parents[3]


def test_the_closing_lines_give_the_tensorboard_command_and_its_extra(tmp_path) -> None:
    paths = demo_paths(tmp_path / "demo with space")
    paths["results"].mkdir(parents=True)
    text = closing_summary(paths, {"2c. continual pretraining": 30.0, "3a. full fine-tuning": 60.0}, 120.0)
    command = next(line for line in text.splitlines() if "tensorboard --logdir" in line)
    words = shlex.split(command.split(":", 1)[1])
    assert words[:2] == ["tensorboard", "--logdir"] and Path(words[2]) == paths["results"]
    install = next(line for line in text.splitlines() if "pip install" in line)
    extra = install.split("shoal[", 1)[1].split("]", 1)[0]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard") for req in extras[extra])
    # Each stage's share of the total, as a user reads it.
    assert " 25%  2c. continual pretraining" in text and " 50%  3a. full fine-tuning" in text
