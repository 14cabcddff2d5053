"""`shoal generate`: text from a shoal checkpoint, an experiment or a Hugging Face folder.

    shoal generate --source CKPT|EXPERIMENT|HF_DIR --prompt TEXT [--chat [--system_prompt S]]
                   [--max_new_tokens N] [--temperature T --top_p P --top_k K --seed S | --greedy]
    shoal generate --source CKPT --prompts FILE.jsonl --output OUT.jsonl [--batch_size B]

One prompt is streamed to the terminal as it is generated; several (or a --prompts file) are
generated in batches and written as JSONL, one line per prompt in input order, to --output or to
standard output. Sampling defaults come from the model's generation_config.json (Llama 3 Instruct:
temperature 0.6, top_p 0.9; top_k 50 unless it says otherwise), as in `transformers`; flags override them, and --greedy turns sampling
off. What was loaded and how tokens are chosen is said on standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from shoal.config.source import add_source_arguments
from shoal.errors import ShoalError
from shoal.generate.prompts import Prompt, chat_messages, encode_prompt, read_prompt_file

DEFAULT_MAX_NEW_TOKENS = 256


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `generate` and `chat` share: what to load, where, and how to pick tokens."""
    add_source_arguments(parser)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                        default=DEFAULT_MAX_NEW_TOKENS, help=f"tokens to generate at most (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 means greedy")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling stream (reproducible runs)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--system_prompt", "--system-prompt", dest="system_prompt", default=None,
                        help="system message put before the conversation (chat mode)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", default=None, help="JSONL file: {\"prompt\": ...} or {\"messages\": [...]} per line")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    parser.add_argument("--output", default=None, help="JSONL file to write the completions to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=16,
                        help="prompts generated together (default 16)")
    parser.add_argument("--no_stream", "--no-stream", dest="no_stream", action="store_true",
                        help="print a single prompt's completion only when it is complete")


def sampling_settings(args: argparse.Namespace, generation_config: dict[str, Any]):
    """The model's generation defaults, overridden by the flags the user gave."""
    from shoal.generate.sampling import SamplingSettings

    do_sample = bool(generation_config.get("do_sample", False))
    temperature = generation_config.get("temperature", 1.0)
    top_p = generation_config.get("top_p", 1.0)
    top_k = generation_config.get("top_k", 50)  # transformers' default when sampling
    if any(v is not None for v in (args.temperature, args.top_p, args.top_k)):
        do_sample = True  # asking for a sampling parameter asks for sampling
    if args.greedy:
        do_sample = False
    return SamplingSettings(
        do_sample=do_sample,
        temperature=args.temperature if args.temperature is not None else float(temperature or 1.0),
        top_p=args.top_p if args.top_p is not None else float(top_p or 1.0),
        top_k=args.top_k if args.top_k is not None else int(top_k or 0),
        seed=args.seed,
    )


def collect_prompts(args: argparse.Namespace) -> list[Prompt]:
    prompts = [Prompt(text=text) for text in args.prompt]
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    if not prompts:
        raise ShoalError("give a --prompt TEXT or a --prompts FILE.jsonl")
    return prompts


def check_output_file(path: str | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.exists() and not overwrite:
        raise ShoalError(f"--output {out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ShoalError(f"--output {out} is a directory; name a .jsonl file")
    if not out.parent.is_dir():
        raise ShoalError(f"--output {out}: folder {out.parent} does not exist")
    return out


def write_jsonl_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write every line to a hidden temporary file, then rename: a reader never sees half the output."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def result_row(prompt: Prompt, prompt_ids: list[int], completion, text: str, chat: bool,
               system_prompt: str | None) -> dict[str, Any]:
    row = dict(prompt.extra)
    if chat or prompt.messages is not None:
        row["messages"] = chat_messages(prompt, system_prompt)
    else:
        row["prompt"] = prompt.text
    row.update(completion=text, finish_reason=completion.finish_reason, prompt_tokens=len(prompt_ids),
               completion_tokens=len(completion.token_ids), token_ids=completion.token_ids)
    return row


def main(args: argparse.Namespace) -> int:
    from shoal.generate.decode import generate_tokens
    from shoal.generate.load import load_for_generation
    from shoal.generate.stream import TextStream

    if args.batch_size < 1:
        raise ShoalError(f"--batch_size must be >= 1, got {args.batch_size}")
    prompts = collect_prompts(args)
    output = check_output_file(args.output, args.overwrite)
    loaded = load_for_generation(args.source, device=args.device, dtype=args.dtype, which=args.checkpoint,
                                 base=args.base_checkpoint)
    settings = sampling_settings(args, loaded.generation_config)
    stops = loaded.stop_token_ids(chat=args.chat or any(p.messages is not None for p in prompts))
    for note in loaded.notes:
        print(f"shoal generate: {note}", file=sys.stderr)
    print(f"shoal generate: {loaded.description}; {settings.describe()}; stop tokens {stops}", file=sys.stderr)

    tokenizer = loaded.tokenizer
    encoded = [encode_prompt(tokenizer, p, args.chat, args.system_prompt) for p in prompts]
    if len(prompts) == 1 and output is None and not args.no_stream:
        stream = TextStream(tokenizer)
        (completion,) = generate_tokens(loaded.model, encoded, args.max_new_tokens, settings, stops,
                                        on_token=lambda row, token: stream.push(token))
        stream.finish()
        return 0
    rows = []
    for start in range(0, len(prompts), args.batch_size):
        batch = encoded[start:start + args.batch_size]
        completions = generate_tokens(loaded.model, batch, args.max_new_tokens, settings, stops)
        for offset, completion in enumerate(completions):
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            rows.append(result_row(prompts[start + offset], batch[offset], completion, text, args.chat,
                                   args.system_prompt))
            if output is None:
                print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    if output is not None:
        write_jsonl_atomically(output, rows)
        print(f"shoal generate: wrote {len(rows)} completion(s) to {output}", file=sys.stderr)
    return 0
