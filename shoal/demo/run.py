"""`shoal demo`: the four stages end to end on the embedded tiny default, on CPU in a few minutes.

It plays a user's part: a "downloaded" Hugging Face model (a tiny Llama made with `transformers`),
a corpus and an instruction set written by `shoal.demo.corpus`, then exactly the commands the
README shows for a real model: import, download + preprocess, pretrain, download sft, finetune
(full, then LoRA), export, and finally `transformers` loading the exports and answering held-out
questions. Each stage's command line is printed before it runs, so the demo doubles as a worked
example.

The step counts below were measured against the learning result (README, "Set-up"): 100 pretraining
and 200 full fine-tuning steps answer 93% of the held-out questions, 80 and 120 only 47%.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from shoal.errors import ShoalError

PRETRAIN_STEPS = 100
FINETUNE_STEPS = 200
LORA_STEPS = 200
# Adapters start as a zero update and change the weights only through low-rank products: they need
# a larger step than the full fine-tune's (2e-3 in the tiny recipe). On every linear layer, as
# NeMo's default (measured better than q/k/v/o alone here).
LORA_LR = 5e-3
LORA_TARGETS = "all-linear"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="shoal_demo",
                        help="where every artifact goes: a new or empty folder, or one an earlier demo made "
                             "(default: ./shoal_demo)")
    parser.add_argument("--pretrain_steps", type=int, default=PRETRAIN_STEPS,
                        help=f"pretraining steps (default {PRETRAIN_STEPS})")
    parser.add_argument("--finetune_steps", type=int, default=FINETUNE_STEPS,
                        help=f"full fine-tuning steps (default {FINETUNE_STEPS})")
    parser.add_argument("--lora_steps", type=int, default=LORA_STEPS,
                        help=f"LoRA fine-tuning steps; 0 skips the LoRA run (default {LORA_STEPS})")
    parser.add_argument("--eval_examples", type=int, default=100, help="held-out questions to score (default 100)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores not already busy, at least 1)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the previous demo run's artifacts in --workdir instead of starting fresh")


def main(args: argparse.Namespace) -> int:
    run_demo(Path(args.workdir), args.pretrain_steps, args.finetune_steps, args.eval_examples, args.keep,
             lora_steps=args.lora_steps, threads=args.threads)
    return 0


def idle_cores(sample_seconds: float = 0.5) -> int:
    """Cores this process may use minus those other processes keep busy right now, at least 1.

    torch's CPU threads wait for each other at every operation: on a shared machine, one more thread
    than there are free cores makes each step several times slower (measured: 30 pretraining steps
    took 6 min with 2 threads, 1.8 min with 1, on 2 cores with a load of 12).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cores(sample_seconds)
    return max(1, min(cores, round(cores - busy)))


def _busy_cores(sample_seconds: float) -> float:
    """Cores in use over a short sample (Linux /proc/stat), else the 1-minute load average."""
    def times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies; idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(sample_seconds)
        total1, idle1 = times()
        online = os.cpu_count() or 1
        return online * (1 - (idle1 - idle0) / max(1, total1 - total0))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _run(title: str, argv: list[str], timings: dict[str, float]) -> None:
    """Run one stage through the real CLI, printing it as the user would type it."""
    from shoal.cli import main as shoal_main

    print(f"\n== {title}\n$ shoal {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    rc = shoal_main(argv)
    if rc:
        raise ShoalError(f"demo stage '{title}' failed (exit {rc})")
    timings[title] = time.perf_counter() - start
    print(f"   ({timings[title]:.1f}s)", flush=True)


def demo_paths(work: Path) -> dict[str, Path]:
    """Every artifact of the demo, under `work`."""
    return {
        "hf_model": work / "hf" / "tiny-llama",
        "imported": work / "ckpt" / "tiny-llama",
        "raw_corpus": work / "raw" / "corpus.jsonl",
        "corpus": work / "data" / "pretrain" / "json" / "corpus.jsonl",
        "preprocessed": work / "data" / "pretrain" / "preprocessed",
        "sft": work / "data" / "sft",
        "results": work / "results",
        "export": work / "hf_export" / "tiny-llama-sft",
        "export_lora": work / "hf_export" / "tiny-llama-lora",
        "export_base": work / "hf_export" / "tiny-llama-pretrained",
        "prompts": work / "use" / "prompts.jsonl",
        "answers": work / "use" / "answers.jsonl",
        "eval_task": work / "use" / "eval_task",
        "eval_results": work / "use" / "eval_demo_qa.json",
    }


def _training_flags(steps: int) -> list[str]:
    """The demo's run length, as any user would set it: a flag and two recipe overrides."""
    # One validation and one checkpoint, at the end: the tiny recipe's every-50-steps adds time
    # and shows nothing more here.
    return ["--max_steps", str(steps), f"--train.val_check_interval={steps}", f"--checkpoint.save_interval={steps}",
            # Batches are slices of a memory-mapped file: a loader process only competes for the two cores.
            "--data.num_workers=0"]


def run_demo(workdir: Path, pretrain_steps: int = PRETRAIN_STEPS, finetune_steps: int = FINETUNE_STEPS,
             eval_examples: int = 100, keep: bool = False, lora_steps: int = LORA_STEPS,
             threads: int | None = None) -> dict[str, float]:
    """The whole demo; returns the exact-match accuracy before fine-tuning ("before"), after full
    fine-tuning ("after") and, when lora_steps > 0, after LoRA ("lora"), and its "seconds"."""
    import torch

    from shoal.demo.workdir import prepare_workdir

    work = Path(workdir).resolve()
    paths = demo_paths(work)
    tops = {work / p.relative_to(work).parts[0] for p in paths.values()}
    work = prepare_workdir(work, sorted(tops), keep=keep)  # refuses a folder the demo did not make
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or idle_cores())
    try:
        return _run_stages(paths, pretrain_steps, finetune_steps, lora_steps, eval_examples)
    finally:
        torch.set_num_threads(previous_threads)  # the caller's setting, e.g. a test session's


