"""The real local Slurm cluster fixture (tests/slurm_cluster.py), for the launch tests."""

import sys
from pathlib import Path

# `python -m pytest` puts the repository on sys.path, a bare `pytest` does not: make both work.
REPO = str(Path(__file__).resolve().parents[3])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401  (a fixture: pytest finds it by name)
