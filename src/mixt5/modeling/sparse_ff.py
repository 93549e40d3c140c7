"""The MoE feed-forward sub-layer: the routed part every family shares, and T5's `T5LayerFF` replacement."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.t5.modeling_t5 import T5LayerNorm

from .._compat import experts_implementation, index_for_transformers_kernels
from ..config import MixT5Config
from .experts import MixT5Experts, MixT5GatedExperts, handles_unused_slots
from .router import MixT5Router, RouterOutput


class SparseFFMixin:
    """The routed part shared by every family's sparse FF layer: `router`, `experts`, the padding mask of the current
    call and the routing records. A family's layer builds `router` and `experts` and wraps `run_experts` in its own
    residual and normalisation."""

    router: MixT5Router
    experts: nn.Module

    def init_routing_state(self) -> None:
        # Set by the owning model before each call (padding mask); kept until the next call so that
        # gradient-checkpointing recomputation routes exactly as the forward did.
        self.token_mask: torch.Tensor | None = None
        # A list while a model forward collects routing records (see `MoEModelMixin.collect_routing`), else None.
        self.routing_records: list[RouterOutput] | None = None

    def run_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, d_model) -> (batch, seq_len, d_model): each token's weighted sum of its experts."""
        batch_size, seq_len, d_model = hidden_states.shape
        flat = hidden_states.reshape(-1, d_model)  # (tokens, d_model)
        token_mask = self.token_mask
        if token_mask is not None:  # with a KV cache the decoder sees only the last `seq_len` positions
            fits = token_mask.dim() == 2 and token_mask.shape[0] == batch_size and token_mask.shape[1] >= seq_len
            token_mask = token_mask[:, -seq_len:].reshape(-1).bool() if fits else None
        routing = self.router(flat, token_mask)
        expert_index = routing.expert_index
        if not handles_unused_slots(experts_implementation(self.experts.config)):
            expert_index = index_for_transformers_kernels(expert_index, self.experts.num_experts)
        expert_output = self.experts(flat, expert_index, routing.expert_weights)
        if torch.is_grad_enabled() and not expert_output.requires_grad:
            expert_output = expert_output + self._zero_gradient_term()
        if self.routing_records is not None:
            self.routing_records.append(routing)
        return expert_output.view(batch_size, seq_len, d_model)

    def _zero_gradient_term(self) -> torch.Tensor:
        """A zero that depends on every trainable parameter of the layer, so that each gets a (zero) gradient.

        Data parallelism needs every process to produce a gradient for the same parameters in every step (DDP
        reduces them in buckets and waits for all of them; ZeRO and FSDP reduce-scatter them). Each 3-D expert weight
        is one parameter, and every experts implementation (MixT5's dispatch, transformers' grouped_mm/batched_mm)
        gives it a gradient whenever any of its experts ran, zero in the rows of experts that got no tokens. Only a
        step in which no token reaches any expert of the layer (every slot dropped by the capacity limit, or only
        padding) leaves the output disconnected from the weights: this term, added only then, reconnects them.
        Empty slices rather than `0 * p.sum()`: no arithmetic on the values (an inf cannot become a NaN), no cost.
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        return sum((p[:0].sum() for p in trainable), torch.zeros((), device=self.router.weight.device))


class MixT5LayerSparseFF(SparseFFMixin, nn.Module):
    """`T5LayerFF` with the dense FFN replaced by a router and E experts.

    Same structure and pre-norm residual as `T5LayerFF`: `x + dropout(experts(layer_norm(x)))`. It stays the
    last entry of `T5Block.layer`, with parameters `layer_norm.weight`, `router.weight` and `experts.*`.
    """

    def __init__(self, config: MixT5Config, router_type: str) -> None:
        super().__init__()
        moe = config.moe_config
        self.router = MixT5Router(config.d_model, moe, router_type)
        self.experts = (MixT5GatedExperts if config.is_gated_act else MixT5Experts)(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.init_routing_state()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.dropout(self.run_experts(self.layer_norm(hidden_states)))
