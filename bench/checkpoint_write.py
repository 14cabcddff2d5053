"""The write time of one training checkpoint (model + AdamW state): torch's FileSystemWriter, as
shoal wrote training checkpoints before issue 19, against shoal's SafetensorsStorageWriter, same run.

    python bench/checkpoint_write.py --preset llama32_1b --num_layers 2 --vocab_size 32000 --repeats 3 \\
        --output bench/results/checkpoint_write_cpu.json

A model of the preset's shape (cut to `--num_layers`, `--vocab_size`) is built in fp32 on CPU and
given AdamW state by one step on zero gradients, so `optim/` holds two fp32 moments and a step
count per parameter, as a real run's does. Each save is a whole `save_training_checkpoint` (the
temporary folder, `model/` and `optim/` through DCP with fsync of every data file, trainer.json,
the rename) into a new folder, removed before the next; the two writers alternate, `--repeats`
times each, and the table gives each one's median, its rate over the checkpoint's bytes, and the
ratio. The "old" writer is put in the new one's place in `shoal.checkpoint.training` for its runs:
everything but the data files' writer is the same code. Load = the 1-minute load average before
each save (the machine may be shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shoal.checkpoint.training as training  # noqa: E402
from shoal.checkpoint.storage import SafetensorsStorageWriter  # noqa: E402
from shoal.models import build_model, get_preset  # noqa: E402


def todays_writer(path):  # what `_write_files` used before issue 19, for model/ and optim/ alike
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemWriter(str(path))


WRITERS = {"torch FileSystemWriter (before)": todays_writer, "shoal SafetensorsStorageWriter": SafetensorsStorageWriter}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(args) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    cfg = dataclasses.replace(get_preset(args.preset), num_layers=args.num_layers, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates exp_avg, exp_avg_sq and step for every parameter
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, cfg


def save_once(root: Path, model, optimizer, record, writer) -> tuple[float, int]:
    training.SafetensorsStorageWriter = writer
    try:
        begin = time.perf_counter()
        path = training.save_training_checkpoint(root, [model], [optimizer], training.Progress(1), record,
                                                 max_steps=1, val_loss=None, save_top_k=1)
        seconds = time.perf_counter() - begin
    finally:
        training.SafetensorsStorageWriter = SafetensorsStorageWriter
    size = folder_bytes(path)
    shutil.rmtree(root)
    return seconds, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama32_1b")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint_dir", default=".", help="a local folder; the benchmark writes a new one inside")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    model, optimizer, cfg = build(args)
    params = sum(p.numel() for p in model.parameters())
    record = training.CheckpointRecord(model_config=cfg, made_by={"bench": "checkpoint_write"}, run_id="bench")
    top = Path(args.checkpoint_dir) / f"checkpoint_write_{time.strftime('%Y%m%d_%H%M%S')}"
    top.mkdir(parents=True)  # new: never a folder the user had (it is removed at the end)
    runs: dict[str, list[dict]] = {name: [] for name in WRITERS}
    try:
        for i in range(args.repeats):
            for name, writer in WRITERS.items():
                load = os.getloadavg()[0]
                seconds, size = save_once(top / f"run{i}", model, optimizer, record, writer)
                runs[name].append({"seconds": seconds, "bytes": size, "load": load})
                print(f"{name}: {seconds:.2f} s, {size / 1e9:.2f} GB, load {load:.1f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    summary = {name: {"median_s": statistics.median(r["seconds"] for r in rs), "bytes": rs[0]["bytes"],
                      "loads": [r["load"] for r in rs]} for name, rs in runs.items()}
    old, new = (summary[name]["median_s"] for name in WRITERS)
    result = {"args": vars(args), "parameters": params, "torch": torch.__version__, "cpus": os.cpu_count(),
              "runs": runs, "summary": summary, "before_over_after": old / new}
    print(f"\n{args.preset} cut to {args.num_layers} layers, vocab {args.vocab_size}: {params / 1e6:.0f} M parameters, "
          f"fp32 + AdamW, median of {args.repeats} (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    for name, s in summary.items():
        print(f"{name:32s} {s['median_s']:7.2f} s  {s['bytes'] / 1e9:6.2f} GB  {s['bytes'] / 1e9 / s['median_s']:5.2f} GB/s"
              f"  load {min(s['loads']):.1f}-{max(s['loads']):.1f}")
    print(f"before / after: {result['before_over_after']:.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
