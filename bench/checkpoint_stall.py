"""How long a training checkpoint stalls the step loop: synchronous against asynchronous saves, same run.

    python bench/checkpoint_stall.py --preset llama32_1b --seq_length 4096 --micro_batch_size 4 \\
        --save_every 50 --saves 3 --output bench/results/checkpoint_stall_h200.json
    python bench/checkpoint_stall.py --device cpu --preset llama_tiny --seq_length 64 --micro_batch_size 2 \\
        --save_every 4 --saves 3   # the same code path on a CPU, to try the benchmark itself

One model of the preset's shape trains on random tokens (bf16 compute with fp32 weights on a GPU,
as `shoal pretrain` does; fp32 on CPU). Three phases, one after the other, on the same model:

1. no checkpoint: the median step time every stall is measured against;
2. synchronous saves (checkpoint.async_save=false) every `--save_every` steps;
3. asynchronous saves (checkpoint.async_save=true), the same steps.

Every checkpoint holds the model and the AdamW state, written through shoal's own save
(`shoal.checkpoint.training.TrainingCheckpoints`: temporary folder, DCP with fsync, rename,
retention keeping only the newest) into a fresh folder under `--checkpoint_dir`, removed at the end.
A phase runs `(saves + 1) * save_every` steps, so the last asynchronous write also overlaps training.
Each step is timed to the end of its GPU work (the save call included). Per mode the table gives:

- stall at the save step: that step's time minus the no-checkpoint median (median over the saves);
- extra time per save: the phase's total time minus steps x the no-checkpoint median, divided by
  the number of saves (it also counts the steps slowed down while a background write runs and
  any wait for the previous write), plus the wait for the last write at the end;
- the bytes of one checkpoint on disk.

Results go to stdout and, as JSON, to `--output`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import random_batch  # noqa: E402 - bench/common.py

from shoal.checkpoint.training import CheckpointRecord, Progress, TrainingCheckpoints  # noqa: E402
from shoal.config.parallel import ParallelConfig  # noqa: E402
from shoal.config.recipe import TrainSection  # noqa: E402
from shoal.distributed import build_mesh  # noqa: E402
from shoal.models import get_preset  # noqa: E402
from shoal.train.engine import build_engine  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_phase(engine, batch, tokens: float, device: torch.device, steps: int, start_step: int,
              checkpoints: TrainingCheckpoints | None, save_every: int) -> dict:
    """`steps` timed steps; a checkpoint after every `save_every`-th when `checkpoints` is given."""
    times, save_steps = [], []
    for i in range(1, steps + 1):
        begin = time.perf_counter()
        if checkpoints is not None:
            checkpoints.poll()
        engine.forward_backward([batch], tokens)
        engine.clip_and_step(1.0, 1e-4)
        if checkpoints is not None and i % save_every == 0 and i <= steps - save_every:
            synchronize(device)  # the step's own work ends before the save copies its state
            checkpoints.save(engine.parts, engine.optimizers, Progress(start_step + i), val_loss=None)
            save_steps.append(len(times))
        synchronize(device)
        times.append(time.perf_counter() - begin)
    drain = 0.0
    if checkpoints is not None:
        begin = time.perf_counter()
        checkpoints.finish()
        drain = time.perf_counter() - begin
    return {"times": times, "save_steps": save_steps, "drain_s": drain}


def summarize(phase: dict, base: float) -> dict:
    saves = len(phase["save_steps"])
    at_save = [phase["times"][i] - base for i in phase["save_steps"]]
    extra = sum(phase["times"]) - len(phase["times"]) * base + phase["drain_s"]
    return {"saves": saves, "stall_at_save_s": statistics.median(at_save), "stall_at_each_save_s": at_save,
            "extra_per_save_s": extra / saves, "drain_s": phase["drain_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama32_1b")
    parser.add_argument("--seq_length", type=int, default=4096)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--save_every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels, compile)")
    parser.add_argument("--base_steps", type=int, default=20, help="timed steps without a checkpoint")
    parser.add_argument("--compile", action="store_true", help="compile the layers, as --parallel.compile=true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--checkpoint_dir", default=".", help="a local folder; the benchmark writes a new one inside")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; pass --device cpu (with a tiny --preset) to try the benchmark on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    root = Path(args.checkpoint_dir) / f"checkpoint_stall_{time.strftime('%Y%m%d_%H%M%S')}"
    root.mkdir(parents=True)  # new: never a folder the user had (it is removed at the end)
    try:
        results = bench(args, device, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(results)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


def bench(args, device: torch.device, root: Path) -> dict:
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    train = TrainSection(micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size)
    parallel = ParallelConfig(compile=args.compile)
    engine = build_engine(cfg, train=train, parallel=parallel, peft=None, dims=build_mesh(parallel, 1, device.type),
                          device=device, compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device)
    tokens = float(batch["loss_mask"].sum())
    run_phase(engine, batch, tokens, device, args.warmup, 0, None, args.save_every)
    base_phase = run_phase(engine, batch, tokens, device, args.base_steps, args.warmup, None, args.save_every)
    base = statistics.median(base_phase["times"])
    record = CheckpointRecord(model_config=cfg, made_by={"bench": "checkpoint_stall"}, run_id="bench")
    steps = (args.saves + 1) * args.save_every
    modes, step = {}, args.warmup + args.base_steps
    for mode, background in (("sync", False), ("async", True)):
        folder = root / mode
        checkpoints = TrainingCheckpoints(folder, record, max_steps=10**9, save_top_k=0, background=background)
        phase = run_phase(engine, batch, tokens, device, steps, step, checkpoints, args.save_every)
        step += steps
        modes[mode] = {**summarize(phase, base), "checkpoint_bytes": folder_bytes(checkpoints.last),
                       "median_step_s": statistics.median(phase["times"])}
        shutil.rmtree(folder, ignore_errors=True)  # frees the disk for the next mode
        print(f"{mode}: {modes[mode]}", file=sys.stderr, flush=True)
    return {
        "args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "median_step_s_without_checkpoint": base, "modes": modes,
        "async_vs_sync_stall": modes["async"]["extra_per_save_s"] / max(modes["sync"]["extra_per_save_s"], 1e-9),
    }


def print_table(r: dict) -> None:
    a = r["args"]
    print(f"\n{a['preset']} seq {a['seq_length']} micro batch {a['micro_batch_size']}, a checkpoint (model + AdamW) "
          f"every {a['save_every']} steps, on {r['device']} (torch {r['torch']})")
    print(f"median step without a checkpoint: {r['median_step_s_without_checkpoint']:.3f} s")
    print(f"{'mode':6s} {'stall at the save step':>23s} {'extra per save':>15s} {'final wait':>11s} {'checkpoint':>14s}")
    for mode, m in r["modes"].items():
        print(f"{mode:6s} {m['stall_at_save_s']:22.3f}s {m['extra_per_save_s']:14.3f}s {m['drain_s']:10.3f}s "
              f"{m['checkpoint_bytes'] / 2**20:>10,.1f} MiB")
    print(f"async / sync, extra time per save: {r['async_vs_sync_stall']:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
