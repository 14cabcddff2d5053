"""Training throughput of shoal against Hugging Face `transformers` training the same shape, same GPU.

    python bench/train.py --preset llama32_1b --seq_length 4096 --micro_batch_size 4 --steps 20

Both sides train a randomly initialised model of the preset's shape on random tokens, in bf16 with
fp32 master weights (shoal: its own training engine, as `shoal pretrain` builds it; transformers:
`AutoModelForCausalLM` with SDPA attention under `torch.autocast`, fused AdamW, optionally
`torch.compile`). Each variant runs `--warmup` steps, then `--steps` timed steps; the table gives
tokens/s/GPU, MFU (DESIGN §7) and peak memory, and every shoal figure's ratio to the best peer.
Results go to stdout and, as JSON, to `--output`.

FP8 variants (torchao, a GPU of compute capability >= 8.9) are named `shoal[_compile]_fp8_RECIPE`
(RECIPE: tensorwise, rowwise, rowwise_with_gw_hp) and also get MFU against the FP8 peak and their
ratio to shoal's BF16 variant of the same compile setting. `--peft lora` fine-tunes LoRA adapters
on q/k/v/o (the peer through `peft`); its FLOPs per token are then 4N + attention (no weight
gradients for the frozen base), not 6N.

    python bench/train.py --preset llama32_3b --variants hf_compile,shoal_compile,shoal_compile_fp8_tensorwise
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import measure_variant, random_batch  # noqa: E402 - bench/common.py

from shoal.config.parallel import ParallelConfig  # noqa: E402
from shoal.config.recipe import TrainSection  # noqa: E402
from shoal.distributed import build_mesh  # noqa: E402
from shoal.distributed import float8 as float8_module  # noqa: E402
from shoal.models import get_preset, to_hf_config  # noqa: E402
from shoal.peft.config import LoraConfig  # noqa: E402
from shoal.train.engine import build_engine  # noqa: E402
from shoal.train.step import masked_cross_entropy_sum  # noqa: E402


def time_steps(step, warmup: int, steps: int) -> tuple[float, float, list[float]]:
    """Seconds per step (median of per-step event timings), peak memory in GiB, and every step's
    seconds in order (their spread says how firm the median is)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30, times


def timing_fields(sec: float, mem: float, times: list[float]) -> dict:
    return {"seconds_per_step": sec, "memory_gib": mem, "step_seconds": [round(t, 5) for t in times],
            "spread_seconds": [min(times), max(times)]}


def bench_shoal(args, compile_: bool, device: torch.device, fp8_recipe: str | None = None,
                per_layer_filter: bool = False) -> dict:
    train = TrainSection(micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
                         weight_decay=0.1, **({"fp8": "hybrid", "fp8_recipe": fp8_recipe} if fp8_recipe else {}))
    parallel = ParallelConfig(compile=compile_, activation_checkpointing=args.activation_checkpointing)
    # The same adapters as the peft peer below: rank 16, alpha 32 on q/k/v/o.
    peft = None if args.peft == "none" else LoraConfig(rank=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                                       use_dora=args.peft == "dora")
    cfg = get_preset(args.preset)
    dims = build_mesh(parallel, 1, "cuda")
    # `_perlayer`: FP8 layers chosen each alone (torchao's auto filter, shoal before 2026-12-07),
    # not by their shared-input group: the same run measures what the grouping changes.
    groups = () if per_layer_filter else float8_module.SHARED_INPUT_GROUPS
    with mock.patch.object(float8_module, "SHARED_INPUT_GROUPS", groups):
        engine = build_engine(cfg, train=train, parallel=parallel, peft=peft, dims=dims, device=device,
                              compute_dtype=torch.bfloat16)
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device)
    tokens = float(batch["loss_mask"].sum())

    def step():
        engine.forward_backward([batch], tokens)
        engine.clip_and_step(1.0, 1e-4)

    timing = timing_fields(*time_steps(step, args.warmup, args.steps))
    if args.profile:
        timing["profile_ms"] = print_profile(step, args.profile_dir, args.profile_name)
    engine = None  # frees its memory before the next variant (the closure `step` holds it too)
    return timing


# Where one step's GPU time goes, by the operator that launched it (matmuls) or the kernel's name.
PROFILE_OPS = ("aten::mm", "aten::_scaled_mm", "aten::addmm", "aten::bmm")
PROFILE_KERNELS = (("attention", ("flash", "fmha", "attn", "cudnn")), ("foreach/optimizer", ("multi_tensor_apply",)),
                   ("triton reduction", ("triton_red", "triton_per")), ("triton pointwise", ("triton_poi",)))


