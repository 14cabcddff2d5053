"""`shoal demo`: the four stages end to end on the embedded tiny default, on CPU in a few minutes.

It plays a user's part: a "downloaded" Hugging Face model (a tiny Llama made with `transformers`),
a corpus and an instruction set written by `shoal.demo.corpus`, then exactly the commands the
README shows for a real model: import, download + preprocess, pretrain, download sft, finetune,
export, and finally `transformers` loading the export and answering held-out questions. Each
stage's command line is printed before it runs, so the demo doubles as a worked example.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from shoal.errors import ShoalError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="shoal_demo", help="where every artifact goes (default: ./shoal_demo)")
    parser.add_argument("--pretrain_steps", type=int, default=None, help="default: the tiny recipe's")
    parser.add_argument("--finetune_steps", type=int, default=None, help="default: the tiny recipe's")
    parser.add_argument("--eval_examples", type=int, default=100, help="held-out questions to score")
    parser.add_argument("--keep", action="store_true", help="reuse an existing workdir instead of starting fresh")


def _run(title: str, argv: list[str]) -> None:
    """Run one stage through the real CLI, printing it as the user would type it."""
    from shoal.cli import main as shoal_main

    print(f"\n== {title}\n$ shoal {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    rc = shoal_main(argv)
    if rc:
        raise ShoalError(f"demo stage '{title}' failed (exit {rc})")
    print(f"   ({time.perf_counter() - start:.1f}s)", flush=True)


def main(args: argparse.Namespace) -> int:
    run_demo(Path(args.workdir), args.pretrain_steps, args.finetune_steps, args.eval_examples, args.keep)
    return 0


def run_demo(workdir: Path, pretrain_steps: int | None = None, finetune_steps: int | None = None,
             eval_examples: int = 100, keep: bool = False) -> dict[str, float]:
    """The whole demo; returns the exact-match accuracy before and after fine-tuning."""
    import shutil

    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus
    from shoal.demo.evaluate import exact_match, read_rows
    from shoal.demo.tiny_model import write_tiny_hf_model

    work = Path(workdir).resolve()
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {
        "hf_model": work / "hf" / "tiny-llama",
        "imported": work / "ckpt" / "tiny-llama",
        "raw_corpus": work / "raw" / "corpus.jsonl",
        "corpus": work / "data" / "pretrain" / "json" / "corpus.jsonl",
        "preprocessed": work / "data" / "pretrain" / "preprocessed",
        "sft": work / "data" / "sft",
        "results": work / "results",
        "export": work / "hf_export" / "tiny-llama-sft",
        "export_base": work / "hf_export" / "tiny-llama-pretrained",
    }
    started = time.perf_counter()
    print(f"shoal demo: working in {work}", flush=True)

    # What a user downloads from the hub, made locally: the model and raw data.
    write_tiny_hf_model(paths["hf_model"], overwrite=True)
    write_pretraining_corpus(paths["raw_corpus"], overwrite=True)
    write_instruction_set(paths["sft"], overwrite=True)

    common = ["--recipe", "tiny", "--results_dir", str(paths["results"])]
    _run("1. import the Hugging Face model",
         ["import", "--source", str(paths["hf_model"]), "--output_path", str(paths["imported"]), "--overwrite"])
    _run("2a. download the pretraining corpus",
         ["download", "pretrain", "--dataset_name", str(paths["raw_corpus"]), "--output", str(paths["corpus"]), "--overwrite"])
    _run("2b. tokenize it into Megatron .bin/.idx",
         ["preprocess", "--input", str(paths["corpus"]), "--json-keys", "text", "--tokenizer", str(paths["imported"]),
          "--output-prefix", str(paths["preprocessed"] / "demo"), "--append-eod", "--workers", "2", "--overwrite"])
    pretrain = ["pretrain", *common, "--experiment", "demo_pretraining", "--nemo_model", str(paths["imported"]),
                "--dataset_path", str(paths["preprocessed"])]
    if pretrain_steps:
        pretrain += ["--max_steps", str(pretrain_steps)]
    _run("2c. continual pretraining", pretrain)
    finetune = ["finetune", *common, "--experiment", "demo_finetuning", "--dataset_path", str(paths["sft"])]
    if finetune_steps:
        finetune += ["--max_steps", str(finetune_steps)]
    _run("3. instruction fine-tuning (starts from the latest pretraining checkpoint)", finetune)
    _run("4. export to Hugging Face",
         ["export", "--source", str(paths["results"] / "demo_finetuning"), "--output_path", str(paths["export"]),
          "--overwrite"])
    _run("4b. export the pretrained (not fine-tuned) model, for comparison",
         ["export", "--source", str(paths["results"] / "demo_pretraining"), "--output_path", str(paths["export_base"]),
          "--overwrite"])

    print("\n== 5. load the exports with transformers and answer held-out questions", flush=True)
    rows = read_rows(paths["sft"] / "test.jsonl", eval_examples)
    base_acc, _ = exact_match(paths["export_base"], rows)
    tuned_acc, answers = exact_match(paths["export"], rows)
    for row, ans in list(zip(rows, answers))[:5]:
        mark = "ok " if ans == row["output"].strip() else "bad"
        print(f"  [{mark}] Q: {row['input']!r}\n        A: {ans!r} (expected {row['output']!r})")
    print(f"\nexact match on {len(rows)} held-out questions: before fine-tuning {100 * base_acc:.0f}%, "
          f"after {100 * tuned_acc:.0f}%")
    print(f"\nartifacts ({time.perf_counter() - started:.0f}s in all):")
    for name, path in paths.items():
        print(f"  {name:14s} {path}")
    print(f"  {'metrics':14s} {paths['results']}/<experiment>/metrics.jsonl and tensorboard/")
    return {"before": base_acc, "after": tuned_acc}
