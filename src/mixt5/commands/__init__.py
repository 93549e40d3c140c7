"""What every `mixt5` command shares: its parser class, and its arguments as dataclasses. Plus, as modules of this
package, the commands that are thin wrappers of a core module (`upcycle`, `convert_seed`, `score`); the others live
beside what they run (`mixt5.train`, `mixt5.evaluate`, `mixt5.predict`, `mixt5.demo`, `mixt5.sweep`, `mixt5.report`,
`mixt5.serve`).

A command module exposes `add_arguments(parser)` and `run(args) -> int`, as torchtune's subcommands do; `mixt5.cli`
puts them on one parser and is the only place that exits. A `CommandParser` never exits: a bad flag raises
`UsageError` (a `ValueError`), and `--help` raises `ParserExit`, so that `mixt5 sweep` can check a run's flags with the
command's own parser and report the error for the run at fault.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, NoReturn

from transformers import HfArgumentParser

from .. import _compat


class UsageError(ValueError):
    """A command line its parser refuses (unknown flag, bad choice, missing value); `parser` made the message."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class ParserExit(Exception):
    """argparse finished the command line itself (`--help`): exit with `status`."""

    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message or "")
        self.status = status


class CommandParser(HfArgumentParser):
    """The parser of `mixt5` and each command: an `HfArgumentParser` (dataclass fields become flags, with their
    aliases, help and choices) that raises instead of exiting, and shows each flag's default in `--help`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ParserExit(status, message)


def add_dataclass_arguments(parser: argparse.ArgumentParser, *dataclass_types: type) -> None:
    """Add each dataclass's fields as flags, as `HfArgumentParser(dataclass_types)` would, to a parser the CLI made
    (transformers offers this only through the constructor: see `mixt5._compat.add_dataclass_arguments`)."""
    if not isinstance(parser, HfArgumentParser):
        raise TypeError(f"{parser.prog}: dataclass arguments need an HfArgumentParser, got {type(parser).__name__}")
    for dataclass_type in dataclass_types:
        _compat.add_dataclass_arguments(parser, dataclass_type)


def dataclasses_from_namespace(args: argparse.Namespace, *dataclass_types: type) -> tuple[Any, ...]:
    """The dataclass instances of parsed flags, as `HfArgumentParser.parse_args_into_dataclasses` builds them (their
    `__post_init__` checks run here, raising `ValueError` for bad values)."""
    values = vars(args)
    return tuple(
        dataclass_type(**{f.name: values[f.name] for f in dataclasses.fields(dataclass_type) if f.init})
        for dataclass_type in dataclass_types
    )


def command_parser(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> CommandParser:
    """A stand-alone parser of one command (`mixt5 train`), as the CLI builds it, to parse its argv in-process."""
    parser = CommandParser(prog=prog)
    add_arguments(parser)
    return parser
