"""Fine-tuning throughput on one GPU: shoal against transformers + peft on the same packed data, same run.

    python bench/finetune.py --output bench/results/finetune_h200.json
    python bench/finetune.py --cases lora_qkvo_8b,full_1b --variants hf_compile,shoal_compile
    python bench/finetune.py --cases dora_qkvo_8b=hf+shoal_compile,full_3b   # a case's own variants

Cases (`--cases`, comma-separated):

    lora_qkvo_8b, lora_all_8b   LoRA rank 32, alpha 32, dropout 0 on q/k/v/o, or on every linear layer
    dora_qkvo_8b, dora_all_8b   the same with DoRA
    full_1b, full_3b            full fine-tuning (every parameter trains)

on the Llama-3.1-8B, -3.2-1B and -3.2-3B shapes (random weights). Variants (`--variants`): `hf`,
`hf_compile` (transformers `AutoModelForCausalLM`, SDPA; compiled: the whole model with its loss, or
with `--peer_compile layers` each decoder layer and the loss, which recompiles per layer on
transformers 5.17 and then runs slower than eager), `shoal`, `shoal_compile` (shoal's own engine as `shoal finetune` builds it, compiled layers
and loss; the document spans computed on the host and copied with the batch, as `shoal finetune`
does), `shoal_compile_device_spans` (the same, the spans found on the device by each forward, a
`nonzero` that makes the host wait: what removing that sync gains, in the same run),
`shoal_compile_cudagraphs` (the same with `parallel.cuda_graphs`: each compiled layer's forward
and backward replayed as a CUDA graph, so the host launches a graph, not each kernel),
`shoal_compile_cpp_wrapper` (inductor's C++ wrapper launches the compiled layers' kernels: what the
host's Python launch overhead costs), `shoal_compile_fused` (q/k/v and gate/up as one matmul
each even where the weights are not packed, `SHOAL_FUSED_PROJECTIONS=1`: what fusing full
fine-tuning's groups gains; a LoRA base is packed, and so fused, in `shoal_compile` already),
`shoal_compile_unpacked` (the frozen base unpacked and unfused, and the output layer over every
token: the one-GPU step before both, to measure what they gain in the same run).
Peers with Liger-Kernel (`hf_liger`, `hf_liger_compile`: transformers + peft after
`apply_liger_kernel_to_llama`, whose fused linear cross-entropy takes the same shifted labels and
token count) need `liger-kernel` installed (a pure-Python wheel; Triton is on the GPU machine).
Unsloth is not a peer here: it needs about 25 packages the GPU machine lacks (bitsandbytes' wheel
alone is 43 MB of the 64 MiB a device call carries, beside xformers, trl, diffusers, datasets,
accelerate and torchvision built for that machine's torch), which no session has tried.
`--num_layers N` shrinks every shape to N layers for a quick smoke run; `--preset P`
replaces every shape (with `--device cpu`, a tiny preset checks the script without a GPU).

Data: random tokens packed into `--seq_length` rows of documents of random lengths (64 to 1,024
tokens); each document's first quarter is its prompt (no loss), the rest its answer. shoal keeps
the documents apart (packed-document flash attention, positions restart per document), as
`shoal finetune` does. The peer, by default, trains on the same rows as one causal sequence each
(its fastest setting: SDPA's flash kernel; cross-document attention is more work, not less); with
`--peer_documents isolate` it gets the restarting position ids, from which transformers builds a
block-diagonal mask (SDPA with a dense mask: isolated, but slower).

What each side keeps, in which dtype (both compute in bf16 under `torch.autocast`):

* LoRA/DoRA: frozen base weights in bf16 (the peer: built with `dtype=bfloat16`; shoal: the frozen
  base is stored in the compute dtype on one GPU), adapters and DoRA magnitudes as fp32 masters with
  fp32 AdamW state (peft's `autocast_adapter_dtype` upcasts them).
* Full SFT: every weight an fp32 master with fp32 AdamW state on both sides (the peer is built in
  fp32), bf16 copies made for the matmuls.

Both sides use fused AdamW, gradient clipping at 1.0 and the masked token-mean loss over the
answer tokens. Each variant runs `--warmup` steps, then `--steps` timed ones (median step time).

MFU = tokens/s × FLOPs per token / 989e12 (dense bf16 peak of an H100/H200), FLOPs per token from
`ModelConfig.flops_per_token` (the output layer's share counted for the loss tokens only, as
`shoal finetune` counts it): 6N + 12·L·H·Dh·S for full training (N the parameters, a tied
embedding once; S the row length, an upper bound for packed documents), and 4N + 12·L·H·Dh·S for a
frozen base (forward 2N, input gradient 2N, no weight gradient); the adapters' own FLOPs are left
out (under 1% at rank 32). Each row's ratio is against the best peer row of its case. JSON to `--output`.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import measure_variant, time_steps  # noqa: E402 - bench/common.py

from shoal.config.parallel import ParallelConfig  # noqa: E402
from shoal.config.recipe import TrainSection  # noqa: E402
from shoal.distributed import build_mesh  # noqa: E402
from shoal.models import get_preset, to_hf_config  # noqa: E402
from shoal.peft.config import LoraConfig  # noqa: E402
from shoal.train.engine import build_engine  # noqa: E402
from shoal.train.step import to_device, with_loss_positions  # noqa: E402

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*QKVO, "gate_proj", "up_proj", "down_proj")
# case -> (preset, peft kind or None, target modules, micro batch: rows of --seq_length tokens)
CASES = {
    "lora_qkvo_8b": ("llama31_8b", "lora", QKVO, 1),
    "lora_all_8b": ("llama31_8b", "lora", ALL_LINEAR, 1),
    "dora_qkvo_8b": ("llama31_8b", "dora", QKVO, 1),
    "dora_all_8b": ("llama31_8b", "dora", ALL_LINEAR, 1),
    "full_1b": ("llama32_1b", None, (), 4),
    "full_3b": ("llama32_3b", None, (), 2),
}
RANK, ALPHA = 32, 32.0


def packed_batch(vocab: int, rows: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed documents as the SFT packer writes them: tokens, next-token labels, answer-only
    loss mask, positions restarting per document and document ids."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    loss_mask = torch.zeros(rows, seq)
    positions = torch.zeros(rows, seq, dtype=torch.long)
    documents = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        start, doc = 0, 0
        while start < seq:
            length = min(rng.randint(64, 1024), seq - start)
            positions[r, start:start + length] = torch.arange(length)
            documents[r, start:start + length] = doc
            loss_mask[r, start + length // 4:start + length - 1] = 1  # answer tokens; not the last one
            start, doc = start + length, doc + 1
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
             "position_ids": positions, "document_ids": documents}
    return {k: v.contiguous().to(device) for k, v in batch.items()}


def micro_batch(args, case: str) -> int:
    return args.micro_batch_size or CASES[case][3]


def shape(case: str, num_layers: int | None, preset_override: str | None = None):
    import dataclasses

    preset, kind, targets, _ = CASES[case]
    cfg = get_preset(preset_override or preset)
    if num_layers:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    return cfg, kind, targets


def bench_shoal(args, case: str, compile_: bool, device: torch.device, host_spans: bool = True,
                cuda_graphs: bool = False) -> dict:
    cfg, kind, targets = shape(case, args.num_layers, args.preset)
    train = TrainSection(micro_batch_size=micro_batch(args, case), global_batch_size=micro_batch(args, case),
                         weight_decay=0.1)
    parallel = ParallelConfig(compile=compile_, activation_checkpointing=args.activation_checkpointing,
                              cuda_graphs=cuda_graphs)
    peft = None if kind is None else LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets, use_dora=kind == "dora")
    dims = build_mesh(parallel, 1, device.type)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = build_engine(cfg, train=train, parallel=parallel, peft=peft, dims=dims, device=device,
                          compute_dtype=dtype, document_mask=True, seq_length=args.seq_length)
    host = packed_batch(cfg.vocab_size, micro_batch(args, case), args.seq_length, torch.device("cpu"))
    tokens = float(host["loss_mask"].sum())  # on the host, as the step loop counts it
    if host_spans:  # as `shoal finetune` does: spans made on the host, the head on the answer tokens alone
        host = engine.prepare_on_host(host)
    elif engine.takes_loss_positions:
        host = with_loss_positions(host)
    batch = to_device(host, device)

    def step():
        engine.forward_backward([batch], tokens)
        engine.clip_and_step(1.0, 1e-4)

    sec, mem = time_steps(step, args.warmup, args.steps, device, peak_from_warmup=cuda_graphs)
    dtypes = sorted({f"{'trainable' if p.requires_grad else 'frozen'} {p.dtype}".replace("torch.", "")
                     for p in engine.parts[0].parameters()})
    if args.profile:
        variant = ("shoal" + ("_compile" if compile_ else "") + ("_cudagraphs" if cuda_graphs else "")
                   + ("" if engine.takes_loss_positions else "_unpacked"))
        write_profile(step, Path(args.profile) / f"{case}_{variant}.txt")
    engine = None  # frees its memory before the next variant (the closure `step` holds it too)
    return {"seconds_per_step": sec, "memory_gib": mem, "dtypes": dtypes}


def write_profile(step, path: Path, rows: int = 40) -> None:
    """The kernels one step spends its GPU time in, to see what limits throughput."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))


