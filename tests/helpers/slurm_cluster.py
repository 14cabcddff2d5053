"""A real two-node Slurm cluster on localhost, for tests that submit jobs through `sbatch`.

Starts a private munge daemon, `slurmctld` and two `slurmd` (two nodes on this one machine) from
Debian's packages `slurmctld slurmd slurm-client munge`, all with their own socket, ports, state
and log folders, so two test sessions on one machine do not collide and nothing under /etc is
touched. Needs root: the job
runs as the submitting user, which `slurmd` can only do when it runs as root.

Tests take the session fixture `slurm_cluster` (tests/conftest.py), which calls `slurm_cluster_for_session`:

    def test_job(slurm_cluster):
        subprocess.run(["sbatch", ...], env=slurm_cluster.env)

When Slurm cannot be started the fixture skips the test, unless `SHOAL_REQUIRE_SLURM=1` (set by
`.ci/run`, which installs the packages) makes it fail: in CI a missing cluster is a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "srun")
PARTITION = "debug"


@dataclass
class SlurmCluster:
    """A running cluster: `env` points the Slurm commands at it (SLURM_CONF)."""

    root: Path
    conf: Path
    partition: str
    nodes: list[str]
    env: dict[str, str]
    pid_files: list[Path] = field(default_factory=list)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job_state(self, job_id: str) -> str:
        """The state Slurm reports for a job (PENDING, RUNNING, COMPLETED, FAILED, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for item in out.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for_job(self, job_id: str, timeout: float = 180.0) -> str:
        """Poll until the job leaves the queue; return its final state."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "UNKNOWN"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"Slurm job {job_id} still {state} after {timeout:.0f}s\n{self.logs()}")

    def logs(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-30:]
                parts.append(f"--- {path.name} (tail)\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons by the PIDs in their pid files, slurmd first."""
        for pid_file in reversed(self.pid_files):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 15)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our own child not reaped yet) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _free_ports(count: int) -> list[int]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for(predicate, timeout: float, what: str, cluster_root: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not happen within {timeout:.0f}s (logs in {cluster_root / 'log'})")


def why_slurm_cannot_start() -> str | None:
    """A reason the cluster cannot be started here, or None."""
    missing = [tool for tool in DAEMONS + CLIENTS + ("munge",) if shutil.which(tool) is None]
    if missing:
        return (
            f"Slurm/munge programs missing: {', '.join(missing)} "
            "(apt-get install -y slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd must run jobs as the submitting user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (it comes with Debian's munge package)"
    return None


def _node_lines(names: list[str], hostname: str, ports: list[int]) -> list[str]:
    # `slurmd -C` prints this machine's real layout; a node declared bigger than it is gets drained.
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    layout = " ".join(w for w in out.splitlines()[0].split() if not w.startswith(("NodeName=", "RealMemory=")))
    # Each node is one `slurmd -N NAME` on this machine with its own port; all share its CPUs.
    # RealMemory is set low so the node registers whatever the machine has.
    return [
        f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port} {layout} RealMemory=1000"
        for name, port in zip(names, ports)
    ]


def start_slurm_cluster(root: Path | None = None) -> SlurmCluster:
    """Start munge, slurmctld and one slurmd per node on localhost; wait until the nodes are idle."""
    reason = why_slurm_cannot_start()
    if reason:
        raise RuntimeError(reason)
    # Under /tmp rather than pytest's 0700 folders: the munge user must reach its own folder.
    root = Path(tempfile.mkdtemp(prefix="shoal-slurm-", dir=root))
    root.chmod(0o755)
    munge_user = pwd.getpwnam("munge")
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o700)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (munge_dir, key):
        os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
    munge_dir.chmod(0o755)  # clients (root, the job) connect to the socket inside it
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir()
    socket_path = munge_dir / "munge.socket"
    subprocess.run(
        [
            "munged",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ],
        user=munge_user.pw_uid,
        group=munge_user.pw_gid,
        check=True,
        capture_output=True,
        timeout=30,
    )
    hostname = socket.gethostname().split(".")[0]
    # Two nodes, so a job can span nodes. Their names must resolve (jobs use the first node's name
    # as the rendezvous address): this machine's name, and `localhost`.
    nodes = [hostname] if hostname == "localhost" else [hostname, "localhost"]
    ctld_port, *slurmd_ports = _free_ports(1 + len(nodes))
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=shoaltest",
                f"SlurmctldHost={hostname}(127.0.0.1)",
                f"SlurmctldPort={ctld_port}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={socket_path}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={root / 'state'}",
                # %n: the node name, as each node's slurmd needs its own files.
                f"SlurmdSpoolDir={root / 'spool' / '%n'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
                # No cgroups on the machines this runs on.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                "MinJobAge=600",  # keep finished jobs visible to `scontrol show job`
                *_node_lines(nodes, hostname, slurmd_ports),
                f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root=root, conf=conf, partition=PARTITION, nodes=nodes, env=env)
    cluster.pid_files = [munge_dir / "munged.pid", root / "run" / "slurmctld.pid"]
    cluster.pid_files += [root / "run" / f"slurmd-{name}.pid" for name in nodes]
    try:
        check = subprocess.run(
            f"munge -n --socket={socket_path} | unmunge --socket={socket_path}",
            shell=True, capture_output=True, text=True, timeout=30,
        )
        if "Success" not in check.stdout:
            raise RuntimeError(f"munge does not work: {check.stdout}{check.stderr}")
        # -i: ignore state left by another cluster; each daemon forks and writes its pid file.
        subprocess.run(["slurmctld", "-i", "-f", str(conf)], env=env, check=True, capture_output=True, timeout=30)
        for name in nodes:
            subprocess.run(["slurmd", "-N", name, "-f", str(conf)], env=env, check=True, capture_output=True,
                           timeout=30)

        def nodes_idle() -> bool:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            return len(states) == len(nodes) and all(state == "idle" for state in states)

        _wait_for(nodes_idle, 60, "the Slurm nodes becoming idle", root)
    except BaseException as err:
        logs = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"could not start Slurm: {err}\n{logs}") from err
    return cluster


def slurm_cluster_for_session() -> Iterator[SlurmCluster]:
    """A running two-node cluster until the generator is closed (the fixture's body); stopped then."""
    required = os.environ.get("SHOAL_REQUIRE_SLURM") == "1"
    reason = why_slurm_cannot_start()
    if reason and not required:
        pytest.skip(f"no local Slurm: {reason}")
    cluster = start_slurm_cluster()  # raises (test fails) when it cannot start
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
