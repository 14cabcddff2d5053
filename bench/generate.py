"""Generation throughput of shoal against Hugging Face `transformers.generate`, same model, same device.

    python bench/generate.py --shape llama31_8b --batch_sizes 1,16          # one GPU, bf16
    python bench/generate.py --shape llama_tiny --device cpu --new_tokens 16 # CPU smoke run

Both sides hold the same random weights of the named shape (a preset of `shoal.models.presets`):
transformers builds the model from the preset's config.json, shoal's model loads its state dict.
Each batch of random prompts (`--prompt_length` tokens, no padding) is continued greedily by
`--new_tokens` tokens with end tokens disabled, so both generate exactly that many; shoal through
its KV cache (`shoal.generate.decode`), transformers through `generate` with its default dynamic
cache. A run is `--warmup` untimed generations then the median of `--repeats` timed ones; tokens/s
counts new tokens (batch x new_tokens) over the whole call, prefill included. The first generated
tokens of both are compared as a sanity check (bf16 rounding may make long continuations differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.generate.decode import generate_tokens  # noqa: E402
from shoal.generate.load import empty_model  # noqa: E402
from shoal.generate.sampling import SamplingSettings  # noqa: E402
from shoal.models import get_preset, to_hf_config  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int):
    """(median seconds of `repeats` calls after `warmup` calls, the last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def build_models(shape: str, device: torch.device, dtype: torch.dtype):
    """A transformers model of the preset's shape with random weights, and shoal's twin holding them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = get_preset(shape)
    hf_config = AutoConfig.for_model(**to_hf_config(cfg, dtype=str(dtype).removeprefix("torch.")))
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa").eval()
    ours = empty_model(cfg, device, dtype)  # as `shoal generate` builds it: no fp32 copy on the way
    ours.load_state_dict(hf.state_dict(), strict=not cfg.tie_word_embeddings)
    ours.tie_weights()
    ours.eval()
    return cfg, hf, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama_tiny", help="a preset name: llama31_8b, llama32_1b, llama_tiny, ...")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--prompt_length", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg, hf, ours = build_models(args.shape, device, dtype)
    greedy = SamplingSettings()
    results = []
    print(f"{args.shape} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{str(dtype).removeprefix('torch.')}, prompt {args.prompt_length}, {args.new_tokens} new tokens, greedy")
    print(f"{'batch':>5} | {'transformers tok/s':>18} | {'shoal tok/s':>11} | {'ratio':>5} | first tokens agree")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_length), generator=gen).to(device)

        @torch.no_grad()
        def run_hf(prompts=prompts):  # bound now: the loop moves on
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt_length:].tolist()

        def run_shoal(prompts=prompts):
            done = generate_tokens(ours, prompts.tolist(), args.new_tokens, greedy, stop_token_ids=())
            return [c.token_ids for c in done]

        hf_s, hf_tokens = timed(run_hf, device, args.warmup, args.repeats)
        shoal_s, shoal_tokens = timed(run_shoal, device, args.warmup, args.repeats)
        new = batch * args.new_tokens
        first = min(8, args.new_tokens)
        agree = sum(a[:first] == b[:first] for a, b in zip(hf_tokens, shoal_tokens))
        row = {"batch": batch, "transformers_tokens_per_s": new / hf_s, "shoal_tokens_per_s": new / shoal_s,
               "ratio": hf_s / shoal_s, "rows_whose_first_tokens_agree": agree, "first_tokens": first}
        results.append(row)
        print(f"{batch:>5} | {row['transformers_tokens_per_s']:>18.1f} | {row['shoal_tokens_per_s']:>11.1f} | "
              f"{row['ratio']:>4.2f}x | {agree}/{batch} rows (first {first})")
    if args.output:
        meta = {"shape": args.shape, "device": str(device), "dtype": str(dtype), "prompt_length": args.prompt_length,
                "new_tokens": args.new_tokens, "torch": torch.__version__}
        Path(args.output).write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
