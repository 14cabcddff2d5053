"""The package's metadata as setuptools builds it: no deprecation warning on install, and the
licence as an SPDX expression. The oracle is setuptools itself, run on a copy of pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_building_the_metadata_prints_no_licence_deprecation(tmp_path) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, tmp_path / name)
    (tmp_path / "shoal").mkdir()
    (tmp_path / "shoal" / "__init__.py").write_text("")
    (tmp_path / "out").mkdir()
    build = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('out'))"
    proc = subprocess.run([sys.executable, "-c", build], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "project.license" not in proc.stderr and "DeprecationWarning" not in proc.stderr, proc.stderr
    metadata = (tmp_path / "out" / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