def _run_stages(paths: dict[str, Path], pretrain_steps: int, finetune_steps: int, lora_steps: int,
                eval_examples: int) -> dict[str, float]:
    import torch

    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus
    from shoal.demo.evaluate import exact_match, read_rows
    from shoal.demo.tiny_model import write_tiny_hf_model

    started = time.perf_counter()
    print(f"shoal demo: working in {paths['results'].parent} ({torch.get_num_threads()} CPU threads)", flush=True)

    # What a user downloads from the hub, made locally: the model and raw data.
    write_tiny_hf_model(paths["hf_model"], overwrite=True)
    write_pretraining_corpus(paths["raw_corpus"], overwrite=True)
    write_instruction_set(paths["sft"], overwrite=True)

    timings: dict[str, float] = {}
    common = ["--recipe", "tiny", "--results_dir", str(paths["results"])]
    _run("1. import the Hugging Face model",
         ["import", "--source", str(paths["hf_model"]), "--output_path", str(paths["imported"]), "--overwrite"], timings)
    _run("2a. download the pretraining corpus",
         ["download", "pretrain", "--dataset_name", str(paths["raw_corpus"]), "--output", str(paths["corpus"]),
          "--overwrite"], timings)
    _run("2b. tokenize it into Megatron .bin/.idx",
         ["preprocess", "--input", str(paths["corpus"]), "--json-keys", "text", "--tokenizer", str(paths["imported"]),
          "--output-prefix", str(paths["preprocessed"] / "demo"), "--append-eod", "--workers", "2", "--overwrite"],
         timings)
    _run("2c. continual pretraining",
         ["pretrain", *common, "--experiment", "demo_pretraining", "--nemo_model", str(paths["imported"]),
          "--dataset_path", str(paths["preprocessed"]), *_training_flags(pretrain_steps)], timings)
    _run("3a. full fine-tuning (starts from the latest pretraining checkpoint)",
         ["finetune", *common, "--experiment", "demo_finetuning", "--dataset_path", str(paths["sft"]),
          *_training_flags(finetune_steps)], timings)
    if lora_steps:
        _run("3b. LoRA fine-tuning (adapters on the same pretrained model)",
             ["finetune", *common, "--experiment", "demo_lora", "--peft", "lora",
              f"--peft.target_modules={LORA_TARGETS}", "--lr", str(LORA_LR),
              "--dataset_path", str(paths["sft"]), *_training_flags(lora_steps)], timings)
    _run("4a. export the full fine-tune to Hugging Face",
         ["export", "--source", str(paths["results"] / "demo_finetuning"), "--output_path", str(paths["export"]),
          "--overwrite"], timings)
    if lora_steps:
        _run("4b. export the LoRA fine-tune (adapters merged into the weights)",
             ["export", "--source", str(paths["results"] / "demo_lora"), "--output_path", str(paths["export_lora"]),
              "--overwrite"], timings)
    _run("4c. export the pretrained (not fine-tuned) model, for comparison",
         ["export", "--source", str(paths["results"] / "demo_pretraining"), "--output_path", str(paths["export_base"]),
          "--overwrite"], timings)

    print("\n== 5. load the exports with transformers and answer held-out questions", flush=True)
    start = time.perf_counter()
    rows = read_rows(paths["sft"] / "test.jsonl", eval_examples)
    accuracy = {"before": exact_match(paths["export_base"], rows)[0]}
    accuracy["after"], answers = exact_match(paths["export"], rows)
    if lora_steps:
        accuracy["lora"] = exact_match(paths["export_lora"], rows)[0]
    timings["5. evaluate"] = time.perf_counter() - start
    for row, ans in list(zip(rows, answers))[:5]:
        mark = "ok " if ans == row["output"].strip() else "bad"
        print(f"  [{mark}] Q: {row['input']!r}\n        A: {ans!r} (expected {row['output']!r})")
    print(f"\nexact match on {len(rows)} held-out questions:")
    print(f"  before fine-tuning (pretrained only) {100 * accuracy['before']:3.0f}%")
    print(f"  after full fine-tuning               {100 * accuracy['after']:3.0f}%")
    if lora_steps:
        print(f"  after LoRA fine-tuning               {100 * accuracy['lora']:3.0f}%")

    # Use and judge the fine-tuned checkpoint with shoal itself, without exporting it.
    _use_and_judge(paths, rows, timings)

    total = time.perf_counter() - started
    print(closing_summary(paths, timings, total), flush=True)
    return {**accuracy, "seconds": total}


