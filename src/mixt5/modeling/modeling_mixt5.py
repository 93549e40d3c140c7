"""MixT5 model classes: stock T5 with chosen FF sub-layers replaced by `MixT5LayerSparseFF`.

The T5 blocks keep their structure, so every attention, cache and generation path is transformers' own. Two
small additions ride on top:
- a forward pre-hook on each stack hands the padding mask to its MoE layers (T5 calls the FF sub-layer with
  the hidden states only), so the aux losses and expert-choice routing see real tokens only;
- a model forward collects each MoE layer's `RouterOutput` and adds the aux losses to the loss, which it computes
  itself (token-normalised over a whole optimizer step when the Trainer passes `num_items_in_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForTextEncoding
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import (
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5PreTrainedModel,
    T5Stack,
)
from transformers.utils.generic import can_return_tuple

from .._compat import (
    CardBeforeUploadMixin,
    ExpertsImplementationMixin,
    OutputTieMixin,
    init_submodel_with,
    token_cross_entropy,
)
from ..config import MixT5Config
from ..losses import load_balancing_loss_func, router_z_loss_func
from .experts import MixT5Experts, MixT5GatedExperts
from .moe_model import MoEModelMixin
from .router import MixT5Router, RouterOutput, expert_counts
from .sparse_ff import MixT5LayerSparseFF
from .tying import missing_lm_head_error


@dataclass
class MixT5Seq2SeqLMOutput(Seq2SeqLMOutput):
    """`Seq2SeqLMOutput` plus the router losses (already weighted into `loss`) and optional router logits.

    `loss = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss` when labels are given
    (the router part divided by `num_batches_in_step` when the forward got it, see `forward`).
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer: (batch * src_len, E)
    decoder_router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer: (batch * tgt_len, E)


@dataclass
class MixT5EncoderOutput(BaseModelOutput):
    """`BaseModelOutput` plus the unweighted router losses, to be added to the caller's loss."""

    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class RouterLosses:
    aux_loss: torch.Tensor
    router_z_loss: torch.Tensor
    num_dropped_tokens: torch.Tensor


def router_losses(records: list[RouterOutput]) -> RouterLosses | None:
    """Load-balancing and z-losses averaged over the MoE layers that ran, and the dropped assignments."""
    if not records:
        return None
    aux = torch.stack([load_balancing_loss_func(r.router_probs, r.selected_experts, r.token_mask) for r in records])
    z_loss = torch.stack([router_z_loss_func(r.router_logits, r.token_mask) for r in records])
    dropped = torch.stack([r.num_dropped for r in records]).sum()
    return RouterLosses(aux.mean(), z_loss.mean(), dropped)


def layer_name(stack: str, block: int) -> str:
    """`encoder.4`: how logs, diagnostics, reports, predictions and the server name a MoE layer."""
    return f"{stack}.{block}"


