"""`mixt5` console script: builds the one parser and is the only place that exits.

mixt5 upcycle --model_name_or_path SRC --output_dir DST [MoEConfig flags]
mixt5 convert-seed SRC DST
mixt5 train | evaluate | predict | score | demo | sweep | report | serve ...   (see `mixt5 COMMAND --help`)

Each command is a module with `add_arguments(parser)` and `run(args) -> int` (see `mixt5.commands`). The table below
imports a command's module only when that command runs, and the parser gets only its arguments, so that `mixt5 --help`
loads no training, serving or plotting code.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from .commands import CommandParser, ParserExit, UsageError

logger = logging.getLogger("mixt5")


def _upcycle() -> ModuleType:
    from .commands import upcycle

    return upcycle


def _convert_seed() -> ModuleType:
    from .commands import convert_seed

    return convert_seed


def _train() -> ModuleType:
    from . import train

    return train


def _evaluate() -> ModuleType:
    from . import evaluate

    return evaluate


def _predict() -> ModuleType:
    from . import predict

    return predict


def _score() -> ModuleType:
    from .commands import score

    return score


def _demo() -> ModuleType:
    from . import demo

    return demo


def _sweep() -> ModuleType:
    from . import sweep

    return sweep


def _report() -> ModuleType:
    from . import report

    return report


def _serve() -> ModuleType:
    from . import serve

    return serve


# name: (the command's module, imported when it runs; its one-line help)
COMMANDS: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "demo": (_demo, "offline demo: fine-tune a small dense T5 and its MoE copy on bundled QA"),
    "train": (_train, "fine-tune a T5 (dense, or upcycled with --enable_moe) on SQuAD-style QA"),
    "evaluate": (_evaluate, "score any checkpoint with the official SQuAD EM/F1"),
    "predict": (_predict, "answer questions about a context (optionally showing the routing)"),
    "score": (_score, "score a predictions file like the official evaluate-v1.1.py"),
    "upcycle": (_upcycle, "turn a dense T5 checkpoint into a sparse MixT5 one"),
    "convert-seed": (_convert_seed, "convert a checkpoint written by the study's fork"),
    "sweep": (_sweep, "run (or print) a sweep of training runs over arms and seeds, then aggregate"),
    "report": (_report, "tables and plots for a run or sweep directory"),
    "serve": (_serve, "HTTP API and web page: answers plus the experts each token used"),
}

# What bad input raises: the library names the flag or file in the message, and `main` prints it as one line and
# exits 2 (argparse's code for a bad flag). OSError covers missing, unreadable and unwritable paths (the message
# names the path); MemoryError an upcycle too large for the memory available. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError)


def build_parser(command: str | None = None) -> tuple[CommandParser, dict[str, CommandParser]]:
    """`mixt5`'s parser and its subparser per command; `command`'s (if any) gets its module's arguments and `run`."""
    parser = CommandParser(prog="mixt5", description="MixT5: sparse upcycling of T5 checkpoints, fine-tuned on QA.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, (load, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = load()
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run)
    return parser, subparsers.choices


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser, commands = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's parser, which knows its flags
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}", commands.get(args.command, parser))
    except ParserExit as done:  # --help, after printing it
        return done.status
    except UsageError as err:
        usage = err.parser.format_usage()
        hint = usage if usage.count("\n") <= 6 else f"(`{err.parser.prog} --help` lists its flags)\n"
        print(f"{hint}{err.parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    args.command_line = shlex.join(["mixt5", *argv])  # as typed: model cards say how a checkpoint was made
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mixt5 {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
