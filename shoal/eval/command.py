"""`shoal eval`: mean loss and perplexity of a checkpoint on a split of training data.

    shoal eval --source CKPT|EXPERIMENT|HF_DIR --dataset_path DATA [--split_name validation]
               [--seq_length N] [--max_samples N] [--output RESULTS.json]

DATA is what `shoal pretrain` or `shoal finetune` took: a folder or prefix of `.bin/.idx` files
(then `--split` chooses the documents, as in training) or a fine-tuning folder with
training/validation/test.jsonl (answer tokens only, packed as in training unless
--pack_sequences false). Give the options the run was trained with (`--seq_length`, `--split`,
`--seed`, `--document_mask`, ...) and the first N samples score exactly as its validation did.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shoal.errors import ShoalError


def _bool(text: str) -> bool:
    from shoal.convert.options import parse_bool

    return parse_bool(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", "--path", dest="source", required=True,
                        help="shoal checkpoint, experiment (its latest checkpoint) or Hugging Face model folder")
    parser.add_argument("--checkpoint", default="latest", choices=["latest", "best"],
                        help="for an experiment: its latest checkpoint (default) or the best by validation loss")
    parser.add_argument("--dataset_path", "--dataset-path", dest="dataset_path", nargs="+", required=True,
                        help=".bin/.idx folder or prefix(es), or a fine-tuning folder of JSONL splits")
    parser.add_argument("--split_name", "--split-name", dest="split_name", default="validation",
                        help="train, validation (default) or test")
    parser.add_argument("--seq_length", "--seq-length", dest="seq_length", type=int, default=2048)
    parser.add_argument("--split", default="998,1,0", help="pretraining document split, as in training")
    parser.add_argument("--seed", type=int, default=1234, help="the data seed training used")
    parser.add_argument("--document_mask", type=_bool, default=False, help="pretraining: keep documents apart")
    parser.add_argument("--eod_mask_loss", type=_bool, default=False, help="pretraining: no loss on end-of-document")
    parser.add_argument("--pack_sequences", type=_bool, default=True, help="fine-tuning: pack examples (default true)")
    parser.add_argument("--prompt_template", default=None, help="fine-tuning: template instead of the chat template")
    parser.add_argument("--system_prompt", default=None, help="fine-tuning: system prompt")
    parser.add_argument("--max_samples", type=int, default=None, help="score the first N samples (default: all)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def main(args: argparse.Namespace) -> int:
    from shoal.eval.perplexity import DataSpec, build_eval_dataset, evaluate_loss
    from shoal.generate.command import check_output_file
    from shoal.generate.load import load_for_generation

    if args.max_samples is not None and args.max_samples < 1:
        raise ShoalError(f"--max_samples must be >= 1, got {args.max_samples}")
    output = check_output_file(args.output, args.overwrite)
    loaded = load_for_generation(args.source, device=args.device, dtype=args.dtype, which=args.checkpoint)
    for note in loaded.notes:
        print(f"shoal eval: {note}", file=sys.stderr)
    print(f"shoal eval: {loaded.description}", file=sys.stderr)
    spec = DataSpec(tuple(args.dataset_path), args.split_name, args.seq_length, args.split, args.seed,
                    args.document_mask, args.eod_mask_loss, args.pack_sequences, args.prompt_template,
                    args.system_prompt, args.max_samples)
    dataset, kind, document_mask = build_eval_dataset(spec, loaded.tokenizer)
    result = evaluate_loss(loaded.model, dataset, document_mask, kind, args.max_samples, args.batch_size)
    print(f"{'split':<12} {'samples':>8} {'loss tokens':>12} {'mean loss':>10} {'perplexity':>11}")
    print(f"{args.split_name:<12} {result.samples:>8} {result.loss_tokens:>12} {result.mean_loss:>10.4f} "
          f"{result.perplexity:>11.3f}")
    if output is not None:
        record = {"source": loaded.description, "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
                  "data": {k: v for k, v in spec.__dict__.items()}, **result.as_dict()}
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(output)
        print(f"shoal eval: wrote {output}", file=sys.stderr)
    return 0
