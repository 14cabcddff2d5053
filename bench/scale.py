"""Multi-GPU training throughput: shoal's layouts against Hugging Face `transformers` under FSDP2.

Run one configuration per torchrun invocation, e.g. on 4 GPUs:

    torchrun --nproc_per_node 4 bench/scale.py --impl shoal --preset llama31_8b --seq_length 8192 \
        --micro_batch_size 1 --tp 2 --activation_checkpointing full --compile
    torchrun --nproc_per_node 4 bench/scale.py --impl hf --preset llama31_8b --seq_length 8192 \
        --micro_batch_size 1 --activation_checkpointing full --compile
    torchrun --nproc_per_node 4 bench/scale.py --impl shoal --preset llama31_8b --seq_length 8192 \
        --micro_batch_size 1 --activation_checkpointing full --compile --fp8_recipe tensorwise

Both sides train random weights of the preset's shape on random tokens with bf16 compute, fp32
master weights and fp32 gradient reduction. The peer is the one the scale-out issue measured:
`transformers`' Llama sharded with FSDP2 per decoder layer (`MixedPrecisionPolicy(bf16, fp32)`),
HF's activation checkpointing, each layer compiled with `--compile`. `--fp8_recipe` runs shoal
with `--fp8` (torchao; tensorwise all-gathers FSDP2 weights and sequence-parallel activations in
FP8). Rank 0 prints one JSON line (tokens/s/GPU, MFU against the bf16 peak and, for FP8, against
the FP8 peak too, peak memory per GPU) and appends it to `--output`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import random_batch  # noqa: E402 - bench/common.py

from shoal.config.parallel import ParallelConfig  # noqa: E402
from shoal.config.recipe import TrainSection  # noqa: E402
from shoal.distributed import build_mesh, init_distributed  # noqa: E402
from shoal.models import get_preset, to_hf_config  # noqa: E402
from shoal.train.engine import build_engine  # noqa: E402
from shoal.train.metrics import mfu_fields  # noqa: E402
from shoal.train.step import masked_cross_entropy_sum  # noqa: E402


def shoal_step(args, world: int, device: torch.device):
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, activation_checkpointing=args.activation_checkpointing,
                              compile=args.compile)
    cfg = get_preset(args.preset)
    dims = build_mesh(parallel, world, "cuda")
    train = TrainSection(micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size * dims.dp_size,
                         fp8="hybrid" if args.fp8_recipe else None, fp8_recipe=args.fp8_recipe)
    engine = build_engine(cfg, train=train, parallel=parallel, peft=None, dims=dims, device=device,
                          compute_dtype=torch.bfloat16)
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device, seed=dims.dp_rank)
    tokens = float(args.micro_batch_size * args.seq_length * dims.dp_size)

    def step():
        engine.forward_backward([batch], tokens)
        engine.clip_and_step(1.0, 1e-4)

    return step, dims.dp_size


def hf_step(args, world: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = get_preset(args.preset)
    hf_cfg = LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    if args.activation_checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cuda", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if args.compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device, seed=dist.get_rank())
    tokens = float(args.micro_batch_size * args.seq_length * world)

    def step():
        logits = model(input_ids=batch["tokens"]).logits
        loss = masked_cross_entropy_sum(logits, batch["labels"], batch["loss_mask"]) / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, world


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["shoal", "hf"], default="shoal")
    parser.add_argument("--preset", default="llama32_1b")
    parser.add_argument("--seq_length", type=int, default=4096)
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--activation_checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--fp8_recipe", default=None, help="shoal only: train with --fp8 and this recipe")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.fp8_recipe and args.impl != "shoal":
        parser.error("--fp8_recipe is shoal's (--impl shoal)")

    rank, world, local_rank = init_distributed("cuda")
    device = torch.device("cuda", local_rank)
    torch.manual_seed(0)
    build = shoal_step if args.impl == "shoal" else hf_step
    result = {"impl": args.impl, "gpus": world, **{k: v for k, v in vars(args).items() if k not in ("impl", "output")}}
    try:
        step, dp = build(args, world, device)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        cfg = get_preset(args.preset)
        tps = args.micro_batch_size * args.seq_length * dp / seconds / world
        result.update(seconds_per_step=seconds, tokens_per_s_per_gpu=tps,
                      **mfu_fields(tps, cfg.flops_per_token(args.seq_length), device, fp8=bool(args.fp8_recipe)),
                      memory_gib=torch.cuda.max_memory_allocated() / 2**30, device=torch.cuda.get_device_name(device))
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
