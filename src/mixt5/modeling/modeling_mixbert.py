"""MixT5 model classes of the BERT family (bert, roberta, xlm-roberta, electra): the stock encoder with the FFN of
chosen layers replaced by `MixBertSparseOutput`.

A BERT-family layer computes its FFN in two modules, `BertLayer.feed_forward_chunk`:
`output(intermediate(attn), attn)` with `intermediate = act(dense(attn))` and
`output = LayerNorm(dropout(dense(h)) + attn)`. A sparse layer keeps that call: `intermediate` becomes an identity and
`output` a `MixBertSparseOutput` (router + experts with biases, then the same dropout, residual and post-FFN
`LayerNorm`, whose parameter names stay `output.LayerNorm.*`). Everything else is transformers' own code.

The model forward adds the weighted router losses to the head's loss when labels are given (the QA start/end loss,
the classification loss), as `MixT5ForConditionalGeneration` does to its LM loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraModel,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

from .._compat import CardBeforeUploadMixin, ExpertsImplementationMixin, experts_class, init_submodel_with
from ..config import MixBertConfig, MixElectraConfig, MixRobertaConfig, MixXLMRobertaConfig
from .experts import sorted_dispatch
from .modeling_mixt5 import router_losses
from .moe_model import MoEModelMixin
from .router import MixT5Router
from .sparse_ff import SparseFFMixin


@experts_class(has_gate=False, has_bias=True)
class MixBertExperts(nn.Module):
    """Experts of a BERT FFN, biases included: `up_proj` (E, intermediate, hidden) and `up_proj_bias` (E, intermediate)
    are `intermediate.dense`, `down_proj` (E, hidden, intermediate) and `down_proj_bias` (E, hidden) `output.dense`.

    MixT5's dispatch (`sorted_dispatch`) adds the biases itself, so the default "eager" kernel is MixT5's, as for T5;
    transformers' "grouped_mm" / "batched_mm" read the same names (`has_bias=True`).
    """

    def __init__(self, config: MixBertConfig) -> None:
        super().__init__()
        num_experts, hidden, inner = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, inner))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.act_fn = ACT2FN[config.hidden_act]  # BERT has no dropout inside its FFN

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sorted_dispatch(self, hidden_states, top_k_index, top_k_weights)


class MixBertSparseOutput(SparseFFMixin, nn.Module):
    """`BertOutput` fed by the experts instead of `intermediate`: `LayerNorm(dropout(experts(x)) + x)`, where `x` is
    the attention output (the layer's `intermediate` is an identity)."""

    def __init__(self, config: MixBertConfig, router_type: str) -> None:
        super().__init__()
        self.router = MixT5Router(config.hidden_size, config.moe_config, router_type)
        self.experts = MixBertExperts(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.init_routing_state()

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        # hidden_states: the attention output, as `intermediate` is an identity; input_tensor: the same (residual)
        return self.LayerNorm(self.dropout(self.run_experts(hidden_states)) + input_tensor)


def _token_mask_hook(model: MixBertPreTrainedModel) -> Callable[..., None]:
    """A forward pre-hook for the base encoder: hand its 2-D padding mask to the MoE layers (the layers themselves
    get the 4-D attention mask, or none under SDPA without padding)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and mask.dim() != 2:
            mask = None
        for _, _, layer in model.sparse_layers():
            layer.token_mask = mask

    return hook


# Each output adds the unweighted router losses (weighted into `loss` when labels are given), the dropped
# assignments, the head's own loss, and optional router logits per MoE layer (fields repeated: a ModelOutput's
# fields must come after its base's).
@dataclass
class MixBertModelOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    task_loss: torch.Tensor | None = None  # the head's own loss, before the router losses
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer: (batch * seq_len, E)


@dataclass
class MixBertQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    task_loss: torch.Tensor | None = None  # the head's own loss, before the router losses
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer: (batch * seq_len, E)


@dataclass
class MixBertSequenceClassifierOutput(SequenceClassifierOutput):
    task_loss: torch.Tensor | None = None  # the head's own loss, before the router losses
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer: (batch * seq_len, E)


class MixBertPreTrainedModel(MoEModelMixin, CardBeforeUploadMixin, ExpertsImplementationMixin):
    """Mixed in before a stock BERT-family model class: sparse layers, their init, routing, losses, model card."""

    output_class: type = MixBertModelOutput
    # the head's loss is a per-example mean, not a token sum: Trainer scales it for gradient accumulation itself
    accepts_loss_kwargs = False

    def __init__(self, config: MixBertConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._sparsify()
        self.post_init()  # initialises only the new modules

    def _encoder_layers(self) -> nn.ModuleList:
        return self.base_model.encoder.layer

    def _sparsify(self) -> None:
        """Swap each configured layer's FFN for an identity `intermediate` and a `MixBertSparseOutput`."""
        router_type = self.config.moe_config.router_type_for("encoder")
        layers = self._encoder_layers()
        for index in self.config.moe_layer_indices["encoder"]:
            # routing sees whole sequences (padding mask, expert choice, capacity): no feed-forward chunking here
            layers[index].chunk_size_feed_forward = 0
            layers[index].intermediate = nn.Identity()
            layers[index].output = MixBertSparseOutput(self.config, router_type)
        self.base_model.register_forward_pre_hook(_token_mask_hook(self), with_kwargs=True)
        if self.base_model is not self:  # its own `_init_weights` knows no router or experts
            init_submodel_with(self.base_model, self._init_weights)

    def sparse_layers(self) -> Iterator[tuple[str, int, MixBertSparseOutput]]:
        for index, layer in enumerate(self._encoder_layers()):
            if isinstance(layer.output, MixBertSparseOutput):
                yield "encoder", index, layer.output

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MixT5Router):
            module.init_weights_(self.config.moe_config)
        elif isinstance(module, MixBertExperts):  # BERT's dense init, per expert
            init.normal_(module.up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)


def _with_router_losses(dense_forward: Callable[..., Any]) -> Callable[..., Any]:
    """The dense class's `forward` (its signature, for Trainer's column filtering), plus the router losses: added,
    weighted, to `loss` when the head computed one, and returned in the model's `output_class`."""

    @functools.wraps(dense_forward)
    def forward(self: MixBertPreTrainedModel, *args: Any, output_router_logits: bool | None = None, **kwargs: Any):
        moe = self.config.moe_config
        if output_router_logits is None:
            output_router_logits = moe.output_router_logits
        with self.collect_routing() as records:
            outputs = dense_forward(self, *args, **kwargs)
        if not isinstance(outputs, dict):  # return_dict=False: the records are in no tuple transformers knows
            raise ValueError(f"{type(self).__name__} returns its router losses in a ModelOutput: use return_dict=True.")
        result = self.output_class(**outputs)
        losses = router_losses(records["encoder"])
        if losses is not None:
            result.aux_loss, result.router_z_loss = losses.aux_loss, losses.router_z_loss
            result.num_dropped_tokens = losses.num_dropped_tokens
            if getattr(result, "loss", None) is not None:  # a bare encoder has no loss field
                result.task_loss = result.loss
                router_loss = moe.router_aux_loss_coef * losses.aux_loss + moe.router_z_loss_coef * losses.router_z_loss
                result.loss = result.loss + router_loss.to(result.loss.dtype)
        if output_router_logits:
            result.encoder_router_logits = tuple(r.router_logits for r in records["encoder"])
        return result

    return forward


# One line per (base type, head): the MixBert class is the stock class with the MixBert mix-in before it.
# Registered with the Auto classes below; `mixt5.families.bert` maps each stock class to its MixBert class.


class MixBertModel(MixBertPreTrainedModel, BertModel):
    config_class = MixBertConfig
    forward = _with_router_losses(BertModel.forward)


class MixBertForQuestionAnswering(MixBertPreTrainedModel, BertForQuestionAnswering):
    config_class = MixBertConfig
    output_class = MixBertQuestionAnsweringOutput
    forward = _with_router_losses(BertForQuestionAnswering.forward)


class MixBertForSequenceClassification(MixBertPreTrainedModel, BertForSequenceClassification):
    config_class = MixBertConfig
    output_class = MixBertSequenceClassifierOutput
    forward = _with_router_losses(BertForSequenceClassification.forward)


class MixRobertaModel(MixBertPreTrainedModel, RobertaModel):
    config_class = MixRobertaConfig
    forward = _with_router_losses(RobertaModel.forward)


class MixRobertaForQuestionAnswering(MixBertPreTrainedModel, RobertaForQuestionAnswering):
    config_class = MixRobertaConfig
    output_class = MixBertQuestionAnsweringOutput
    forward = _with_router_losses(RobertaForQuestionAnswering.forward)


class MixRobertaForSequenceClassification(MixBertPreTrainedModel, RobertaForSequenceClassification):
    config_class = MixRobertaConfig
    output_class = MixBertSequenceClassifierOutput
    forward = _with_router_losses(RobertaForSequenceClassification.forward)


class MixXLMRobertaModel(MixBertPreTrainedModel, XLMRobertaModel):
    config_class = MixXLMRobertaConfig
    forward = _with_router_losses(XLMRobertaModel.forward)


class MixXLMRobertaForQuestionAnswering(MixBertPreTrainedModel, XLMRobertaForQuestionAnswering):
    config_class = MixXLMRobertaConfig
    output_class = MixBertQuestionAnsweringOutput
    forward = _with_router_losses(XLMRobertaForQuestionAnswering.forward)


class MixXLMRobertaForSequenceClassification(MixBertPreTrainedModel, XLMRobertaForSequenceClassification):
    config_class = MixXLMRobertaConfig
    output_class = MixBertSequenceClassifierOutput
    forward = _with_router_losses(XLMRobertaForSequenceClassification.forward)


class MixElectraModel(MixBertPreTrainedModel, ElectraModel):
    config_class = MixElectraConfig
    forward = _with_router_losses(ElectraModel.forward)


class MixElectraForQuestionAnswering(MixBertPreTrainedModel, ElectraForQuestionAnswering):
    config_class = MixElectraConfig
    output_class = MixBertQuestionAnsweringOutput
    forward = _with_router_losses(ElectraForQuestionAnswering.forward)


class MixElectraForSequenceClassification(MixBertPreTrainedModel, ElectraForSequenceClassification):
    config_class = MixElectraConfig
    output_class = MixBertSequenceClassifierOutput
    forward = _with_router_losses(ElectraForSequenceClassification.forward)


# dense class -> MixBert class, per base type and head
MIXBERT_CLASSES: dict[type, type] = {
    BertModel: MixBertModel,
    BertForQuestionAnswering: MixBertForQuestionAnswering,
    BertForSequenceClassification: MixBertForSequenceClassification,
    RobertaModel: MixRobertaModel,
    RobertaForQuestionAnswering: MixRobertaForQuestionAnswering,
    RobertaForSequenceClassification: MixRobertaForSequenceClassification,
    XLMRobertaModel: MixXLMRobertaModel,
    XLMRobertaForQuestionAnswering: MixXLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification: MixXLMRobertaForSequenceClassification,
    ElectraModel: MixElectraModel,
    ElectraForQuestionAnswering: MixElectraForQuestionAnswering,
    ElectraForSequenceClassification: MixElectraForSequenceClassification,
}

_AUTO_CLASSES = {
    "Model": AutoModel,
    "ForQuestionAnswering": AutoModelForQuestionAnswering,
    "ForSequenceClassification": AutoModelForSequenceClassification,
}
for _moe_class in MIXBERT_CLASSES.values():
    AutoConfig.register(_moe_class.config_class.model_type, _moe_class.config_class, exist_ok=True)
    _head = next(suffix for suffix in _AUTO_CLASSES if _moe_class.__name__.endswith(suffix))
    _AUTO_CLASSES[_head].register(_moe_class.config_class, _moe_class, exist_ok=True)
