"""The `shoal` command: one sub-command per stage. Thin on purpose: parse, then call the stage.

Each stage module provides `main(args) -> int | None` and, unless `OPTIONS` names another
torch-free module for it, `add_arguments(parser)`. A command's stage module is imported only once
its arguments have parsed, so `shoal --help` and `shoal COMMAND --help` never import torch or
transformers (tests/unit/test_cli_startup.py), and optional dependencies are loaded only by the
stage that needs them.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import logging
import re
import sys
import textwrap
from importlib import resources

from shoal.errors import ShoalError

# command -> (module, one-line help). Add a command here only when it works.
COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("shoal.convert.importer", "import a Hugging Face checkpoint into a shoal checkpoint"),
    "export": ("shoal.convert.exporter", "export a shoal checkpoint to a Hugging Face checkpoint"),
    "download": ("shoal.data.download", "download a pretraining corpus or an instruction set"),
    "preprocess": ("shoal.data.preprocess", "tokenize JSONL into Megatron .bin/.idx files"),
    "pretrain": ("shoal.train.pretrain", "continual pretraining on .bin/.idx data"),
    "finetune": ("shoal.train.finetune", "instruction fine-tuning, full or LoRA/DoRA"),
    "generate": ("shoal.generate.command", "generate text from a checkpoint, an experiment or a Hugging Face folder"),
    "chat": ("shoal.generate.chat", "talk with a checkpoint in the terminal, turn by turn"),
    "eval": ("shoal.eval.command", "loss and perplexity on training data, or lm-eval-harness tasks"),
    "report": ("shoal.report", "plots and a summary table of a training run (PNG and HTML)"),
    "plan": ("shoal.plan.command", "memory, speed and layouts of a training command line, before running it"),
    "demo": ("shoal.demo.run", "run the four stages end to end on the embedded tiny default"),
}

# command -> "module:function" that adds its flags, for commands whose stage module imports torch:
# the flags live in a module that does not, so `--help` and a bad flag are answered at once.
# The module that defines a command's flags also says whether it takes dotted recipe overrides
# (`ACCEPTS_OVERRIDES`).
OPTIONS: dict[str, str] = {
    "import": "shoal.convert.options:add_import_arguments",
    "export": "shoal.convert.options:add_export_arguments",
    "pretrain": "shoal.config.flags:add_pretrain_arguments",
    "finetune": "shoal.config.flags:add_finetune_arguments",
    "plan": "shoal.plan.options:add_arguments",
}

# The order `shoal --help` lists commands in: a model's life, first to last. Commands not named
# here follow in COMMANDS order.
WORKFLOW_ORDER = ("import", "download", "preprocess", "pretrain", "finetune", "export")

DESCRIPTION = """\
Take a Hugging Face language model through its training life, with NeMo's command-line flags:
import it, download and tokenize a corpus, continually pretrain, fine-tune (full, LoRA or DoRA),
and export it back to a Hugging Face checkpoint.

New here? `shoal demo` runs every stage on a tiny model on CPU.
`shoal COMMAND --help` gives each command's flags."""

_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")
_DOTTED_OVERRIDE = re.compile(r"^--[A-Za-z_]\w*\.[\w.]+=")


def normalize_argv(argv: list[str], options: set[str] | None = None) -> list[str]:
    """Accept NeMo-CLI style `key=value` arguments (`source=hf://x output_path=y`) as `--key=value`.

    With `options` (the command's option strings), only words naming one of them, or a dotted
    recipe key, are rewritten, so a value such as `--env NAME=VALUE` passes through untouched.
    """
    out = []
    for i, a in enumerate(argv):
        key = a.split("=", 1)[0]
        follows_option = i > 0 and argv[i - 1].startswith("-") and "=" not in argv[i - 1]
        known = options is None or f"--{key}" in options or ("." in key and not follows_option)
        out.append(f"--{a}" if _KEY_VALUE.match(a) and known else a)
    return out


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if _exists(spec[0])}


