"""Router auxiliary losses: pure functions over one MoE layer's routing, padding tokens excluded."""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of `values` (tokens, ...), counting only tokens where `token_mask` is True."""
    if token_mask is None:
        return values.mean(dim=0)
    weights = token_mask.to(values.dtype)
    weights = weights.view(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp(min=1.0)


def load_balancing_loss_func(
    router_probs: torch.Tensor, selected_experts: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to top-k.

    `E * sum_e f_e * P_e`, where `f_e` is the fraction of the tokens' top-k assignments that chose expert `e`
    (the fractions sum to 1) and `P_e` the mean router probability of `e`. It is 1 for a uniform router and
    grows to `E` as the routing collapses onto one expert.

    Args:
        router_probs: (tokens, num_experts) softmax of the router logits.
        selected_experts: (tokens, k) the experts each token chose, before any capacity dropping.
        token_mask: (tokens,) True for real tokens; padding is left out of both averages.
    """
    num_experts = router_probs.shape[-1]
    # expert_mask: (tokens, num_experts), the share of each token's k assignments that went to each expert
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_experts).to(router_probs.dtype).mean(dim=1)
    tokens_per_expert = _masked_mean(expert_mask, token_mask)  # (num_experts,)
    prob_per_expert = _masked_mean(router_probs, token_mask)  # (num_experts,)
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def router_z_loss_func(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of `logsumexp(logits)^2`.

    Args:
        router_logits: (tokens, num_experts) raw router logits, not probabilities.
        token_mask: (tokens,) True for real tokens.
    """
    log_z = torch.logsumexp(router_logits, dim=-1)  # (tokens,)
    return _masked_mean(log_z**2, token_mask)
