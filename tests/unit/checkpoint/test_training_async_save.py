"""Checkpoints written in the background (checkpoint.async_save=true, forced on CPU).

Oracles: a synchronous run of the same command (same checkpoints, same loss curve), an
uninterrupted run (a run SIGKILLed during a background save resumes onto its curve), and what the
test sees on disk while the background write is held back by a hook: the step loop goes on, only
one temporary folder ever exists, and a save waits for the previous one to be published. A Ctrl-C
that lands while the loop waits for a background save ends the run only once that save's writer
has stopped (its hook records when it was let go).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import shoal.checkpoint.training as training
from shoal.checkpoint.background import BackgroundTask
from tests.helpers.checkpoint_faults import fail_writes_into
from tests.helpers.cli import run_shoal_process, shoal, shoal_stalling_at, subprocess_env
from tests.helpers.training import TrainAssets, checkpoint_names, read_dcp, train_args, train_records, val_records

ASYNC = "--checkpoint.async_save=true"
SYNC = "--checkpoint.async_save=false"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logged_steps(exp: Path) -> set[int]:
    path = exp / "metrics.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")}


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def temporaries(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith("."))


def hook_model_writes(monkeypatch: pytest.MonkeyPatch, before=None, after=None) -> list[str]:
    """Wrap the model write of every save; returns the names of the threads that wrote."""
    real_save = training.save_model_state
    threads: list[str] = []

    def save(state, model_dir, *args, **kwargs):
        threads.append(threading.current_thread().name)
        if before:
            before(Path(model_dir))
        real_save(state, model_dir, *args, **kwargs)
        if after:
            after(Path(model_dir))

    monkeypatch.setattr(training, "save_model_state", save)
    return threads


@pytest.mark.parametrize("override, cuda, cpu", [
    ("auto", True, False), ("true", True, True), ("false", False, False),
])
def test_the_setting_and_what_auto_means(override: str, cuda: bool, cpu: bool):
    from shoal.config.loader import apply_overrides, from_dict
    from shoal.config.recipe import CheckpointSection

    section = from_dict(CheckpointSection, apply_overrides({}, [f"async_save={override}"]))
    assert training.background_saves(section.async_save, torch.device("cuda")) is cuda
    assert training.background_saves(section.async_save, torch.device("cpu")) is cpu
    assert CheckpointSection().async_save == "auto"


def test_a_bad_setting_is_refused_by_name():
    from shoal.config.loader import apply_overrides, from_dict
    from shoal.config.recipe import CheckpointSection
    from shoal.errors import ShoalError

    with pytest.raises(ShoalError, match=r"checkpoint\.async_save: 'sometimes' is not one of \['auto', True, False\]"):
        from_dict(CheckpointSection, apply_overrides({}, ["async_save=sometimes"]), "checkpoint")


def test_async_run_equals_a_sync_run(train_assets: TrainAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    common = ["--max_steps", 6, "--checkpoint.save_interval=2", "--checkpoint.save_top_k=5", "--train.val_check_interval=2"]
    writers = {}

    def after_the_next_step(model_dir: Path) -> None:
        # The background write starts once the loop has taken the next optimizer step: what it
        # writes must still be the state of the checkpoint's own step (staged, not the live tensors).
        step = int(model_dir.parent.name.split("=")[1][:6])
        if step < 6:
            wait_for(lambda: step + 1 in logged_steps(tmp_path / "async" / "e"), f"step {step + 1}")

    for mode, flag in (("sync", SYNC), ("async", ASYNC)):
        writers[mode] = hook_model_writes(monkeypatch, before=after_the_next_step if mode == "async" else None)
        assert shoal(*train_args(train_assets, "pretrain", tmp_path / mode, "e", *common, flag)) == 0
        monkeypatch.undo()
    # The async run really wrote from another thread, the sync one from the step loop.
    assert writers["sync"] == ["MainThread"] * 3
    assert len(writers["async"]) == 3 and "MainThread" not in writers["async"]

    sync, background = tmp_path / "sync" / "e", tmp_path / "async" / "e"
    expected, got = train_records(sync), train_records(background)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert got[step][key] == expected[step][key], (step, key)
    assert val_records(background) == val_records(sync)

    names = checkpoint_names(sync)
    assert checkpoint_names(background) == names and len(names) == 3
    for name in names:
        a, b = sync / "checkpoints" / name, background / "checkpoints" / name
        assert json.loads((a / "trainer.json").read_text()) == json.loads((b / "trainer.json").read_text())
        meta_a, meta_b = (json.loads((c / "shoal.json").read_text()) for c in (a, b))
        for meta in (meta_a, meta_b):  # the flag itself and the clock differ
            meta["made_by"].pop("command"), meta["made_by"].pop("time")
        assert meta_a == meta_b
        assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if "distcp" not in p.name) == \
            sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if "distcp" not in p.name)
        for folder in ("model", "optim"):
            want, have = read_dcp(a / folder, tmp_path / "a.pt"), read_dcp(b / folder, tmp_path / "b.pt")
            assert want.keys() == have.keys()
            for key in want:
                assert torch.equal(torch.as_tensor(want[key]), torch.as_tensor(have[key])), (name, folder, key)


def test_loop_goes_on_and_one_save_at_a_time(train_assets: TrainAssets, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    exp = tmp_path / "res" / "e"
    ckpts = exp / "checkpoints"
    seen: dict[str, object] = {}

    def before(model_dir: Path) -> None:
        seen.setdefault("temporaries", []).append(temporaries(ckpts))
        if "step=000004" in str(model_dir):
            seen["published_before_step_4"] = checkpoint_names(exp)

    def after(model_dir: Path) -> None:
        if "step=000002" in str(model_dir):
            # Held back until the loop has trained on to step 4 and asked for the next save...
            wait_for(lambda: 4 in logged_steps(exp), "step 4 to be logged during the step-2 save")
            time.sleep(1.0)
            # ...which waits for this one: step 5 is not trained meanwhile.
            seen["logged_while_step_2_was_written"] = sorted(logged_steps(exp))

    hook_model_writes(monkeypatch, before, after)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 6,
                      "--checkpoint.save_interval=2", "--checkpoint.save_top_k=5", ASYNC)
    assert shoal(*args) == 0
    steps = [s for s in seen["logged_while_step_2_was_written"] if isinstance(s, int)]
    assert max(steps) == 4, steps
    assert all(len(t) == 1 for t in seen["temporaries"]), seen["temporaries"]  # one save in flight
    assert [n[:11] for n in seen["published_before_step_4"] if n.startswith("step=")] == ["step=000002"]
    assert [n[:11] for n in checkpoint_names(exp)] == ["step=000002", "step=000004", "step=000006"]
    assert not temporaries(ckpts)


@pytest.mark.parametrize("where", ["model", "optim"])
def test_background_write_failure_stops_the_run(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch, where: str):
    exp = tmp_path / "res" / "e"
    ckpts = exp / "checkpoints"
    seen: dict[str, dict[str, str]] = {}

    def full_disk() -> None:
        (previous,) = ckpts.glob("step=000002*")
        seen[previous.name] = tree_digest(previous)
        wait_for(lambda: 5 in logged_steps(exp), "the loop to train on during the step-4 save")
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "model":
        hook_model_writes(monkeypatch, after=lambda d: "step=000004" in str(d) and full_disk())
    else:  # the system call fails in the writer thread of one optimizer data file
        fail_writes_into(monkeypatch, lambda path: "step=000004" in str(path) and path.parent.name == "optim"
                         and path.name.startswith("__0_1"), full_disk)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 10,
                      "--checkpoint.save_interval=2", ASYNC)
    assert shoal(*args) == 2
    err = capsys.readouterr().err
    for fragment in ("error:", "could not write checkpoint", "step=000004", "No space left on device"):
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err
    # The run stopped at the latest at the next save (step 6), which waits for the failed one.
    assert 5 <= max(logged_steps(exp)) <= 6
    (name,) = seen
    assert [p.name for p in ckpts.iterdir()] == [name]  # no temporary folder, nothing after step 2
    assert tree_digest(ckpts / name) == seen[name]

    monkeypatch.undo()
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err


def test_ctrl_c_during_a_background_save(train_assets: TrainAssets, tmp_path: Path, capsys,
                                         monkeypatch: pytest.MonkeyPatch):
    exp = tmp_path / "res" / "e"
    ckpts = exp / "checkpoints"
    seen: dict[str, dict[str, str]] = {}

    def ctrl_c(model_dir: Path) -> None:
        if "step=000004" in str(model_dir):
            (previous,) = ckpts.glob("step=000002*")
            seen[previous.name] = tree_digest(previous)
            wait_for(lambda: 5 in logged_steps(exp), "the loop to train on during the step-4 save")
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches the main thread, which is training
            time.sleep(0.5)

    hook_model_writes(monkeypatch, after=ctrl_c)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 10,
                      "--checkpoint.save_interval=2", ASYNC)
    assert shoal(*args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and "could not write" not in err, err
    (name,) = seen
    assert [p.name for p in ckpts.iterdir()] == [name]  # the interrupted save dropped, as a sync one is
    assert tree_digest(ckpts / name) == seen[name]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.undo()
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err


def ctrl_c_once_the_main_thread_waits_in(function: str, module: str) -> None:
    """Ctrl-C to the main thread once it has stayed 0.3 s inside `module`'s `function`: it is then
    blocked there (in a wait), not running the Python code around it."""
    main = threading.main_thread()

    def inside() -> bool:
        frame = sys._current_frames().get(main.ident)
        while frame is not None:
            if frame.f_code.co_name == function and Path(frame.f_code.co_filename).name == module:
                return True
            frame = frame.f_back
        return False

    wait_for(inside, f"the main thread to wait in {module}:{function}")
    time.sleep(0.3)
    assert inside(), f"the main thread left {module}:{function}"
    signal.pthread_kill(main.ident, signal.SIGINT)


def test_a_ctrl_c_that_interrupts_a_wait_leaves_the_task_running_until_its_work_ends():
    # The oracle is the work itself: it ends only when the test releases it, so "done" before
    # that, or a result without it, is wrong whatever threading reports.
    release = threading.Event()
    task = BackgroundTask(lambda aborted: "written" if release.wait(60) else "timed out", name="shoal-test-task")
    task.start()
    interrupter = threading.Thread(target=ctrl_c_once_the_main_thread_waits_in, args=("wait", "background.py"))
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            task.wait()
        interrupter.join()
        assert not task.done()
    finally:
        release.set()
    assert task.result() == "written"
    assert task.done()


def test_ctrl_c_while_the_loop_waits_for_a_background_save(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                            monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C lands while the step-6 save waits for the step-4 one: the run returns only once the
    step-4 writer has stopped, so nothing of it is left to write into (or prune) the checkpoints
    of the next run in the same process."""
    exp = tmp_path / "res" / "e"
    ckpts = exp / "checkpoints"
    digests: dict[str, dict[str, str]] = {}
    held: list[float] = []

    def ctrl_c(model_dir: Path) -> None:
        if "step=000004" in str(model_dir):
            (previous,) = ckpts.glob("step=000002*")
            digests[previous.name] = tree_digest(previous)
            wait_for(lambda: 6 in logged_steps(exp), "the loop to train on to the step-6 save")
            ctrl_c_once_the_main_thread_waits_in("finish", "training.py")
            time.sleep(1.0)  # the writer goes on a while: a run that does not wait for it returns meanwhile
            held.append(time.monotonic())

    hook_model_writes(monkeypatch, after=ctrl_c)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 10,
                      "--checkpoint.save_interval=2", ASYNC)
    assert shoal(*args) == 130
    returned = time.monotonic()
    assert held and held[0] <= returned, "the interrupted run returned while its step-4 writer was still going"
    err = capsys.readouterr().err
    assert "waiting for its writer to stop" in err and "Traceback" not in err and "could not write" not in err, err
    # Once the writer's thread is gone, the folder is still as the run left it: the previous
    # checkpoint untouched, the interrupted save dropped and not published behind the run's back.
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("shoal-checkpoint-")],
             "the writer thread to end", timeout=30)
    (name,) = digests
    assert [p.name for p in ckpts.iterdir()] == [name]
    assert tree_digest(ckpts / name) == digests[name]

    monkeypatch.undo()
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err
    names = checkpoint_names(exp)  # no temporary folder, only complete checkpoints, the last of step 10
    assert names[-1].startswith("step=000010") and names[-1].endswith("-last"), names
    for n in names:
        assert json.loads((ckpts / n / "trainer.json").read_text())["step"] == int(n[5:11]), n
        assert (ckpts / n / "model" / ".metadata").is_file() and (ckpts / n / "optim" / ".metadata").is_file(), n


