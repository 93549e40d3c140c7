"""Routers and the sparse FF sub-layer: top-k, capacity dropping, expert choice, dispatch gradients."""

from __future__ import annotations

import pytest
import torch

from mixt5 import MixT5Config, MoEConfig
from mixt5.modeling import MixT5LayerSparseFF, MixT5Router
from tiny import tiny_config


def _layer(router_type="topk", dropout=0.0, **moe):
    config = MixT5Config(moe={"moe_layers": "all", **moe}, **tiny_config(dropout_rate=dropout).to_dict())
    layer = MixT5LayerSparseFF(config, router_type)
    torch.manual_seed(0)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.2)
    torch.nn.init.ones_(layer.layer_norm.weight)
    return layer.eval()


def test_topk_weights_sum_to_one_and_pick_largest():
    router = MixT5Router(16, MoEConfig(num_experts=6, top_k=3), "topk")
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(20, 16)
    out = router(hidden)
    probs = (hidden @ router.weight.t()).softmax(-1)
    assert torch.equal(out.expert_index, probs.topk(3, -1).indices)
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(20))
    torch.testing.assert_close(out.expert_weights, probs.topk(3, -1).values / probs.topk(3, -1).values.sum(-1, True))
    assert out.router_logits.dtype == torch.float32


def test_routing_runs_in_at_least_float32():
    router = MixT5Router(8, MoEConfig(num_experts=4), "topk").to(torch.bfloat16)
    torch.nn.init.normal_(router.weight)
    out = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.router_logits.dtype == torch.float32 and out.expert_weights.dtype == torch.float32


def test_noisy_topk_adds_noise_only_in_training():
    router = MixT5Router(8, MoEConfig(num_experts=4, top_k=1), "noisy_topk")
    torch.nn.init.normal_(router.weight, std=0.01)
    torch.nn.init.normal_(router.noise_weight, std=1.0)
    hidden = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(hidden).expert_index, router(hidden).expert_index)
    router.train()
    torch.manual_seed(0)
    first = router(hidden).expert_index
    assert not torch.equal(first, router(hidden).expert_index)


def test_capacity_drops_overflow_to_residual_and_counts_it():
    layer = _layer(num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    hidden = torch.rand(1, 8, 32) + 0.1  # positive, so weight[2] @ x is largest
    layer.routing_records = []
    with torch.no_grad():
        out = layer(hidden)
    record = layer.routing_records[0]
    capacity = 2  # ceil(1.0 * 8 tokens * 1 / 4 experts)
    assert int(record.num_dropped) == 8 - capacity
    kept = record.expert_index[:, 0] == 2
    assert kept.tolist() == [True, True] + [False] * 6  # first come, first served
    torch.testing.assert_close(out[0, ~kept], hidden[0, ~kept])  # dropped tokens: residual only
    assert not torch.allclose(out[0, kept], hidden[0, kept])


def test_capacity_gives_first_choices_priority():
    router = MixT5Router(4, MoEConfig(num_experts=2, top_k=2, capacity_factor=0.5), "topk")
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    hidden = torch.tensor([[0.0, 1.0, 0, 0], [1.0, 0.0, 0, 0]])  # token 0 prefers expert 1, token 1 expert 0
    out = router(hidden)
    # capacity = ceil(0.5 * 2 * 2 / 2) = 1: each expert keeps its first-choice token, second choices drop
    assert out.expert_index.tolist() == [[1, 2], [0, 2]]
    assert int(out.num_dropped) == 2
    assert out.expert_weights[:, 1].abs().sum() == 0


def test_padding_takes_no_capacity():
    router = MixT5Router(4, MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0), "topk")
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    hidden = torch.ones(4, 4)
    mask = torch.tensor([False, False, True, True])
    out = router(hidden, mask)
    # capacity = ceil(1.0 * 2 real tokens * 1 / 2) = 1: the first real token keeps it, the second overflows;
    # padding is routed nowhere and is not counted as dropped
    assert out.expert_index[:, 0].tolist() == [2, 2, 0, 2]
    assert int(out.num_dropped) == 1


def test_expert_choice_each_expert_takes_capacity_tokens_never_padding():
    router = MixT5Router(8, MoEConfig(num_experts=4, top_k=2), "expert_choice")
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(10, 8)
    mask = torch.tensor([True] * 8 + [False] * 2)
    out = router(hidden, mask)
    chosen = out.expert_index != 4
    capacity = 4  # ceil(1.0 * 8 real tokens * 2 / 4)
    assert chosen.sum(0).tolist() == [capacity] * 4
    assert not chosen[8:].any()
    torch.testing.assert_close(out.expert_weights[chosen], out.router_probs[chosen])


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_dispatch_matches_per_token_reference_and_gradients(top_k, capacity_factor):
    layer = _layer(num_experts=4, top_k=top_k, capacity_factor=capacity_factor)
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    layer.routing_records = []
    out = layer(hidden)
    record = layer.routing_records[0]
    experts = layer.experts
    normed = layer.layer_norm(hidden).reshape(-1, 32)
    reference = []
    for t in range(normed.shape[0]):
        acc = torch.zeros(32)
        for slot in range(record.expert_index.shape[1]):
            e = int(record.expert_index[t, slot])
            if e == 4:
                continue
            gate, up = (experts.gate_up_proj[e] @ normed[t]).chunk(2)
            acc = acc + record.expert_weights[t, slot] * (experts.down_proj[e] @ (experts.act_fn(gate) * up))
        reference.append(acc)
    expected = hidden + torch.stack(reference).view(2, 5, 32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad_out,) = torch.autograd.grad(out.sum(), [experts.gate_up_proj])
    (grad_ref,) = torch.autograd.grad(expected.sum(), [experts.gate_up_proj])
    torch.testing.assert_close(grad_out, grad_ref, rtol=1e-4, atol=1e-5)
