"""Import and export when the disk fails them (issue 14 item 9): a message naming the output and the
cause, exit status 2, and nothing half-written left behind (no temporary folder, no folder made for
the output). The failing writers stand in for the disk; where this machine lets the test mount a
tiny tmpfs, a real full file system is the oracle too.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from shoal.cli import main as shoal  # noqa: E402
from tests.helpers.hf_models import save_hf_checkpoint

torch.set_num_threads(1)

CAUSES = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only",
          errno.EDQUOT: "quota"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pristine")
    save_hf_checkpoint(root / "hf", "llama")
    assert shoal(["import", "--source", str(root / "hf"), "--output_path", str(root / "ck")]) == 0
    return root / "hf", root / "ck"


def assert_clean_failure(code: int, err: str, out: Path, root: Path, *phrases: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert str(out) in err, err
    assert not out.exists()
    assert not (root / "made").exists()  # the folders created for the output are gone again


class FailingStream:
    """A binary file whose writes fail with `code` once `budget` bytes went through."""

    def __init__(self, handle, code: int, budget: int):
        self._handle, self._code, self._budget = handle, code, budget

    def write(self, data) -> int:
        self._budget -= len(memoryview(data).cast("B"))
        if self._budget < 0:
            raise OSError(self._code, "simulated failure")
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def fail_writes(monkeypatch, code: int, budget: int) -> None:
    """Every write of a conversion (positional writes and in-kernel copies, whichever thread makes
    them) fails with `code` once `budget` bytes went through, as a full or protected disk does."""
    import threading

    import shoal.checkpoint.parallel_io as parallel_io

    left = [budget]
    lock = threading.Lock()

    def spend(nbytes: int) -> None:
        with lock:
            left[0] -= nbytes
            if left[0] < 0:
                raise OSError(code, "simulated failure")

    real_pwrite, real_copy = parallel_io._pwrite, parallel_io._copy_file_range

    def pwrite(fd, data, offset):
        spend(len(data))
        return real_pwrite(fd, data, offset)

    def copy(src, dst, count, src_offset, dst_offset):
        spend(count)
        return real_copy(src, dst, count, src_offset, dst_offset)

    monkeypatch.setattr(parallel_io, "_pwrite", pwrite)
    monkeypatch.setattr(parallel_io, "_copy_file_range", copy)


@pytest.mark.parametrize("code", list(CAUSES))
def test_export_onto_a_failing_disk(tmp_path, pristine, monkeypatch, capsys, code):
    fail_writes(monkeypatch, code, 4096)
    out = tmp_path / "made" / "deeper" / "hf"
    status = shoal(["export", "--source", str(pristine[1]), "--output_path", str(out)])
    assert_clean_failure(status, capsys.readouterr().err, out, tmp_path, CAUSES[code])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_import_onto_a_failing_disk(tmp_path, pristine, monkeypatch, capsys, code):
    fail_writes(monkeypatch, code, 2048)
    out = tmp_path / "made" / "ck"
    status = shoal(["import", "--source", str(pristine[0]), "--output_path", str(out)])
    err = capsys.readouterr().err
    assert_clean_failure(status, err, out, tmp_path)
    assert CAUSES[code] in err, err


def test_interrupted_export_leaves_nothing(tmp_path, pristine, monkeypatch, capsys):
    import shoal.convert.safetensors_io as safetensors_io

    def interrupt(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", interrupt)
    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "copy", interrupt)
    out = tmp_path / "made" / "hf"
    status = shoal(["export", "--source", str(pristine[1]), "--output_path", str(out)])
    assert status == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "made").exists()


def test_a_failed_overwrite_keeps_the_previous_output(tmp_path, pristine, monkeypatch, capsys):
    out = tmp_path / "hf"
    assert shoal(["export", "--source", str(pristine[1]), "--output_path", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    fail_writes(monkeypatch, errno.ENOSPC, 0)
    status = shoal(["export", "--source", str(pristine[1]), "--output_path", str(out), "--overwrite"])
    assert status == 2 and "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real file system that fills up (needs root and mount rights, else skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_import_and_export_onto_a_really_full_disk(full_disk, pristine, capsys):
    for command, source in (("import", pristine[0]), ("export", pristine[1])):
        out = full_disk / "made" / command
        status = shoal([command, "--source", str(source), "--output_path", str(out)])
        err = capsys.readouterr().err
        assert status == 2, err
        assert "disk full" in err or "disk is nearly full" in err, err
        assert list(full_disk.iterdir()) == []


def test_hub_download_onto_a_full_disk(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def full(repo_id, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/models--org--tiny/blobs/abc.incomplete")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    status = shoal(["import", "--source", "hf://org/tiny", "--output_path", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert status == 2 and "disk full" in err and "hf://org/tiny" in err and "abc.incomplete" in err, err
    assert not (tmp_path / "ck").exists()


def test_interrupted_import_leaves_nothing(tmp_path, pristine, monkeypatch, capsys):
    """Ctrl-C while DCP writes (inside its writer, in one of its threads) is still "interrupted"."""
    import shoal.checkpoint.parallel_io as parallel_io

    calls = []
    real = parallel_io._copy_file_range

    def interrupt(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(parallel_io, "_copy_file_range", interrupt)
    out = tmp_path / "made" / "ck"
    status = shoal(["import", "--source", str(pristine[0]), "--output_path", str(out)])
    err = capsys.readouterr().err
    assert status == 130 and "interrupted" in err, err
    assert not (tmp_path / "made").exists()


def test_an_unreadable_input_is_named_as_the_input(tmp_path, pristine, monkeypatch, capsys):
    """A read that fails midway (permission, failing disk) names the input file, not the output."""
    import shoal.checkpoint.parallel_io as parallel_io

    def unreadable(path, mode="r"):  # the source shard, opened for the copy of its bytes
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(parallel_io, "open", unreadable, raising=False)
    out = tmp_path / "made" / "ck"
    status = shoal(["import", "--source", str(pristine[0]), "--output_path", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and f"while reading {pristine[0] / 'model.safetensors'}" in err and "permission denied" in err
    assert not (tmp_path / "made").exists()
