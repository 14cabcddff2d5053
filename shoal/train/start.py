"""Where a run starts: resume the experiment's latest checkpoint, or start from given weights.

Everything a run needs to know about its start is read here once, before data or model are built:
the model's shape (checked against `--model` and `--seq_length`), the tokenizer (its bytes, which
every checkpoint of the run will carry), what the start checkpoint recorded that the run's
checkpoints must keep (generation config, the source model's dtype), and the base checkpoint a
LoRA/DoRA run's adapter-only checkpoints refer to (checked here, before anything is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.checkpoint import format as ckpt_format
from shoal.checkpoint.base import base_reference, recorded_base, resolve_base
from shoal.checkpoint.catalog import CheckpointInfo, latest_checkpoint, resolve_checkpoint
from shoal.checkpoint.runs import check_new_run, check_resumed_settings, segment_settings
from shoal.config.recipe import CheckpointSection, ModelSection, Recipe
from shoal.errors import ShoalError
from shoal.models import ModelConfig, get_preset
from shoal.train.vocabulary import check_data_fits, check_tokenizer_fits

_SHAPE = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")


@dataclass(frozen=True)
class StartPoint:
    model_config: ModelConfig
    resume: CheckpointInfo | None = None  # the experiment's own checkpoint to continue from
    weights: Path | None = None  # the checkpoint whose weights a new run loads (None: random init)
    tokenizer_dir: Path | None = None  # for building the data, read before any checkpoint is saved
    tokenizer: dict[str, bytes] | None = None  # copied into every checkpoint of the run
    extra: dict[str, Any] = field(default_factory=dict)
    # The base an adapter-only checkpoint of this run would name (`shoal.checkpoint.base`): the
    # given weights, or the base of an adapter-only start; None when resuming a self-contained one.
    base: dict[str, Any] | None = None
    base_path: Path | None = None  # that base, checked; where a resumed adapter-only checkpoint's base is
    notes: tuple[str, ...] = ()  # said once by the run's first rank

    @property
    def checkpoint(self) -> Path | None:
        return self.resume.path if self.resume else self.weights


def _shape(cfg: ModelConfig) -> str:
    return (f"hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, "
            f"vocab {cfg.vocab_size}")


def _given_weights(model: ModelSection) -> Path | None:
    if model.checkpoint is None:
        return None
    try:
        return resolve_checkpoint(model.checkpoint)
    except ShoalError as err:
        raise ShoalError(f"--nemo_model: {err}") from None


def find_start(model: ModelSection, checkpoint: CheckpointSection, experiment_dir: Path) -> StartPoint:
    # A new run (checkpoint.new_run) never continues the old one, whose records it moves aside.
    resume_wanted = checkpoint.resume and not checkpoint.new_run
    resume = latest_checkpoint(experiment_dir / "checkpoints") if resume_wanted else None
    weights = _given_weights(model)
    ckpt = resume.path if resume else weights
    if ckpt is not None:
        cfg = ckpt_format.read_model_config(ckpt)
        if resume is not None and weights is not None:
            # Resuming ignores --nemo_model; one of another shape means the user meant another run.
            given = ckpt_format.read_model_config(weights)
            if any(getattr(given, k) != getattr(cfg, k) for k in _SHAPE):
                raise ShoalError(
                    f"experiment {experiment_dir} has checkpoints of another model than --nemo_model "
                    f"{model.checkpoint} (hidden {cfg.hidden_size} vs {given.hidden_size}, layers {cfg.num_layers} "
                    f"vs {given.num_layers}, vocab {cfg.vocab_size} vs {given.vocab_size}); use a new --experiment "
                    "to start from it"
                )
        if model.preset:
            preset = get_preset(model.preset)
            if any(getattr(preset, k) != getattr(cfg, k) for k in _SHAPE):
                raise ShoalError(
                    f"checkpoint {ckpt} holds a model of another shape ({_shape(cfg)}) than the preset "
                    f"{model.preset} ({_shape(preset)}); drop --model/--model_size or pass the matching checkpoint"
                )
        meta = ckpt_format.read_metadata(ckpt)
        extra = dict(meta.get("extra") or {})
        extra.setdefault("source_dtype", meta["dtype"])
        tok_dir = ckpt / ckpt_format.TOKENIZER_DIR
        has_tokenizer = tok_dir.is_dir() and bool(ckpt_format.tokenizer_files(tok_dir))
        override = checkpoint.base
        if override is None and resume is not None and weights is not None and _moved_base_is(weights, ckpt):
            override = str(weights)  # resuming with --nemo_model naming the base where it now is
        base_path, base, notes = _base_of_start(ckpt, meta, resume is not None, override)
        if resume is None and base_path is not None:
            weights = base_path  # an adapter-only start: its base's weights, the adapters start anew
        return StartPoint(cfg, resume, None if resume else weights, tok_dir if has_tokenizer else None,
                          ckpt_format.snapshot_tokenizer(ckpt) if has_tokenizer else None, extra,
                          base, base_path, notes)
    if model.preset:
        return StartPoint(get_preset(model.preset))
    raise ShoalError("no model to train: pass --nemo_model CKPT (an imported checkpoint) or --model PRESET")


def _moved_base_is(candidate: Path, ckpt: Path) -> bool:
    """Whether an adapter-only `ckpt`'s recorded base is gone or changed while `candidate` is it."""
    try:
        resolve_base(ckpt)
        return False
    except ShoalError:
        pass
    try:
        return resolve_base(ckpt, candidate) is not None
    except ShoalError:
        return False


