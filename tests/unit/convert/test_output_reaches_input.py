"""An output that reaches its own input, however it is spelled, is refused before anything is written.

Issue 14 item 3: `shoal export --source src/ck --output_path via/ck --overwrite`, with `via` a symlink
to `src`, replaced the checkpoint by its own export; a `..` spelling lost it to a hidden `.old-*`
folder. Each variant here is one more way to name the same folder (or a folder inside it, or a
folder holding it); the oracle is the input's bytes before and after, which must not change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from shoal.cli import main as shoal  # noqa: E402
from tests.helpers.hf_models import save_hf_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny HF folder and its import, made once and copied by each test."""
    root = tmp_path_factory.mktemp("pristine")
    save_hf_checkpoint(root / "hf", "qwen2")
    assert shoal(["import", "--source", str(root / "hf"), "--output_path", str(root / "ck")]) == 0
    return root / "hf", root / "ck"


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path, pristine) -> Path:
    """tmp/src/{hf,ck}, plus tmp/via -> src (a symlink) and tmp/src/sub (a folder for `..`)."""
    hf, ck = pristine
    folder = tmp_path / "src"
    shutil.copytree(hf, folder / "hf")
    shutil.copytree(ck, folder / "ck")
    (folder / "sub").mkdir()
    (tmp_path / "via").symlink_to(folder, target_is_directory=True)
    return folder


# (command, input name under src/, how the output is spelled); {tmp} is the test's folder.
ALIASES = {
    "symlink": "{tmp}/via/{name}",
    "dotdot": "{tmp}/src/sub/../{name}",
    "trailing_slash": "{tmp}/src/{name}/",
    "relative": "src/{name}",
    "output_inside_input": "{tmp}/src/{name}/exported",
    "input_inside_output": "{tmp}/src",
    "input_inside_output_via_symlink": "{tmp}/via",
}


@pytest.mark.parametrize("command,name", [("export", "ck"), ("import", "hf")])
@pytest.mark.parametrize("alias", list(ALIASES))
def test_output_reaching_input_is_refused(tmp_path, src, monkeypatch, capsys, command, name, alias):
    monkeypatch.chdir(tmp_path)  # for the relative spelling
    before = digest(src)
    output = ALIASES[alias].format(tmp=tmp_path, name=name)
    code = shoal([command, "--source", str(src / name), "--output_path", output, "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"shoal {command}: error:" in err and "input" in err, err
    assert digest(src) == before  # not a byte of the input changed, and nothing was added to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "via"]  # no hidden .tmp-/.old- folders


def test_source_spelled_through_a_symlink_is_the_same_input(tmp_path, src, capsys):
    """The input too may be a link: `--source via/ck --output_path src/ck` is the same folder."""
    before = digest(src)
    code = shoal(["export", "--source", str(tmp_path / "via" / "ck"), "--output_path", str(src / "ck"),
                  "--overwrite"])
    assert code == 2 and "input" in capsys.readouterr().err
    assert digest(src) == before


def test_a_sibling_output_is_fine(tmp_path, src):
    """The check refuses only real overlaps: a name that merely starts like the input is another folder."""
    assert shoal(["export", "--source", str(src / "ck"), "--output_path", str(src / "ck-hf")]) == 0
    assert (src / "ck-hf" / "config.json").is_file()
    assert shoal(["import", "--source", str(src / "hf"), "--output_path", str(src / "hf2")]) == 0
    assert (src / "hf2" / "shoal.json").is_file()


def test_relative_and_absolute_spellings_of_a_real_output_still_work(tmp_path, src, monkeypatch):
    monkeypatch.chdir(src)
    assert shoal(["export", "--source", "ck", "--output_path", "out/"]) == 0
    assert (src / "out" / "model.safetensors").is_file()
    assert shoal(["export", "--source", "ck", "--output_path", str(src / "out"), "--overwrite"]) == 0
    assert not [p for p in src.iterdir() if p.name.startswith(".")]
    assert os.path.isdir(src / "ck" / "model")


def test_dotdot_through_a_folder_that_does_not_exist(tmp_path, src, capsys):
    """`src/new/../ck` names src/ck even though `new` does not exist yet: refused as the input, and a
    legitimate output spelled that way neither lands elsewhere nor leaves `new` behind."""
    before = digest(src)
    code = shoal(["export", "--source", str(src / "ck"), "--output_path", str(src / "new" / ".." / "ck"),
                  "--overwrite"])
    assert code == 2 and "is the input" in capsys.readouterr().err
    assert digest(src) == before
    assert shoal(["export", "--source", str(src / "ck"), "--output_path", str(src / "new" / ".." / "out")]) == 0
    assert (src / "out" / "config.json").is_file() and not (src / "new").exists()