def build_parser(commands: dict[str, tuple[str, str]]) -> tuple[argparse.ArgumentParser, dict]:
    from shoal import __version__

    parser = argparse.ArgumentParser(prog="shoal", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    subparsers = {}
    ordered = [c for c in WORKFLOW_ORDER if c in commands] + [c for c in commands if c not in WORKFLOW_ORDER]
    for name in ordered:
        help_text = commands[name][1]
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
    return parser, subparsers


def training_epilog() -> str:
    """What `pretrain --help` / `finetune --help` add below the flags: recipes and the override form."""
    names = sorted(p.name[: -len(".yaml")] for p in (resources.files("shoal") / "recipes").iterdir()
                   if p.name.endswith(".yaml"))
    shipped = textwrap.fill(", ".join(names), width=88, initial_indent="    ", subsequent_indent="    ")
    return (
        "recipes (--recipe NAME, shipped in shoal/recipes/; or --recipe FILE.yaml):\n"
        f"{shipped}\n"
        "  without --recipe: the --model/--model_size preset's recipe, else `default`.\n"
        "\n"
        "overrides:\n"
        "  any recipe key as --section.key=value (or section.key=value), applied after the flags, e.g.\n"
        "    --train.lr=1e-4 --data.seq_length=4096 --parallel.compile=true\n"
        "  the keys are documented in shoal/config/recipe.py; the resolved recipe is saved as\n"
        "  results/EXPERIMENT/config.yaml."
    )


def _options_module(command: str, stage_module: str):
    """The module defining `command`'s flags, and its function that adds them to a parser."""
    module_name, _, function = OPTIONS.get(command, f"{stage_module}:add_arguments").partition(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, function)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set(parser._option_string_actions)
    for action in parser._actions:  # sub-sub-commands (`shoal download pretrain`)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def _innermost_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the deepest (sub-)command that argv names, e.g. `download sft`'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            word = next((a for a in argv if not a.startswith("-")), None)
            if word in action.choices:
                return _innermost_parser(action.choices[word], argv[argv.index(word) + 1 :])
    return parser


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose errors end with the flag the user probably meant (`hint`)."""

    hint: str | None = None

    def error(self, message: str):
        super().error(f"{message}; did you mean {self.hint}?" if self.hint else message)


def _closest_flag(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """The parser's flag nearest to the first word that looks like a flag it does not know."""
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    for i, word in enumerate(words):
        # A NeMo-style key=value word may be a flag; after a flag that takes a value, it is that value.
        is_value = i > 0 and words[i - 1].startswith("-") and "=" not in words[i - 1]
        if _DOTTED_OVERRIDE.match(word) or not (word.startswith("--") or (_KEY_VALUE.match(word) and not is_value)):
            continue
        flag = "--" + word.lstrip("-").split("=", 1)[0]
        extensions = [o for o in options if o.startswith(flag)]
        if flag in options or (extensions and parser.allow_abbrev):  # known, or an abbreviation argparse takes
            continue
        # Training commands refuse abbreviations (the launcher re-reads flags by their full names).
        close = extensions if len(extensions) == 1 else difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
        if close:
            return close[0]
    return None


def _quiet_third_party_import_notices() -> None:
    """peft imports torchao when it is installed (shoal's fp8 and test extras), and torchao's import
    logs a warning for every CUDA kernel library it cannot load on a CPU machine, then torch logs a
    deprecation for each Enum torchao registers: a screenful before any command's own output, none
    of it about the user's run. FP8 itself needs none of those libraries (shoal.distributed.float8)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party_import_notices()
    commands = _available()
    parser, subparsers = build_parser(commands)
    # The command is the first word that is not an option; only its module is imported.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in commands:
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # exits: --version, --help, or an error naming the valid commands
        return 2
    options, add_arguments = _options_module(chosen, commands[chosen][0])
    add_arguments(subparsers[chosen])
    overrides = getattr(options, "ACCEPTS_OVERRIDES", False)
    if overrides:
        subparsers[chosen].epilog = training_epilog()
        subparsers[chosen].formatter_class = argparse.RawDescriptionHelpFormatter
    argv = normalize_argv(argv, _option_strings(subparsers[chosen]))
    # A misspelt flag gets a suggestion in whichever error argparse raises first (a required flag
    # missing, or the unknown word itself), under the command's own usage.
    command_parser = _innermost_parser(subparsers[chosen], argv[argv.index(chosen) + 1 :])
    command_parser.hint = _closest_flag(command_parser, argv)
    args, rest = parser.parse_known_args(argv)
    # Training commands take dotted recipe overrides (`--train.lr=1e-4`) beside their flags.
    unknown = [a for a in rest if not (overrides and _DOTTED_OVERRIDE.match(a))]
    if unknown:
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = rest
    args.argv = ["shoal", *argv]  # what the user typed, for launchers and provenance records
    module = importlib.import_module(commands[chosen][0])  # only now: the heavy imports of the stage
    try:
        return int(module.main(args) or 0)
    except ShoalError as err:
        print(f"shoal {chosen}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shoal {chosen}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
