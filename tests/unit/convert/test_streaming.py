"""Import and export stream: peak memory stays far below the model's size.

A ~176 MB random checkpoint (sharded safetensors written by the safetensors library) is imported
and exported in a fresh process each, whose peak resident memory above its starting point is read
from /proc (VmHWM after resetting it). Holding the model would cost its full size; streaming costs
a few copies of one tensor on import (DCP serialises through a buffer), and one load group plus
a few copies of one tensor on export (DCP's reader deserialises each blob before copying it in).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shoal.convert.adapters import get_adapter
from shoal.models import to_hf_config
from shoal.models.config import ModelConfig

torch.set_num_threads(1)

# ~176 MB in fp32 over 147 tensors, the largest 8.4 MB: holding the model would be 20 times a tensor.
CFG = ModelConfig(family="llama", vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=16,
                  num_heads=8, num_kv_heads=8, head_dim=64, rope_theta=10000.0, max_position_embeddings=1024)
EXPORT_LOAD_BUDGET = 16 << 20

MEASURE = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
from shoal.convert.importer import import_checkpoint
from shoal.convert.exporter import export_checkpoint
import torch
torch.set_num_threads(1)
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
    f.write("5")
before = status("VmRSS")
if sys.argv[1] == "import":
    import_checkpoint(sys.argv[2], sys.argv[3])
else:
    export_checkpoint(sys.argv[2], sys.argv[3], load_budget=int(sys.argv[4]), max_shard_size="64MB")
print(json.dumps({"peak_above_start": status("VmHWM") - before}))
"""


def write_random_hf_checkpoint(path: Path) -> int:
    """Random weights of CFG as HF shards of <= 48 MB, never more than one shard in memory."""
    path.mkdir()
    shapes = get_adapter(CFG).expected_hf()
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 4
        if current and size + nbytes > 48_000_000:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.randn(shape, generator=gen) for name, shape in shard.items()}
        save_file(tensors, path / file, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name in shard})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(to_hf_config(CFG, dtype="float32")))
    return total


def peak(*args: str) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_above_start"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure memory")
def test_import_and_export_stream(tmp_path):
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    model_bytes = write_random_hf_checkpoint(hf_dir)
    largest = max(torch.Size(s).numel() * 4 for s in get_adapter(CFG).expected_hf().values())

    import_peak = peak("import", str(hf_dir), str(ckpt))
    export_peak = peak("export", str(ckpt), str(out), str(EXPORT_LOAD_BUDGET))
    print(f"model {model_bytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB: "
          f"import peak +{import_peak / 1e6:.0f} MB, export peak +{export_peak / 1e6:.0f} MB")
    assert import_peak < model_bytes / 3
    assert export_peak < model_bytes / 2

    # And the weights came through intact.
    src_index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert src_index.keys() == out_index.keys()
    for name in src_index:
        with safe_open(hf_dir / src_index[name], "pt") as a, safe_open(out / out_index[name], "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