def print_profile(step, out_dir: str | None = None, name: str = "shoal", rows: int = 40) -> dict:
    """The kernels one step spends its GPU time in, to see what limits throughput: the top `rows`
    (printed, and the top 150 written to `out_dir/profile_NAME.txt`) and a summary by kind (ms)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    if out_dir:
        Path(out_dir, f"profile_{name}.txt").write_text(
            averages.table(sort_by="self_device_time_total", row_limit=150, max_name_column_width=90))
    print(averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    summary = {op: 0.0 for op in PROFILE_OPS} | {kind: 0.0 for kind, _ in PROFILE_KERNELS} | {"other kernels": 0.0}
    kernels_total = 0.0
    for event in averages:
        ms = event.self_device_time_total / 1000
        if event.key in PROFILE_OPS:
            summary[event.key] += ms
        if event.device_type != DeviceType.CUDA:
            continue
        kernels_total += ms
        kind = next((k for k, marks in PROFILE_KERNELS if any(m in event.key for m in marks)), None)
        if kind is not None:
            summary[kind] += ms
    matmuls = sum(summary[op] for op in PROFILE_OPS)
    summary["other kernels"] = kernels_total - matmuls - sum(summary[k] for k, _ in PROFILE_KERNELS)
    summary["all kernels"] = kernels_total
    print(f"profile {name} (GPU ms in one step): " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()), flush=True)
    return {k: round(v, 2) for k, v in summary.items()}


def bench_hf(args, compile_: bool, device: torch.device, fp8_recipe: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = get_preset(args.preset)
    hf_cfg = LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):  # initialised on the GPU: an 8B model takes minutes on the CPU
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    if args.activation_checkpointing == "full":
        model.gradient_checkpointing_enable()
    if args.peft != "none":
        from peft import LoraConfig, get_peft_model

        if args.activation_checkpointing == "full":
            model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 use_dora=args.peft == "dora"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile_ else model
    batch = random_batch(cfg.vocab_size, args.micro_batch_size, args.seq_length, device)
    tokens = float(batch["loss_mask"].sum())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(input_ids=batch["tokens"]).logits
        loss = masked_cross_entropy_sum(logits, batch["labels"], batch["loss_mask"]) / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = timing_fields(*time_steps(step, args.warmup, args.steps))
    model = optimizer = forward = None  # frees their memory before the next variant
    return timing


def parse_variant(name: str):
    """`hf`, `hf_compile`, `shoal`, `shoal_compile`, with `_fp8_RECIPE` after a shoal name and
    optionally `_perlayer` after that: (runner, compile, recipe, keyword arguments)."""
    base, _, fp8_recipe = name.partition("_fp8_")
    fp8_recipe, per_layer = fp8_recipe.removesuffix("_perlayer"), fp8_recipe.endswith("_perlayer")
    runners = {"hf": (bench_hf, False), "hf_compile": (bench_hf, True),
               "shoal": (bench_shoal, False), "shoal_compile": (bench_shoal, True)}
    if base not in runners or (fp8_recipe and not base.startswith("shoal")):
        raise SystemExit(f"unknown variant {name!r}: expected one of {', '.join(runners)}, "
                         "a shoal one optionally followed by _fp8_RECIPE[_perlayer]")
    return (*runners[base], fp8_recipe or None, {"per_layer_filter": True} if per_layer else {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama32_1b")
    parser.add_argument("--seq_length", type=int, default=4096)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--activation_checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--peft", default="none", choices=["none", "lora", "dora"])
    parser.add_argument("--variants", default="hf,hf_compile,shoal,shoal_compile")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of one shoal step")
    parser.add_argument("--profile_dir", default=None, help="with --profile: write each variant's table here")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/train.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = get_preset(args.preset)
    tokens_per_step = args.micro_batch_size * args.seq_length
    # A frozen base (LoRA/DoRA) has no weight-gradient matmuls: 4N instead of 6N, plus attention.
    flops_per_token = cfg.flops_per_token(args.seq_length, frozen_params=cfg.num_params if args.peft != "none" else 0)
    results = {}
    for name in args.variants.split(","):
        fn, compile_, fp8_recipe, options = parse_variant(name)
        torch.manual_seed(0)
        args.profile_name = name
        r = measure_variant(functools.partial(fn, args, compile_, device, fp8_recipe, **options), tokens_per_step,
                            flops_per_token, device, rate_key="tokens_per_s_per_gpu", fp8=fp8_recipe is not None)
        results[name] = r
        print(f"{name}: {r}", flush=True)
        write_output(args, results, device)  # after each variant: a run cut short keeps what it measured
    peers = [r["tokens_per_s_per_gpu"] for n, r in results.items()
             if n.startswith("hf") and "tokens_per_s_per_gpu" in r]
    best_peer = max(peers) if peers else None
    print(f"\n{args.preset} seq {args.seq_length} micro batch {args.micro_batch_size} peft {args.peft} "
          f"AC {args.activation_checkpointing} on {torch.cuda.get_device_name(device)} (torch {torch.__version__})")
    print(f"{'variant':34s} {'tokens/s/GPU':>13s} {'MFU bf16':>9s} {'MFU fp8':>8s} {'mem GiB':>8s} {'vs best HF':>10s} "
          f"{'vs shoal bf16':>13s}")
    for name, r in results.items():
        if "tokens_per_s_per_gpu" not in r:
            print(f"{name:34s} {r.get('error')}")
            continue
        ratio = r["tokens_per_s_per_gpu"] / best_peer if best_peer else float("nan")
        bf16 = results.get(name.split("_fp8_")[0], {}).get("tokens_per_s_per_gpu") if "_fp8_" in name else None
        if "step_seconds" in r:  # the spread of the timed steps, as a fraction of the median
            low, high = r["spread_seconds"]
            r["spread"] = f"{100 * (low / r['seconds_per_step'] - 1):+.1f}%..{100 * (high / r['seconds_per_step'] - 1):+.1f}%"
        vs_bf16 = f"{r['tokens_per_s_per_gpu'] / bf16:12.2f}x" if bf16 else f"{'':13s}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        mfu8 = f"{100 * r['mfu_fp8_peak']:.1f}%" if r.get("mfu_fp8_peak") else ""
        print(f"{name:34s} {r['tokens_per_s_per_gpu']:13,.0f} {mfu:>9s} {mfu8:>8s} {r['memory_gib']:8.1f} "
              f"{ratio:9.2f}x {vs_bf16}  step {r['seconds_per_step']:.4f}s {r.get('spread', '')}")
    write_output(args, results, device)
    return 0


def write_output(args, results: dict, device: torch.device) -> None:
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results,
                                                 "device": torch.cuda.get_device_name(device)}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
