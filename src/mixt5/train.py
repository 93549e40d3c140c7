"""`mixt5 train` / `mixt5 evaluate`: SQuAD as text-to-text QA on `Seq2SeqTrainer`, dense or upcycled to MoE.

The task follows from the model (`mixt5.loading.model_task`, or `--task`): this module is the generative
(seq2seq) path; an encoder with a span head takes the extractive one, `mixt5.train_extractive`, with the same
flags, run folder and files.

build model → load and tokenise data → `MixT5Trainer` → train → evaluate → write the model and the run's results into
`output_dir`. One code path for one process and for `accelerate launch` / `torchrun`.

A run folder describes itself, so that `mixt5 report` only reads files: `run.json` (the command and every argument),
`metrics.json`, `predictions.json`, `question_scores.json` (each question's EM and F1, keyed by id),
`diagnostics.jsonl` (routing and expert similarity of MoE models) and, for training, `trainer_state.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import (
    RUN_FILE,
    DataArguments,
    MixT5TrainingArguments,
    ModelArguments,
    MoEArguments,
    moe_config_from_arguments,
    run_description,
)
from .commands import add_dataclass_arguments, command_parser, dataclasses_from_namespace
from .config import MoEConfig, MoESettingsMixin, non_default_fields
from .data.extractive import ExtractiveArguments
from .data.sources import load_split
from .data.squad import SquadExamples, add_prompt_special_tokens, examples_to_dataset, tokenize_dataset
from .diagnostics import RoutingDiagnosticsCallback
from .loading import from_pretrained, load_config, model_task
from .loading import load_tokenizer as load_pretrained_tokenizer
from .metrics import QUESTION_SCORES_FILE, write_question_scores
from .model_card import add_training_results
from .modeling import MoEModelMixin
from .trainer import MixT5Trainer, SquadEvaluator
from .upcycle import upcycle
from .utils import honour_umask, is_staging, read_json, remove_stale_staging, staging_prefix, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # generative input tokens; the extractive windows' default is 384


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    name = model_args.tokenizer_name or model_args.model_name_or_path
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    tokenizer = load_pretrained_tokenizer(name, flag=flag, alternative="pass --tokenizer_name NAME")
    if not tokenizer.is_fast:
        raise ValueError(f"the tokenizer of {name} is not a fast (tokenizers-backed) one; MixT5 needs offsets.")
    return tokenizer


def build_model(
    model_args: ModelArguments,
    moe: MoEConfig | None,
    command: str | None = None,
    auto_class: Any = AutoModelForSeq2SeqLM,
) -> PreTrainedModel:
    """Load the checkpoint as `auto_class`; with `moe` (i.e. `--enable_moe`), upcycle it unless it already is a MixT5
    model."""
    source = model_args.reference_model_name_or_path or model_args.model_name_or_path
    if (
        moe is not None
        and is_deepspeed_zero3_enabled()
        and not isinstance(AutoConfig.from_pretrained(source), MoESettingsMixin)
    ):
        # ZeRO-3 loads each process's shard only: there are no whole dense weights to copy into experts
        raise ValueError(
            f"--enable_moe upcycles {source} in every process, but DeepSpeed ZeRO-3 loads it partitioned. Upcycle "
            f"it once first (mixt5 upcycle --model_name_or_path {source} --output_dir DIR [MoE flags]), then train DIR."
        )
    flag = "--reference_model_name_or_path" if model_args.reference_model_name_or_path else "--model_name_or_path"
    model = from_pretrained(auto_class, source, flag=flag)
    if moe is not None and not isinstance(model, MoEModelMixin):
        model = upcycle(model, moe, base_model=source)
        if command:
            model.config.upcycled_from["command"] = command  # the model card's "How it was made"
        logger.info(
            "Upcycled %s: MoE blocks %s, %d experts, top-%d",
            source,
            model.config.moe_layer_indices,
            moe.num_experts,
            moe.top_k,
        )
    elif moe is not None:
        logger.info("%s is already a MixT5 model; its own MoE settings are kept.", source)
    if model_args.experts_implementation and isinstance(model, MoEModelMixin):
        model.set_experts_implementation(model_args.experts_implementation)
    return model


def prepare_features(
    examples: SquadExamples, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, split: str
) -> tuple[Any, Any]:
    features, stats = tokenize_dataset(
        examples_to_dataset(examples),
        tokenizer,
        prompt_format=data_args.prompt_format,
        max_source_length=data_args.max_sequence_length,
        max_target_length=data_args.max_target_length,
        num_proc=data_args.preprocessing_num_workers,
    )
    logger.info(
        "%s: %d of %d answers fall (partly) beyond max_sequence_length=%d",
        split,
        stats.num_answers_cut,
        stats.num_examples,
        data_args.max_sequence_length,
    )
    return features, stats


def _save_final(trainer: MixT5Trainer, output_dir: str) -> None:
    """Save model, tokenizer, config (MoE settings included) and training arguments; each file lands atomically."""
    staging = Path(output_dir) / f"{staging_prefix('final', trainer.staging_owner)}staging.partial"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))  # every rank calls it (collective under FSDP/DeepSpeed); rank 0 writes
    if trainer.is_world_process_zero():
        write_json_atomic(staging / "training_args.json", trainer.args.to_dict())
        honour_umask(staging)
        for item in staging.iterdir():
            os.replace(item, Path(output_dir) / item.name)
        shutil.rmtree(staging, ignore_errors=True)


def _write_results(
    trainer: MixT5Trainer,
    output_dir: str,
    metrics: dict[str, Any],
    evaluator: SquadEvaluator | None,
    description: dict[str, Any],
) -> None:
    """The run's files (see the module docstring); metrics.json last, so that its presence means the rest is there."""
    if not trainer.is_world_process_zero():
        return
    write_json_atomic(Path(output_dir) / RUN_FILE, description)
    if evaluator is not None and evaluator.last_predictions:
        write_json_atomic(Path(output_dir) / "predictions.json", evaluator.last_predictions)
        write_question_scores(Path(output_dir) / QUESTION_SCORES_FILE, evaluator.gold, evaluator.last_predictions)
    write_json_atomic(Path(output_dir) / "metrics.json", metrics)


