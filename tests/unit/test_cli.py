"""The `shoal` command line as a new user meets it: --version, typos in flags, --help texts.

Oracles: the installed package's metadata for the version, the shipped recipe files for the
recipes the help must list, and the flags each command really defines (a suggestion must name one).
"""

from __future__ import annotations

import importlib.metadata
import re
from importlib import resources

import pytest

from shoal.cli import main

WORKFLOW = ["import", "download", "preprocess", "pretrain", "finetune", "export"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `shoal ARGV`, whether it returns or exits."""
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_version_prints_the_installed_version_and_not_the_help(capsys) -> None:
    rc, out, err = run(["--version"], capsys)
    assert rc == 0
    assert out.strip() == f"shoal {importlib.metadata.version('shoal')}"
    assert "usage:" not in out + err


def test_no_arguments_prints_the_help_and_succeeds(capsys) -> None:
    rc, out, _ = run([], capsys)
    assert rc == 0 and out.startswith("usage: shoal")


def test_unknown_command_is_refused_with_the_command_list(capsys) -> None:
    rc, _, err = run(["pretrian"], capsys)
    assert rc == 2
    assert "invalid choice" in err and "pretrain" in err


@pytest.mark.parametrize(
    "argv, usage, suggestion",
    [
        (["pretrain", "--dataset_pth", "x"], "usage: shoal pretrain", "--dataset_path"),
        (["finetune", "--global_batch_sise=8"], "usage: shoal finetune", "--global_batch_size"),
        (["import", "--sorce", "x", "--output_path", "y"], "usage: shoal import", "--source"),
        (["download", "sft", "--output-dri", "x", "--dataset_name", "y"], "usage: shoal download sft", "--output-dir"),
        # Training commands take no abbreviations: the full name is suggested.
        (["pretrain", "--exec", "slurm"], "usage: shoal pretrain", "--executor"),
        # NeMo's key=value form, misspelt the same way.
        (["pretrain", "dataset_pth=x"], "usage: shoal pretrain", "--dataset_path"),
    ],
)
def test_a_misspelt_flag_gets_the_commands_usage_and_a_suggestion(argv, usage, suggestion, capsys) -> None:
    rc, out, err = run(argv, capsys)
    assert rc == 2
    assert err.startswith(usage), err
    assert f"did you mean {suggestion}?" in err, err
    assert "usage: shoal [-h]" not in err  # not the top-level usage


def test_a_value_is_not_taken_for_a_misspelt_flag(capsys) -> None:
    # `--env NAME=VALUE` looks like NeMo's key=value form; it is the value of --env.
    rc, _, err = run(["pretrain", "--env", "dataset_pth=1", "--zzzzzz"], capsys)
    assert rc == 2 and "did you mean" not in err


def test_an_unknown_flag_with_nothing_close_still_names_it(capsys) -> None:
    rc, _, err = run(["pretrain", "--zzzzzz"], capsys)
    assert rc == 2
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err


def _help(command: str, capsys) -> str:
    rc, out, _ = run([command, "--help"], capsys)
    assert rc == 0
    return out


def test_pretrain_offers_no_adapters_and_refuses_peft(capsys) -> None:
    assert "--peft" not in _help("pretrain", capsys)
    assert "--peft" in _help("finetune", capsys)
    rc, _, err = run(["pretrain", "--peft", "lora", "--dataset_path", "x"], capsys)
    assert rc == 2 and "--peft" in err


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_help_lists_the_shipped_recipes_and_the_override_form(command, capsys) -> None:
    text = _help(command, capsys)
    shipped = sorted(p.name[: -len(".yaml")] for p in (resources.files("shoal") / "recipes").iterdir()
                     if p.name.endswith(".yaml"))
    assert shipped, "no recipe shipped"
    for name in shipped:
        assert re.search(rf"\b{name}\b", text), f"recipe {name} missing from `shoal {command} --help`"
    assert "--section.key=value" in text
    assert "--train.lr=" in text  # a worked example of the form


def test_top_level_help_describes_the_workflow_in_order(capsys) -> None:
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    import shoal.cli

    assert shoal.cli.__doc__.splitlines()[0] not in out  # the module's note to developers
    # The command list (one `  name  help` line each) follows the workflow.
    listed = [m.group(1) for m in re.finditer(r"^ {4}(\w+)\s{2,}", out, re.MULTILINE)]
    assert [c for c in listed if c in WORKFLOW] == WORKFLOW, listed
    assert "shoal demo" in out  # where a new user starts
