"""`hf://ORG/NAME[@REVISION]` sources: download what an import needs from the Hugging Face Hub.

Only the config, the tokenizer and the safetensors weights are fetched (never `.bin` pickles or
the duplicate `consolidated.safetensors` some repos carry). The token comes from `--hf_token` or
the `HF_TOKEN` environment variable; it is handed to `huggingface_hub` and nowhere else: never
printed, logged or saved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shoal.checkpoint.format import TOKENIZER_DIRS, TOKENIZER_FILES
from shoal.errors import ShoalError, io_error

HF_SCHEME = "hf://"
DOWNLOAD_PATTERNS = [
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "model-*-of-*.safetensors", *TOKENIZER_FILES, *(f"{d}/*" for d in TOKENIZER_DIRS),
]


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return HF_SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_source(source: str) -> HubSource | None:
    """`hf://org/name[@revision]` -> HubSource; None for anything not starting with hf://."""
    if not source.startswith(HF_SCHEME):
        return None
    rest = source[len(HF_SCHEME):].strip("/")
    repo_id, _, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or not repo_id:
        raise ShoalError(f"--source {source!r}: expected hf://ORG/NAME or hf://NAME, optionally @REVISION")
    return HubSource(repo_id, revision or None)


def download(source: HubSource, token: str | None = None) -> Path:
    """Fetch the files an import needs into the Hugging Face cache and return their folder."""
    import huggingface_hub
    from huggingface_hub import errors

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        path = huggingface_hub.snapshot_download(
            source.repo_id, revision=source.revision, allow_patterns=DOWNLOAD_PATTERNS, token=token,
        )
    except errors.GatedRepoError:
        raise ShoalError(f"{source}: the repository is gated; accept its licence on huggingface.co and pass "
                         "--hf_token (or set HF_TOKEN) for an account that has access") from None
    except errors.RepositoryNotFoundError:
        raise ShoalError(f"{source}: repository not found on the Hugging Face Hub (or it is private: pass "
                         "--hf_token or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise ShoalError(f"{source}: revision {source.revision!r} not found") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError) as err:
        offline = "outgoing traffic has been disabled" in str(err) or isinstance(err, errors.OfflineModeIsEnabled)
        reason = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline
                  else "the Hugging Face Hub could not be reached")
        raise ShoalError(
            f"{source}: cannot download: {reason}, and the files are not in the local Hugging Face cache. "
            "Connect to the internet, or download the model elsewhere and pass its folder as --source"
        ) from None
    except errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise ShoalError(f"{source}: download failed (HTTP {status})") from None
    except OSError as err:  # after the Hub's own errors, some of which are OSErrors too
        raise io_error(err, f"downloading {source} into the Hugging Face cache", nothing_left=False) from None
    return Path(path)
