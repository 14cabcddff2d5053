"""The package's dependencies have a direction: every shoal module imports on its own (no cycle
that only works in one import order), the model code pulls in no parallel or PEFT code, and the
model-agnostic parallel code pulls in no PEFT code (LoRA brings its own tensor-parallel styles)."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter: for each module, forget every shoal module imported so far, import
# it alone and record which shoal packages came with it. torch stays loaded (it is not ours).
PROBE = r"""
import importlib, json, pkgutil, sys
import shoal
names = sorted(m.name for m in pkgutil.walk_packages(shoal.__path__, "shoal.") if not m.name.endswith("__main__"))
report = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "shoal" or m.startswith("shoal.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    report[name] = {"loaded": sorted({m.split(".")[1] for m in sys.modules if m.startswith("shoal.")})}
print(json.dumps(report))
"""


def test_modules_import_alone_and_dependencies_point_one_way() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert "shoal.distributed.layout_checks" in report and "shoal.models.parallel_plan" in report
    assert {n: r["error"] for n, r in report.items() if "error" in r} == {}
    for name, result in report.items():
        if name.startswith("shoal.models"):
            assert not {"distributed", "peft", "train"} & set(result["loaded"]), (name, result["loaded"])
        if name.startswith("shoal.distributed"):
            assert "peft" not in result["loaded"], (name, result["loaded"])
        if name.startswith("shoal.peft"):
            assert "distributed" not in result["loaded"], (name, result["loaded"])