# Stalls the background write of the step-4 checkpoint, so the test can kill the process while the loop trains on.
STALLING_SHOAL = shoal_stalling_at(4)


def test_sigkill_during_a_background_save_resumes_on_the_same_curve(train_assets: TrainAssets, tmp_path: Path):
    common = ["--max_steps", "6", "--checkpoint.save_interval=2", "--train.val_check_interval=2"]
    reference = train_args(train_assets, "pretrain", tmp_path / "ref", "run", *common, SYNC)
    run_shoal_process(reference, tmp_path)

    args = train_args(train_assets, "pretrain", tmp_path / "res", "run", *common, ASYNC)
    exp = tmp_path / "res" / "run"
    proc = subprocess.Popen([sys.executable, "-c", STALLING_SHOAL, *args], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def stalled_and_trained_on() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}")
            return bool(list((exp / "checkpoints").glob(".step=000004*/model.stalled"))) and 6 in logged_steps(exp)

        # The step-4 write is stalled, the loop trained steps 5 and 6 and now waits for it: kill.
        wait_for(stalled_and_trained_on, "the stalled step-4 save and step 6", timeout=300)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    complete = [n for n in checkpoint_names(exp) if n.startswith("step=")]
    assert len(complete) == 1 and complete[0].startswith("step=000002"), checkpoint_names(exp)

    resumed = run_shoal_process(args, tmp_path)
    assert "resuming" in resumed.stderr and "(step 2)" in resumed.stderr
    ref_exp = tmp_path / "ref" / "run"
    expected, got = train_records(ref_exp), train_records(exp)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert got[step][key] == expected[step][key], (step, key)
    assert val_records(exp) == val_records(ref_exp)
    assert checkpoint_names(exp) == checkpoint_names(ref_exp)  # the half-written folder is gone
    (ref_last,) = (ref_exp / "checkpoints").glob("step=000006*-last")
    (last,) = (exp / "checkpoints").glob("step=000006*-last")
    ref_state, state = read_dcp(ref_last / "model", tmp_path / "a.pt"), read_dcp(last / "model", tmp_path / "b.pt")
    assert ref_state.keys() == state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], state[name]), name
