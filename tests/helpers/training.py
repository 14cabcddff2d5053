"""Training-command runs for the tests: the assets a run needs (made the way a user makes them: an
HF model folder, `shoal import`, `shoal preprocess`), a small run's arguments, and readers that do
not go through shoal's own loading code (torch's DCP converter, plain JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers.cli import shoal
from tests.helpers.hf_models import write_small_hf_model


@dataclass(frozen=True)
class TrainAssets:
    """Everything a training run needs, made once per test session."""

    root: Path
    hf_model: Path  # the "downloaded" Hugging Face model
    checkpoint: Path  # its shoal import
    data_dir: Path  # preprocessed .bin/.idx
    sft_dir: Path  # training/validation/test.jsonl


def make_train_assets(root: Path) -> TrainAssets:
    """The small model imported with `shoal import`, a preprocessed corpus and an instruction set."""
    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus

    hf = write_small_hf_model(root / "hf")  # untied embeddings: a pipeline can split it
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    write_pretraining_corpus(root / "corpus.jsonl", num_documents=200)
    assert shoal("preprocess", "--input", root / "corpus.jsonl", "--json-keys", "text", "--tokenizer", root / "ckpt",
                 "--output-prefix", root / "data" / "corpus", "--append-eod", "--workers", "1") == 0
    write_instruction_set(root / "sft", sizes=(48, 16, 16))
    return TrainAssets(root, hf, root / "ckpt", root / "data", root / "sft")


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
        "--train.limit_val_batches=1", "--data.num_workers=0", "--logging.report=false",  # plots: their own tests
        *split, *[str(e) for e in extra],
    ]


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
    """Every tensor of a DCP folder, whole, read without shoal's loader: torch's own converter for
    `.distcp` data files (checkpoints of torch's writer), the `safetensors` library for shoal's
    safetensors data files, each chunk put at the offsets its file's `DCP_SHARDING_INFO` gives
    (the format spec; a tensor saved sharded by several ranks is stored in chunks)."""
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        from safetensors import safe_open

        chunks: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        for file in safetensors_files:
            with safe_open(str(file), "pt") as f:
                sharding = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    offsets = sharding.get(key, {}).get("saved_offsets", [0] * tensor.dim())
                    chunks.setdefault(key, []).append((offsets, tensor))
        state = {}
        for key, pieces in chunks.items():
            dims = pieces[0][1].dim()
            whole = torch.empty([max(o[d] + t.shape[d] for o, t in pieces) for d in range(dims)],
                                dtype=pieces[0][1].dtype)
            for offsets, tensor in pieces:
                whole[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
            state[key] = whole
        return state
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(folder), str(scratch))
    state = torch.load(scratch, weights_only=True)
    scratch.unlink()
    return state


def write_seed_world(root: Path, preset: str, checkpoint_name: str, assets: TrainAssets) -> Path:
    """The seed's folders for a dry run: `nemo_ckpt/NAME` (the preset's shoal.json, the assets'
    tokenizer, one stand-in tensor: a dry run reads no weights), a corpus long enough for the seed's
    100 × 2048 × 8192-token run in `data/custom_dataset/preprocessed/`, and the SFT set in `data/alpaca`."""
    import shutil

    import numpy as np

    from shoal.checkpoint.format import write_metadata
    from shoal.checkpoint.model_state import save_model_state
    from shoal.data.indexed import IndexedDatasetWriter
    from shoal.models.presets import get_preset

    ckpt = root / "nemo_ckpt" / checkpoint_name
    save_model_state({"model.norm.weight": torch.ones(4)}, ckpt / "model")
    write_metadata(ckpt, get_preset(preset), "bfloat16")
    shutil.copytree(assets.checkpoint / "tokenizer", ckpt / "tokenizer")
    data = root / "data" / "custom_dataset" / "preprocessed"
    data.mkdir(parents=True)
    with IndexedDatasetWriter(data / "wikinews_text_document", dtype=np.int32) as writer:
        rng = np.random.default_rng(0)
        for _ in range(8):
            writer.add_document(rng.integers(0, 1000, size=1_000_000))
    shutil.copytree(assets.sft_dir, root / "data" / "alpaca")
    return root
