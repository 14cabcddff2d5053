"""`shoal pretrain` and `shoal finetune`, as a user types them, train the same in every layout.

Each run is `python -m shoal.cli ... --num_gpus N` in a child process: the launcher starts N CPU
ranks under torchrun (gloo), exactly the path a user's command takes. The oracle is the same
command in one process on the same data (same global batch, same imported starting weights): the
per-step losses, gradient norms and validation losses of every layout must equal it within fp32
rounding (RTOL), and a checkpoint written by one layout must resume in another on the same curve.
A rank that fails mid-training must end the whole run with its error shown (the launcher's own
test, tests/unit/launch/test_local.py, does this with a selftest program; here it is the
training loop, with the other rank waiting in a collective).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import shoal, subprocess_env
from tests.helpers.training import TrainAssets, make_train_assets, read_dcp, train_args, train_records, val_records

# fp32 with the batch reduced in another order (across ranks, across sequence or weight shards):
# the curves agree to about 1e-6 relative; 1e-5 leaves room for that and for nothing else (a wrong
# gradient reduction, a lost data position or optimizer state moves them by 1e-3 or more).
RTOL = 1e-5
STEPS = 4
# Every pretraining run saves at step 2 and keeps it (the resume test starts from it); saving and
# validating changes no training number, so the one-process oracle does the same.
SAVE_AT_2 = ["--checkpoint.save_interval=2", "--checkpoint.save_top_k=2"]
LORA = ["--peft", "lora", "--peft.rank=4", "--peft.alpha=8", "--peft.dropout=0.0", "--train.lr=1e-2"]
PEFT = {"lora": LORA, "dora": ["--peft", "dora", *LORA[2:]]}
# Variables that would make a child believe it is already a rank of some launched job.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    """A small untied Llama imported with `shoal import`, a preprocessed corpus and an instruction set."""
    return make_train_assets(tmp_path_factory.mktemp("layout_assets"))


def user_env(extra_pythonpath: Path | None = None) -> dict[str, str]:
    """The user's shell: one thread per process, and not inside any launched job."""
    env = {k: v for k, v in subprocess_env().items() if k not in RANK_ENV}
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_pythonpath), env.get("PYTHONPATH")]))
    return env


