"""Experts as 3-D weights (the transformers 5 experts convention) and their token dispatch.

Gated experts (t5-v1.1, flan-t5, mt5) hold `gate_up_proj` (E, 2*d_ff, d_model), rows `[:d_ff]` the dense
`wi_0` and rows `[d_ff:]` the dense `wi_1`; non-gated (t5 v1.0) hold `up_proj` (E, d_ff, d_model); both hold
`down_proj` (E, d_model, d_ff), the dense `wo`.

Both classes go through `transformers.integrations.moe.use_experts_implementation`, so
`experts_implementation="grouped_mm"` (or "batched_mm", ...) runs transformers' kernels. "eager" runs
`sorted_dispatch` below, written by hand because transformers' eager path indexes a 3-D parameter per expert
inside autograd (`self.gate_up_proj[expert_idx]`): each index's backward writes a full-size (E, ...) gradient,
O(E^2) traffic that measured 1.75x the FLOP floor on CPU. Here the weights are split once with `unbind`, whose
backward stacks the E slices once.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from ..config import MixT5Config


class ActivationDropout(nn.Module):
    """T5's activation followed by its inner dropout (before `wo`), as one callable for the experts backends."""

    def __init__(self, act_fn: str, dropout_rate: float) -> None:
        super().__init__()
        self.act = ACT2FN[act_fn]
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(hidden_states))


def sorted_dispatch(
    experts: nn.Module,
    up_weight: torch.Tensor,
    hidden_states: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weights: torch.Tensor,
) -> torch.Tensor:
    """Run each expert on one contiguous slice of the (token, slot) pairs sorted by expert.

    Args:
        experts: the experts module (gives `num_experts`, `down_proj`, `_expert_activation`).
        up_weight: (E, up_dim, d_model), `gate_up_proj` or `up_proj`.
        hidden_states: (tokens, d_model).
        expert_index: (tokens, slots) expert ids; `num_experts` marks an unused slot.
        expert_weights: (tokens, slots) combine weights.
    Returns:
        (tokens, d_model): the weighted sum of each token's experts, in `hidden_states.dtype`.
    """
    num_experts = experts.num_experts
    num_slots = expert_index.shape[-1]
    flat_index = expert_index.reshape(-1)  # (tokens * slots,)
    order = torch.argsort(flat_index, stable=True)  # sentinel slots sort last
    counts = torch.bincount(flat_index, minlength=num_experts + 1)[:num_experts].tolist()
    num_assigned = sum(counts)
    order = order[:num_assigned]
    token_of_pair = order // num_slots  # (pairs,)
    pair_inputs = hidden_states[token_of_pair]  # (pairs, d_model), grouped by expert
    up_weights = up_weight.unbind(0)
    down_weights = experts.down_proj.unbind(0)
    outputs = []
    for expert, pair_slice in enumerate(torch.split(pair_inputs, counts)):
        if pair_slice.shape[0] == 0:
            continue
        hidden = experts._expert_activation(nn.functional.linear(pair_slice, up_weights[expert]))
        hidden = hidden.to(down_weights[expert].dtype)  # `down_proj` may be kept in fp32, as T5's `wo`
        outputs.append(nn.functional.linear(hidden, down_weights[expert]))
    result = torch.zeros_like(hidden_states)
    if not outputs:
        return result
    pair_weights = expert_weights.reshape(-1)[order].unsqueeze(-1)  # (pairs, 1)
    pair_outputs = torch.cat(outputs) * pair_weights  # (pairs, d_model)
    return result.index_add(0, token_of_pair, pair_outputs.to(result.dtype))


@use_experts_implementation(has_gate=True)
class MixT5GatedExperts(nn.Module):
    """Experts of a gated-activation T5 FF block (`T5DenseGatedActDense`): fused gate/up projection."""

    def __init__(self, config: MixT5Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.d_ff, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.d_model, config.d_ff))
        self.act_fn = ACT2FN[config.dense_act_fn]
        self.dropout = nn.Dropout(config.dropout_rate)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        # gate_up_out: (pairs, 2 * d_ff) -> (pairs, d_ff); used by transformers' backends too
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.dropout(self.act_fn(gate) * up)

    _expert_activation = _apply_gate

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sorted_dispatch(self, self.gate_up_proj, hidden_states, top_k_index, top_k_weights)


@use_experts_implementation(has_gate=False)
class MixT5Experts(nn.Module):
    """Experts of a non-gated T5 FF block (`T5DenseActDense`, t5 v1.0 ReLU)."""

    def __init__(self, config: MixT5Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.up_proj = nn.Parameter(torch.empty(config.num_experts, config.d_ff, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.d_model, config.d_ff))
        # transformers' backends call `act_fn` alone between the projections: it carries the inner dropout
        self.act_fn = ActivationDropout(config.dense_act_fn, config.dropout_rate)

    def _expert_activation(self, up_out: torch.Tensor) -> torch.Tensor:
        return self.act_fn(up_out)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sorted_dispatch(self, self.up_proj, hidden_states, top_k_index, top_k_weights)
