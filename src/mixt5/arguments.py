"""Command-line argument dataclasses of `mixt5 train` / `evaluate`, parsed with `HfArgumentParser`.

The study's own flags (`--pretrained_model_name_or_path`, `--save_dir`, `--wandb_model_name`, `--use_wandb`,
`--project_name`, `--entity`, `--evaluation_strategy`, `--max_sequence_length`) are aliases or fields here, so its
README command runs unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from transformers import Seq2SeqTrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from .config import MoEConfig
from .utils import check_output_path


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune or evaluate (hub id or folder).",
            "aliases": ["--pretrained_model_name_or_path"],
        },
    )
    reference_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Dense source of the weights (and experts) when upcycling; defaults to the model."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    enable_moe: bool = field(default=False, metadata={"help": "Upcycle the dense checkpoint into a sparse MoE first."})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "Experts kernel: eager (MixT5's dispatch), grouped_mm, batched_mm, ..."}
    )
    task: Literal["auto", "generative", "extractive"] = field(
        default="auto",
        metadata={
            "help": "generative: a seq2seq model writes the answer; extractive: an encoder with a span head picks "
            "it from the context; auto: follows from the model (see mixt5.loading.model_task)."
        },
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path (or --pretrained_model_name_or_path) is required.")


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A hub data set, e.g. `squad` (via datasets)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name, if any."})
    train_file: str | None = field(default=None, metadata={"help": "SQuAD v1.1 JSON (.json/.json.gz) or JSON Lines."})
    validation_file: str | None = field(default=None, metadata={"help": "SQuAD v1.1 JSON or JSON Lines to score."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training questions."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation questions."})
    prompt_format: Literal["t5", "seed"] = field(
        default="t5",
        metadata={"help": "t5: `question: q context: c`; seed: the study's `[squad][question]q[context]c`."},
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={
            "help": "Input tokens kept (the rest is cut); extractive: tokens per sliding window. Default: 512 "
            "(generative), 384 (extractive).",
            "aliases": ["--max_source_length"],
        },
    )
    max_target_length: int = field(default=32, metadata={"help": "Answer tokens kept as the training target."})
    strict_data: bool = field(default=False, metadata={"help": "Make a bad answer_start an error, not a warning."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})

    def __post_init__(self) -> None:
        for name in ("max_sequence_length", "max_target_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")


def _moe_argument_fields() -> list[tuple[str, object, dataclasses.Field]]:
    """MoEConfig's fields as CLI fields; its `seed` becomes `--moe_seed` (Trainer owns `--seed`)."""
    hints = get_type_hints(MoEConfig)
    fields = [
        (f.name, hints[f.name], field(default=f.default, metadata=dict(f.metadata)))
        for f in dataclasses.fields(MoEConfig)
        if f.name != "seed"
    ]
    fields.append(
        ("moe_seed", int | None, field(default=None, metadata={"help": "Seed of the expert init; defaults to --seed."}))
    )
    return fields


MoEArguments = dataclasses.make_dataclass("MoEArguments", _moe_argument_fields())
MoEArguments.__doc__ = "Every MoEConfig field as a flag (defaults: the study's 8 experts, top-2, last:6)."


def moe_config_from_arguments(moe_args: object, seed: int) -> MoEConfig:
    values = dataclasses.asdict(moe_args)
    moe_seed = values.pop("moe_seed")
    config = MoEConfig(**values, seed=seed if moe_seed is None else moe_seed)
    config.check_settings_used()
    return config


# The run folder's description of itself: which command made it, with every argument (read by `mixt5 report`).
RUN_FILE = "run.json"


def run_description(command: str, *arguments: Any) -> dict[str, Any]:
    """`run.json`'s content: the command and its parsed arguments, one group per dataclass (`ModelArguments` →
    "model", `DataArguments` → "data", `MoEArguments` → "moe", `MixT5TrainingArguments` → "training")."""
    groups = {}
    for group in arguments:
        name = type(group).__name__.removeprefix("MixT5").removesuffix("Arguments").lower()
        groups[name] = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
    return {"command": command, "arguments": groups}


def read_engine_config(flag: str, value: object) -> dict:
    """The JSON object of a `--deepspeed` / `--fsdp_config` value: a file, inline JSON, or an already-loaded dict.

    Raises `FileNotFoundError` / `ValueError` naming the flag and the file.
    """
    if isinstance(value, dict):
        return value
    text, where = str(value), "inline JSON"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {text}: no such file.")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {where}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}).") from err
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {where}: expected a JSON object, got {type(config).__name__}.")
    return config


