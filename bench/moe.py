"""Qwen3-MoE training throughput: shoal against transformers' Qwen3MoeForCausalLM, same shape, same GPU.

    # full training on the 30B-A3B shape cut to 8 layers (5.6B parameters, 1.1B active)
    python bench/moe.py --preset qwen3_30b_a3b --num_layers 8 --seq_length 4096 --micro_batch_size 1
    # the whole 30B-A3B shape (48 layers), LoRA on q/k/v/o over a bf16 frozen base
    python bench/moe.py --preset qwen3_30b_a3b --peft lora --seq_length 4096 --micro_batch_size 1
    # on CPU, to check the script itself (tiny shape, no MFU)
    python bench/moe.py --preset qwen3_moe_tiny --seq_length 64 --steps 2 --warmup 1

Both sides train a randomly initialised model on random tokens with bf16 compute, the
load-balancing loss (router_aux_loss_coef) included, gradient clipping and AdamW:

* shoal: its training engine as `shoal pretrain` builds it (fp32 master weights under a bf16
  autocast). `shoal` runs the experts as the exact per-expert loop, `shoal_grouped` through
  `torch._grouped_mm` (shoal.models.moe.GROUPED_MM_ON_CUDA on for that variant); `_compile`
  compiles each decoder layer.
* transformers: Qwen3MoeForCausalLM with SDPA attention under `torch.autocast`, fused AdamW, with
  each of its experts implementations (transformers 5: `grouped_mm`, its default, through
  `torch._grouped_mm`; `batched_mm`; `eager`, the per-expert loop); `hf_compile` is grouped_mm
  under `torch.compile`.

With `--peft lora` both sides adapt q/k/v/o (rank 16, alpha 32; the peer through `peft`) and keep
the frozen base in bf16, as the 30B shape needs (61 GB of bf16 weights on one GPU; fp32 would take
122 GB): transformers loads it with `torch_dtype=bfloat16`; shoal builds it under a bf16 default
dtype and returns the adapters to fp32 (the engine has no frozen-dtype setting of its own yet).

MFU counts the active parameters only (a token passes through num_experts_per_tok experts):
`ModelConfig.flops_per_token`, 6·N_active + attention for full training, 4·N_active + attention
for a frozen base (DESIGN §7). Results go to stdout and, as JSON, to `--output`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import measure_variant, random_batch, time_steps  # noqa: E402 - bench/common.py

from shoal.config.parallel import ParallelConfig  # noqa: E402
from shoal.config.recipe import TrainSection  # noqa: E402
from shoal.distributed import build_mesh  # noqa: E402
from shoal.models import get_preset, to_hf_config  # noqa: E402
from shoal.models import moe as moe_module  # noqa: E402
from shoal.peft.config import LoraConfig  # noqa: E402
from shoal.train.engine import build_engine  # noqa: E402
from shoal.train.step import masked_cross_entropy_sum  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# variant -> (side, compile, experts implementation: shoal's grouped flag or transformers' name)
VARIANTS = {
    "hf": ("hf", False, "grouped_mm"),
    "hf_batched_mm": ("hf", False, "batched_mm"),
    "hf_eager": ("hf", False, "eager"),
    "hf_compile": ("hf", True, "grouped_mm"),
    "shoal": ("shoal", False, False),
    "shoal_grouped": ("shoal", False, True),
    "shoal_compile": ("shoal", True, False),
    "shoal_grouped_compile": ("shoal", True, True),
}


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def bench_shoal(args, cfg, compile_: bool, grouped: bool, device: torch.device) -> dict:
    moe_module.GROUPED_MM_ON_CUDA = grouped
    train = TrainSection(micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size)
    parallel = ParallelConfig(compile=compile_, activation_checkpointing=args.activation_checkpointing)
    lora = args.peft == "lora"
    peft = LoraConfig(rank=16, alpha=32.0, target_modules=LORA_TARGETS) if lora else None
    dims = build_mesh(parallel, 1, device.type)
    base_dtype = torch.bfloat16 if lora and device.type == "cuda" else torch.get_default_dtype()
    with default_dtype(base_dtype):  # the frozen base in bf16 from the start (never an fp32 copy)
        engine = build_engine(cfg, train=train, parallel=parallel, peft=peft, dims=dims, device=device,
                              compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for param in engine.parameters():  # the trainable ones: fp32 master weights, as in training
        param.data = param.data.float()
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device)
    tokens = float(batch["loss_mask"].sum())

    def step():
        engine.forward_backward([batch], tokens)  # the aux loss joins the objective inside
        engine.clip_and_step(1.0, 1e-4)

    sec, mem = time_steps(step, args.warmup, args.steps, device)
    engine = None  # frees its memory before the next variant
    moe_module.GROUPED_MM_ON_CUDA = False
    return {"seconds_per_step": sec, "memory_gib": mem}


def bench_hf(args, cfg, compile_: bool, experts: str, device: torch.device) -> dict:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf = {k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_cfg = Qwen3MoeConfig(**(hf | {"output_router_logits": True}))  # its aux loss, as shoal computes one
    lora = args.peft == "lora"
    dtype = torch.bfloat16 if lora and device.type == "cuda" else torch.float32
    with torch.device(device), default_dtype(dtype):  # initialised on the GPU, the frozen base in bf16
        model = Qwen3MoeForCausalLM._from_config(hf_cfg, attn_implementation="sdpa",
                                                 experts_implementation=experts, dtype=dtype)
    if args.activation_checkpointing == "full":
        model.gradient_checkpointing_enable()
    if lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if args.activation_checkpointing == "full":
            model.enable_input_require_grads()
        model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS)))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_ else model
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device)
    tokens = float(batch["loss_mask"].sum())

    def step():
        with autocast(device):
            out = forward(input_ids=batch["tokens"])
        loss = masked_cross_entropy_sum(out.logits, batch["labels"], batch["loss_mask"]) / tokens
        (loss + cfg.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sec, mem = time_steps(step, args.warmup, args.steps, device)
    model = optimizer = forward = None
    return {"seconds_per_step": sec, "memory_gib": mem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_30b_a3b")
    parser.add_argument("--num_layers", type=int, default=None, help="cut the preset to this many layers")
    parser.add_argument("--seq_length", type=int, default=4096)
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--activation_checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--peft", default="none", choices=["none", "lora"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: expected some of {', '.join(VARIANTS)}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = get_preset(args.preset)
    if args.num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    tokens_per_step = args.micro_batch_size * args.seq_length
    frozen = cfg.num_active_params if args.peft == "lora" else 0  # no weight gradients for a frozen base
    flops_per_token = cfg.flops_per_token(args.seq_length, frozen_params=frozen)
    results = {}
    for name in args.variants.split(","):
        side, compile_, experts = VARIANTS[name]
        torch.manual_seed(0)
        runner = bench_hf if side == "hf" else bench_shoal
        r = measure_variant(functools.partial(runner, args, cfg, compile_, experts, device), tokens_per_step, flops_per_token,
                            device, rate_key="tokens_per_s_per_gpu")
        results[name] = r
        print(f"{name}: {r}", flush=True)
    peers = [r["tokens_per_s_per_gpu"] for n, r in results.items() if n.startswith("hf") and "tokens_per_s_per_gpu" in r]
    best_peer = max(peers) if peers else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.preset} ({cfg.num_layers} layers, {cfg.num_params / 1e9:.2f}B parameters, "
          f"{cfg.num_active_params / 1e9:.2f}B active) seq {args.seq_length} micro batch {args.micro_batch_size} "
          f"peft {args.peft} AC {args.activation_checkpointing} on {where} (torch {torch.__version__})")
    print(f"{'variant':24s} {'tokens/s/GPU':>13s} {'MFU active':>10s} {'mem GiB':>8s} {'vs best HF':>10s}")
    for name, r in results.items():
        if "tokens_per_s_per_gpu" not in r:
            print(f"{name:24s} {r.get('error')}")
            continue
        ratio = r["tokens_per_s_per_gpu"] / best_peer if best_peer else float("nan")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        mem = f"{r['memory_gib']:8.1f}" if r["memory_gib"] is not None else f"{'n/a':>8s}"
        print(f"{name:24s} {r['tokens_per_s_per_gpu']:13,.0f} {mfu:>10s} {mem} {ratio:9.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results, "device": where,
                                                 "flops_per_token": flops_per_token}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
