"""`--executor slurm`: write `EXPERIMENT/slurm/<job>.sbatch` and submit it with `sbatch`.

The script asks for the nodes once, in its #SBATCH header; its body `srun`s one torchrun per node
and takes everything else from Slurm's environment: the node count (`$SLURM_NNODES`), each
node's rank (`$SLURM_NODEID`) and the rendezvous host (the allocation's first node). The ranks
run the user's command without `--executor slurm`. Secrets never enter the script: they reach
the job through the environment `sbatch` exports (`--export=ALL`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from shoal.config.launch import EXECUTOR_ENV, LAUNCHED_ENV, LaunchConfig
from shoal.errors import ShoalError
from shoal.launch.command import secret_values
from shoal.launch.worker import LOG_DIR_ENV, RANK0_CONSOLE_ENV

# Seconds before the time limit at which Slurm signals the batch shell so it can requeue the job.
REQUEUE_WARNING_S = 120
SBATCH_TIMEOUT_S = 120


def job_name(cfg: LaunchConfig) -> str:
    if cfg.job_name:
        return cfg.job_name
    name = Path(cfg.experiment_dir or "shoal").name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "shoal"


def script_path(cfg: LaunchConfig) -> Path:
    return Path(cfg.experiment_dir) / "slurm" / f"{job_name(cfg)}.sbatch"


def _header(cfg: LaunchConfig, workdir: Path) -> list[str]:
    slurm_dir = Path(cfg.experiment_dir) / "slurm"
    options = [
        f"--job-name={job_name(cfg)}",
        f"--nodes={cfg.num_nodes}",  # the only place the node count is written
        "--ntasks-per-node=1",  # one torchrun per node; it starts the node's ranks
        f"--cpus-per-task={cfg.cpus_per_task or cfg.num_gpus}",
    ]
    if cfg.gpus_requested:
        options.append(f"--gpus-per-node={cfg.gpus_requested}")
    options.append(f"--time={cfg.time_limit}")
    if cfg.account:
        options.append(f"--account={cfg.account}")
    if cfg.partition:
        options.append(f"--partition={cfg.partition}")
    options += [
        f"--chdir={workdir}",
        f"--output={slurm_dir}/%x-%j.out",
        f"--error={slurm_dir}/%x-%j.err",
        "--open-mode=append",  # a requeued job adds to its files instead of overwriting them
        "--export=ALL",  # how secrets and the user's environment reach the ranks
    ]
    if cfg.requeue:
        options += ["--requeue", f"--signal=B:USR1@{REQUEUE_WARNING_S}"]
    return [f"#SBATCH {option}" for option in options]


def _srun_line(cfg: LaunchConfig, python: str, module: str, args: list[str]) -> str:
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cfg.container_image:
        srun.append(f"--container-image={cfg.container_image}")
        if cfg.container_mounts:
            srun.append(f"--container-mounts={cfg.container_mounts}")
    # The node's rank must be read on that node, hence `bash -c`; the command arrives as "$0" "$@"
    # so it needs no second layer of quoting.
    per_node = (
        'exec "$0" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" '
        f'--nproc_per_node={cfg.num_gpus} --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"'
    )
    command = [python, "-m", "shoal.launch.worker", module, *args]
    # srun does not pass the job's --cpus-per-task on to its tasks since Slurm 22.05.
    return (
        " ".join(srun) + ' --cpus-per-task="$SLURM_CPUS_PER_TASK" \\\n    bash -c '
        + shlex.quote(per_node) + " \\\n    " + shlex.join(command)
    )


def render_sbatch_script(cfg: LaunchConfig, module: str, args: list[str], *, python: str | None = None,
                         workdir: Path | None = None) -> str:
    """The batch script for `module args` on `cfg.num_nodes` nodes of `cfg.num_gpus` ranks each."""
    if python is None:
        # In a container the image's own Python runs shoal; otherwise the submitting one (shared filesystem).
        python = "python" if cfg.container_image else sys.executable
    workdir = Path.cwd() if workdir is None else workdir
    log_dir = Path(cfg.experiment_dir) / "logs"
    shown = " ".join(shlex.join([module, *args]).split("\n"))
    lines = [
        "#!/bin/bash",
        f"# Written by shoal for: python -m {shown}",
        "# Submit again with `sbatch <this file>`; the run resumes from its last checkpoint.",
        *_header(cfg, workdir),
        "set -euo pipefail",
        "",
        "# The allocation's first node hosts the rendezvous; each node learns its rank from Slurm.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"MASTER_PORT={cfg.master_port}" if cfg.master_port else
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # differs between jobs sharing a node",
        "export MASTER_ADDR MASTER_PORT",
        # Ranks know they were launched (and by what), and where their logs go.
        f"export {LAUNCHED_ENV}=1 {EXECUTOR_ENV}=slurm {RANK0_CONSOLE_ENV}=1 PYTHONUNBUFFERED=1",
        f"export {LOG_DIR_ENV}={shlex.quote(str(log_dir))}",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(cfg.env.items())),
        'echo "shoal: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s)'
        ' $SLURM_JOB_NODELIST; rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
    ]
    srun = _srun_line(cfg, python, module, args)
    if not cfg.requeue:
        lines.append(srun)
    else:
        lines += [
            "# Near the time limit Slurm sends USR1 (the --signal above): put the job back in the",
            "# queue. When it starts again, the training resumes from its last checkpoint.",
            "trap 'echo \"shoal: time limit near; requeueing job $SLURM_JOB_ID\"; "
            "scontrol requeue \"$SLURM_JOB_ID\"' USR1",
            srun + " &",
            "srun_pid=$!",
            "status=0",
            '# A trapped signal interrupts `wait`; keep waiting for srun itself.',
            'wait "$srun_pid" || status=$?',
            'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || status=$?; done',
            'exit "$status"',
        ]
    return "\n".join(lines) + "\n"


def _check_no_secret(script: str, secret_env: dict[str, str]) -> None:
    for value in secret_values(secret_env):
        if value in script:
            raise ShoalError(
                "a secret (a token given by --hf_token/--wandb_token or in HF_TOKEN/WANDB_API_KEY) appears in "
                "another argument; it would be written into the job script. Pass secrets only through "
                "those flags or variables"
            )


def submit_slurm(cfg: LaunchConfig, module: str, args: list[str], secret_env: dict[str, str]) -> int:
    """Write the script and submit it (or print it, with --dryrun); return the exit status."""
    if cfg.experiment_dir is None:
        raise ShoalError("--executor slurm needs an experiment folder for the job script and logs (--experiment)")
    script = render_sbatch_script(cfg, module, args)
    _check_no_secret(script, secret_env)
    path = script_path(cfg)
    if cfg.dryrun:
        print(script, end="")
        print(f"dry run: nothing submitted; the script would be written to {path}", file=sys.stderr)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ShoalError(
            "--executor slurm needs Slurm's `sbatch` on PATH; run this on a login node of your cluster "
            "(add --dryrun to see the job script without submitting)"
        )
    for sub in ("slurm", "logs"):  # Slurm does not create the output folder; a job writing there would vanish
        (Path(cfg.experiment_dir) / sub).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(script)
    os.replace(tmp, path)
    try:
        result = subprocess.run(
            [sbatch, "--parsable", str(path)], env={**os.environ, **secret_env},
            capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise ShoalError(f"sbatch did not answer within {SBATCH_TIMEOUT_S}s; is the Slurm controller up?") from None
    if result.returncode != 0:
        raise ShoalError(
            f"sbatch refused {path} (exit status {result.returncode}):\n{result.stderr.strip() or result.stdout.strip()}"
        )
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise ShoalError(f"sbatch answered {result.stdout.strip()!r}, not a job id; script: {path}")
    out = Path(cfg.experiment_dir) / "slurm" / f"{job_name(cfg)}-{job_id}"
    gpus = f"{cfg.gpus_requested} GPU(s)" if cfg.gpus_requested else "no GPU"
    print(f"shoal: submitted Slurm job {job_id}: {cfg.num_nodes} node(s) x {cfg.num_gpus} rank(s), {gpus} per node")
    print(f"  script: {path}")
    print(f"  output: {out}.out")
    print(f"  errors: {out}.err")
    print(f"  ranks other than 0 log to {Path(cfg.experiment_dir) / 'logs'}/rank<N>.log")
    return 0
