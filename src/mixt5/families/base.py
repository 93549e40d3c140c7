"""What a model family tells `upcycle()`: where its FF blocks are, their dense weights, the sparse classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..config import MoEConfig


class DenseFF(NamedTuple):
    """One dense FFN's weights in the experts' order (`mixt5.modeling.experts`), with biases where it has them.

    `inputs`: the input projections, (d_ff, d_model) each: `[gate, up]` for a gated FFN (stacked into
    `gate_up_proj`), `[up]` otherwise (`up_proj`). `output`: the output projection (d_model, d_ff), `down_proj`.
    """

    inputs: list[torch.Tensor]
    output: torch.Tensor
    input_biases: list[torch.Tensor] | None = None  # (d_ff,) each, as `inputs`
    output_bias: torch.Tensor | None = None  # (d_model,)

    @property
    def gated(self) -> bool:
        return len(self.inputs) == 2

    def tensors(self) -> list[torch.Tensor]:
        return [*self.inputs, self.output, *(self.input_biases or []), *([self.output_bias] if self.has_bias else [])]

    @property
    def has_bias(self) -> bool:
        return self.output_bias is not None


def expert_as_dense(experts: nn.Module, expert: int) -> DenseFF:
    """One expert of a 3-D experts module as a `DenseFF`: the inverse of how `upcycle()` stacks the dense weights."""
    gated = experts.has_gate
    up = (experts.gate_up_proj if gated else experts.up_proj)[expert]
    inputs = list(up.chunk(2, dim=0)) if gated else [up]
    if not getattr(experts, "has_bias", False):
        return DenseFF(inputs, experts.down_proj[expert])
    up_bias = (experts.gate_up_proj_bias if gated else experts.up_proj_bias)[expert]
    biases = list(up_bias.chunk(2)) if gated else [up_bias]
    return DenseFF(inputs, experts.down_proj[expert], biases, experts.down_proj_bias[expert])


class Family:
    """One model family (T5, BERT, ...): subclass it in one module under `mixt5.families` and list it in `FAMILIES`."""

    name: str  # "t5", "bert"
    model_types: str  # for messages: "t5, t5-v1.1, flan-t5, mt5"
    classes: dict[type, type]  # stock dense class -> its MixT5 class

    def moe_class(self, model: nn.Module) -> type | None:
        """The MixT5 class for `model`, or None when the family does not have it."""
        if type(model) in self.classes:
            return self.classes[type(model)]
        return next((moe for dense, moe in self.classes.items() if isinstance(model, dense)), None)

    def stacks(self, model: PreTrainedModel) -> dict[str, Sequence[nn.Module]]:
        """The model's stacks ("encoder", "decoder") and their blocks, in order."""
        raise NotImplementedError

    def dense_ff(self, block: nn.Module) -> DenseFF:
        """The dense FFN weights of one block."""
        raise NotImplementedError

    def moe_config(
        self,
        model: PreTrainedModel,
        moe: MoEConfig,
        layer_indices: dict[str, list[int]],
        provenance: dict[str, Any],
    ) -> PreTrainedConfig:
        """The sparse model's config: every field of the dense one, plus the MoE settings."""
        raise NotImplementedError

    def finish(self, dense: PreTrainedModel, moe_model: PreTrainedModel) -> None:
        """Anything left once the sparse model holds its weights (ties, generation config)."""
