"""Routers: which experts each token goes to, and with what weight."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init

from ..config import MoEConfig


class RouterOutput(NamedTuple):
    """One MoE layer's routing of `tokens = batch * seq_len` tokens.

    Unused slots (capacity overflow, expert-choice slots a token did not win) hold the sentinel expert id
    `num_experts` and weight 0: they skip the experts and leave the residual path alone.
    """

    router_logits: torch.Tensor  # (tokens, num_experts), float32 or wider
    router_probs: torch.Tensor  # (tokens, num_experts), softmax of the clean logits
    selected_experts: torch.Tensor  # (tokens, k) the experts chosen before capacity dropping (for the aux loss)
    expert_index: torch.Tensor  # (tokens, slots) expert id per slot, `num_experts` for an unused slot
    expert_weights: torch.Tensor  # (tokens, slots) combine weight per slot, 0 for an unused slot
    token_mask: torch.Tensor | None  # (tokens,) True for real (non-padding) tokens
    num_dropped: torch.Tensor  # () assignments dropped by the capacity limit


def expert_counts(routing: RouterOutput) -> torch.Tensor:
    """(num_experts,) float64: the token-expert assignments the dispatch ran, per expert.

    Counted from `expert_index`, so capacity-dropped and other unused slots and padding tokens are left out, and
    noisy top-k and expert choice count what they chose, not a top-k of the clean logits. On the routing's device.
    """
    num_experts = routing.router_logits.shape[-1]
    index = routing.expert_index.detach()  # (tokens, slots); num_experts marks an unused slot
    if routing.token_mask is not None:
        index = index.masked_fill(~routing.token_mask.unsqueeze(-1), num_experts)
    return torch.bincount(index.reshape(-1), minlength=num_experts + 1)[:num_experts].to(torch.float64)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Route in float32 at least, and never below the model's dtype (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def expert_capacity(
    capacity_factor: float, num_tokens: int | torch.Tensor, top_k: int, num_experts: int
) -> int | torch.Tensor:
    """Slots per expert: `ceil(capacity_factor * tokens * top_k / num_experts)`, at least 1.

    `num_tokens` may be a count on the device (real tokens under a padding mask): the capacity then stays there
    too, computed in float64 in the same order, so the layer does not wait for the device to read it.
    """
    if isinstance(num_tokens, torch.Tensor):
        return (num_tokens.double() * capacity_factor * top_k / num_experts).ceil().clamp(min=1).long()
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def init_router_weight_(weight: torch.Tensor, moe: MoEConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initialise a router weight (num_experts, d_model) in place per `moe.router_init`, and return it.

    `linear_default` is what a fresh `nn.Linear(d_model, num_experts, bias=False)` gets (the study's router). The
    `transformers.initialization` functions leave a weight alone that `from_pretrained` already loaded.
    """
    if moe.router_init == "linear_default":
        return init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if moe.router_init == "normal":
        return init.normal_(weight, mean=0.0, std=moe.router_init_std, generator=generator)
    return init.zeros_(weight)


