"""The one `Seq2SeqTrainer` subclass (router losses and expert load in the logs) and the SQuAD metric hook."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import EvalPrediction, PreTrainedTokenizerBase, Seq2SeqTrainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

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


class MixT5Trainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` that also logs the router aux/z losses, dropped assignments and per-layer expert load."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # T5's forward takes **kwargs but ignores `num_items_in_batch` and returns a per-batch mean, so Trainer must
        # divide by the accumulation steps itself (it skips that for models that "accept loss kwargs").
        self.model_accepts_loss_kwargs = False
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
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if track and outputs.get("aux_loss") is not None:
            self._accumulate_moe_stats(unwrapped, inputs, outputs)
        return (loss, outputs) if return_outputs else loss

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

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return ResumableLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        """Keep the evaluation set in order: predictions are matched to question ids by position.

        transformers 5 applies `train_sampling_strategy="group_by_length"` to evaluation too, which would reorder it.
        """
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None  # distributed: sharded in order

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._moe_steps and "loss" in logs:  # a training log: add the averages since the last one
            logs = {**logs, **{k: round(v / self._moe_steps, 6) for k, v in self._moe_sums.items()}}
            self._moe_sums.clear()
            self._moe_steps = 0
        super().log(logs, *args, **kwargs)
