"""The training recipe: one dataclass per concern, assembled into `Recipe`.

A recipe is a YAML file under `shoal/recipes/` (one per seed model plus the tiny demo) with
dotted overrides on top (`--train.lr=1e-4`, or the seed's own flags, see `shoal.config.flags`).
`shoal.config.resolve.resolve_recipe` makes every derived decision once and returns a frozen
`Recipe`: it is what `config.yaml` records, and nothing changes it afterwards. Every field is
documented here; functions receive only the section they use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shoal.config.launch import LaunchConfig
from shoal.config.parallel import ParallelConfig
from shoal.errors import ShoalError
from shoal.peft.config import LoraConfig


@dataclass(frozen=True)
class ModelSection:
    # Named architecture preset (`llama31_8b`, `llama32_1b`, ...; see shoal.models.presets). Used only
    # when no checkpoint is given (training from random weights, e.g. for benchmarks).
    preset: str | None = None
    # shoal checkpoint to start from (the seed's `--nemo_model`): an imported model, or for
    # fine-tuning the latest pretraining checkpoint when unset (see `pretrain_experiment`).
    checkpoint: str | None = None
    # The Hugging Face id the run is about (the seed's `--hf_model_id`); recorded, and used to find the
    # tokenizer when the checkpoint does not carry one.
    hf_model_id: str | None = None
    # Fine-tuning without `checkpoint`: the experiment whose latest checkpoint to start from.
    pretrain_experiment: str | None = None


@dataclass(frozen=True)
class DataSection:
    # Pretraining: a directory of `*_document.bin/.idx`, a prefix, or a weighted list `[w1, p1, w2, p2]`.
    # Fine-tuning: a directory with training.jsonl / validation.jsonl / test.jsonl.
    dataset_path: list[str] = field(default_factory=list)
    seq_length: int = 2048
    split: str = "998,1,0"  # pretraining train/valid/test split of the documents (Megatron's rule)
    seed: int = 1234
    cache_dir: str | None = None  # sample-index cache; default next to the data
    # Keep tokens of different documents from attending to each other (and restart positions).
    document_mask: bool = False
    eod_mask_loss: bool = False  # no loss on predicting the end-of-document token
    # Fine-tuning only.
    pack_sequences: bool = True  # pack several examples per sequence (first-fit decreasing)
    prompt_template: str | None = None  # a template string instead of the tokenizer's chat template
    system_prompt: str | None = None
    num_workers: int = 1  # DataLoader worker processes


@dataclass(frozen=True)
class TrainSection:
    max_steps: int | None = None  # None: one epoch over the training data
    global_batch_size: int = 32
    micro_batch_size: int = 1
    lr: float = 3e-4
    min_lr: float | None = None  # None: lr / 10
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    # Linear warmup; one that would not end before the run does is cut to a tenth of the run (logged).
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 1234
    # "bf16": bf16 compute with fp32 master weights, optimizer state and gradient reduction;
    # "fp32": everything in fp32 (the default on CPU, where bf16 is slow).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Steps between validations; None: only at the end; "seed": the seed's rule, every fifth of the run
    # when it is longer than 1,000 steps (pretraining) or 100 (fine-tuning), else at the end.
    val_check_interval: int | Literal["seed"] | None = None
    limit_val_batches: int | None = 8  # global batches per validation; None: the whole split
    log_interval: int = 1
    # FP8 matmuls through torchao (see shoal.distributed.float8 and docs/training.md): None (off),
    # "hybrid" (the seed's plain --fp8) or "e4m3"; fp8_recipe: a torchao or seed recipe name.
    fp8: str | None = None
    fp8_recipe: str | None = None


@dataclass(frozen=True)
class CheckpointSection:
    results_dir: str = "results"
    experiment: str = "default"
    save_interval: int | None = None  # steps between checkpoints; None: only at the end
    save_top_k: int = 1  # best k by validation loss are kept, plus the last
    resume: bool = True  # continue from the experiment's latest checkpoint when there is one
    # Start a new run in an experiment that has checkpoints: the old run's checkpoints and records
    # move to EXPERIMENT/runs/<n>/ first (resume=false alone is refused there; docs/training.md).
    new_run: bool = False
    # Resume although a setting that fixes what the saved data position means changed
    # (global_batch_size, seq_length, dataset_path, data seed/split, packing); refused otherwise.
    allow_changed_data: bool = False
    # False: checkpoints hold the model but not the optimizer (a third of the size for full
    # training in bf16); resuming from one restarts AdamW's moments from zero, with a warning.
    save_optimizer: bool = True
    # LoRA/DoRA runs: checkpoints hold only what trains (and its optimizer state) and name the
    # base checkpoint they apply to (docs/checkpoint-format.md); false: whole-model checkpoints.
    adapter_only: bool = True
    # Where the base of an adapter-only checkpoint now is, when it moved since it was recorded
    # (resuming, or fine-tuning from such a checkpoint); it must be the same base, unchanged.
    base: str | None = None
    # Write checkpoints in the background while training goes on (the state is first copied to
    # CPU memory; one save in flight at a time). "auto": on a GPU yes, on CPU no.
    async_save: Literal["auto", True, False] = "auto"


@dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    # report.png / report.html of the run at its end (`shoal report`; needs the `report` extra).
    report: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    wandb_name: str | None = None


@dataclass(frozen=True)
class Recipe:
    # Which command the recipe was resolved for; "pretrain" or "finetune".
    stage: Literal["pretrain", "finetune"] = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    # LoRA/DoRA adapters (fine-tuning with --peft lora|dora); None trains every weight.
    peft: LoraConfig | None = None
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        """Checks that need several sections; layout checks live in shoal.distributed."""
        t = self.train
        if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
            raise ShoalError("train.global_batch_size and train.micro_batch_size must be positive")
        if t.global_batch_size % t.micro_batch_size:
            raise ShoalError(
                f"--global_batch_size {t.global_batch_size} is not divisible by "
                f"--micro_batch_size {t.micro_batch_size}"
            )
        if t.max_steps is not None and t.max_steps <= 0:
            raise ShoalError(f"--max_steps must be positive, got {t.max_steps}")
        if t.fp8 or t.fp8_recipe:
            from shoal.distributed.float8 import check_torchao_installed, float8_plan

            # Every layout takes FP8 (tests/distributed/test_float8_tensor_parallel.py); what is
            # refused is a recipe or format torchao lacks, or a run without torchao.
            if float8_plan(t.fp8, t.fp8_recipe) is not None:
                check_torchao_installed()
        if self.parallel.cuda_graphs:
            # What a CPU run lacks is known only when it starts (shoal.train.engine.check_cuda_graphs).
            if not self.parallel.compile:
                raise ShoalError("parallel.cuda_graphs=true replays the compiled layers: set parallel.compile=true too")
            processes = self.launch.num_nodes * self.launch.num_gpus
            if processes > 1:
                raise ShoalError(f"parallel.cuda_graphs=true runs on one GPU only; this run asks for {processes} "
                                 f"(--num_nodes {self.launch.num_nodes} × --num_gpus {self.launch.num_gpus})")
        if self.data.seq_length <= 1:
            raise ShoalError(f"--seq_length must be > 1, got {self.data.seq_length}")
