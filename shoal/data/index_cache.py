"""Index arrays cached on disk as `.npy` files, shared safely between concurrent ranks.

Megatron's convention: a family of arrays is named `{md5}-{Class}-{split}-{array}.npy` next to
`{md5}-{Class}-{split}-description.txt`, where md5 hashes the JSON description of everything the
arrays depend on; a change of seed, sequence length, split or data gives new names. Every file is
written to a private temporary name and renamed into place, and the description goes last, so a
rank that sees a complete set never sees a partially written file, and ranks that build the same
set at the same time only overwrite each other with identical bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _atomic_save(path: str, write: Callable[[int], None]) -> None:
    """Write through a private temporary file in the same folder, then rename it into place."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        write(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other users' jobs may share the cache
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npy(fd: int, array: np.ndarray) -> None:
    with os.fdopen(fd, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _save_text(fd: int, text: str) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def load_or_build_arrays(
    cache_dir: str | None,
    base_name: str,
    description: str,
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
    is_valid: Callable[[dict[str, np.ndarray]], bool],
) -> dict[str, np.ndarray]:
    """Load `{cache_dir}/{base_name}-{name}.npy` memory-mapped, or build and save them.

    The description file is written last, so a complete set is one whose description exists;
    a set that fails to load or `is_valid` is rebuilt. An unwritable cache is only a warning.
    """
    if cache_dir is None:
        return build()
    paths = {name: os.path.join(cache_dir, f"{base_name}-{name}.npy") for name in names}
    description_path = os.path.join(cache_dir, f"{base_name}-description.txt")
    if os.path.isfile(description_path) and all(os.path.isfile(p) for p in paths.values()):
        try:
            arrays = {
                name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()
            }
            if is_valid(arrays):
                return arrays
            logger.warning("cached indices %s-* are inconsistent; rebuilding them", base_name)
        except (OSError, ValueError) as err:
            logger.warning("cannot read cached indices %s-* (%s); rebuilding them", base_name, err)
    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for name, path in paths.items():
            _atomic_save(path, lambda fd, a=arrays[name]: _save_npy(fd, a))
        _atomic_save(description_path, lambda fd: _save_text(fd, description))
    except OSError as err:
        logger.warning("cannot write index cache %s (%s); keeping indices in memory", cache_dir, err)
    return arrays


def description_hash(description: str) -> str:
    """The MD5 hex digest that names a cache family (a name, not a security measure)."""
    return hashlib.md5(description.encode("utf-8"), usedforsecurity=False).hexdigest()


