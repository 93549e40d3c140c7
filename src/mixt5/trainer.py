"""The one `Seq2SeqTrainer` subclass (router losses and expert load in the logs) and the SQuAD metric hook."""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import EvalPrediction, PreTrainedTokenizerBase, Seq2SeqTrainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

from ._compat import TrainerHooksMixin
from .data.squad import SquadExamples, TruncationStats
from .metrics import squad_metrics
from .modeling import MixT5PreTrainedModel, router_logits_to_expert_load


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


class MixT5Trainer(TrainerHooksMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` that also logs the router aux/z losses, dropped assignments and per-layer expert load."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Trainer then counts the label tokens of each optimizer step over all accumulation steps and processes
        # (`num_items_in_batch`); `compute_loss` normalises by that count itself (T5's forward ignores it).
        self.model_accepts_loss_kwargs = True
        if self.is_fsdp_enabled:
            share_t5_embedding_modules(self.accelerator.unwrap_model(self.model))
        self._moe_sums: dict[str, float] = defaultdict(float)
        self._moe_steps = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)
        track = model.training and isinstance(unwrapped, MixT5PreTrainedModel)
        if track:
            inputs = {**inputs, "output_router_logits": True}
        over_global_batch = (
            num_items_in_batch is not None
            and "labels" in inputs
            and self.label_smoother is None
            and self.args.n_gpu <= 1
        )
        # Tells `training_step` whether to divide by the accumulation steps (True: already done here).
        self.loss_is_scaled_for_ga = over_global_batch
        if over_global_batch:
            outputs = model(**inputs)
            loss = self._global_batch_loss(unwrapped, outputs, inputs["labels"], num_items_in_batch)
        else:  # evaluation, label smoothing, DataParallel: the model's per-batch mean
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if track and outputs.get("aux_loss") is not None:
            self._accumulate_moe_stats(unwrapped, inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    def _global_batch_loss(
        self, model: torch.nn.Module, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int
    ) -> torch.Tensor:
        """This micro-batch's share of the optimizer step's loss, so that the step's gradient does not depend on how
        its global batch is split into processes and accumulation steps.

        The LM loss is this batch's token cross-entropy sum over the label tokens of the whole step (all accumulation
        steps and processes), times the number of processes because DDP/FSDP/ZeRO average the gradients over them:
        the step then minimises the mean over every label token of the global batch, as one process with the whole
        batch would (T5's own loss is a per-batch mean: batches with fewer tokens would weigh more). The router's aux
        and z losses are per-batch means (each process balances its own tokens, as Switch/GShard do per device),
        divided by the accumulation steps: their mean over the step's batches.
        """
        logits = outputs["logits"]
        token_sum = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten().to(logits.device), ignore_index=-100, reduction="sum"
        )
        loss = token_sum / num_items_in_batch
        if self.args.average_tokens_across_devices:  # the count covers every process (Trainer gathers it)
            loss = loss * self.accelerator.num_processes
        if outputs.get("aux_loss") is not None:
            moe = model.config.moe
            router_loss = (
                moe["router_aux_loss_coef"] * outputs["aux_loss"] + moe["router_z_loss_coef"] * outputs["router_z_loss"]
            )
            loss = loss + router_loss.to(loss.dtype) / self.current_gradient_accumulation_steps
        return loss

    @torch.no_grad()
    def _accumulate_moe_stats(self, model: MixT5PreTrainedModel, inputs: dict[str, Any], outputs: Any) -> None:
        sums = self._moe_sums
        sums["moe/aux_loss"] += float(outputs["aux_loss"])
        sums["moe/z_loss"] += float(outputs["router_z_loss"])
        sums["moe/dropped_assignments"] += float(outputs["num_dropped_tokens"])
        top_k = model.config.moe["top_k"]
        masks = {"encoder": inputs.get("attention_mask"), "decoder": inputs["labels"].ne(-100)}
        names = defaultdict(list)
        for stack, block, _ in model.sparse_layers():
            names[stack].append(f"{stack}.{block}")
        for stack in ("encoder", "decoder"):
            logits = outputs.get(f"{stack}_router_logits") or ()
            if not logits:
                continue
            loads = router_logits_to_expert_load(tuple(logits), top_k, masks[stack])  # (layers, E)
            for name, load in zip(names[stack], loads.tolist(), strict=True):
                for expert, fraction in enumerate(load):
                    sums[f"moe/load/{name}/e{expert}"] += fraction
        self._moe_steps += 1

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
        """The MoE averages since the last log, reduced over processes (one collective per log, not per step).

        Losses and load fractions are averaged over processes, like Trainer's `loss`; the dropped-assignment count
        is summed, so it counts per step of the global batch whatever the number of processes.
        """
        averages = {key: total / self._moe_steps for key, total in self._moe_sums.items()}
        world_size = self.args.world_size
        if world_size > 1:
            keys = sorted(averages)  # the same keys on every process: they come from the model's config
            values = torch.tensor([averages[key] for key in keys], device=self.args.device)
            averages = dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist(), strict=True))
            averages["moe/dropped_assignments"] *= world_size
        return {key: round(value, 6) for key, value in averages.items()}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Every process logs at the same steps (Trainer calls `log` on all of them), so the reduction cannot hang.
        if self._moe_steps and "loss" in logs:  # a training log: add the averages since the last one
            logs = {**logs, **self._reduce_moe_stats()}
            self._moe_sums.clear()
            self._moe_steps = 0
        super().log(logs, *args, **kwargs)
