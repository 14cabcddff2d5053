"""What the training benchmarks share: a batch of random tokens and the timing of a step.

Imported by the scripts beside it (`python bench/NAME.py` puts this folder on sys.path).
"""

from __future__ import annotations

import time

import torch


def random_batch(vocab: int, mbs: int, seq: int, device: torch.device, seed: int | None = None) -> dict[str, torch.Tensor]:
    """`mbs` rows of `seq` random tokens, one document a row, the loss on every token; `seed` gives
    each data-parallel rank its own tokens."""
    g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = torch.randint(0, vocab, (mbs, seq + 1), device=device, generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(mbs, seq, device=device),
        "position_ids": torch.arange(seq, device=device).expand(mbs, seq).contiguous(),
        "document_ids": torch.zeros(mbs, seq, dtype=torch.long, device=device),
    }


def time_steps(step, warmup: int, steps: int, device: torch.device,
               peak_from_warmup: bool = False) -> tuple[float, float | None]:
    """Seconds per step (the median of `steps` after `warmup` untimed ones) and peak GPU memory in
    GiB (None on CPU), over the timed steps, or from the first step with `peak_from_warmup`: CUDA
    graphs allocate their pool while recording, in warmup, and a replay allocates nothing the
    allocator's peak would see."""
    cuda = device.type == "cuda"
    if cuda and peak_from_warmup:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        if not peak_from_warmup:
            torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def measure_variant(run, tokens_per_step: int, flops_per_token: float, device: torch.device,
                    rate_key: str = "tokens_per_s", fp8: bool = False) -> dict:
    """`run()`'s result dict with the rate (`rate_key`) and MFU added; a variant that runs out of
    memory or fails is recorded as an error, not raised: one broken variant must not cost the rest
    of a GPU session. Starts from an empty compile cache (variants share one process: a case
    compiled on bf16 activations must not make the next, fp32 one recompile each layer up to
    Dynamo's limit and fall back to eager) and frees what it left on the GPU before the next."""
    import gc

    from shoal.train.metrics import mfu_fields

    torch._dynamo.reset()
    try:
        result = run()
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "seconds_per_step" in result:
        result[rate_key] = tokens_per_step / result["seconds_per_step"]
        result.update(mfu_fields(result[rate_key], flops_per_token, device, fp8=fp8))
    return result
