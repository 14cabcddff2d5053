"""`shoal pretrain` and `shoal finetune`, as a user types them, train the same in every layout.

Each run is `python -m shoal.cli ... --num_gpus N` in a child process: the launcher starts N CPU
ranks under torchrun (gloo), exactly the path a user's command takes. The oracle is the same
command in one process on the same data (same global batch, same imported starting weights): the
per-step losses, gradient norms and validation losses of every layout must equal it within fp32
rounding (RTOL), and a checkpoint written by one layout must resume in another on the same curve.
A rank that fails mid-training must end the whole run with its error shown (the launcher's own
test, tests/unit/launch/test_launch_local.py, does this with a selftest program; here it is the
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

from tests.unit.train.training_runs import (
    TrainAssets, shoal, subprocess_env, train_args, train_records, val_records, write_small_hf_model,
)

# fp32 with the batch reduced in another order (across ranks, across sequence or weight shards):
# the curves agree to about 1e-6 relative; 1e-5 leaves room for that and for nothing else (a wrong
# gradient reduction, a lost data position or optimizer state moves them by 1e-3 or more).
RTOL = 1e-5
STEPS = 4
# Every pretraining run saves at step 2 and keeps it (the resume test starts from it); saving and
# validating changes no training number, so the one-process oracle does the same.
SAVE_AT_2 = ["--checkpoint.save_interval=2", "--checkpoint.save_top_k=2"]
LORA = ["--peft", "lora", "--peft.rank=4", "--peft.alpha=8", "--peft.dropout=0.0", "--train.lr=1e-2"]
# Variables that would make a child believe it is already a rank of some launched job.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    """A small untied Llama imported with `shoal import`, a preprocessed corpus and an instruction set."""
    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus

    root = tmp_path_factory.mktemp("layout_assets")
    hf = write_small_hf_model(root / "hf")  # untied embeddings: a pipeline can split it
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    write_pretraining_corpus(root / "corpus.jsonl", num_documents=200)
    assert shoal("preprocess", "--input", root / "corpus.jsonl", "--json-keys", "text", "--tokenizer", root / "ckpt",
                 "--output-prefix", root / "data" / "corpus", "--append-eod", "--workers", "1") == 0
    write_instruction_set(root / "sft", sizes=(48, 16, 16))
    return TrainAssets(root, hf, root / "ckpt", root / "data", root / "sft")


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
        if name not in self.done:
            args = train_args(self.assets, "pretrain", self.root, name, "--max_steps", STEPS, *SAVE_AT_2, *layout)
            run_ok(args, self.root)
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
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_pretrain_layout_matches_one_process(runs: Runs, name: str):
    layout = LAYOUTS[name]
    one = runs.pretrain("one_process")
    got = runs.pretrain(name, *layout)
    assert ranks_that_ran(got) == set(range(int(layout[1])))  # it did run as that many ranks
    assert not (one / "logs").exists()  # and the oracle as one plain process
    assert_same_curve(got, one, list(range(1, STEPS + 1)))


@pytest.mark.parametrize("layout", [pytest.param([], id="one_process"),
                                    pytest.param(["--num_gpus", "2", "-T", "2"], id="tp2")])
def test_fsdp_checkpoint_resumes_in_another_layout(runs: Runs, layout: list[str], request: pytest.FixtureRequest):
    """Steps 3-4 resumed from the FSDP run's step-2 checkpoint, with data-parallel size 1 instead
    of 2: weights, optimizer moments and the position in the data must all carry over."""
    fsdp = runs.pretrain("fsdp2", *LAYOUTS["fsdp2"])
    one = runs.pretrain("one_process")
    exp = runs.root / f"resume_{request.node.callspec.id}"
    # The FSDP experiment as it was at step 2: its step-4 checkpoint and later records removed.
    shutil.copytree(fsdp, exp)
    shutil.rmtree(exp / "logs")
    (step4,) = (exp / "checkpoints").glob("step=000004*")
    shutil.rmtree(step4)
    records = [line for line in (exp / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (exp / "metrics.jsonl").write_text("".join(line + "\n" for line in records))

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


def test_lora_finetune_over_fsdp_matches_one_process(assets: TrainAssets, tmp_path: Path):
    # The adapters start from random A matrices: they must be the same whatever the layout.
    got, one = finetune_pair(assets, tmp_path, ["--num_gpus", "2"], *LORA)
    assert ranks_that_ran(got) == {0, 1}
    assert_same_curve(got, one, list(range(1, STEPS + 1)))


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
