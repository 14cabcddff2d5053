"""The `shoal` command: one sub-command per stage. Thin on purpose: parse, then call the stage.

Each stage module provides `add_arguments(parser)` and `main(args) -> int | None`; modules are
imported only when their command runs, so `shoal --help` stays fast and optional dependencies
are loaded only by the stage that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys

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
    "plan": ("shoal.plan", "memory, speed and layouts of a training command line, before running it"),
    "demo": ("shoal.demo.run", "run the four stages end to end on the embedded tiny default"),
}

_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")


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
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__.splitlines()[0])
    from shoal import __version__

    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (_, help_text) in commands.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
    return parser, subparsers


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set(parser._option_string_actions)
    for action in parser._actions:  # sub-sub-commands (`shoal download pretrain`)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    parser, subparsers = build_parser(commands)
    # Only the chosen command's module is imported to fill in its arguments.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in commands:
        parser.print_help() if chosen is None else parser.parse_args(argv)
        return 0 if chosen is None else 2
    module = importlib.import_module(commands[chosen][0])
    module.add_arguments(subparsers[chosen])
    argv = normalize_argv(argv, _option_strings(subparsers[chosen]))
    if getattr(module, "ACCEPTS_OVERRIDES", False):
        # Training commands take dotted recipe overrides (`--train.lr=1e-4`) beside their flags.
        args, rest = parser.parse_known_args(argv)
        bad = [a for a in rest if not re.match(r"^--[A-Za-z_]\w*\.[\w.]+=", a)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = rest
    else:
        args = parser.parse_args(argv)
    args.argv = ["shoal", *argv]  # what the user typed, for launchers and provenance records
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