def run_command(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m shoal.cli ARGS` as the user runs it; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=env or user_env(),
                          capture_output=True, text=True, timeout=300)


def run_ok(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = run_command(args, cwd)
    assert proc.returncode == 0, f"shoal {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


class Runs:
    """Pretraining runs by name, each made once per module (the oracle serves several tests)."""

    def __init__(self, assets: TrainAssets, root: Path):
        self.assets, self.root = assets, root
        self.done: dict[str, Path] = {}

    def pretrain(self, name: str, *layout: str) -> Path:
        return self._run("pretrain", name, layout)

    def finetune(self, name: str, method: str, *layout: str) -> Path:
        """A LoRA or DoRA fine-tuning run (see PEFT)."""
        return self._run("finetune", name, (*PEFT[method], *layout))

    def _run(self, stage: str, name: str, flags: tuple[str, ...]) -> Path:
        if name not in self.done:
            run_ok(train_args(self.assets, stage, self.root, name, "--max_steps", STEPS, *SAVE_AT_2, *flags), self.root)
            self.done[name] = self.root / name
        return self.done[name]


@pytest.fixture(scope="module")
def runs(assets: TrainAssets, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(assets, tmp_path_factory.mktemp("layout_runs"))


def assert_same_curve(got: Path, expected: Path, steps: list[int]) -> None:
    """The training records of `steps` and every validation loss agree within RTOL; the learning
    rate and data position exactly (they are computed, not reduced)."""
    mine, theirs = train_records(got), train_records(expected)
    assert [s for s in steps if s in mine] == steps, f"{got.name} logged steps {sorted(mine)}"
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert math.isclose(mine[step][key], theirs[step][key], rel_tol=RTOL), \
                f"{got.name} step {step}: {key} {mine[step][key]!r} != {theirs[step][key]!r} ({expected.name})"
        for key in ("lr", "consumed_samples"):
            assert mine[step][key] == theirs[step][key], (got.name, step, key)
    vals, expected_vals = val_records(got), val_records(expected)
    assert sorted(vals) == sorted(expected_vals) and vals, (vals, expected_vals)
    for step, value in expected_vals.items():
        assert math.isclose(vals[step], value, rel_tol=RTOL), f"{got.name} val_loss at {step}: {vals[step]} != {value}"


def ranks_that_ran(experiment: Path) -> set[int]:
    return {int(p.stem[4:]) for p in (experiment / "logs").glob("rank*.log")}


# Global batch 4 in micro batches of 2, sequences of 32 tokens: every layout sees the same samples.
LAYOUTS = {
    "fsdp2": ["--num_gpus", "2"],
    "tp2_sp": ["--num_gpus", "2", "-T", "2"],
    "pp2_1f1b": ["--num_gpus", "2", "-P", "2"],  # the model's embeddings are untied
    "cp2": ["--num_gpus", "2", "-C", "2"],
    "fsdp2_tp2": ["--num_gpus", "4", "-T", "2"],
    # Micro batches of 1: two per rank per step, gradients reduced once per step or after each.
    "fsdp2_accumulate_sync_last": ["--num_gpus", "2", "--micro_batch_size", "1",
                                   "--parallel.fsdp_gradient_sync=last_micro_batch"],
    "fsdp2_accumulate_sync_every": ["--num_gpus", "2", "--micro_batch_size", "1",
                                    "--parallel.fsdp_gradient_sync=every_micro_batch"],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_pretrain_layout_matches_one_process(runs: Runs, name: str):
    layout = LAYOUTS[name]
    one = runs.pretrain("one_process")
    got = runs.pretrain(name, *layout)
    assert ranks_that_ran(got) == set(range(int(layout[1])))  # it did run as that many ranks
    assert not (one / "logs").exists()  # and the oracle as one plain process
    assert_same_curve(got, one, list(range(1, STEPS + 1)))


def rewound_to_step_2(experiment: Path, copy: Path) -> Path:
    """A copy of `experiment` as it was at step 2: its step-4 checkpoint and later records removed."""
    shutil.copytree(experiment, copy)
    shutil.rmtree(copy / "logs", ignore_errors=True)
    (step4,) = (copy / "checkpoints").glob("step=000004*")
    shutil.rmtree(step4)
    records = [line for line in (copy / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in records))
    return copy


@pytest.mark.parametrize("layout", [pytest.param([], id="one_process"),
                                    pytest.param(["--num_gpus", "2", "-T", "2"], id="tp2")])
def test_fsdp_checkpoint_resumes_in_another_layout(runs: Runs, layout: list[str], request: pytest.FixtureRequest):
    """Steps 3-4 resumed from the FSDP run's step-2 checkpoint, with data-parallel size 1 instead
    of 2: weights, optimizer moments and the position in the data must all carry over."""
    fsdp = runs.pretrain("fsdp2", *LAYOUTS["fsdp2"])
    one = runs.pretrain("one_process")
    exp = rewound_to_step_2(fsdp, runs.root / f"resume_{request.node.callspec.id}")
    args = train_args(runs.assets, "pretrain", runs.root, exp.name, "--max_steps", STEPS, *SAVE_AT_2, *layout)
    resumed = run_ok(args, runs.root)
    assert "from step=000002" in resumed.stdout + resumed.stderr  # rank 0's log is followed on stdout
    assert_same_curve(exp, fsdp, [3, 4])  # the uninterrupted FSDP run ...
    assert_same_curve(exp, one, [3, 4])  # ... and the one-process run
    assert sorted(p.name[:11] for p in (exp / "checkpoints").iterdir()) == ["step=000002", "step=000004"]


def finetune_pair(assets: TrainAssets, root: Path, layout: list[str], *extra: str) -> tuple[Path, Path]:
    """The same fine-tuning command in one process and in `layout`; returns both experiments."""
    for name, flags in (("one_process", []), ("layout", layout)):
        run_ok(train_args(assets, "finetune", root, name, "--max_steps", STEPS, *extra, *flags), root)
    return root / "layout", root / "one_process"


def test_lora_finetune_over_fsdp_matches_one_process(runs: Runs):
    # The adapters start from random A matrices: they must be the same whatever the layout.
    one = runs.finetune("lora_one_process", "lora")
    got = runs.finetune("lora_fsdp2", "lora", "--num_gpus", "2")
    assert ranks_that_ran(got) == {0, 1}
    assert_same_curve(got, one, list(range(1, STEPS + 1)))


# Run in each rank before shoal starts: output-layer rows in buckets of 16 (the test's micro-batches
# hold 64 tokens, fewer than the default bucket of 256), and a file per rank with, for every
# micro-batch, the rows its plain (FSDP or tensor-parallel) output layer ran on and the micro-batch's tokens.
LOSS_ROWS_MARKER = """
import os
from pathlib import Path
import shoal.train.engine as engine
import shoal.train.step as step
step.LOSS_POSITION_BUCKET = 16
real_loss_sum = engine.Engine._loss_sum
def _loss_sum(self, tokens, labels, loss_mask, inputs, loss_positions=None):
    if self.head_loss_fn is not None:
        return real_loss_sum(self, tokens, labels, loss_mask, inputs, loss_positions)
    rows = []  # the rows the output layer itself was called on
    hook = self.parts[0].lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
    try:
        return real_loss_sum(self, tokens, labels, loss_mask, inputs, loss_positions)
    finally:
        hook.remove()
        with open(Path(os.environ["LOSS_ROWS_MARKS"]) / f"rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(f"{sum(rows)} of {tokens.numel()}\\n")
engine.Engine._loss_sum = _loss_sum
"""


# Where the output layer runs on the answer tokens alone across ranks: FSDP (the output layer its
# own unit, the model untied: it gathers its weight in its own forward) and tensor parallelism with
# sequence parallelism (the final norm's sequence shards gathered, then the loss rows taken) or without.
LOSS_ROWS_LAYOUTS = {"fsdp2": ["--num_gpus", "2"], "tp2_sp": ["--num_gpus", "2", "-T", "2"],
                     "tp2": ["--num_gpus", "2", "-T", "2", "--parallel.sequence_parallel=false"]}


@pytest.mark.parametrize("layout", LOSS_ROWS_LAYOUTS)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_output_layer_on_loss_rows_alone_matches_one_process(runs: Runs, method: str, layout: str,
                                                             tmp_path: Path):
    # The oracle, one process, computes the output layer on every token.
    inject, marks = tmp_path / "inject", tmp_path / "marks"
    inject.mkdir(), marks.mkdir()
    (inject / "sitecustomize.py").write_text(LOSS_ROWS_MARKER)
    env = {**user_env(extra_pythonpath=inject), "LOSS_ROWS_MARKS": str(marks)}
    flags = [*SAVE_AT_2, *(PEFT[method] if method != "full" else ["--train.lr=1e-3"])]
    oracle = runs.finetune("lora_one_process", "lora") if method == "lora" else None
    if oracle is None:
        oracle = tmp_path / "res" / "one_process"
        run_ok(train_args(runs.assets, "finetune", tmp_path / "res", "one_process", "--max_steps", STEPS, *flags),
               tmp_path)
    args = train_args(runs.assets, "finetune", tmp_path / "res", layout, "--max_steps", STEPS, *flags,
                      *LOSS_ROWS_LAYOUTS[layout])
    proc = run_command(args, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = tmp_path / "res" / layout
    assert ranks_that_ran(got) == {0, 1}
    for rank in (0, 1):  # every training and validation micro-batch of each rank, on fewer rows than tokens
        rows = [tuple(map(int, line.split(" of "))) for line in (marks / f"rank{rank}").read_text().splitlines()]
        assert len(rows) >= STEPS and all(0 < n < tokens for n, tokens in rows), rows
    assert_same_curve(got, oracle, list(range(1, STEPS + 1)))


# LoRA/DoRA under tensor parallelism (sequence parallel is on by default): adapted projections are
# split with the LoRA styles of shoal/peft/tensor_parallel.py. DoRA's row norms need the
# whole row, which row-wise (o/down) projections hold only in pieces.
PEFT_TP_LAYOUTS = {
    "lora_tp2_sp": ("lora", ["--num_gpus", "2", "-T", "2"]),
    "dora_tp2_sp_selective_ac": ("dora", ["--num_gpus", "2", "-T", "2",
                                          "--parallel.activation_checkpointing=selective"]),
    "lora_fsdp2_tp2_full_ac": ("lora", ["--num_gpus", "4", "-T", "2", "--parallel.activation_checkpointing=full"]),
}


def final_checkpoint(experiment: Path) -> Path:
    (final,) = (experiment / "checkpoints").glob(f"step={STEPS:06d}*")
    return final


def exported(source: Path, out: Path, *flags: str) -> dict[str, object]:
    """`shoal export` of a checkpoint: every tensor of the written safetensors files and every JSON file."""
    from safetensors.torch import load_file

    assert shoal("export", "--source", source, "--output_path", out, *flags) == 0
    files: dict[str, object] = {}
    for path in sorted(out.iterdir()):
        if path.suffix == ".safetensors":
            files.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
        elif path.suffix == ".json":
            files[path.name] = json.loads(path.read_text())
    return files


def assert_close_files(got: dict[str, object], expected: dict[str, object], atol: float) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("name", PEFT_TP_LAYOUTS)
def test_adapter_finetune_under_tensor_parallel_matches_one_process(runs: Runs, name: str, tmp_path: Path):
    method, layout = PEFT_TP_LAYOUTS[name]
    one = runs.finetune(f"{method}_one_process", method)
    got = runs.finetune(name, method, *layout)
    assert ranks_that_ran(got) == set(range(int(layout[1])))
    # Same A at the start (step 1's gradient norm depends on it), same training.
    assert_same_curve(got, one, list(range(1, STEPS + 1)))

    # The trained adapters equal the one-process ones: AdamW at lr 1e-2 moves them by ~1e-2 a step,
    # reordered fp32 sums by ~1e-6. Only they are saved: the frozen base stays in its checkpoint.
    mine = read_dcp(final_checkpoint(got) / "model", tmp_path / "mine.pt")
    theirs = read_dcp(final_checkpoint(one) / "model", tmp_path / "theirs.pt")
    assert sorted(mine) == sorted(theirs)
    assert mine and all(".lora_" in k for k in mine)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")

    # What a user takes away is the same: the merged Hugging Face model and the PEFT adapter.
    for flags in ([], ["--adapter_only"]):
        kind = "adapter" if flags else "merged"
        assert_close_files(exported(final_checkpoint(got), tmp_path / f"{kind}_mine", *flags),
                           exported(final_checkpoint(one), tmp_path / f"{kind}_theirs", *flags), atol=1e-4)


def test_lora_checkpoint_from_tensor_parallel_resumes_in_one_process(runs: Runs):
    """Steps 3-4 resumed in one process from the TP2 LoRA run's step-2 checkpoint, whose adapters
    and AdamW moments were saved as tensor-parallel shards and copies. (Loading into a
    tensor-parallel layout is test_fsdp_checkpoint_resumes_in_another_layout[tp2].)"""
    one = runs.finetune("lora_one_process", "lora")
    tp2 = runs.finetune("lora_tp2_sp", "lora", *PEFT_TP_LAYOUTS["lora_tp2_sp"][1])
    exp = rewound_to_step_2(tp2, runs.root / "lora_resume_one_process")
    resumed = run_ok(train_args(runs.assets, "finetune", runs.root, exp.name, "--max_steps", STEPS, *SAVE_AT_2,
                                *LORA), runs.root)
    assert "from step=000002" in resumed.stdout + resumed.stderr
    assert_same_curve(exp, one, [3, 4])


def test_packed_finetune_under_context_parallel_matches_one_process(assets: TrainAssets, tmp_path: Path):
    # Sequences of 128 tokens hold two or three examples each, so the document mask decides what
    # attends to what in nearly every sequence; each context-parallel rank holds half of it.
    got, one = finetune_pair(assets, tmp_path, ["--num_gpus", "2", "-C", "2"],
                             "--seq_length", "128", "--data.pack_sequences=true", "--data.document_mask=true")
    packing = re.search(r"training\.jsonl: (\d+) examples .* packed into (\d+) sequences",
                        (got / "logs" / "rank0.log").read_text())
    assert packing, "the packing summary line is missing from rank 0's log"
    examples, sequences = map(int, packing.groups())
    assert sequences * 2 <= examples, (examples, sequences)
    assert_same_curve(got, one, list(range(1, STEPS + 1)))


# Loaded at interpreter start in every process of the run (through PYTHONPATH); only in rank 1
# it makes the second optimizer step raise, while rank 0 waits in that step's collectives.
FAIL_RANK1 = """
import os
if os.environ.get("RANK") == "1":
    import shoal.train.engine as engine
    real_step, steps = engine.Engine.clip_and_step, []
    def clip_and_step(self, *args, **kwargs):
        steps.append(None)
        if len(steps) == 2:
            raise RuntimeError("rank 1 fails on purpose at step 2")
        return real_step(self, *args, **kwargs)
    engine.Engine.clip_and_step = clip_and_step
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def test_a_rank_failing_mid_training_ends_the_run(assets: TrainAssets, tmp_path: Path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_RANK1)
    args = train_args(assets, "pretrain", tmp_path / "res", "run", "--max_steps", STEPS, "--num_gpus", "2")
    start = time.monotonic()
    proc = run_command(args, tmp_path, env=user_env(extra_pythonpath=inject))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert time.monotonic() - start < 120  # stopped, not left to the collective timeout
    # Rank 1 is named as the (first) failing rank: rank 0 only stopped because it was told to.
    assert re.search(r"rank 1 (failed|first,) with exit status 1", proc.stderr), proc.stderr[-4000:]
    assert "RuntimeError: rank 1 fails on purpose at step 2" in proc.stderr
    exp = tmp_path / "res" / "run"
    # No checkpoint was published, and neither rank is left running.
    assert not list(exp.glob("checkpoints/step=*"))
    pids = [int(m) for p in (exp / "logs").glob("rank*.log") for m in re.findall(r"\(pid (\d+)\)", p.read_text())]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_background_saves_across_ranks_equal_synchronous_ones(runs: Runs):
    """checkpoint.async_save=true on two FSDP ranks: every rank stages its shards, writes them from
    its thread over the background gloo group, and rank 0 renames once both agree. The oracle is
    the same layout saving in the step loop: the same curve and the same tensors in every checkpoint."""
    sync = runs.pretrain("fsdp2", *LAYOUTS["fsdp2"])
    got = runs.pretrain("fsdp2_async_save", *LAYOUTS["fsdp2"], "--checkpoint.async_save=true")
    assert ranks_that_ran(got) == {0, 1}
    assert train_records(got).keys() == train_records(sync).keys()
    for step, record in train_records(sync).items():
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert train_records(got)[step][key] == record[key], (step, key)
    names = sorted(p.name for p in (sync / "checkpoints").iterdir())
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == names and len(names) == 2
    for name in names:
        for folder in ("model", "optim"):
            want = read_dcp(sync / "checkpoints" / name / folder, runs.root / "a.pt")
            have = read_dcp(got / "checkpoints" / name / folder, runs.root / "b.pt")
            assert want.keys() == have.keys()
            for key in want:
                assert torch.equal(torch.as_tensor(want[key]), torch.as_tensor(have[key])), (name, folder, key)


# Rank 1's disk is full when it writes its shard of the step-2 optimizer state.
FULL_DISK_RANK1 = """
import errno, os
if os.environ.get("RANK") == "1":  # the system call of shoal's checkpoint writer threads
    import shoal.checkpoint.parallel_io as parallel_io
    real_pwrite = parallel_io._pwrite
    def pwrite(fd, data, offset):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "step=000002" in path and os.path.basename(os.path.dirname(path)) == "optim":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    parallel_io._pwrite = pwrite
"""


def test_a_background_write_failing_on_one_rank_stops_every_rank(assets: TrainAssets, tmp_path: Path):
    """The ranks agree before the rename: rank 1's failed write means no checkpoint, no temporary
    folder left, and a run that ends with the disk-full message instead of training on."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK_RANK1)
    args = train_args(assets, "pretrain", tmp_path / "res", "run", "--max_steps", 6, "--num_gpus", "2",
                      "--checkpoint.save_interval=2", "--checkpoint.async_save=true")
    start = time.monotonic()
    proc = run_command(args, tmp_path, env=user_env(extra_pythonpath=inject))
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert time.monotonic() - start < 120  # stopped, not left to the collective timeout
    said = proc.stdout + proc.stderr
    assert "could not write checkpoint" in said and "step=000002" in said and "No space left" in said, said[-4000:]
    exp = tmp_path / "res" / "run"
    assert not list((exp / "checkpoints").iterdir())
    assert max(train_records(exp)) <= 4  # stopped at the latest by the step-4 save, which waits for step 2's
