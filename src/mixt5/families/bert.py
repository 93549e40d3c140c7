"""The BERT family: bert, roberta, xlm-roberta and electra encoders, bare or with a QA or classification head.

Each layer's FFN is `intermediate.dense` (d_ff, d_model) + bias → activation → `output.dense` (d_model, d_ff) + bias;
the dropout, residual and post-FFN `LayerNorm` (in `output`) stay the dense model's. One stack: "encoder".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..config import MoEConfig
from ..modeling.modeling_mixbert import MIXBERT_CLASSES
from .base import DenseFF, Family

_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map")


class BertFamily(Family):
    name = "bert"
    model_types = (
        "bert, roberta, xlm-roberta, electra: the bare encoder, ...ForQuestionAnswering, ...ForSequenceClassification"
    )
    classes = MIXBERT_CLASSES

    def stacks(self, model: PreTrainedModel) -> dict[str, Sequence[nn.Module]]:
        return {"encoder": model.base_model.encoder.layer}

    def dense_ff(self, block: nn.Module) -> DenseFF:
        up, down = block.intermediate.dense, block.output.dense
        return DenseFF([up.weight], down.weight, [up.bias], down.bias)

    def moe_config(
        self,
        model: PreTrainedModel,
        moe: MoEConfig,
        layer_indices: dict[str, list[int]],
        provenance: dict[str, Any],
    ) -> PreTrainedConfig:
        config_class = self.moe_class(model).config_class
        values = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED}
        return config_class(moe=moe, moe_layer_indices=layer_indices, upcycled_from=provenance, **values)


BERT = BertFamily()
