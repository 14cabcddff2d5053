"""Find and load the Hugging Face tokenizer that a data stage names.

A tokenizer is named by a Hugging Face tokenizer folder, by a shoal checkpoint (whose `tokenizer/`
folder holds the files copied from the source model), or by a Hub id (`hf://ID` or plain `org/name`,
as NeMo's `--tokenizer-type` takes it). Remote code is never run: a tokenizer that needs it is
refused with a message rather than executed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import ShoalError

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PreTrainedTokenizerBase

# Files whose presence marks a folder as a Hugging Face tokenizer folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """The local folder holding tokenizer files for `path`, or None when `path` is not local."""
    local = Path(path).expanduser()
    if not local.exists():
        return None
    if not local.is_dir():
        raise ShoalError(f"tokenizer {local} is a file; pass the folder holding tokenizer.json / "
                         f"tokenizer_config.json, or a shoal checkpoint folder")
    if (local / "shoal.json").is_file():
        if not (local / "tokenizer").is_dir():
            raise ShoalError(f"checkpoint {local} has no tokenizer/ folder; pass a tokenizer "
                             f"folder or Hub id instead")
        local = local / "tokenizer"
    if not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise ShoalError(f"no tokenizer found in {local}: expected one of "
                         f"{', '.join(_TOKENIZER_FILES)}, or a shoal checkpoint with a "
                         f"tokenizer/ folder")
    return local


def load_tokenizer(path: str | os.PathLike, token: str | None = None) -> PreTrainedTokenizerBase:
    """Load a `transformers` tokenizer from a folder, a shoal checkpoint or a Hub id.

    `token` (or HF_TOKEN in the environment) is used only for gated Hub repositories and never
    appears in messages.
    """
    from transformers import AutoTokenizer

    name = os.fspath(path)
    local = resolve_tokenizer_dir(name)
    if local is not None:
        try:
            return AutoTokenizer.from_pretrained(local, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            raise ShoalError(f"cannot load the tokenizer in {local}: {err}") from err
    repo_id = name[len("hf://"):] if name.startswith("hf://") else name
    if not _HUB_ID.match(repo_id):
        raise ShoalError(f"tokenizer {name} not found: not a local folder, and not a Hub id "
                         f"such as hf://org/name")
    token = token or os.environ.get("HF_TOKEN")
    try:
        return AutoTokenizer.from_pretrained(repo_id, trust_remote_code=False, token=token)
    except Exception as err:  # network, auth and missing-repo errors come in many types
        detail = str(err).replace(token, "***") if token else str(err)
        raise ShoalError(
            f"could not load tokenizer {repo_id!r} from the Hugging Face Hub or its local cache "
            f"({type(err).__name__}: {detail.splitlines()[0] if detail else ''}). No local folder "
            f"{name} exists either; if this machine is offline, pass a local tokenizer folder or "
            f"a shoal checkpoint") from None


def eod_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The end-of-document id appended by `--append-eod`: the tokenizer's eos id, as NeMo does."""
    if tokenizer.eos_token_id is None:
        raise ShoalError("the tokenizer has no eos_token, so --append-eod has no id to append")
    return int(tokenizer.eos_token_id)


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id `--add-bos` puts in front of each document."""
    if tokenizer.bos_token_id is None:
        raise ShoalError("the tokenizer has no bos_token, so --add-bos has no id to prepend "
                         "(Qwen tokenizers, for example, define none)")
    return int(tokenizer.bos_token_id)
