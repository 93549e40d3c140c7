"""The T5 family: t5, t5-v1.1, flan-t5, mt5 (MT5's modules mirror T5's, parameter names included; flan-t5 is T5).

Each block's FF sub-layer is its last, `layer[-1].DenseReluDense`: `wi` (t5 v1.0) or `wi_0` (gate) and `wi_1` (up),
then `wo`, no biases. Two stacks, "encoder" and "decoder" (a `T5EncoderModel` has the first only).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedModel
from transformers.models.mt5.modeling_mt5 import MT5EncoderModel, MT5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5EncoderModel, T5ForConditionalGeneration

from ..config import MixT5Config, MoEConfig
from ..modeling.modeling_mixt5 import MixT5EncoderModel, MixT5ForConditionalGeneration
from ..modeling.tying import has_separate_lm_head
from .base import DenseFF, Family

_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map")


def mixt5_config_from_dense(
    dense_config: Any,
    moe: MoEConfig,
    layer_indices: dict[str, list[int]],
    provenance: dict[str, Any],
    *,
    tie_word_embeddings: bool,
) -> MixT5Config:
    """A `MixT5Config` carrying every field of a dense T5/MT5 config plus the MoE settings.

    `tie_word_embeddings` says whether the dense weights' `lm_head` is `shared` (the dense config cannot: transformers
    forces it to True); the decoder-output rescale is the dense model's own (MT5 never rescales).
    """
    values = {k: v for k, v in dense_config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED}
    values["tie_word_embeddings"] = tie_word_embeddings
    values["scale_decoder_outputs"] = bool(getattr(dense_config, "scale_decoder_outputs", False))
    return MixT5Config(moe=moe, moe_layer_indices=layer_indices, upcycled_from=provenance, **values)


def _dense_ties_lm_head(model: PreTrainedModel) -> bool:
    """Whether the dense model's output layer is its input embedding. An encoder has none: it follows the family
    (T5Config's decoder-output rescale is on exactly for tied configs; MT5Config has none, and mt5 is untied)."""
    if model.get_output_embeddings() is not None:
        return not has_separate_lm_head(model)
    return bool(getattr(model.config, "scale_decoder_outputs", False))


class T5Family(Family):
    name = "t5"
    model_types = "t5, t5-v1.1, flan-t5, mt5"
    classes: ClassVar[dict[type, type]] = {
        T5ForConditionalGeneration: MixT5ForConditionalGeneration,
        MT5ForConditionalGeneration: MixT5ForConditionalGeneration,
        T5EncoderModel: MixT5EncoderModel,
        MT5EncoderModel: MixT5EncoderModel,
    }

    def stacks(self, model: PreTrainedModel) -> dict[str, Sequence[nn.Module]]:
        stacks = {"encoder": model.encoder.block}
        if getattr(model, "decoder", None) is not None:
            stacks["decoder"] = model.decoder.block
        return stacks

    def dense_ff(self, block: nn.Module) -> DenseFF:
        ff = block.layer[-1].DenseReluDense
        inputs = [ff.wi_0.weight, ff.wi_1.weight] if hasattr(ff, "wi_0") else [ff.wi.weight]
        return DenseFF(inputs, ff.wo.weight)

    def moe_config(
        self,
        model: PreTrainedModel,
        moe: MoEConfig,
        layer_indices: dict[str, list[int]],
        provenance: dict[str, Any],
    ) -> MixT5Config:
        return mixt5_config_from_dense(
            model.config,
            moe,
            {"encoder": [], "decoder": [], **layer_indices},
            provenance,
            tie_word_embeddings=_dense_ties_lm_head(model),
        )

    def finish(self, dense: PreTrainedModel, moe_model: PreTrainedModel) -> None:
        moe_model.tie_weights()  # embed_tokens (and a tied lm_head) become `shared` again; a separate lm_head stays
        if getattr(dense, "generation_config", None) is not None:
            moe_model.generation_config = copy.deepcopy(dense.generation_config)


T5 = T5Family()
