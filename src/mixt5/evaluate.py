"""`mixt5 evaluate --model_name_or_path CKPT --validation_file F --output_dir D`: score any checkpoint, dense or MoE,
with the official SQuAD EM/F1 (the pipeline is `mixt5.train.run_evaluation`, which shares training's loading)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from .arguments import DataArguments, MixT5TrainingArguments, ModelArguments
from .commands import add_dataclass_arguments, command_parser, dataclasses_from_namespace
from .data.extractive import ExtractiveArguments

EVALUATE_ARGUMENTS = (ModelArguments, DataArguments, MixT5TrainingArguments, ExtractiveArguments)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, *EVALUATE_ARGUMENTS)


def parse_evaluate_args(argv: Sequence[str]) -> tuple[Any, ...]:
    """`(model_args, data_args, training_args, extractive_args)` of `mixt5 evaluate ARGV`; a bad flag raises
    `UsageError`."""
    return command_parser("mixt5 evaluate", add_arguments).parse_args_into_dataclasses(args=list(argv))


def run(args: argparse.Namespace) -> int:
    from .train import run_evaluation

    print(json.dumps(run_evaluation(*dataclasses_from_namespace(args, *EVALUATE_ARGUMENTS)), indent=2))
    return 0