def _base_of_start(ckpt: Path, meta: dict[str, Any], resuming: bool, override: str | None
                   ) -> tuple[Path | None, dict[str, Any] | None, tuple[str, ...]]:
    """(checked base path, reference for the run's checkpoints, notes) of a start checkpoint.

    An adapter-only checkpoint passes its base on (checked, or moved to `override`); a
    self-contained one given as weights is the base itself. A resumed self-contained checkpoint
    (a LoRA run saved before adapter-only checkpoints) has none: its run goes on saving whole ones.
    """
    base_path = resolve_base(ckpt, override)
    if base_path is None:
        return None, (None if resuming else base_reference(ckpt)), ()
    recorded = recorded_base(meta, ckpt)
    given = override if override is not None else recorded.get("path", recorded["resolved"])
    notes = () if resuming else (
        f"{ckpt} holds adapters only: this run starts from the weights of its base {base_path}; its adapters "
        "are not merged in (as for a self-contained LoRA checkpoint). To continue from the adapted model, "
        "export it merged and import the export",)
    return base_path, base_reference(base_path, given), notes


def check_start(start: StartPoint, seq_length: int) -> None:
    if seq_length > start.model_config.max_position_embeddings:
        raise ShoalError(
            f"--seq_length {seq_length} exceeds what the model supports "
            f"(max_position_embeddings {start.model_config.max_position_embeddings})"
        )


def check_segment(recipe: Recipe, start: StartPoint, experiment_dir: Path, world_size: int,
                  layout: dict[str, int], *, verbose: bool) -> dict[str, Any]:
    """The checks a run segment passes before anything is built or written: a new run in an
    experiment with checkpoints only when asked for, token ids the model can embed, and a resume
    with the data settings its data position was counted in. Returns the segment's settings."""
    check_new_run(recipe, experiment_dir)
    if recipe.stage == "finetune" and start.checkpoint is None:
        raise ShoalError("no model to fine-tune: a new run starts from given weights; pass --nemo_model CKPT")
    vocab = start.model_config.vocab_size
    check_tokenizer_fits(start.tokenizer_dir, vocab)
    if recipe.stage == "pretrain" and recipe.data.dataset_path:
        check_data_fits(list(recipe.data.dataset_path), vocab, verbose=verbose)
    settings = segment_settings(recipe, world_size, layout)
    if start.resume is not None:
        check_resumed_settings(recipe, experiment_dir, settings, start.resume.step, verbose=verbose)
    return settings
