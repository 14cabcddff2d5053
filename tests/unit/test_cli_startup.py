"""`shoal --help` and every `shoal COMMAND --help` are answered without importing torch or transformers.

Behaviour, not timing: a fresh interpreter runs the command line and reports which heavy modules
it imported (importing torch alone takes about a second, most of a slow start-up). The oracle is
the interpreter's own `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal.cli import COMMANDS

HEAVY = ("torch", "transformers", "numpy", "safetensors")

_PROBE = """
import json, sys
from shoal.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def _heavy_modules_after(argv: list[str]) -> tuple[list[str], str]:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv],
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in COMMANDS],
                                  ["plan", "pretrain", "--help"], ["download", "sft", "--help"]],
                         ids=lambda argv: " ".join(argv))
def test_help_imports_no_torch(argv) -> None:
    heavy, out = _heavy_modules_after(argv)
    assert "usage: shoal" in out  # the help really was printed
    assert heavy == [] or heavy == ["numpy"] and argv[0] == "preprocess", heavy


def test_import_help_still_lists_its_flags() -> None:
    _, out = _heavy_modules_after(["import", "--help"])
    for flag in ("--source", "--output_path", "--overwrite", "--hf_token", "--model"):
        assert flag in out


def test_a_bad_flag_is_refused_before_torch_is_imported() -> None:
    heavy, _ = _heavy_modules_after(["export", "--source", "x", "--output_path", "y", "--max_shard_size", "lots"])
    assert "torch" not in heavy
