"""Where the QA examples come from: a hub data set (`--dataset_name`) or files (`--train_file`/`--validation_file`)."""

from __future__ import annotations

import logging
from typing import Any

from .squad import SquadExamples, examples_from_hf, load_examples

logger = logging.getLogger(__name__)

_HUB_SPLITS = {"train": "train", "validation": "validation"}


def load_split(data_args: Any, split: str) -> SquadExamples | None:
    """The `train` or `validation` examples named by `DataArguments`, cut to max_*_samples; None if none named.

    Training data must have an answer per question; an empty validation set is an error naming its source.
    """
    path = data_args.train_file if split == "train" else data_args.validation_file
    require_answers = split == "train"
    if path:
        examples = load_examples(path, split_name=split, require_answers=require_answers, strict=data_args.strict_data)
    elif data_args.dataset_name:
        import datasets

        hub_split = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, split=_HUB_SPLITS[split]
        )
        examples = examples_from_hf(
            hub_split, split_name=split, require_answers=require_answers, strict=data_args.strict_data
        )
    else:
        return None
    limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
    if limit is not None and len(examples) > limit:
        examples = SquadExamples(
            examples[:limit],
            source=examples.source,
            version=examples.version,
            num_bad_answer_starts=examples.num_bad_answer_starts,
            bad_answer_start_ids=examples.bad_answer_start_ids,
        )
    if not examples:
        raise ValueError(f"the {split} set from {path or data_args.dataset_name} has no questions.")
    logger.info("%s: %d questions from %s", split, len(examples), path or data_args.dataset_name)
    return examples
