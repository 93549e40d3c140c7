"""Every place MixT5 relies on a private or version-specific part of `transformers`, and nothing else.

Each entry says what we rely on; `tests/test_compat.py` has one contract test per entry that fails loudly when a
transformers release breaks it. `pyproject.toml` pins transformers to the minor versions CI tests: to move the pin,
install the new version, run `python -m pytest -q tests/test_compat.py` first, fix the entries that fail here (and
only here), then run the whole suite and widen the pin.

Imports: transformers only (this module sits below `config`, so every MixT5 module may use it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import HfArgumentParser, modeling_utils
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import cached_file

# --- Experts kernels (`transformers.integrations.moe`, transformers >= 5) --------------------------------------------


def experts_class(*, has_gate: bool, has_bias: bool = False) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: the experts' `forward` dispatches on `config._experts_implementation` (transformers'
    `use_experts_implementation`).

    We rely on: the decorated instance keeps `config` and gets `has_gate` (the weights are `gate_up_proj` when True,
    `up_proj` when False: the keyword appeared in transformers 5 and its default is True) and `has_bias` (transformers'
    kernels then add `gate_up_proj_bias` / `up_proj_bias` and `down_proj_bias`), and its `forward` is the kernel
    registered under the config's implementation, the class's own `forward` for "eager".
    """
    return use_experts_implementation(has_gate=has_gate, has_bias=has_bias)


def register_experts_kernel(name: str, forward: Callable[..., torch.Tensor]) -> None:
    """Make `forward(experts, hidden_states, top_k_index, top_k_weights)` the kernel `experts_implementation=name`."""
    ExpertsInterface.register(name, forward)


def experts_implementation(config: Any) -> str | None:
    """The experts kernel a model runs with: transformers keeps it in the private `config._experts_implementation`
    (set by `from_pretrained(..., experts_implementation=...)` and `set_experts_implementation`)."""
    return getattr(config, "_experts_implementation", None)


def set_experts_implementation(config: Any, implementation: str) -> None:
    """Set the kernel on a config directly (a lone layer has no model to call `set_experts_implementation` on)."""
    config._experts_implementation = implementation


