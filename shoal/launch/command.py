"""The command each rank runs: the user's own command line, minus what must not reach the ranks.

Two kinds of things are taken out. The launcher's own choices: `--executor slurm`, so a rank never
submits the job again, `--dryrun`, so the job script is one that runs, and `--num_nodes/-N`, which
the ranks learn from torchrun (the node count is stated once, where the job asks for its nodes; see
`launch_config_from_args`). And secrets
(`--hf_token`, `--wandb_token`), whose values would otherwise land in the sbatch script and in
every process listing: they travel in the environment instead, as `HF_TOKEN` and `WANDB_API_KEY`,
the variables the training commands (and the Hugging Face and W&B libraries) already read.
"""

from __future__ import annotations

import os

from shoal.config.secrets import SECRET_ENV_NAMES, secret_flag_spellings

# flag spelling -> environment variable that carries its value to the ranks
SECRET_FLAGS: dict[str, str] = secret_flag_spellings()
LAUNCHER_ONLY_FLAGS = ("--executor", "--num_nodes", "--num-nodes", "-N")
LAUNCHER_ONLY_SWITCHES = ("--dryrun", "--dry-run")


def _take_option(args: list[str], flags: tuple[str, ...] | dict[str, str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove `--flag value` and `--flag=value` for the given flags; return what is left and what was taken."""
    kept: list[str] = []
    taken: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, sep, value = arg.partition("=")
        if not name.startswith("-") and sep:  # NeMo style `executor=slurm`, as shoal.cli reads it
            name = f"--{name}"
        if name in flags and sep:
            taken.append((name, value))
        elif arg[:2] in flags and len(arg) > 2 and not arg.startswith("--"):  # `-N2`
            taken.append((arg[:2], arg[2:]))
        elif arg in flags and i + 1 < len(args):
            taken.append((arg, args[i + 1]))
            i += 1
        elif arg == "--":  # everything after `--` is positional: leave it alone
            kept += args[i:]
            break
        else:
            kept.append(arg)
        i += 1
    return kept, taken


def rank_arguments(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """From a `sys.argv`-like list (argv[0] ignored), the ranks' arguments and the secret environment.

    Flags are found as `--flag value`, `--flag=value` and NeMo's `flag=value`, the forms
    `shoal.cli` accepts; the rest of the command line is passed on as it was typed.
    """
    args = [a for a in argv[1:] if a not in LAUNCHER_ONLY_SWITCHES]
    args, _ = _take_option(args, LAUNCHER_ONLY_FLAGS)
    args, secrets = _take_option(args, SECRET_FLAGS)
    env = {SECRET_FLAGS[flag]: value for flag, value in secrets}
    return args, env


def secret_values(extra_env: dict[str, str]) -> list[str]:
    """Every secret this launch knows of (flags and environment), to check that none is written out."""
    values = list(extra_env.values()) + [os.environ.get(name, "") for name in SECRET_ENV_NAMES]
    return [v for v in values if len(v) >= 8]  # shorter ones are no real token, and match by chance