def bench_hf(args, case: str, compile_: bool, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg, kind, targets = shape(case, args.num_layers, args.preset)
    hf_cfg = LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    # A frozen base is kept in bf16 (what a peft user loads); full training keeps fp32 masters.
    base_dtype = torch.bfloat16 if kind is not None and device.type == "cuda" else torch.float32
    with torch.device(device):  # initialised on the GPU: an 8B model takes minutes on the CPU
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=base_dtype)
    if args.activation_checkpointing != "none":
        model.gradient_checkpointing_enable()
    if kind is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if args.activation_checkpointing != "none":
            model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
        model = get_peft_model(model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules=list(targets), use_dora=kind == "dora"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    forward = model
    if compile_ and args.peer_compile == "model":
        forward = torch.compile(model)
    elif compile_:
        # Each decoder layer (one graph serves all: minutes less to compile than the whole model)
        # and transformers' loss, where the fp32 upcast and softmax of the logits fuse.
        for layer in (model.base_model.model if kind is not None else model).model.layers:
            layer.compile()
        inner = model.base_model.model if kind is not None else model
        inner.loss_function = torch.compile(inner.loss_function)
    batch = packed_batch(cfg.vocab_size, micro_batch(args, case), args.seq_length, device)
    tokens = batch["loss_mask"].sum()
    # transformers' own loss (inside the compiled graph): labels already shifted, -100 off the answers.
    shift_labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
    inputs = {"input_ids": batch["tokens"]}
    if args.peer_documents == "isolate":
        inputs["position_ids"] = batch["position_ids"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(**inputs, labels=shift_labels, shift_labels=shift_labels, num_items_in_batch=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sec, mem = time_steps(step, args.warmup, args.steps, device)
    dtypes = sorted({f"{'trainable' if p.requires_grad else 'frozen'} {p.dtype}".replace("torch.", "")
                     for p in model.parameters()})
    model = optimizer = forward = None  # frees their memory before the next variant
    return {"seconds_per_step": sec, "memory_gib": mem, "dtypes": dtypes}


def with_inductor_config(fn, **options):
    """`fn` run (compiled lazily, so its steps included) under these inductor settings."""
    def run(*args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(**options):
            return fn(*args, **kwargs)
    return run


def with_fused_projections(fn):
    """`fn` with q/k/v and gate/up run as one matmul each (shoal.models.fused_linear switched on;
    compiled lazily, so its graphs are traced with the fusion)."""
    def run(*args, **kwargs):
        from shoal.models import fused_linear

        previous, fused_linear.FUSED_PROJECTIONS = fused_linear.FUSED_PROJECTIONS, True
        try:
            return fn(*args, **kwargs)
        finally:
            fused_linear.FUSED_PROJECTIONS = previous
    return run


def with_liger(fn):
    """`fn` with Liger-Kernel's Llama kernels patched into transformers (its RMSNorm, RoPE, SwiGLU
    and fused linear cross-entropy, which never materialises the logits), as its
    `apply_liger_kernel_to_llama` does before a model is built; undone afterwards, so the variants
    after it get plain transformers. Needs `liger-kernel` (pure Python + Triton: carry its wheel)."""
    def run(*args, **kwargs):
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        from transformers.models.llama import modeling_llama

        names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
        saved = {name: getattr(modeling_llama, name) for name in names}
        saved_forward = modeling_llama.LlamaForCausalLM.forward
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
        try:
            return fn(*args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(modeling_llama, name, value)
            modeling_llama.LlamaForCausalLM.forward = saved_forward
    return run


def without_packing(fn):
    """`fn` with the frozen base left unpacked (so, the switch off, q/k/v and gate/up unfused) and the
    output layer over every token: shoal's one-GPU LoRA step as it was before both, for comparison
    in the same run. Compiled lazily, so its graphs are traced that way."""
    def run(*args, **kwargs):
        from shoal.train import engine

        saved = engine.pack_frozen_groups, engine.Engine.takes_loss_positions
        engine.pack_frozen_groups = lambda model: 0
        engine.Engine.takes_loss_positions = property(lambda self: False)
        try:
            return fn(*args, **kwargs)
        finally:
            engine.pack_frozen_groups, engine.Engine.takes_loss_positions = saved
    return run


RUNNERS = {"hf": (bench_hf, False), "hf_compile": (bench_hf, True),
           # transformers + peft with Liger-Kernel's Triton kernels (its usual use is eager)
           "hf_liger": (with_liger(bench_hf), False), "hf_liger_compile": (with_liger(bench_hf), True),
           "shoal": (bench_shoal, False), "shoal_compile": (bench_shoal, True),
           "shoal_compile_device_spans": (functools.partial(bench_shoal, host_spans=False), True),
           # the compiled layers replayed as CUDA graphs (parallel.cuda_graphs)
           "shoal_compile_cudagraphs": (functools.partial(bench_shoal, cuda_graphs=True), True),
           # inductor's C++ wrapper: the compiled layers launch their kernels from C++, not Python
           "shoal_compile_cpp_wrapper": (with_inductor_config(bench_shoal, cpp_wrapper=True), True),
           # q/k/v and gate/up as separate matmuls, as before shoal.models.fused_linear: what fusing gains
           "shoal_compile_fused": (with_fused_projections(bench_shoal), True),
           # neither the packed (fused) frozen base nor the output layer over loss tokens only
           "shoal_compile_unpacked": (without_packing(bench_shoal), True)}


def run_case(args, case: str, device: torch.device, variants: list[str]) -> dict:
    cfg, kind, _ = shape(case, args.num_layers, args.preset)
    frozen = cfg.num_params if kind is not None else 0
    # Every variant trains on this batch; the output layer is needed for its loss tokens only.
    mask = packed_batch(cfg.vocab_size, micro_batch(args, case), args.seq_length, torch.device("cpu"))["loss_mask"]
    flops_per_token = cfg.flops_per_token(args.seq_length, frozen_params=frozen,
                                          loss_token_fraction=float(mask.mean()))
    tokens_per_step = micro_batch(args, case) * args.seq_length
    results = {}
    for name in variants:
        fn, compile_ = RUNNERS[name]
        torch.manual_seed(0)
        r = measure_variant(functools.partial(fn, args, case, compile_, device), tokens_per_step, flops_per_token, device)
        results[name] = r
        print(f"{case} {name}: {r}", flush=True)
    peers = [r["tokens_per_s"] for n, r in results.items() if n.startswith("hf") and "tokens_per_s" in r]
    best = max(peers) if peers else None
    for r in results.values():
        if best and "tokens_per_s" in r:
            r["vs_best_peer"] = r["tokens_per_s"] / best
    return {"preset": CASES[case][0], "micro_batch_size": micro_batch(args, case), "flops_per_token": flops_per_token, "variants": results}


def print_table(all_results: dict) -> None:
    print(f"\n{'case':14s} {'variant':26s} {'tokens/s':>9s} {'MFU':>6s} {'mem GiB':>8s} {'vs best peer':>12s}  dtypes")
    for case, res in all_results.items():
        for name, r in res["variants"].items():
            if "tokens_per_s" not in r:
                print(f"{case:14s} {name:26s} {r.get('error')}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
            ratio = f"{r['vs_best_peer']:.2f}x" if "vs_best_peer" in r else ""
            print(f"{case:14s} {name:26s} {r['tokens_per_s']:9,.0f} {mfu:>6s} {r['memory_gib'] or 0.0:8.1f} {ratio:>12s}  "
                  f"{', '.join(r['dtypes'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default="hf,hf_compile,shoal,shoal_compile")
    parser.add_argument("--seq_length", type=int, default=2048)
    parser.add_argument("--micro_batch_size", type=int, default=None, help="rows per step (default: the case's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num_layers", type=int, default=None, help="shrink every shape (smoke runs)")
    parser.add_argument("--preset", default=None, help="replace every case's shape by this preset (smoke runs)")
    parser.add_argument("--activation_checkpointing", default="none", choices=["none", "full", "selective", "auto"])
    parser.add_argument("--peer_compile", default="model", choices=["layers", "model"],
                        help="hf_compile: torch.compile each decoder layer and the loss, or the whole model")
    parser.add_argument("--peer_documents", default="ignore", choices=["ignore", "isolate"])
    parser.add_argument("--profile", default=None, help="folder for one profiled step of each shoal variant")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke runs of tiny shapes")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    plan = {}  # case -> variants; "case=v1+v2" gives a case its own variants
    for entry in args.cases.split(","):
        name, _, own = entry.partition("=")
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}: expected some of {', '.join(CASES)}")
        plan[name] = own.split("+") if own else args.variants.split(",")
        for variant in plan[name]:
            if variant not in RUNNERS:
                raise SystemExit(f"unknown variant {variant!r}: expected some of {', '.join(RUNNERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/finetune.py needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    all_results = {}
    for case, variants in plan.items():
        all_results[case] = run_case(args, case, device, variants)
        if args.output:  # after every case: a run cut short keeps what it measured
            Path(args.output).write_text(json.dumps(
                {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "results": all_results}, indent=1))
    print_table(all_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
