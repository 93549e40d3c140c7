"""`mixt5 train` / `mixt5 evaluate` of an encoder with a span head (e.g. `BertForQuestionAnswering`): extractive QA.

SQuAD examples → sliding windows (`--max_sequence_length`, default 384, `--doc_stride` 128) labelled with the first
answer's start/end tokens, from the training questions whose answer offset is known (`drop_unknown_answer_starts`) →
`MixT5Trainer` without generation (the start/end loss is the model's own; the trainer adds MoE logging for an
upcycled model and keeps evaluation in order) → start/end logits → n-best answer spans (`postprocess_predictions`;
transformers 5 has no question-answering pipeline left to call) → the official metric. The run folder gets the same
files as the generative path (`mixt5.train`): run.json, metrics.json, predictions.json, question_scores.json.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, TrainerCallback

from .arguments import DataArguments, MixT5TrainingArguments, ModelArguments, run_description
from .data.extractive import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    ExtractiveArguments,
    drop_unknown_answer_starts,
    find_answer_starts_file,
    prepare_eval_features,
    prepare_train_features,
)
from .data.squad import SquadExamples
from .diagnostics import RoutingDiagnosticsCallback
from .loading import check_sequence_length
from .train import _write_results, build_model, finish_training, load_tokenizer, start_training
from .trainer import ExtractiveEvaluator, MixT5Trainer

logger = logging.getLogger(__name__)


def _extractive_training_args(training_args: MixT5TrainingArguments) -> MixT5TrainingArguments:
    """Predictions are logits, not generated text: no generation in evaluation."""
    training_args.predict_with_generate = False
    return training_args


def _eval_windows(
    examples: SquadExamples, tokenizer: Any, data_args: DataArguments, extractive_args: ExtractiveArguments
) -> tuple[Any, ExtractiveEvaluator]:
    features, _ = prepare_eval_features(
        examples,
        tokenizer,
        max_sequence_length=data_args.max_sequence_length,
        doc_stride=extractive_args.doc_stride,
        num_proc=data_args.preprocessing_num_workers,
    )
    evaluator = ExtractiveEvaluator(
        examples,
        features,
        n_best_size=extractive_args.n_best_size,
        max_answer_length=extractive_args.max_answer_length,
    )
    return features, evaluator


def _collator(tokenizer: Any, training_args: MixT5TrainingArguments) -> DataCollatorWithPadding:
    pad_to = 8 if training_args.fp16 or training_args.bf16 else None
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)


def run_extractive_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    moe_args: Any,
    training_args: MixT5TrainingArguments,
    extractive_args: ExtractiveArguments,
    callbacks: Sequence[TrainerCallback] = (),
    command: str | None = None,
) -> dict[str, Any]:
    """`mixt5.train.run_training` for an encoder QA model; returns `{"train": ..., "eval": ...}` metrics."""
    _extractive_training_args(training_args)
    resume, train_examples, eval_examples, tokenizer, moe = start_training(
        model_args, data_args, moe_args, training_args, DEFAULT_MAX_SEQUENCE_LENGTH
    )
    answer_starts_file = extractive_args.skip_answer_starts_file or find_answer_starts_file(data_args.train_file)
    train_examples, skips = drop_unknown_answer_starts(train_examples, answer_starts_file)
    model = build_model(model_args, moe, command, auto_class=AutoModelForQuestionAnswering)
    check_sequence_length(model.config, data_args.max_sequence_length)

    with training_args.main_process_first(desc="tokenising"):
        train_features, windows = prepare_train_features(
            train_examples,
            tokenizer,
            max_sequence_length=data_args.max_sequence_length,
            doc_stride=extractive_args.doc_stride,
            num_proc=data_args.preprocessing_num_workers,
        )
        eval_features, evaluator = None, None
        if eval_examples is not None:
            eval_features, evaluator = _eval_windows(eval_examples, tokenizer, data_args, extractive_args)

    trainer = MixT5Trainer(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=eval_features,
        processing_class=tokenizer,
        data_collator=_collator(tokenizer, training_args),
        compute_metrics=evaluator,
        callbacks=[*callbacks, RoutingDiagnosticsCallback()],  # a no-op for dense models
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_metrics = {
        **train_result.metrics,
        "train_samples": skips.num_examples,
        **skips.as_metrics(),
        "train_windows": windows.num_features,
        "train_answers_in_no_window": windows.num_answers_in_no_window,
    }
    arguments = (
        model_args,
        data_args,
        *((moe_args,) if model_args.enable_moe else ()),
        training_args,
        extractive_args,
    )
    return finish_training(
        trainer, train_metrics, evaluator, run_description("train", *arguments), command, resumed_from=resume
    )


def run_extractive_evaluation(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MixT5TrainingArguments,
    extractive_args: ExtractiveArguments,
    examples: SquadExamples,
) -> dict[str, Any]:
    """`mixt5.train.run_evaluation` for an encoder QA model: writes predictions.json, question_scores.json,
    run.json and metrics.json."""
    if data_args.max_sequence_length is None:
        data_args.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
    _extractive_training_args(training_args)
    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, None, auto_class=AutoModelForQuestionAnswering)
    check_sequence_length(model.config, data_args.max_sequence_length)
    features, evaluator = _eval_windows(examples, tokenizer, data_args, extractive_args)
    diagnostics = RoutingDiagnosticsCallback()
    diagnostics.attach(model)  # a no-op for dense models
    trainer = MixT5Trainer(
        model=model,
        args=training_args,
        eval_dataset=features,
        processing_class=tokenizer,
        data_collator=_collator(tokenizer, training_args),
        compute_metrics=evaluator,
        callbacks=[diagnostics],
    )
    metrics = trainer.evaluate()
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    description = run_description("evaluate", model_args, data_args, training_args, extractive_args)
    _write_results(trainer, training_args.output_dir, metrics, evaluator, description)
    return metrics