def _stack_token_mask_hook(stack: T5Stack, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: give the stack's MoE layers this call's padding mask (or None)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None and stack.is_decoder:
        mask = getattr(stack, "pending_token_mask", None)  # labels != -100, set by the model's forward
    for block in stack.block:
        if isinstance(block.layer[-1], MixT5LayerSparseFF):
            block.layer[-1].token_mask = mask


class MixT5PreTrainedModel(
    MoEModelMixin, CardBeforeUploadMixin, OutputTieMixin, ExpertsImplementationMixin, T5PreTrainedModel
):
    """T5's pretrained-model base plus MixT5's config, init, tying (`lm_head` tied only when the config says so, see
    `tying`) and model card."""

    config_class = MixT5Config
    config: MixT5Config
    # `down_proj` is the experts' `wo`: kept in fp32 under fp16 like T5's `wo`, and so is the router
    _keep_in_fp32_modules: ClassVar[list[str]] = ["wo", "down_proj", "router"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`; a config that says untied with no `lm_head.weight` stored is an error."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if "lm_head.weight" in info["missing_keys"] and not model.config.tie_word_embeddings:
            raise missing_lm_head_error(pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, MixT5Router):
            module.init_weights_(self.config.moe_config)
        elif isinstance(module, MixT5GatedExperts | MixT5Experts):  # T5's dense FF init, per expert
            up = module.gate_up_proj if isinstance(module, MixT5GatedExperts) else module.up_proj
            init.normal_(up, mean=0.0, std=factor * self.config.d_model**-0.5)
            init.normal_(module.down_proj, mean=0.0, std=factor * self.config.d_ff**-0.5)

    def _sparsify_stacks(self) -> None:
        """Swap the FF sub-layer of each configured block for a `MixT5LayerSparseFF`."""
        moe = self.config.moe_config
        for stack_name, indices in self.config.moe_layer_indices.items():
            stack = getattr(self, stack_name, None)
            if stack is None:
                continue
            for index in indices:
                stack.block[index].layer[-1] = MixT5LayerSparseFF(self.config, moe.router_type_for(stack_name))
            stack.register_forward_pre_hook(_stack_token_mask_hook, with_kwargs=True)
            init_submodel_with(stack, self._init_weights)  # the stack's own init knows no router or experts

    def sparse_layers(self) -> Iterator[tuple[str, int, MixT5LayerSparseFF]]:
        """(stack name, block index, layer) for every MoE layer, encoder first."""
        for stack_name in ("encoder", "decoder"):
            stack = getattr(self, stack_name, None)
            if stack is None:
                continue
            for index, block in enumerate(stack.block):
                if isinstance(block.layer[-1], MixT5LayerSparseFF):
                    yield stack_name, index, block.layer[-1]


class MixT5ForConditionalGeneration(MixT5PreTrainedModel, T5ForConditionalGeneration):
    """T5 encoder-decoder whose configured FF sub-layers are sparse MoE layers."""

    def __init__(self, config: MixT5Config) -> None:
        super().__init__(config)
        self._sparsify_stacks()
        self.post_init()  # initialises only the new modules

    # Trainer passes `num_items_in_batch` (see `forward`) and takes the loss as normalised over the optimizer step.
    accepts_loss_kwargs = True

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        num_batches_in_step: int | None = None,
        **kwargs: Any,
    ) -> MixT5Seq2SeqLMOutput:
        """T5's forward; with labels, `loss` is the LM loss plus the weighted router aux and z losses.

        Args:
            num_items_in_batch: the label tokens of the whole optimizer step (Trainer counts them over the accumulation
                steps and, with `average_tokens_across_devices`, the processes). The LM loss is then this batch's token
                cross-entropy sum divided by it, so the step's batches add up to the mean over all its label tokens
                however it is split; without it, the mean over this batch's label tokens.
            num_batches_in_step: with `num_items_in_batch`, how many batches that count spans. The router losses are
                per-batch means (each batch balances its own tokens, as Switch and GShard do per device); they are
                divided by it, so the step's batches add up to their mean.
        """
        moe = self.config.moe_config
        if output_router_logits is None:
            output_router_logits = moe.output_router_logits
        if labels is not None and decoder_input_ids is None and kwargs.get("decoder_inputs_embeds") is None:
            decoder_input_ids = self._shift_right(labels)
        # decoder padding = positions without a label; the decoder's attention itself is left as T5 has it
        self.decoder.pending_token_mask = labels.ne(-100) if labels is not None else None
        try:
            with self.collect_routing() as records:
                outputs = super().forward(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=decoder_attention_mask,
                    return_dict=True,
                    **kwargs,
                )
        finally:
            self.decoder.pending_token_mask = None
        result = MixT5Seq2SeqLMOutput(**outputs)
        if labels is not None:
            result.lm_loss = result.loss = token_cross_entropy(result.logits, labels, num_items_in_batch)
        losses = router_losses(records["encoder"] + records["decoder"])
        if losses is not None:
            result.aux_loss, result.router_z_loss = losses.aux_loss, losses.router_z_loss
            result.num_dropped_tokens = losses.num_dropped_tokens
            if result.loss is not None:
                router_loss = moe.router_aux_loss_coef * losses.aux_loss + moe.router_z_loss_coef * losses.router_z_loss
                if num_items_in_batch is not None and num_batches_in_step is not None:
                    router_loss = router_loss / num_batches_in_step
                result.loss = result.loss + router_loss.to(result.loss.dtype)
        if output_router_logits:
            result.encoder_router_logits = tuple(r.router_logits for r in records["encoder"])
            result.decoder_router_logits = tuple(r.router_logits for r in records["decoder"])
        return result


class MixT5EncoderModel(MixT5PreTrainedModel, T5EncoderModel):
    """T5 encoder whose configured FF sub-layers are sparse MoE layers (upcycled from `T5EncoderModel`)."""

    def __init__(self, config: MixT5Config) -> None:
        super().__init__(config)
        self._sparsify_stacks()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> MixT5EncoderOutput:
        if output_router_logits is None:
            output_router_logits = self.config.moe_config.output_router_logits
        with self.collect_routing() as records:
            outputs = super().forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        result = MixT5EncoderOutput(**outputs)
        losses = router_losses(records["encoder"])
        if losses is not None:
            result.aux_loss, result.router_z_loss = losses.aux_loss, losses.router_z_loss
            result.num_dropped_tokens = losses.num_dropped_tokens
        if output_router_logits:
            result.encoder_router_logits = tuple(r.router_logits for r in records["encoder"])
        return result


def expert_counts_by_layer(
    model: MixT5PreTrainedModel, records: dict[str, list[RouterOutput]]
) -> dict[str, torch.Tensor]:
    """Per MoE layer (`layer_name`), the assignments the dispatch ran per expert, (num_experts,) float64.

    `records` as `collect_routing` gives them: per stack, each call's records in layer order (a `generate()` adds one
    decoder round per step); a layer's counts are summed over its calls.
    """
    counts: dict[str, torch.Tensor] = {}
    for stack in ("encoder", "decoder"):
        names = [layer_name(s, block) for s, block, _ in model.sparse_layers() if s == stack]
        for i, routing in enumerate(records.get(stack, ())):
            name = names[i % len(names)]
            counts[name] = counts[name] + expert_counts(routing) if name in counts else expert_counts(routing)
    return counts


def router_logits_to_expert_load(
    router_logits: tuple[torch.Tensor, ...], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-layer expert load from router logits: (num_layers, E), the fraction of top-k assignments per expert.

    It re-runs a plain top-k on the clean logits, so it ignores capacity dropping, noisy top-k and expert choice; for
    what the dispatch did, use `expert_counts_by_layer` over `collect_routing()`'s records.

    Args:
        router_logits: per MoE layer, (tokens, E) as in `MixT5Seq2SeqLMOutput.encoder_router_logits`.
        top_k: the model's `top_k`.
        token_mask: (tokens,) or (batch, seq_len), True for real tokens.
    """
    loads = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices  # (tokens, k)
        counts = nn.functional.one_hot(chosen, logits.shape[-1]).sum(dim=1).to(torch.float64)  # (tokens, E)
        if token_mask is not None:
            counts = counts[token_mask.reshape(-1).bool()]
        loads.append(counts.sum(dim=0) / counts.sum().clamp(min=1))
    return torch.stack(loads) if loads else torch.empty(0)


AutoConfig.register(MixT5Config.model_type, MixT5Config, exist_ok=True)
AutoModelForSeq2SeqLM.register(MixT5Config, MixT5ForConditionalGeneration, exist_ok=True)
AutoModelForTextEncoding.register(MixT5Config, MixT5EncoderModel, exist_ok=True)
