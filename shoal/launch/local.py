"""`--executor local`: several ranks on this machine through torchrun.

Every rank writes to `EXPERIMENT/logs/rank{N}.log`; rank 0's log is followed onto this terminal
as it grows, and torchrun's own messages go to `logs/torchrun.log`, so the terminal shows the
training and not the launcher. When a rank fails torchrun stops the others; we then print which
rank failed first and the end of its log, and exit with its status. A rank killed by a signal
(SIGKILL from the out-of-memory killer, say) cannot report itself, and the ranks left waiting for
it then fail with errors of their own: torchrun's summary of the failures, in its log, names the
rank that died first and how, and that rank is the one reported. Ctrl-C stops every rank.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shoal.config.launch import EXECUTOR_ENV, LAUNCHED_ENV, LaunchConfig
from shoal.errors import ShoalError
from shoal.launch.worker import LOG_DIR_ENV, STATUS_DIR_ENV, rank_log_path

TAIL_LINES = 30
# One entry of torchrun's failure summary (torch.distributed.elastic's ChildFailedError message).
_TORCHRUN_FAILURE = re.compile(
    r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")
# How long torchrun gets to stop its ranks after Ctrl-C before it is killed.
STOP_GRACE_S = 60.0


def torchrun_command(cfg: LaunchConfig, module: str, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run ... -m shoal.launch.worker MODULE ARGS...` for one node."""
    if cfg.master_port is None:
        rendezvous = ["--standalone"]  # torchrun picks a free port on localhost
    else:
        rendezvous = ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={cfg.master_port}"]
    return [
        sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={cfg.num_gpus}",
        "-m", "shoal.launch.worker", module, *args,
    ]


def describe_devices(num_processes: int) -> str:
    """Say what the ranks will run on; refuse more GPU ranks than this machine has GPUs."""
    import torch

    if not torch.cuda.is_available():
        return f"{num_processes} CPU processes (gloo; no GPU on this machine)"
    count = torch.cuda.device_count()
    if num_processes > count:
        raise ShoalError(f"--num_gpus {num_processes} but this machine has {count} GPU(s); pass --num_gpus {count} or fewer")
    return f"{num_processes} processes, one per GPU"


class _Stop(Exception):
    """SIGTERM reached the launcher: stop the ranks as for Ctrl-C."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def _on_sigterm(handler):
    """Install a SIGTERM handler, returning the previous one; only the main thread may (else a no-op)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _copy_new_output(source: Path, offset: int) -> int:
    """Write what was appended to `source` since `offset` to our stdout; return the new offset."""
    try:
        with open(source, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    if data:
        sys.stdout.flush()
        if hasattr(sys.stdout, "buffer"):  # bytes as the rank wrote them (progress bars' \r included)
            sys.stdout.buffer.write(data)
        else:
            sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} was not written)"
    return "\n".join(text.splitlines()[-lines:])


def _failures(status_dir: Path) -> list[dict]:
    """The ranks that reported a failure, first failure first."""
    records = []
    for path in status_dir.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: r["time"])