def _check_moe_flags(model_args: ModelArguments, moe_args: Any) -> None:
    """MoE flags act only when `--enable_moe` upcycles a dense checkpoint: refuse them where they would be ignored."""
    given = [f"--{name}" for name in non_default_fields(moe_args)]
    if not given:
        return
    if not model_args.enable_moe:
        raise ValueError(f"{' '.join(given)}: MoE flags act only with --enable_moe; add --enable_moe, or drop them.")
    source = model_args.reference_model_name_or_path or model_args.model_name_or_path
    flag = "--reference_model_name_or_path" if model_args.reference_model_name_or_path else "--model_name_or_path"
    if isinstance(load_config(source, flag=flag), MoESettingsMixin):  # any family's MoE checkpoint
        raise ValueError(
            f"{flag} {source} is already a MixT5 model and keeps its own MoE settings (the 'moe' block of its "
            f"config.json), so {' '.join(given)} would be ignored: drop them, or train its dense source with them."
        )


# What `mixt5 train` stages in output_dir before renaming it into place (see `utils.remove_stale_staging`).
STAGED_OUTPUTS = (
    f"{PREFIX_CHECKPOINT_DIR}-*",
    "final",
    "metrics.json",
    "predictions.json",
    RUN_FILE,
    QUESTION_SCORES_FILE,
)
# What a run writes into output_dir before its first checkpoint: a folder holding only these can be resumed.
RUN_LOGS = ("diagnostics.jsonl", "runs")


