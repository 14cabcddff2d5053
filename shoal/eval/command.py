"""`shoal eval`: a checkpoint's loss and perplexity on training data, or its lm-eval-harness scores.

    shoal eval --source CKPT|EXPERIMENT|HF_DIR --dataset_path DATA [--split_name validation]
               [--seq_length N] [--max_samples N] [--output RESULTS.json]
    shoal eval --source CKPT --tasks gsm8k --num_fewshot 5 [--apply_chat_template --fewshot_as_multiturn]
               [--include_path MY_TASKS/] [--limit N] [--output RESULTS.json]

DATA is what `shoal pretrain` or `shoal finetune` took: a folder or prefix of `.bin/.idx` files
(then `--split` chooses the documents, as in training) or a fine-tuning folder with
training/validation/test.jsonl (answer tokens only, packed as in training unless
--pack_sequences false). Give the options the run was trained with (`--seq_length`, `--split`,
`--seed`, `--document_mask`, ...) and the first N samples score exactly as its validation did.

With `--tasks`, lm-eval-harness (the optional `eval` extra) runs the tasks on the checkpoint through
shoal's backend (`shoal.eval.harness`); the results JSON goes beside the checkpoint (the
experiment's `eval/` folder for a checkpoint of an experiment) unless `--output` says where, and
the usual table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shoal.config.source import add_source_arguments
from shoal.errors import ShoalError


def _bool(text: str) -> bool:
    from shoal.convert.options import parse_bool

    return parse_bool(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--dataset_path", "--dataset-path", dest="dataset_path", nargs="+", default=None,
                        help="loss mode: .bin/.idx folder or prefix(es), or a fine-tuning folder of JSONL splits")
    parser.add_argument("--tasks", default=None, help="lm-eval mode: comma-separated task, group or tag names")
    parser.add_argument("--num_fewshot", type=int, default=None, help="lm-eval: few-shot examples per prompt")
    parser.add_argument("--apply_chat_template", action="store_true", help="lm-eval: prompts through the chat template")
    parser.add_argument("--fewshot_as_multiturn", action="store_true",
                        help="lm-eval: few-shot examples as earlier turns (with --apply_chat_template)")
    parser.add_argument("--include_path", default=None, help="lm-eval: a folder of task YAML files of your own")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: at most N documents per task")
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
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def default_results_path(loaded, source: str, tasks: list[str]) -> Path:
    """Beside the checkpoint: RESULTS/EXP/eval/<checkpoint>.lm_eval.<tasks>.json for an experiment's."""
    ckpt = loaded.checkpoint or Path(source)
    folder = ckpt.parent.parent / "eval" if ckpt.parent.name == "checkpoints" else ckpt.parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{ckpt.name}.lm_eval.{'+'.join(tasks)}.json"


def run_harness(args: argparse.Namespace) -> int:
    from shoal.generate.command import check_output_file
    from shoal.generate.load import load_for_generation

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ShoalError("--tasks needs lm-evaluation-harness: pip install 'shoal[eval]' (or pip install lm-eval)") from None
    from lm_eval.utils import handle_non_serializable, make_table

    from shoal.eval.harness import run_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ShoalError("--tasks names no task")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ShoalError(f"--include_path {args.include_path}: no such folder")
    output = check_output_file(args.output, args.overwrite)
    loaded = load_for_generation(args.source, device=args.device, dtype=args.dtype, which=args.checkpoint,
                                 base=args.base_checkpoint)
    for note in loaded.notes:
        print(f"shoal eval: {note}", file=sys.stderr)
    print(f"shoal eval: {loaded.description}", file=sys.stderr)
    results = run_tasks(loaded, tasks, args.num_fewshot, args.include_path, args.apply_chat_template,
                        args.fewshot_as_multiturn, args.limit, args.batch_size, args.seed)
    if output is None:
        output = check_output_file(str(default_results_path(loaded, args.source, tasks)), args.overwrite)
    record = {"source": loaded.description, "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
              **{k: results[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better")
                 if k in results}}
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
    tmp.replace(output)
    print(make_table(results))
    print(f"shoal eval: wrote {output}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    from shoal.eval.perplexity import DataSpec, build_eval_dataset, evaluate_loss
    from shoal.generate.command import check_output_file
    from shoal.generate.load import load_for_generation

    if (args.tasks is None) == (args.dataset_path is None):
        raise ShoalError("give --dataset_path DATA (loss and perplexity) or --tasks NAMES (lm-eval), one of the two")
    if args.tasks is not None:
        return run_harness(args)
    if args.max_samples is not None and args.max_samples < 1:
        raise ShoalError(f"--max_samples must be >= 1, got {args.max_samples}")
    output = check_output_file(args.output, args.overwrite)
    loaded = load_for_generation(args.source, device=args.device, dtype=args.dtype, which=args.checkpoint,
                                 base=args.base_checkpoint)
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
