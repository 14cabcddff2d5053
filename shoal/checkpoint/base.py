"""The base checkpoint an adapter-only checkpoint applies to: how it is recorded, found and checked.

A LoRA/DoRA training checkpoint holds only what trains (adapters, DoRA magnitudes) and its
optimizer state; the frozen base weights stay in the checkpoint the run started from. Its
`shoal.json` names that base under the key `base`:

    "base": {"path": "nemo_ckpt/Llama-3.1-8B-Instruct",            (as the user gave it)
             "resolved": "/data/nemo_ckpt/Llama-3.1-8B-Instruct",  (absolute, symlinks resolved)
             "fingerprint": {"metadata_sha256": "...", "files": {"__0_0.distcp": 16060522688}}}

The fingerprint is the SHA-256 of the base's `model/.metadata` plus the size of every file it
names. It is cheap (the metadata is kilobytes, sizes need no read) and sensitive: DCP writes a
new random `save_id` into `.metadata` on every save, so a re-import, a re-save or another model
at the same path changes it, and a truncated data file changes a size, while a `mv` or `cp -r`
of the base keeps it (file dates are left out for that reason). The base's `shoal.json` is not
hashed: it holds the time it was made and nothing about the weights that `.metadata` lacks.

A base whose `model/` has no `.metadata` (format 3: its safetensors headers describe it) is
fingerprinted by its headers instead: `metadata_sha256` is then the SHA-256 of, for every
`*.safetensors` data file sorted by name, its name, a NUL byte, and its raw header (the 8-byte
length and the JSON as stored, as far as the file holds it), and `files` the size of each of
those files. Such headers carry a random per-save `shoal_save_id`, so a re-import changes the
fingerprint as a DCP save's `save_id` does. (The key keeps its name for compatibility.)

Readers find the base at `override` (the `--checkpoint.base=PATH` key of a training run, the
`--base_checkpoint PATH` flag of export, generate, chat and eval) when given, else at the recorded
`resolved` path; either way the fingerprint must match, or a ShoalError names the base and what
differs.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

from shoal.checkpoint.data_files import METADATA_NAME, data_files
from shoal.checkpoint.format import METADATA_FILE, MODEL_DIR, read_metadata
from shoal.convert.safetensors_io import MAX_HEADER_BYTES
from shoal.errors import ShoalError

BASE_KEY = "base"
POINT_AT_IT = ("pass its new place with --base_checkpoint PATH (export, generate, chat, eval) or "
               "--checkpoint.base=PATH (training; when resuming, --nemo_model PATH does too)")


def _raw_header(path: Path) -> bytes:
    """A safetensors file's header as stored (length prefix and JSON), as much of it as the file has."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return prefix
        (length,) = struct.unpack("<Q", prefix)
        return prefix + handle.read(min(length, MAX_HEADER_BYTES))


