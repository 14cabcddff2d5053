"""A resumed run's checkpoints keep the tokenizer of the run's start, byte for byte (issue 14, item 1).

The failure this guards against: a resumed run copied `tokenizer/` from the checkpoint it resumed
from each time it saved; retention then deleted that checkpoint and every later checkpoint had no
tokenizer, so `shoal finetune` from it could not build its data and `shoal export` wrote a model
without tokenizer files. The oracle is the imported checkpoint's own `tokenizer/` folder.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, checkpoint_names, train_args


def tokenizer_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_raised_max_steps_keeps_the_tokenizer_after_retention(train_assets: TrainAssets, tmp_path: Path):
    results = tmp_path / "res"
    imported = tokenizer_bytes(train_assets.checkpoint / "tokenizer")
    assert imported  # the oracle is not empty
    # A first segment to step 2, then the same experiment raised to step 4; save_top_k=0 keeps
    # only the newest, so the step-2 checkpoint the second segment resumed from is deleted.
    assert shoal(*train_args(train_assets, "pretrain", results, "pre", "--max_steps", 2,
                             "--checkpoint.save_top_k=0")) == 0
    assert shoal(*train_args(train_assets, "pretrain", results, "pre", "--max_steps", 4,
                             "--checkpoint.save_interval=1", "--checkpoint.save_top_k=0")) == 0
    names = checkpoint_names(results / "pre")
    assert len(names) == 1 and names[0].startswith("step=000004")
    last = results / "pre" / "checkpoints" / names[0]
    assert tokenizer_bytes(last / "tokenizer") == imported

    # Fine-tuning from the later checkpoint builds its data with that tokenizer ...
    ft = train_args(train_assets, "finetune", results, "ft", "--max_steps", 1)
    ft[ft.index("--nemo_model") + 1] = str(last)
    assert shoal(*ft) == 0
    ft_ckpt = results / "ft" / "checkpoints" / checkpoint_names(results / "ft")[0]
    assert tokenizer_bytes(ft_ckpt / "tokenizer") == imported

    # ... and the export has the tokenizer files as they were imported.
    out = tmp_path / "hf"
    assert shoal("export", "--source", last, "--output_path", out) == 0
    exported = tokenizer_bytes(out)
    for name, data in imported.items():
        assert exported.get(name) == data, name