class MixT5Router(nn.Module):
    """A fresh `d_model -> num_experts` router (`weight`: (num_experts, d_model), no bias).

    - `topk` (default): softmax over all experts, then top-k, then renormalise (the study's and Mixtral's).
    - `noisy_topk`: Shazeer et al. 2017: during training, top-k over `logits + N(0, 1) * softplus(x W_noise)`.
    - `expert_choice`: Zhou et al. 2022: each expert picks its top-`capacity` tokens (encoder only).
    Optional multiplicative input jitter (Switch) during training, and a token-choice capacity limit.
    """

    def __init__(self, d_model: int, moe: MoEConfig, router_type: str) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.router_type = router_type
        self.norm_topk_prob = moe.norm_topk_prob
        self.jitter_noise = moe.router_jitter_noise
        self.capacity_factor = moe.capacity_factor
        self.weight = nn.Parameter(torch.empty(moe.num_experts, d_model))
        if router_type == "noisy_topk":
            self.noise_weight = nn.Parameter(torch.zeros(moe.num_experts, d_model))

    def init_weights_(self, moe: MoEConfig) -> None:
        """A model's `_init_weights` for a router: `weight` per `moe.router_init`, the noise projection zero."""
        init_router_weight_(self.weight, moe)
        if hasattr(self, "noise_weight"):
            init.zeros_(self.noise_weight)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        # hidden_states: (tokens, d_model); token_mask: (tokens,) bool
        dtype = routing_dtype(hidden_states.dtype)
        router_input = hidden_states.to(dtype)
        if self.training and self.jitter_noise > 0:
            router_input = router_input * torch.empty_like(router_input).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        router_logits = nn.functional.linear(router_input, self.weight.to(dtype))  # (tokens, num_experts)
        router_probs = router_logits.softmax(dim=-1)

        if self.router_type == "expert_choice":
            return self._expert_choice(router_logits, router_probs, token_mask)

        selection_logits = router_logits
        if self.router_type == "noisy_topk" and self.training:
            noise_std = nn.functional.softplus(nn.functional.linear(router_input, self.noise_weight.to(dtype)))
            selection_logits = router_logits + torch.randn_like(router_logits) * noise_std
        selection_probs = router_probs if selection_logits is router_logits else selection_logits.softmax(dim=-1)
        top_k_weights, selected_experts = selection_probs.topk(self.top_k, dim=-1)  # (tokens, k)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)

        expert_index, num_dropped = selected_experts, router_logits.new_zeros((), dtype=torch.long)
        if self.capacity_factor is not None:
            expert_index, num_dropped = self._apply_capacity(selected_experts, token_mask)
            top_k_weights = top_k_weights.masked_fill(expert_index == self.num_experts, 0.0)
        return RouterOutput(
            router_logits, router_probs, selected_experts, expert_index, top_k_weights, token_mask, num_dropped
        )

    def _apply_capacity(
        self, selected_experts: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop assignments past each expert's capacity; first choices have priority over second ones (GShard)."""
        num_tokens, k = selected_experts.shape
        num_real = token_mask.sum() if token_mask is not None else num_tokens  # on the device: no host sync
        capacity = expert_capacity(self.capacity_factor, num_real, k, self.num_experts)
        # slot-major order: every token's 1st choice, then every token's 2nd choice, ...
        experts_by_slot = selected_experts.t().reshape(-1)  # (k * tokens,)
        one_hot = nn.functional.one_hot(experts_by_slot, self.num_experts)  # (k * tokens, num_experts)
        if token_mask is not None:  # padding takes no capacity; it is dropped without being counted
            one_hot = one_hot * token_mask.repeat(k).unsqueeze(-1)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based position in its expert's queue
        keep = (position >= 1) & (position <= capacity)
        kept_index = torch.where(keep, experts_by_slot, torch.full_like(experts_by_slot, self.num_experts))
        num_dropped = (position > capacity).sum()
        return kept_index.view(k, num_tokens).t(), num_dropped

    def _expert_choice(
        self, router_logits: torch.Tensor, router_probs: torch.Tensor, token_mask: torch.Tensor | None
    ) -> RouterOutput:
        """Each expert takes its `capacity` highest-probability tokens; a token may get 0..E experts."""
        num_tokens = router_probs.shape[0]
        capacity_factor = self.capacity_factor or 1.0
        capacity = min(num_tokens, expert_capacity(capacity_factor, num_tokens, self.top_k, self.num_experts))
        scores = router_probs if token_mask is None else router_probs.masked_fill(~token_mask.unsqueeze(-1), -1.0)
        chosen_tokens = scores.topk(capacity, dim=0).indices  # (capacity, num_experts), best first
        chosen = torch.zeros_like(router_probs, dtype=torch.bool)
        if token_mask is None:
            chosen.scatter_(0, chosen_tokens, True)  # (tokens, num_experts)
        else:
            # under padding each expert keeps the first min(real, capacity of the real tokens) of its picks: a
            # count on the device, so the top-k runs at the bound set by all tokens and nothing waits for the device
            num_real = token_mask.sum()
            real_capacity = expert_capacity(capacity_factor, num_real, self.top_k, self.num_experts)
            keep = torch.arange(capacity, device=chosen.device) < torch.minimum(real_capacity, num_real)
            chosen.scatter_(0, chosen_tokens, keep.unsqueeze(-1).expand_as(chosen_tokens))
        experts = torch.arange(self.num_experts, device=router_probs.device).expand(num_tokens, -1)
        expert_index = torch.where(chosen, experts, torch.full_like(experts, self.num_experts))
        expert_weights = router_probs * chosen
        selected_experts = router_probs.topk(self.top_k, dim=-1).indices
        return RouterOutput(
            router_logits,
            router_probs,
            selected_experts,
            expert_index,
            expert_weights,
            token_mask,
            router_logits.new_zeros((), dtype=torch.long),
        )