def _headers_fingerprint(model: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    files = {}
    for path in data_files(model):
        try:
            header = _raw_header(path)
            files[path.name] = path.stat().st_size
        except OSError as err:
            raise ShoalError(f"{path}: cannot read it ({err.strerror or err})") from None
        digest.update(path.name.encode("utf-8") + b"\0" + header)
    if not files:
        raise ShoalError(f"{model}: no DCP .metadata file and no safetensors data files (incomplete or not a checkpoint)")
    return {"metadata_sha256": digest.hexdigest(), "files": files}


def fingerprint(ckpt: Path) -> dict[str, Any]:
    """{metadata_sha256, files: {data file: size}} of a checkpoint's `model/`: of `.metadata` and
    the files it names, or of the data files' raw headers without it (see the module docstring)."""
    model = Path(ckpt) / MODEL_DIR
    if not (model / METADATA_NAME).exists():
        return _headers_fingerprint(model)
    try:
        digest = hashlib.sha256((model / METADATA_NAME).read_bytes()).hexdigest()
    except OSError as err:
        raise ShoalError(f"{model}/.metadata: cannot read it ({err.strerror or err})") from None
    from shoal.checkpoint.model_state import SafeFileSystemReader  # DCP's pickle needs torch

    metadata = SafeFileSystemReader(str(model)).read_metadata()
    names = sorted({str(getattr(info, "relative_path", "")) for info in (metadata.storage_data or {}).values()})
    files = {}
    for name in names:
        path = model / name
        files[name] = path.stat().st_size if path.is_file() else None
    return {"metadata_sha256": digest, "files": files}


def base_reference(base: Path, given: str | os.PathLike | None = None) -> dict[str, Any]:
    """What an adapter-only checkpoint records of its base (the value of the `base` key)."""
    base = Path(base)
    return {"path": str(given if given is not None else base), "resolved": str(base.resolve()),
            "fingerprint": fingerprint(base)}


def recorded_base(meta: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """The `base` entry of a checkpoint's shoal.json (validated), or None for a self-contained one."""
    ref = meta.get(BASE_KEY)
    if ref is None:
        return None
    fp = ref.get("fingerprint") if isinstance(ref, dict) else None
    if not (isinstance(ref, dict) and isinstance(ref.get("resolved"), str) and isinstance(fp, dict)
            and isinstance(fp.get("metadata_sha256"), str) and isinstance(fp.get("files"), dict)):
        raise ShoalError(f"{where / METADATA_FILE}: key 'base' must be {{path, resolved, fingerprint: "
                         f"{{metadata_sha256, files}}}}, got {ref!r}")
    return ref


def is_adapter_only(ckpt: Path) -> bool:
    """Whether a checkpoint holds only trained tensors and refers to a base for the rest."""
    return recorded_base(read_metadata(ckpt), Path(ckpt)) is not None


def _differences(expected: dict[str, Any], found: dict[str, Any], hashed: str = f"{MODEL_DIR}/.metadata") -> list[str]:
    out = []
    if expected["metadata_sha256"] != found["metadata_sha256"]:
        out.append(f"{hashed} differs (SHA-256 {found['metadata_sha256'][:12]}..., recorded "
                   f"{expected['metadata_sha256'][:12]}...: the base was saved again or replaced)")
    for name in sorted(set(expected["files"]) | set(found["files"])):
        want, got = expected["files"].get(name), found["files"].get(name)
        if want != got:
            out.append(f"{MODEL_DIR}/{name} is {'missing' if got is None else f'{got} bytes'}, "
                       f"recorded {'absent' if want is None else f'{want} bytes'}")
    return out


def resolve_base(ckpt: Path, override: str | os.PathLike | None = None) -> Path | None:
    """The checked base of an adapter-only checkpoint (None when `ckpt` is self-contained).

    Raises a ShoalError naming the base path and what differs when it is missing, is no longer a
    checkpoint, or has changed since the adapters were trained on it.
    """
    ckpt = Path(ckpt)
    ref = recorded_base(read_metadata(ckpt), ckpt)
    if ref is None:
        return None
    base = Path(override).expanduser() if override is not None else Path(ref["resolved"])
    named = f"--base_checkpoint/--checkpoint.base {base}" if override is not None else f"{base}"
    intro = f"{ckpt} holds adapters only; its base checkpoint {named}"
    has_metadata = (base / MODEL_DIR / METADATA_NAME).is_file()
    if not (base / METADATA_FILE).is_file() or not (has_metadata or data_files(base / MODEL_DIR)):
        what = "does not exist" if not base.exists() else "is not a complete shoal checkpoint"
        raise ShoalError(f"{intro} {what} (recorded as {ref.get('path')!r}); if the base was moved, {POINT_AT_IT}")
    if recorded_base(read_metadata(base), base) is not None:
        raise ShoalError(f"{intro} holds adapters only itself; a base must hold the whole model")
    hashed = f"{MODEL_DIR}/.metadata" if has_metadata else f"the safetensors headers in {MODEL_DIR}/"
    differs = _differences(ref["fingerprint"], fingerprint(base), hashed)
    if differs:
        raise ShoalError(f"{intro} has changed since the adapters were trained on it: {'; '.join(differs)}. "
                         f"The adapters apply only to the weights they were trained on: restore that base, or {POINT_AT_IT}")
    return base
