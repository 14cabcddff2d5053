"""The one list of secrets shoal knows of, and the one way they are kept out of files and logs.

A secret is typed as a flag (`--hf_token X`, `--hf_token=X`, `--hf-token X`) or in NeMo's
key=value form (`hf_token=X`), or it comes from the environment (`HF_TOKEN`, `WANDB_API_KEY`).
It never enters a recipe: the launcher moves flag values into the ranks' environment
(`shoal.launch.command`), provenance records and W&B's copy of the command line go through
`redact_argv`, and `--env NAME=VALUE` refuses names that look like secrets.
"""

from __future__ import annotations

import os
import re

# flag name (without dashes, underscore spelling) -> the environment variable that carries it
SECRET_FLAGS: dict[str, str] = {"hf_token": "HF_TOKEN", "wandb_token": "WANDB_API_KEY"}
SECRET_ENV_NAMES: tuple[str, ...] = tuple(sorted(set(SECRET_FLAGS.values())))

# Environment variable names that look like credentials (refused in --env, which is written to job scripts).
_SECRET_LIKE = re.compile(r"TOKEN|SECRET|PASSW|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)

REDACTED = "***"


def secret_flag_spellings() -> dict[str, str]:
    """Every spelling of a secret flag (`--hf_token`, `--hf-token`) -> its environment variable."""
    out = {}
    for name, env in SECRET_FLAGS.items():
        out[f"--{name}"] = env
        out[f"--{name.replace('_', '-')}"] = env
    return out


def secret_flag_of(arg: str) -> str | None:
    """The secret flag `arg` sets in any of its forms (`--hf_token`, `--hf-token=..`, `hf_token=..`), else None."""
    key = arg.split("=", 1)[0]
    if not key.startswith("-"):
        if "=" not in arg:  # a bare word is a value, not a flag
            return None
        key = f"--{key}"
    return key if key in secret_flag_spellings() else None


def looks_like_secret_name(name: str) -> bool:
    return bool(_SECRET_LIKE.search(name))


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with every secret value replaced by `***`, whatever its spelling."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag = secret_flag_of(arg)
        if flag is None:
            out.append(arg)
        elif "=" in arg:
            out.append(f"{arg.split('=', 1)[0]}={REDACTED}")
        else:
            out.append(arg)
            hide_next = True
    return out


def secret(value: str | None, env: str) -> str | None:
    """A secret from its flag or environment variable; the caller keeps it in memory only."""
    return value or os.environ.get(env) or None
