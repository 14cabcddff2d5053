"""LoRA and DoRA loss curves with the frozen base in FP8 against full precision, in torchao's CPU
emulation (the same casts as on a GPU, the matmuls in fp32; no fast accumulation).

A tiny random-init Llama (hidden 256, 2 layers, vocabulary 2048), adapters of rank 16 on every
linear layer, AdamW at lr 1e-3 with 20 warmup steps and clipping at 1.0, on the GPU test's data
(a random successor table followed with probability 0.9). Everything computes in fp32 except the
base matmul of the `_fp8` variants. Prints the largest and final gap between 10-step means.

    PYTHONPATH=. python bench/float8_lora_curves_emulated.py --seeds 0 1 2 3   # ~4 min a seed on one busy core
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from shoal.distributed.float8 import FrozenFloat8Linear, float8_config, float8_plan
from shoal.models.model import build_model
from shoal.models.presets import get_preset
from shoal.peft import apply_lora
from shoal.peft.lora import init_lora_weights, lora_modules

VOCAB, SEQ, BATCH, WINDOW = 2048, 128, 4, 10
CFG = dataclasses.replace(get_preset("llama_tiny"), vocab_size=VOCAB, hidden_size=256, intermediate_size=768,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randint(0, VOCAB, (VOCAB,), generator=gen)
    out = []
    for _ in range(count):
        tokens = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=gen)
        noise = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        follow = torch.rand(BATCH, SEQ, generator=gen) < 0.9
        for t in range(SEQ):
            tokens[:, t + 1] = torch.where(follow[:, t], successor[tokens[:, t]], noise[:, t])
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def train(peft: str, fp8: bool, seed: int, data) -> list[float]:
    torch.manual_seed(seed)
    model = build_model(CFG)
    apply_lora(model, rank=16, alpha=32.0, target_modules="all-linear", use_dora=peft == "dora")
    init_lora_weights(model, seed=seed)
    if fp8:
        config = dataclasses.replace(float8_config(float8_plan("hybrid", "tensorwise")), emulate=True)
        for _, layer in lora_modules(model):
            layer.base_linear = FrozenFloat8Linear(config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step, (x, y) in enumerate(data):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def smoothed(xs: list[float]) -> list[float]:
    return [sum(xs[i - WINDOW:i]) / WINDOW for i in range(WINDOW, len(xs) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        data = batches(args.steps, 1000 + seed)
        for peft in ("lora", "dora"):
            full, fp8 = smoothed(train(peft, False, seed, data)), smoothed(train(peft, True, seed, data))
            diff = [abs(a - b) for a, b in zip(full, fp8)]
            print(f"seed {seed} {peft}: loss {full[0]:.3f} -> {full[-1]:.3f}; FP8 gap max {max(diff):.4f}, "
                  f"final {diff[-1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
