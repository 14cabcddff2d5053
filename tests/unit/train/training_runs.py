"""Helpers for the training-command tests: a small HF model, shoal runs in and out of process, and
readers that do not go through shoal's own loading code (torch's DCP converter, plain JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# The test model: the demo tokenizer (vocabulary 1024, Llama 3 specials) on a smaller Llama than the
# demo's, so each training step takes milliseconds.
SMALL_LLAMA_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class TrainAssets:
    """Everything a training run needs, made once per test session."""

    root: Path
    hf_model: Path  # the "downloaded" Hugging Face model
    checkpoint: Path  # its shoal import
    data_dir: Path  # preprocessed .bin/.idx
    sft_dir: Path  # training/validation/test.jsonl


def write_small_hf_model(out_dir: Path, seed: int = 0, **shape_changes) -> Path:
    """A randomly initialised small Llama with the demo tokenizer, written by `transformers`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoal.demo.tiny_model import tiny_llama_config
    from shoal.demo.tokenizer import TOKENIZER_DIR

    ids = tiny_llama_config()  # only for the tokenizer's vocabulary size and special ids
    config = LlamaConfig(vocab_size=ids.vocab_size, bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                         pad_token_id=ids.pad_token_id, **{**SMALL_LLAMA_SHAPE, **shape_changes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    return out_dir


def shoal(*args: object) -> int:
    """`shoal ARGS` in this process; returns the exit code."""
    from shoal.cli import main

    return main([str(a) for a in args])


def train_args(assets: TrainAssets, stage: str, results: Path, experiment: str, *extra: object) -> list[str]:
    """A small run of `shoal pretrain|finetune`: sequences of 32 (pretrain) or 64 tokens, global
    batch 4 in micro batches of 2, fp32, constant warmup-free start, a log record every step."""
    data = assets.data_dir if stage == "pretrain" else assets.sft_dir
    seq = 32 if stage == "pretrain" else 64
    # The corpus is small: give validation 5% of its documents (0.1%, the default, is none of them).
    split = ["--data.split=95,5,0"] if stage == "pretrain" else []
    return [
        stage, "--recipe", "tiny", "--results_dir", str(results), "--experiment", experiment,
        "--nemo_model", str(assets.checkpoint), "--dataset_path", str(data), "--seq_length", str(seq),
        "-g", "4", "-m", "2", "--train.log_interval=1", "--train.precision=fp32", "--train.warmup_steps=0",
        "--train.limit_val_batches=1", "--data.num_workers=0", *split, *[str(e) for e in extra],
    ]


def subprocess_env() -> dict[str, str]:
    """One thread per process, so results do not depend on how busy the machine is."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    return env


def run_shoal_process(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m shoal.cli ARGS` as a child process; fails the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"shoal {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def read_metrics(experiment_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (experiment_dir / "metrics.jsonl").read_text().splitlines() if line]


def train_records(experiment_dir: Path) -> dict[int, dict]:
    """step -> the training record (loss, lr, grad_norm, ...) of that step."""
    return {r["step"]: r for r in read_metrics(experiment_dir) if "loss" in r}


def val_records(experiment_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(experiment_dir) if "val_loss" in r}


def checkpoint_names(experiment_dir: Path) -> list[str]:
    return sorted(p.name for p in (experiment_dir / "checkpoints").iterdir())


def read_dcp(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, read by torch's own converter (not shoal's loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(folder), str(scratch))
    state = torch.load(scratch, weights_only=True)
    scratch.unlink()
    return state