def launcher_world_size() -> int:
    """Processes of this run, as the launcher announced them (torchrun, accelerate launch and deepspeed set WORLD_SIZE).

    Read from the environment so that a bad batch is reported while parsing, before any process group starts.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch_size(global_batch_size: int, world_size: int, gradient_accumulation_steps: int) -> int:
    """`global_batch_size / (world_size * gradient_accumulation_steps)`; a `ValueError` unless it divides exactly."""
    share = world_size * gradient_accumulation_steps
    if global_batch_size < 1 or global_batch_size % share:
        raise ValueError(
            f"--global_train_batch_size {global_batch_size} does not split evenly over world size {world_size} x "
            f"--gradient_accumulation_steps {gradient_accumulation_steps} = {share}; use a multiple of {share}."
        )
    return global_batch_size // share


@dataclass
class MixT5TrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` with the study's defaults and flag names."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints, the model and metrics go.", "aliases": ["--save_dir"]}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty output_dir that holds no run to resume; its old checkpoints are removed."
        },
    )
    run_name: str | None = field(default=None, metadata={"help": "Run name (W&B).", "aliases": ["--wandb_model_name"]})
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate (the study's 1e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    eval_strategy: IntervalStrategy | str = field(
        default="epoch",
        metadata={"help": "When to evaluate: no | steps | epoch.", "aliases": ["--evaluation_strategy"]},
    )
    save_strategy: SaveStrategy | str = field(default="epoch", metadata={"help": "When to save: no | steps | epoch."})
    load_best_model_at_end: bool | None = field(
        default=None, metadata={"help": "Keep the best checkpoint by F1; on by default when eval and save match."}
    )
    metric_for_best_model: str | None = field(default="f1", metadata={"help": "Metric that picks the best checkpoint."})
    predict_with_generate: bool = field(default=True, metadata={"help": "Evaluate by generating answers."})
    generation_max_length: int | None = field(default=30, metadata={"help": "Max tokens of a generated answer."})
    generation_num_beams: int | None = field(default=1, metadata={"help": "Beams (1: greedy)."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "random | sequential | group_by_length | batch_rebalance.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )
    global_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Training examples per optimizer step over all processes; sets --per_device_train_batch_size to "
            "it / (processes x gradient_accumulation_steps), which must divide it exactly."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. False: every MoE layer gives each of its parameters a (zero) "
            "gradient in every step by design, so DDP needs no extra graph traversal per step."
        },
    )
    use_wandb: bool = field(default=False, metadata={"help": "Report to Weights & Biases (same as --report_to wandb)."})
    project_name: str | None = field(default=None, metadata={"help": "W&B project (sets WANDB_PROJECT)."})
    entity: str | None = field(default=None, metadata={"help": "W&B entity (sets WANDB_ENTITY)."})

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--output_dir (or --save_dir) is required.")
        check_output_path(self.output_dir, "--output_dir", is_dir=True)
        # Checked before anything is loaded, with the flag and file named (transformers' own errors name neither).
        if self.deepspeed is not None:
            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError("--deepspeed needs the deepspeed package: pip install deepspeed")
            read_engine_config("--deepspeed", self.deepspeed)
        if self.fsdp_config is not None:
            if not self.fsdp:
                raise ValueError(f"--fsdp_config {self.fsdp_config} has no effect without --fsdp: add --fsdp.")
            read_engine_config("--fsdp_config", self.fsdp_config)
        if self.global_train_batch_size is not None:
            self.per_device_train_batch_size = per_device_batch_size(
                self.global_train_batch_size, launcher_world_size(), self.gradient_accumulation_steps
            )
        if self.use_wandb:
            reports = (
                []
                if self.report_to in (None, "none")
                else list(self.report_to if isinstance(self.report_to, list) else [self.report_to])
            )
            self.report_to = sorted({*reports, "wandb"})
        if self.project_name:
            os.environ["WANDB_PROJECT"] = self.project_name
        if self.entity:
            os.environ["WANDB_ENTITY"] = self.entity
        if self.load_best_model_at_end is None:
            eval_strategy, save_strategy = (
                str(getattr(self.eval_strategy, "value", self.eval_strategy)),
                str(getattr(self.save_strategy, "value", self.save_strategy)),
            )
            self.load_best_model_at_end = eval_strategy != "no" and eval_strategy == save_strategy
        super().__post_init__()
        if self.global_train_batch_size is not None:
            actual = self.train_batch_size * self.gradient_accumulation_steps * self.world_size
            if actual != self.global_train_batch_size:  # e.g. one process driving several GPUs (DataParallel)
                raise ValueError(
                    f"--global_train_batch_size {self.global_train_batch_size}: this run would train on {actual} "
                    f"examples per step ({self.world_size} processes, {self.n_gpu} GPUs each); start one process per "
                    "GPU with torchrun or accelerate launch."
                )