def _read_state(folder: Path) -> dict[str, Any] | None:
    """The `trainer_state.json` in `folder`, or None where it is missing or cut short."""
    try:
        state = read_json(folder / TRAINER_STATE_NAME)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def last_whole_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-N` of `output_dir` that is whole; incomplete ones are skipped with a warning.

    Trainer writes `trainer_state.json` last, so a checkpoint without a readable one was cut short (by a kill while
    saving, with a version that did not stage checkpoints, or by a hand copy).
    """
    numbered = [
        (int(path.name.rpartition("-")[2]), path)
        for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and path.name.rpartition("-")[2].isdigit()
    ]
    for _, path in sorted(numbered, reverse=True):
        if _read_state(path) is not None:
            return path
        logger.warning("%s is incomplete (no readable %s): skipped.", path, TRAINER_STATE_NAME)
    return None


def _finished_state(training_args: MixT5TrainingArguments) -> dict[str, Any] | None:
    """The final trainer state of a run in output_dir that already trained as far as these arguments ask, or None.

    `trainer_state.json` and `metrics.json` beside the checkpoints are written last, when a run has finished.
    """
    output_dir = Path(training_args.output_dir)
    state = _read_state(output_dir)
    if state is None or not (output_dir / "metrics.json").is_file():
        return None
    if training_args.max_steps > 0:
        target = training_args.max_steps
    elif state.get("num_train_epochs") == training_args.num_train_epochs:
        target = state.get("max_steps", 0)
    else:  # trained for another number of epochs: let Trainer work out the steps
        return None
    return state if state["global_step"] >= target else None


def _resolve_resume(training_args: MixT5TrainingArguments) -> str | None:
    """The checkpoint to resume from, after checking that output_dir may be written.

    A non-empty output_dir is refused unless this is a resume of the run in it (`--resume_from_checkpoint`) or
    `--overwrite_output_dir` is given (which removes its old checkpoints). Staging left there by a killed earlier run
    is removed first.
    """
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if training_args.should_save:
        for name in STAGED_OUTPUTS:
            remove_stale_staging(output_dir, name)
    # staging of other processes (or of this run's process 0, which may not have removed it yet) is not content
    entries = sorted(p.name for p in output_dir.iterdir() if not is_staging(p.name)) if output_dir.is_dir() else []
    if training_args.overwrite_output_dir:
        if training_args.should_save:
            for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(path)
        return None if resume in ("last", "latest", "True", "true") else resume
    if resume in ("last", "latest", "True", "true"):
        last = last_whole_checkpoint(output_dir)
        if last is not None:
            logger.info("Resuming from %s.", last)
            return str(last)
        if set(entries) - set(RUN_LOGS):
            raise FileExistsError(
                f"--resume_from_checkpoint {resume}: {output_dir} holds no whole checkpoint to resume but is not "
                f"empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); pass --overwrite_output_dir "
                "to train into it anyway, or choose another --output_dir."
            )
        logger.warning("--resume_from_checkpoint %s: no checkpoint in %s; starting fresh.", resume, output_dir)
        return None
    if resume:
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder.")
        return resume
    if entries:
        raise FileExistsError(
            f"output directory {output_dir} is not empty; resume the run in it with --resume_from_checkpoint last, "
            "or pass --overwrite_output_dir to train into it anyway."
        )
    return None


def resolve_task(model_args: ModelArguments, extractive_args: ExtractiveArguments | None) -> str:
    """`--task`, or the model's own (`model_task`); the extractive flags are refused on the generative task."""
    task = model_args.task
    if task == "auto":
        source = model_args.reference_model_name_or_path or model_args.model_name_or_path
        flag = "--reference_model_name_or_path" if model_args.reference_model_name_or_path else "--model_name_or_path"
        task = model_task(load_config(source, flag=flag), flag=f"{flag} {source}")
    given = non_default_fields(extractive_args) if extractive_args is not None else []
    if task == "generative" and given:
        flags = " ".join(f"--{name}" for name in given)
        raise ValueError(f"{flags}: extractive QA flags, but {model_args.model_name_or_path} is a generative model.")
    return task


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    moe_args: Any,
    training_args: MixT5TrainingArguments,
    extractive_args: ExtractiveArguments | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    command: str | None = None,
) -> dict[str, Any]:
    """Fine-tune and evaluate; returns `{"train": ..., "eval": ...}` metrics (also written to metrics.json).

    `command` (the command line, when known) goes into a MixT5 model's card with the metrics.
    """
    if not (data_args.train_file or data_args.dataset_name):
        raise ValueError("mixt5 train needs --train_file or --dataset_name.")
    _check_moe_flags(model_args, moe_args)
    if training_args.resume_from_checkpoint and not training_args.overwrite_output_dir:
        finished = _finished_state(training_args)
        if finished is not None:
            logger.info(
                "The run in %s is complete (step %d of %d): nothing to train. Its results are in %s.",
                training_args.output_dir,
                finished["global_step"],
                finished.get("max_steps", finished["global_step"]),
                Path(training_args.output_dir) / "metrics.json",
            )
            return read_json(Path(training_args.output_dir) / "metrics.json")
    if resolve_task(model_args, extractive_args) == "extractive":
        from .train_extractive import run_extractive_training

        return run_extractive_training(
            model_args, data_args, moe_args, training_args, extractive_args or ExtractiveArguments(), callbacks, command
        )
    resume, train_examples, eval_examples, tokenizer, moe = start_training(
        model_args, data_args, moe_args, training_args, DEFAULT_MAX_SEQUENCE_LENGTH
    )
    model = build_model(model_args, moe, command)
    add_prompt_special_tokens(tokenizer, model, data_args.prompt_format)

    with training_args.main_process_first(desc="tokenising"):
        train_features, train_stats = prepare_features(train_examples, tokenizer, data_args, "train")
        eval_features, eval_stats, evaluator = None, None, None
        if eval_examples is not None:
            eval_features, eval_stats = prepare_features(eval_examples, tokenizer, data_args, "validation")
            evaluator = SquadEvaluator(eval_examples, tokenizer, eval_stats)

    pad_to = 8 if training_args.fp16 or training_args.bf16 else None
    trainer = MixT5Trainer(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=eval_features,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=pad_to
        ),
        compute_metrics=evaluator,
        callbacks=[*callbacks, RoutingDiagnosticsCallback()],  # a no-op for dense models
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_metrics = {
        **train_result.metrics,
        "train_samples": len(train_examples),
        "train_answers_cut_by_truncation": train_stats.num_answers_cut,
    }
    arguments = (model_args, data_args, *((moe_args,) if model_args.enable_moe else ()), training_args)
    return finish_training(
        trainer, train_metrics, evaluator, run_description("train", *arguments), command, resumed_from=resume
    )


def start_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    moe_args: Any,
    training_args: MixT5TrainingArguments,
    default_max_sequence_length: int,
) -> tuple[str | None, SquadExamples, SquadExamples | None, PreTrainedTokenizerBase, MoEConfig | None]:
    """What a run does first, for either task: the task's default `--max_sequence_length`, the checkpoint to resume
    from, the seed, the splits (evaluation and best-checkpoint selection off without validation data), the tokenizer
    and the MoE settings (None unless `--enable_moe`)."""
    if data_args.max_sequence_length is None:
        data_args.max_sequence_length = default_max_sequence_length
    resume = _resolve_resume(training_args)
    set_seed(training_args.seed)
    train_examples = load_split(data_args, "train")
    eval_examples = load_split(data_args, "validation")
    if eval_examples is None and training_args.eval_strategy != "no":
        logger.info("No validation data: evaluation and best-checkpoint selection are off.")
        training_args.eval_strategy = "no"
        training_args.load_best_model_at_end = False
    tokenizer = load_tokenizer(model_args)
    moe = moe_config_from_arguments(moe_args, training_args.seed) if model_args.enable_moe else None
    return resume, train_examples, eval_examples, tokenizer, moe


def finish_training(
    trainer: MixT5Trainer,
    train_metrics: dict[str, Any],
    evaluator: Any | None,
    description: dict[str, Any],
    command: str | None,
    resumed_from: str | None = None,
) -> dict[str, Any]:
    """After `trainer.train()`, for either task: save the final model, evaluate it when there is an evaluation set
    (`evaluator`), log, write the run's files and add the metrics to the model card of an MoE model.

    `resumed_from` (the checkpoint `trainer.train` resumed from) is recorded as `train_resumed_from`: the Trainer's
    `train_runtime` then covers only the part after it, and reports leave such runs out of training-time figures.
    """
    if resumed_from is not None:
        train_metrics = {**train_metrics, "train_resumed_from": os.path.basename(os.path.normpath(resumed_from))}
    metrics: dict[str, Any] = {"train": train_metrics}
    output_dir = trainer.args.output_dir
    _save_final(trainer, output_dir)
    if evaluator is not None:
        metrics["eval"] = trainer.evaluate()
    for split, values in metrics.items():
        trainer.log_metrics(split, values)
    _write_results(trainer, output_dir, metrics, evaluator, description)
    if trainer.is_world_process_zero() and isinstance(trainer.model, MoEModelMixin):
        add_training_results(output_dir, metrics, command)  # to the card save_pretrained wrote
    trainer.save_state()
    return metrics


def run_evaluation(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MixT5TrainingArguments,
    extractive_args: ExtractiveArguments | None = None,
) -> dict[str, Any]:
    """Score any checkpoint, dense or MoE, on a validation set; writes predictions.json and metrics.json."""
    examples = load_split(data_args, "validation")
    if examples is None:
        raise ValueError("mixt5 evaluate needs --validation_file or --dataset_name.")
    if resolve_task(model_args, extractive_args) == "extractive":
        from .train_extractive import run_extractive_evaluation

        return run_extractive_evaluation(
            model_args, data_args, training_args, extractive_args or ExtractiveArguments(), examples
        )
    if data_args.max_sequence_length is None:
        data_args.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, None)
    add_prompt_special_tokens(tokenizer, model, data_args.prompt_format)
    features, stats = prepare_features(examples, tokenizer, data_args, "validation")
    evaluator = SquadEvaluator(examples, tokenizer, stats)
    diagnostics = RoutingDiagnosticsCallback()
    diagnostics.attach(model)  # an evaluation's routing, as training records it (a no-op for dense models)
    trainer = MixT5Trainer(
        model=model,
        args=training_args,
        eval_dataset=features,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=evaluator,
        callbacks=[diagnostics],
    )
    metrics = trainer.evaluate()
    os.makedirs(training_args.output_dir, exist_ok=True)
    description = run_description("evaluate", model_args, data_args, training_args)
    _write_results(trainer, training_args.output_dir, metrics, evaluator, description)
    return metrics


# --- mixt5 train -----------------------------------------------------------------------------------------------------

TRAIN_ARGUMENTS = (ModelArguments, DataArguments, MoEArguments, MixT5TrainingArguments, ExtractiveArguments)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, *TRAIN_ARGUMENTS)


def parse_train_args(argv: Sequence[str]) -> tuple[Any, ...]:
    """`(model_args, data_args, moe_args, training_args, extractive_args)` of `mixt5 train ARGV`; a bad flag raises
    `UsageError`."""
    return command_parser("mixt5 train", add_arguments).parse_args_into_dataclasses(args=list(argv))


def run(args: argparse.Namespace) -> int:
    metrics = run_training(
        *dataclasses_from_namespace(args, *TRAIN_ARGUMENTS), command=getattr(args, "command_line", None)
    )
    print(json.dumps(metrics.get("eval", metrics["train"]), indent=2))
    return 0