def index_for_transformers_kernels(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routing indices that transformers' experts kernels accept: unused slots sent to expert 0 (their weight is 0).

    transformers' `batched_mm` indexes the weights with every slot's expert id (`gate_up_proj[expert_ids]`) and treats
    the id `num_experts` as "unused" only under expert parallelism; its `grouped_mm` skips it, but older releases did
    not. Expert 0 with weight 0 adds nothing to any token, whichever kernel runs.
    """
    return expert_index.clamp(max=num_experts - 1)


class ExpertsImplementationMixin:
    """For `PreTrainedModel` subclasses whose experts live in another module than the model class.

    transformers decides whether a model may switch its experts kernel by grepping the model class's module source
    for `@use_experts_implementation` (`_can_set_experts_implementation`, private); ours is in `modeling/experts.py`.
    `get_correct_experts_implementation` (transformers 5) picks the default: here MixT5's own dispatch, "eager".
    """

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return super().get_correct_experts_implementation("eager" if requested_experts is None else requested_experts)


# --- Tied output layer (transformers 5's tie API) -------------------------------------------------------------------


def config_forces_tied_output(config_class: type) -> bool:
    """Whether `config_class` (T5Config, MT5Config) says `tie_word_embeddings=True` whatever it is given.

    transformers 5's T5/MT5 configs do, keeping the given value only as T5's `scale_decoder_outputs`; their
    `from_pretrained` keeps a separate `lm_head` only because the checkpoint holds a different `lm_head.weight`, and a
    later `tie_weights()` (resizing the embeddings, FSDP2) ties it again unless the config says False.
    """
    return bool(config_class(tie_word_embeddings=False).tie_word_embeddings)


class OutputTieMixin:
    """For T5-family `PreTrainedModel`s whose `lm_head` is tied to `shared` only when `config.tie_word_embeddings` is.

    transformers 5 ties the `{target: source}` pairs `get_expanded_tied_weights_keys` returns (in `post_init`,
    `tie_weights()` and `from_pretrained`), and returns none at all for a config that says untied: T5's encoder and
    decoder `embed_tokens` would stop being `shared`. We keep those and drop only `lm_head.weight`.
    """

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict[str, str]:
        if all_submodels:  # calls this method on each PreTrainedModel inside, `self` included
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        mapping = dict(self._tied_weights_keys or {})
        if not self.config.tie_word_embeddings:
            mapping.pop("lm_head.weight", None)
        return mapping


class CardBeforeUploadMixin:
    """For `PreTrainedModel`s whose `README.md` must survive `push_to_hub`.

    transformers' `push_to_hub` saves the model into a temporary folder, writes over its `README.md` the Hub repo's
    card (or a generic one), then uploads the folder with `_upload_modified_files` (private; `save_pretrained(...,
    push_to_hub=True)` uploads with it too). We write the model's own card there just before: `write_card(folder)`.
    """

    def _upload_modified_files(self, working_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        self.write_card(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def write_card(self, folder: str | os.PathLike) -> None:
        raise NotImplementedError


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one `*.safetensors` or legacy `pytorch_model*.bin` file, read as `from_pretrained` reads them
    (`modeling_utils.load_state_dict`: safetensors, or `torch.load(weights_only=True)` behind its torch check)."""
    return modeling_utils.load_state_dict(path)


def local_or_cached_file(source: str, name: str) -> str | None:
    """The path of file `name` of `source` (a folder, or a hub id: downloaded into the cache), or None when it has
    none or the hub cannot be reached (`cached_file`'s private `_raise_exceptions_for_*` switches)."""
    return cached_file(
        source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
    )


# --- Weight initialisation -------------------------------------------------------------------------------------------


def init_submodel_with(submodel: nn.Module, init_weights: Callable[[nn.Module], None]) -> None:
    """Initialise the modules under `submodel` (a `PreTrainedModel` inside the model, e.g. a `T5Stack`) with
    `init_weights`.

    transformers' `initialize_weights` initialises a sub-model with its own `_init_weights` (private), which knows
    only its own class's modules; we put the outer model's in its place.
    """
    submodel._init_weights = init_weights


# --- Losses ---------------------------------------------------------------------------------------------------------


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of `logits` (..., vocab) against `labels` (...), -100 ignored, unshifted, in float32 at least.

    transformers' `ForMaskedLM` loss (`transformers.loss.loss_utils.LOSS_MAPPING`): the sum over the label tokens
    divided by `num_items_in_batch` when given (the Trainer's count over a whole optimizer step), else their mean.
    """
    return LOSS_MAPPING["ForMaskedLM"](logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


# --- Trainer hooks ---------------------------------------------------------------------------------------------------


def batches_per_item_count(trainer: Any) -> int:
    """How many batches the Trainer's `num_items_in_batch` spans in the current optimizer step.

    For a model with `accepts_loss_kwargs = True`, Trainer counts the label tokens over the step's accumulation
    steps (`current_gradient_accumulation_steps`) and, with `average_tokens_across_devices`, over all processes;
    it passes that count to the forward, does not divide the returned loss by the accumulation steps, and then
    multiplies it by the number of processes (which DDP's gradient average undoes).
    """
    batches = trainer.current_gradient_accumulation_steps
    if trainer.args.average_tokens_across_devices:
        batches *= trainer.accelerator.num_processes
    return batches


class TrainerHooksMixin:
    """Put before `Trainer` in the bases; implement the public-named methods it calls.

    - `train_sampler(default)`: the training sampler, given Trainer's own choice (`_get_train_sampler`, private;
      Trainer builds the training dataloader with it).
    - `eval_sampler(dataset)`: the evaluation sampler (`_get_eval_sampler`, private).
    - `eval_gather_function()`: how `evaluation_loop` gathers across processes (the private `gather_function`, which
      `Seq2SeqTrainer.evaluate` / `predict` reset before each call to `evaluation_loop`); None keeps Trainer's.
    - `checkpoint_staging_dir(run_dir, name)` and `publish_checkpoint(staging, staged, final)`: where a checkpoint is
      written before it is complete, and how it then takes its place (see `_save_checkpoint`); None writes in place.
    """

    _checkpoint_staging: str | None = None

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write `checkpoint-N` into `checkpoint_staging_dir(...)/checkpoint-N`, then have `publish_checkpoint` move it.

        `Trainer._save_checkpoint` (private) writes model, optimizer, scheduler, RNG states and `trainer_state.json`
        (last) one by one into `_get_output_dir(trial)/checkpoint-N`, records `state.best_model_checkpoint` as that
        path when this step is the best, and then rotates the checkpoints of that folder. So, for the call,
        `_get_output_dir` answers the staging folder (the smallest override that moves every write); afterwards the
        best checkpoint's path is corrected (and `trainer_state.json` rewritten with it), the checkpoint published,
        and the run folder rotated (the rotation Trainer did saw only the staging folder).
        """
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = self.checkpoint_staging_dir(run_dir, name)
        if staging is None:
            return super()._save_checkpoint(model, trial)
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.publish_checkpoint(staging, staged, final)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _get_output_dir(self, trial: Any) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def checkpoint_staging_dir(self, run_dir: str, name: str) -> str | None:
        return None

    def publish_checkpoint(self, staging: str, staged: str, final: str) -> None:
        pass

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        return self.train_sampler(super()._get_train_sampler(train_dataset))

    def _get_eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        return self.eval_sampler(eval_dataset)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        gather = self.eval_gather_function()
        if gather is not None:
            self.gather_function = gather
        return super().evaluation_loop(*args, **kwargs)

    def train_sampler(self, default: torch.utils.data.Sampler | None) -> torch.utils.data.Sampler | None:
        return default

    def eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        return super()._get_eval_sampler(eval_dataset)

    def eval_gather_function(self) -> Callable[..., Any] | None:
        return None


# --- Command-line arguments (`transformers.hf_argparser`) ------------------------------------------------------------


def add_dataclass_arguments(parser: HfArgumentParser, dataclass_type: type) -> None:
    """Add a dataclass's fields as flags to an existing `HfArgumentParser` (a subparser of `mixt5`), as its
    constructor does for the dataclasses it is given.

    We rely on: the private `_add_dataclass_arguments(dtype)` adding every field as its constructor would (name,
    `aliases`, `--no_<name>` for booleans defaulting to True, `Literal` choices, help), and
    `parse_args_into_dataclasses` building one instance per entry of the public `dataclass_types` list.
    """
    parser._add_dataclass_arguments(dataclass_type)
    parser.dataclass_types.append(dataclass_type)
