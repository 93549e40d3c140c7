"""MixT5 modeling: router, experts, the sparse FF sub-layers and the model classes of each family."""

from .experts import MixT5Experts, MixT5GatedExperts
from .modeling_mixbert import (
    MixBertForQuestionAnswering,
    MixBertForSequenceClassification,
    MixBertModel,
    MixBertPreTrainedModel,
)
from .modeling_mixt5 import (
    MixT5EncoderModel,
    MixT5EncoderOutput,
    MixT5ForConditionalGeneration,
    MixT5PreTrainedModel,
    MixT5Seq2SeqLMOutput,
    expert_counts_by_layer,
    layer_name,
    router_logits_to_expert_load,
)
from .moe_model import MoEModelMixin
from .router import MixT5Router, RouterOutput, expert_counts
from .sparse_ff import MixT5LayerSparseFF

__all__ = [
    "MixBertForQuestionAnswering",
    "MixBertForSequenceClassification",
    "MixBertModel",
    "MixBertPreTrainedModel",
    "MixT5EncoderModel",
    "MixT5EncoderOutput",
    "MixT5Experts",
    "MixT5ForConditionalGeneration",
    "MixT5GatedExperts",
    "MixT5LayerSparseFF",
    "MixT5PreTrainedModel",
    "MixT5Router",
    "MixT5Seq2SeqLMOutput",
    "MoEModelMixin",
    "RouterOutput",
    "expert_counts",
    "expert_counts_by_layer",
    "layer_name",
    "router_logits_to_expert_load",
]
