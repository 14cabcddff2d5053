"""The run's plan, decided once its data is known: steps, validation interval, warmup, tokens per step.

Two of the seed's rules depend on the run's length, so they are settled here rather than in the
recipe: `train.val_check_interval: seed` validates every fifth of the run when it is long enough
(pretraining: more than 1,000 steps; fine-tuning: more than 100), else only at the end; and a
warmup longer than the run (NeMo's recipes warm up for 2,000 and 50 steps) is cut to a tenth of
the run, with a notice, instead of never reaching the peak learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.config.recipe import TrainSection

# The seed's thresholds: validate every max_steps // 5 steps above these run lengths.
_SEED_VALIDATION_MIN_STEPS = {"pretrain": 1000, "finetune": 100}


def validation_interval(train: TrainSection, stage: str, max_steps: int) -> int | None:
    """Steps between validations (None: only at the end of the run)."""
    interval = train.val_check_interval
    if interval == "seed":
        return max_steps // 5 if max_steps > _SEED_VALIDATION_MIN_STEPS[stage] else None
    return interval


def warmup_steps(train: TrainSection, max_steps: int) -> int:
    """`train.warmup_steps`, or a tenth of the run when the warmup would not end before it does."""
    if train.warmup_steps >= max_steps:
        return max_steps // 10
    return train.warmup_steps


@dataclass(frozen=True)
class RunPlan:
    max_steps: int
    val_interval: int | None
    warmup_steps: int
    micro_batches_per_step: int
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        val = f"every {self.val_interval} steps" if self.val_interval else "at the end"
        return (f"{self.max_steps} steps of {self.tokens_per_step:,} tokens ({self.micro_batches_per_step} "
                f"micro-batches per rank per step), {self.max_steps * self.tokens_per_step:,} tokens in all; "
                f"warmup {self.warmup_steps} steps; validation {val}")


def plan_run(train: TrainSection, stage: str, max_steps: int, seq_length: int, dp_size: int,
             train_samples: int) -> RunPlan:
    notes = []
    warmup = warmup_steps(train, max_steps)
    if warmup != train.warmup_steps:
        notes.append(f"train.warmup_steps {train.warmup_steps} is not shorter than the run's {max_steps} steps; "
                     f"warming up for {warmup} steps (a tenth of the run) instead")
    if train.global_batch_size > train_samples:
        notes.append(f"the global batch ({train.global_batch_size} sequences) is larger than the training set "
                     f"({train_samples} sequences): each step reads the data {train.global_batch_size / train_samples:.1f} "
                     "times; lower --global_batch_size for a real epoch")
    return RunPlan(
        max_steps=max_steps,
        val_interval=validation_interval(train, stage, max_steps),
        warmup_steps=warmup,
        micro_batches_per_step=train.global_batch_size // (train.micro_batch_size * dp_size),
        tokens_per_step=train.global_batch_size * seq_length,
        notes=notes,
    )
