"""`shoal demo --workdir DIR` never deletes or writes into a folder it did not make.

Oracle: the user's files, compared before and after (contents and the folder listing), and
`git check-ignore` for the default folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from shoal.cli import main as shoal
from shoal.demo.run import add_arguments, run_demo
from shoal.demo.workdir import MARKER, prepare_workdir
from shoal.errors import ShoalError

ROOT = Path(__file__).resolve().parents[3]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def users_folder(tmp_path) -> Path:
    folder = tmp_path / "my_project"
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("two weeks of notes\n")
    (folder / "src" / "train.py").write_text("print('mine')\n")
    return folder


def test_the_demo_refuses_a_non_empty_folder_it_did_not_make(users_folder) -> None:
    before = _snapshot(users_folder)
    with pytest.raises(ShoalError, match="not empty and was not made by `shoal demo`") as refused:
        run_demo(users_folder)
    assert str(users_folder) in str(refused.value) and "--workdir" in str(refused.value)
    assert _snapshot(users_folder) == before  # nothing deleted, nothing added


def test_keep_does_not_open_a_foreign_folder_either(users_folder) -> None:
    before = _snapshot(users_folder)
    with pytest.raises(ShoalError, match="not made by `shoal demo`"):
        run_demo(users_folder, keep=True)
    assert _snapshot(users_folder) == before


def test_workdir_dot_in_a_non_empty_directory_is_refused_from_the_command_line(users_folder, monkeypatch, capsys) -> None:
    monkeypatch.chdir(users_folder)
    before = _snapshot(users_folder)
    assert shoal(["demo", "--workdir", "."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shoal demo: error: --workdir ") and "new or empty folder" in err
    assert _snapshot(users_folder) == before


def test_a_file_is_refused(tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("data")
    with pytest.raises(ShoalError, match="is a file"):
        prepare_workdir(target, [target / "results"])
    assert target.read_text() == "data"


def test_a_new_or_empty_folder_is_taken_and_marked(tmp_path) -> None:
    for work in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        if work.name == "empty":
            work.mkdir()
        assert prepare_workdir(work, [work / "results"]) == work.resolve()
        assert (work / MARKER).is_file()


def test_a_rerun_clears_only_the_demos_own_artifacts(tmp_path) -> None:
    work = tmp_path / "demo"
    artifacts = [work / "results", work / "ckpt", work / "summary.txt"]
    prepare_workdir(work, artifacts)
    (work / "results" / "exp").mkdir(parents=True)
    (work / "results" / "exp" / "metrics.jsonl").write_text("{}\n")
    (work / "summary.txt").write_text("old run")
    (work / "my_note.txt").write_text("keep me")  # the user's, inside the demo's folder
    prepare_workdir(work, artifacts)
    assert not (work / "results").exists() and not (work / "summary.txt").exists()
    assert (work / "my_note.txt").read_text() == "keep me"
    # --keep leaves the previous run's artifacts in place.
    (work / "results").mkdir()
    prepare_workdir(work, artifacts, keep=True)
    assert (work / "results").is_dir()


def test_a_link_among_the_artifacts_is_removed_without_following_it(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_text("x")
    work = tmp_path / "demo"
    prepare_workdir(work, [work / "results"])
    (work / "results").symlink_to(elsewhere, target_is_directory=True)
    prepare_workdir(work, [work / "results"])
    assert not (work / "results").exists() and (elsewhere / "precious.bin").read_text() == "x"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_the_default_workdir_is_ignored_by_git() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = parser.parse_args([]).workdir
    probe = subprocess.run(["git", "check-ignore", "-q", f"{default}/results/x"], cwd=ROOT)
    assert probe.returncode == 0, f"{default}/ is not in .gitignore"
