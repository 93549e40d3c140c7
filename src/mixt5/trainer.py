"""The one `Seq2SeqTrainer` subclass (router losses and expert load in the logs, samplers) and the SQuAD metric hook."""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import EvalPrediction, PreTrainedTokenizerBase, Seq2SeqTrainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

from ._compat import TrainerHooksMixin, batches_per_item_count, token_cross_entropy
from .data.extractive import DEFAULT_MAX_ANSWER_LENGTH, DEFAULT_N_BEST_SIZE, postprocess_predictions
from .data.squad import SquadExamples, TruncationStats
from .metrics import squad_metrics
from .model_card import write_model_card
from .modeling import MixT5PreTrainedModel, MoEModelMixin, RouterOutput, expert_counts_by_layer
from .utils import honour_umask, replace_dir, staging_owner, staging_prefix


class SquadEvaluator:
    """`compute_metrics` for generated answers: decodes them, maps them to question ids, scores them officially.

    The generated batches come back in the evaluation set's order (Trainer never shuffles it and drops the duplicates
    that distributed padding adds), so the i-th prediction answers `examples[i]`.
    """

    def __init__(
        self, examples: SquadExamples, tokenizer: PreTrainedTokenizerBase, truncation: TruncationStats | None = None
    ) -> None:
        self.ids = [example.id for example in examples]
        self.gold = {example.id: example.answers for example in examples}
        self.tokenizer = tokenizer
        self.truncation = truncation
        self.last_predictions: dict[str, str] = {}

    def decode(self, token_ids: np.ndarray) -> list[str]:
        token_ids = np.where(token_ids < 0, self.tokenizer.pad_token_id, token_ids)  # -100 = gathering padding
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def __call__(self, eval_prediction: EvalPrediction) -> dict[str, Any]:
        generated = eval_prediction.predictions
        generated = generated[0] if isinstance(generated, tuple) else generated
        answers = self.decode(generated)
        if len(answers) != len(self.ids):
            raise ValueError(f"got {len(answers)} generated answers for {len(self.ids)} evaluation questions")
        self.last_predictions = dict(zip(self.ids, answers, strict=True))
        metrics = squad_metrics(self.gold, self.last_predictions)
        if self.truncation is not None:
            metrics["answers_cut_by_truncation"] = self.truncation.num_answers_cut
        return metrics


class ExtractiveEvaluator:
    """`compute_metrics` for an encoder with a span head: start/end logits of every window → the best span of each
    question (`postprocess_predictions`) → the official score. Same `gold` / `last_predictions` as `SquadEvaluator`.

    `features` are the evaluation windows (`prepare_eval_features`) in the order Trainer evaluates them.
    """

    def __init__(
        self,
        examples: SquadExamples,
        features: Any,
        *,
        n_best_size: int = DEFAULT_N_BEST_SIZE,
        max_answer_length: int = DEFAULT_MAX_ANSWER_LENGTH,
    ) -> None:
        self.examples = examples
        self.features = features
        self.gold = {example.id: example.answers for example in examples}
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.last_predictions: dict[str, str] = {}

    def __call__(self, eval_prediction: EvalPrediction) -> dict[str, Any]:
        start_logits, end_logits = eval_prediction.predictions[:2]  # (num_windows, sequence_length) each
        if len(start_logits) != len(self.features):
            raise ValueError(f"got logits of {len(start_logits)} windows for {len(self.features)} evaluation windows")
        self.last_predictions = postprocess_predictions(
            self.examples,
            self.features,
            start_logits,
            end_logits,
            n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
        )
        return {**squad_metrics(self.gold, self.last_predictions), "windows": len(self.features)}


class ResumableLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose shuffle is seeded by (seed, epoch), so a resumed run replays the same order.

    transformers' own draws from the global RNG when an epoch starts; a resume restores that RNG to its mid-epoch state,
    so the resumed epoch would see a different order than the uninterrupted run.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