# Held-out questions scored by `shoal eval` through lm-eval (its generation loop, shoal's model).
EVAL_TASK_QUESTIONS = 30


def _use_and_judge(paths: dict[str, Path], rows: list[dict[str, str]], timings: dict[str, float]) -> None:
    """`shoal generate` answers a few held-out questions, `shoal eval` scores a local lm-eval task."""
    import importlib.util
    import json

    from shoal.demo.eval_task import TASK_NAME, write_task

    paths["prompts"].parent.mkdir(parents=True, exist_ok=True)
    paths["prompts"].write_text("".join(json.dumps({"prompt": r["input"], "expected": r["output"]}, ensure_ascii=False)
                                        + "\n" for r in rows[5:8]), encoding="utf-8")
    finetuned = str(paths["results"] / "demo_finetuning")
    _run("6a. answer questions with the fine-tuned checkpoint (no export needed)",
         ["generate", "--source", finetuned, "--prompts", str(paths["prompts"]), "--chat", "--greedy",
          "--max_new_tokens", "24", "--output", str(paths["answers"]), "--overwrite"], timings)
    for row, line in zip(rows[5:8], paths["answers"].read_text(encoding="utf-8").splitlines()):
        print(f"  Q: {row['input']!r}\n  A: {json.loads(line)['completion']!r} (expected {row['output']!r})")
    if importlib.util.find_spec("lm_eval") is None:
        print("\n(shoal eval --tasks needs lm-eval: pip install 'shoal[eval]'; skipped)")
        return
    write_task(paths["eval_task"], paths["sft"] / "test.jsonl", limit=EVAL_TASK_QUESTIONS)
    _run(f"6b. score the fine-tuned checkpoint on a local lm-eval task ({EVAL_TASK_QUESTIONS} held-out questions)",
         ["eval", "--source", finetuned, "--tasks", TASK_NAME, "--include_path", str(paths["eval_task"]),
          "--apply_chat_template", "--output", str(paths["eval_results"]), "--overwrite"], timings)


def closing_summary(paths: dict[str, Path], timings: dict[str, float], total: float) -> str:
    """The demo's last lines: time per stage, where every artifact is, and how to look at the runs."""
    lines = [f"\ntime per stage ({total:.0f}s in all):"]
    lines += [f"  {seconds:6.1f}s  {100 * seconds / max(total, 1e-9):3.0f}%  {title}" for title, seconds in timings.items()]
    lines.append("\nartifacts:")
    lines += [f"  {name:14s} {path}" for name, path in paths.items() if path.exists()]
    lines.append(f"  {'metrics':14s} {paths['results']}/<experiment>/metrics.jsonl (one JSON record per logged step)")
    reports = sorted(paths["results"].glob("*/report.html"))
    if reports:
        lines.append(f"  {'reports':14s} " + "\n                 ".join(str(r) for r in reports)
                     + "  (loss, learning rate, gradient norm, throughput; shoal report EXPERIMENT)")
    lines.append(f"\ntraining curves: tensorboard --logdir {shlex.quote(str(paths['results']))}")
    lines.append("  (TensorBoard is an extra: pip install 'shoal[tensorboard]')")
    return "\n".join(lines)