def _die_with_parent() -> None:
    """In torchrun's process, before exec: get SIGTERM if the launcher dies (Linux), so no rank is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Ask torchrun to stop its ranks (it forwards the signal), kill it if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_local(cfg: LaunchConfig, module: str, args: list[str], secret_env: dict[str, str]) -> int:
    """Run `cfg.num_gpus` ranks of `module` on this machine; return the exit status to report."""
    if cfg.experiment_dir is None:
        raise ShoalError("several local processes need an experiment folder for their logs (--experiment)")
    log_dir = Path(cfg.experiment_dir) / "logs"
    command = torchrun_command(cfg, module, args)
    if cfg.dryrun:
        print(shlex.join(command))
        print(f"dry run: nothing started; rank logs would go to {log_dir}/", file=sys.stderr)
        return 0
    devices = describe_devices(cfg.num_gpus)
    log_dir.mkdir(parents=True, exist_ok=True)
    rank0_log = rank_log_path(log_dir, 0)
    offset = rank0_log.stat().st_size if rank0_log.exists() else 0
    torchrun_log_path = log_dir / "torchrun.log"
    torchrun_offset = torchrun_log_path.stat().st_size if torchrun_log_path.exists() else 0
    print(f"shoal: starting {devices}; rank 0 below, every rank's log in {log_dir}/", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="shoal-launch-") as status_dir, \
            open(log_dir / "torchrun.log", "ab") as torchrun_log:
        env = {
            **os.environ, **cfg.env, **secret_env,
            LAUNCHED_ENV: "1", EXECUTOR_ENV: "local",
            LOG_DIR_ENV: str(log_dir), STATUS_DIR_ENV: status_dir,
            "PYTHONUNBUFFERED": "1",  # a rank's last words must reach its log before it is stopped
        }
        previous = _on_sigterm(_raise_stop)
        # Its own session: Ctrl-C reaches only us, and torchrun gets exactly one signal to stop its
        # ranks (a second one while it is stopping them would cut that short).
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=torchrun_log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        try:
            while proc.poll() is None:
                offset = _copy_new_output(rank0_log, offset)
                time.sleep(0.1)
        except (KeyboardInterrupt, _Stop):
            _stop(proc)
            _copy_new_output(rank0_log, offset)
            print("shoal: interrupted; all ranks stopped", file=sys.stderr)
            return 130
        finally:
            _on_sigterm(previous)
            if proc.poll() is None:  # an unexpected error in this loop: leave no ranks behind
                _stop(proc)
        _copy_new_output(rank0_log, offset)
        if proc.returncode == 0:
            return 0
        return _report_failure(proc.returncode, Path(status_dir), log_dir, torchrun_offset)


def _signal_death(torchrun_log: Path, offset: int, reported: frozenset[int] = frozenset()) -> tuple[int, int, int] | None:
    """(rank, signal, pid) of a rank that torchrun saw die of a signal in this run, or None.

    torchrun's summary lists the failures it observed, the first observed as the root cause. Two
    ranks seen in the same poll can tie, so the root cause may be a survivor's echo: then another
    entry killed by a signal (not SIGTERM or SIGINT, which are how ranks are stopped) is the death.
    A rank in `reported` wrote its own error first: a signal it died of afterwards (gloo's teardown
    can abort a rank whose peer vanished) is not the death either.
    """
    try:
        with open(torchrun_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    summary, found, root = text.rpartition("Root Cause (first observed failure):")
    if not found:
        return None
    entries = [(int(m.group(1)), int(m.group(2)), int(m.group(3)))
               for m in _TORCHRUN_FAILURE.finditer(root[:root.find("====")] if "====" in root else root)]
    others = [(int(m.group(1)), int(m.group(2)), int(m.group(3)))
              for m in _TORCHRUN_FAILURE.finditer(summary[summary.rfind("Failures:"):])]
    stops = (-signal.SIGTERM, -signal.SIGINT)
    for rank, code, pid in entries[:1] + [e for e in others if e[1] not in stops]:
        if code < 0 and rank not in reported:
            return rank, -code, pid
    return None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _report_signal_death(rank: int, signum: int, pid: int, failures: list[dict], log_dir: Path) -> int:
    name = _signal_name(signum)
    hint = (" SIGKILL usually comes from the out-of-memory killer (see `dmesg`, or the job's memory limit)."
            if signum == signal.SIGKILL else "")
    others = sorted({f["rank"] for f in failures if f["rank"] != rank})
    after = ""
    if others:
        which = f"Rank {others[0]}" if len(others) == 1 else f"Ranks {', '.join(map(str, others))}"
        after = f" {which} failed after it, while waiting for it: an echo of this death, not its cause."
    log = rank_log_path(log_dir, rank)
    print(f"shoal: rank {rank} was killed by signal {signum} ({name}) (pid {pid}); a killed process leaves no "
          f"error message of its own.{hint}{after} The other ranks were stopped. The end of {log}:\n{_tail(log)}",
          file=sys.stderr)
    return 128 + signum  # what a shell reports for a process killed by that signal


def _report_failure(torchrun_status: int, status_dir: Path, log_dir: Path, torchrun_offset: int = 0) -> int:
    failures = _failures(status_dir)
    killed = _signal_death(log_dir / "torchrun.log", torchrun_offset, frozenset(f["rank"] for f in failures))
    if killed is not None:
        return _report_signal_death(*killed, failures, log_dir)
    if not failures:
        # No rank reported: one was killed (out of memory?) or torchrun itself failed.
        print(
            f"shoal: the run failed (torchrun exit status {torchrun_status}); the end of "
            f"{log_dir / 'torchrun.log'}:\n{_tail(log_dir / 'torchrun.log')}",
            file=sys.stderr,
        )
        return torchrun_status or 1
    rank, code = failures[0]["rank"], failures[0]["exit_code"]
    what = f"rank {rank} failed" if len(failures) == 1 else f"{len(failures)} ranks failed, rank {rank} first,"
    if rank == 0:
        print(f"shoal: {what} with exit status {code} (its output is above); the other ranks were stopped",
              file=sys.stderr)
    else:
        log = rank_log_path(log_dir, rank)
        print(f"shoal: {what} with exit status {code}; the other ranks were stopped. The end of {log}:\n{_tail(log)}",
              file=sys.stderr)
    return code