def share_t5_embedding_modules(model: torch.nn.Module) -> None:
    """Make T5's encoder and decoder `embed_tokens` the `shared` module itself, not three modules with one weight.

    FSDP2 shards parameters by module, and accelerate puts `shared` with the tied `lm_head` into a group of its own;
    the same weight, reached again through `encoder.embed_tokens` from the root group, then makes `fully_shard` refuse
    it (torch >= 2.13: "shared with a parameter already managed by another FSDP group"). One module under three
    names computes the same and keeps the same state-dict keys. A no-op unless the weights are tied.
    """
    shared = getattr(model, "shared", None)
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        embed = getattr(stack, "embed_tokens", None)
        if shared is not None and embed is not None and embed.weight is shared.weight:
            stack.embed_tokens = shared


def seq2seq_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> Any:
    """A dense T5's loss as MixT5's forward computes its LM loss (Trainer's `compute_loss_func`): the token
    cross-entropy over `num_items_in_batch` (the optimizer step's label tokens) when given, else the batch mean."""
    return token_cross_entropy(outputs["logits"], labels, num_items_in_batch)


class MixT5Trainer(TrainerHooksMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` that logs the router aux/z losses, dropped assignments and per-layer expert load, and keeps
    the evaluation set in order. The loss is the model's own (see `MixT5ForConditionalGeneration.forward`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # DataParallel (several GPUs, one process) splits a batch on its own: keep the model's per-batch mean there,
        # as Trainer does for models that take no `num_items_in_batch`.
        if self.args.n_gpu > 1:
            self.model_accepts_loss_kwargs = False
        elif (
            self.compute_loss_func is None
            and self.label_smoother is None
            and not self._is_moe
            and getattr(self.accelerator.unwrap_model(self.model).config, "is_encoder_decoder", False)
        ):  # an encoder QA model's start/end loss is its own
            self.compute_loss_func = seq2seq_token_loss  # a stock T5's forward ignores `num_items_in_batch`
        if self.is_fsdp_enabled:
            share_t5_embedding_modules(self.accelerator.unwrap_model(self.model))
        self._moe_sums: dict[str, torch.Tensor] = {}
        self._moe_steps = 0
        # Staging folders carry the owner (host, pid) of process 0: one name for every process.
        owner = [staging_owner()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(owner)
        self.staging_owner: str = owner[0]

    @property
    def _is_moe(self) -> bool:
        return isinstance(self.accelerator.unwrap_model(self.model), MoEModelMixin)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """For a MixT5 model, the card `save_pretrained` writes (training results kept), not transformers' generic one,
        which `push_to_hub` would otherwise write over it."""
        if not self._is_moe:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            write_model_card(self.accelerator.unwrap_model(self.model), self.args.output_dir)
        return None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if not (model.training and self._is_moe):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        if (
            num_items_in_batch is not None
            and self.model_accepts_loss_kwargs
            and isinstance(unwrapped, MixT5PreTrainedModel)
        ):
            inputs = {**inputs, "num_batches_in_step": batches_per_item_count(self)}
        with unwrapped.collect_routing() as records:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self._accumulate_moe_stats(unwrapped, outputs, records)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _accumulate_moe_stats(self, model: MoEModelMixin, outputs: Any, records: dict[str, list[RouterOutput]]) -> None:
        """Add this batch's router losses, dropped assignments and dispatched assignments per expert (on the device:
        no host synchronisation per step)."""
        if outputs.get("aux_loss") is None:
            return
        step = {
            "moe/aux_loss": outputs["aux_loss"].detach().to(torch.float64),
            "moe/z_loss": outputs["router_z_loss"].detach().to(torch.float64),
            "moe/dropped_assignments": outputs["num_dropped_tokens"].detach().to(torch.float64),
        }
        for name, counts in expert_counts_by_layer(model, records).items():
            step[f"moe/counts/{name}"] = counts
        for key, value in step.items():
            self._moe_sums[key] = self._moe_sums[key] + value if key in self._moe_sums else value
        self._moe_steps += 1

    def checkpoint_staging_dir(self, run_dir: str, name: str) -> str:
        """Checkpoints appear whole or not at all: written into `.checkpoint-N.HOST-PID.staging.partial/`, then renamed.

        Trainer writes a checkpoint's files one by one straight into `checkpoint-N`; a run killed meanwhile left a
        folder that `--resume_from_checkpoint last` picked and failed on. Now a kill at any moment leaves the earlier
        checkpoints as they were, plus a staging folder that the next run removes (`utils.remove_stale_staging`).
        """
        staging = os.path.join(run_dir, f"{staging_prefix(name, self.staging_owner)}staging.partial")
        if self.args.should_save:
            os.makedirs(staging, exist_ok=True)
        return staging

    def publish_checkpoint(self, staging: str, staged: str, final: str) -> None:
        self.accelerator.wait_for_everyone()  # every process has written its part (shards, RNG state)
        if self.args.should_save:
            honour_umask(staged)  # safetensors writes 0600
            replace_dir(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def train_sampler(self, default: torch.utils.data.Sampler | None) -> torch.utils.data.Sampler | None:
        if type(default) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # Group by the global batch of an optimizer step, not one process's share: accelerate deals the sampler's
            # order out to the processes batch by batch, so the same global batch gives the same examples per step
            # whether it runs as 4 x 1 process or 2 x 2 processes.
            global_batch = default.batch_size * max(1, self.args.world_size)
            return ResumableLengthGroupedSampler(global_batch, default.lengths, seed)
        return default

    def eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        """Keep the evaluation set in order: predictions are matched to question ids by position.

        transformers 5 applies `train_sampling_strategy="group_by_length"` to evaluation too, which would reorder it.
        """
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None  # distributed: sharded in order

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Score extractive predictions, which have no label ids: Trainer calls `compute_metrics` only with labels,
        and evaluation windows have none (the answer of a question is found across its windows, after the loop).
        As transformers' `QuestionAnsweringTrainer` example does, run the loop without it, then score the logits."""
        evaluator = self.compute_metrics
        if isinstance(evaluator, ExtractiveEvaluator):
            self.compute_metrics = None
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            self.compute_metrics = evaluator
        if isinstance(evaluator, ExtractiveEvaluator) and output.predictions is not None:
            scores = evaluator(EvalPrediction(predictions=output.predictions, label_ids=None))
            output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in scores.items()})
        return output

    def eval_gather_function(self) -> Any:
        """Gather each question's answer once from all processes.

        `Seq2SeqTrainer.evaluate` switches to `accelerator.gather`, which keeps the examples that distributed sharding
        repeats to even out the last batch (it does so for `num_return_sequences > 1`, transformers PR #27025), so 2
        processes would score duplicates. Evaluation here generates one answer per question (`SquadEvaluator` checks
        the count), so `gather_for_metrics`, which drops those repeats, is right; the eval loss then skips them too.
        """
        return functools.partial(
            self.accelerator.gather_for_metrics, use_gather_object=self.args.eval_use_gather_object
        )

    def _reduce_moe_stats(self) -> dict[str, float]:
        """The MoE statistics since the last log, over all processes (one collective per log, not per step).

        The losses are averaged over batches and processes, like Trainer's `loss`; the dropped-assignment count is per
        step of the global batch (summed over processes); `moe/load/<layer>/e<k>` is the fraction of the assignments
        the dispatch ran that went to expert k, over every token of every process since the last log.
        """
        keys = list(self._moe_sums)  # the same keys in the same order on every process: from the model's config
        sums = torch.cat([self._moe_sums[key].reshape(-1) for key in keys])
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        values = dict(zip(keys, sums.cpu().split([self._moe_sums[key].numel() for key in keys]), strict=True))
        processes, steps = max(1, self.args.world_size), self._moe_steps
        logs = {
            "moe/aux_loss": float(values.pop("moe/aux_loss")) / (steps * processes),
            "moe/z_loss": float(values.pop("moe/z_loss")) / (steps * processes),
            "moe/dropped_assignments": float(values.pop("moe/dropped_assignments")) / steps,
        }
        for key, counts in values.items():
            name = key.removeprefix("moe/counts/")
            load = counts / counts.sum() if counts.sum() > 0 else counts
            logs.update({f"moe/load/{name}/e{expert}": float(x) for expert, x in enumerate(load.tolist())})
        return {key: round(value, 6) for key, value in logs.items()}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Every process logs at the same steps (Trainer calls `log` on all of them), so the reduction cannot hang.
        if self._moe_steps and "loss" in logs:  # a training log: add the averages since the last one
            logs = {**logs, **self._reduce_moe_stats()}
            self._moe_sums.clear()
            self._moe_steps = 0
        super().log(logs, *args, **kwargs)
