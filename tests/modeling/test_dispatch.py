"""MixT5's expert dispatch against a plain reference: outputs and gradients, kernels, blocks, activations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSeq2SeqLM
from transformers.activations import ACT2FN

from mixt5 import MixT5Config, MoEConfig, upcycle
from mixt5.modeling import MixT5Experts, MixT5GatedExperts, MixT5LayerSparseFF
from mixt5.modeling.experts import (
    default_kernel,
    expert_activation,
    handles_unused_slots,
    row_blocks,
    sorted_dispatch,
)
from tiny import batch, tiny_config, tiny_dense

D_MODEL, D_FF = 32, 64  # grouped_mm on CPU needs 16-byte row strides: multiples of 4 floats


def _experts(num_experts: int, gated: bool = True, dropout: float = 0.0, seed: int = 0, **dims):
    variant = "t5-v1.1-gated-gelu" if gated else "t5-v1.0-relu"
    overrides = {"dropout_rate": dropout, **dims}
    config = MixT5Config(
        moe={"num_experts": num_experts, "moe_layers": "all"}, **tiny_config(variant, **overrides).to_dict()
    )
    experts = (MixT5GatedExperts if gated else MixT5Experts)(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return experts.train(dropout > 0)


def _reference(experts, hidden, expert_index, expert_weights):
    """Per token, per slot: `weight * down(act(up(x)))` with the 3-D weights indexed in autograd."""
    gated = isinstance(experts, MixT5GatedExperts)
    up = experts.gate_up_proj if gated else experts.up_proj
    rows = []
    for token in range(hidden.shape[0]):
        acc = hidden.new_zeros(hidden.shape[1])
        for slot in range(expert_index.shape[1]):
            expert = int(expert_index[token, slot])
            if expert == experts.num_experts:
                continue
            projected = up[expert] @ hidden[token]
            if gated:
                gate, lin = projected.chunk(2)
                inner = experts.act_fn(gate) * lin
            else:
                inner = experts.act_fn(projected)
            acc = acc + expert_weights[token, slot] * (experts.down_proj[expert] @ inner)
        rows.append(acc)
    return torch.stack(rows)


def _routing(num_tokens, num_experts, top_k, *, seed=0, skew=False, unused=0.0, idle=()):
    """Random top-k routing: distinct experts per token; `skew` piles tokens onto expert 0; `unused` marks that
    share of slots with the sentinel; experts in `idle` get no token."""
    generator = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(num_experts) if e not in idle]
    scores = torch.rand(num_tokens, len(allowed), generator=generator)
    if skew:
        scores[:, 0] += 1.0
    index = torch.tensor(allowed)[scores.topk(top_k, dim=-1).indices]
    weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    if unused:
        drop = torch.rand(num_tokens, top_k, generator=generator) < unused
        index = index.masked_fill(drop, num_experts)
        weights = weights.masked_fill(drop, 0.0)
    return index, weights


def _grads(output, inputs):
    return torch.autograd.grad(output, inputs, torch.linspace(-1, 1, output.numel()).view_as(output))


CASES = [
    # (num_experts, top_k, skew, unused share, idle experts)
    (4, 1, False, 0.0, ()),
    (4, 2, True, 0.0, ()),
    (8, 2, False, 0.3, (5, 6)),
    (4, 4, False, 0.0, ()),  # top-E
    (3, 2, True, 0.5, (2,)),
]


@pytest.mark.parametrize("kernel", ["mm", "grouped_mm"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(("num_experts", "top_k", "skew", "unused", "idle"), CASES)
def test_dispatch_matches_reference_outputs_and_gradients(kernel, gated, num_experts, top_k, skew, unused, idle):
    experts = _experts(num_experts, gated)
    up = experts.gate_up_proj if gated else experts.up_proj
    hidden = torch.randn(13, D_MODEL, generator=torch.Generator().manual_seed(1), requires_grad=True)
    index, weights = _routing(13, num_experts, top_k, skew=skew, unused=unused, idle=idle)
    weights.requires_grad_()
    out = sorted_dispatch(experts, hidden, index, weights, kernel)
    expected = _reference(experts, hidden, index, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    inputs = [hidden, weights, up, experts.down_proj]
    grads = _grads(out, inputs)
    names = ["hidden", "weights", "up", "down"]
    for got, want, name in zip(grads, _grads(expected, inputs), names, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")
    for expert in idle:  # experts that got no tokens get exactly zero gradient
        assert not grads[2][expert].any() and not grads[3][expert].any()


def _as_inputs(experts, index):
    """`sorted_dispatch` as a function of (hidden, weights, up weight, down weight), for gradcheck."""
    gated = isinstance(experts, MixT5GatedExperts)

    def run(hidden, weights, up_weight, down_weight):
        view = SimpleNamespace(
            num_experts=experts.num_experts,
            has_gate=gated,
            act_fn=experts.act_fn,
            dropout=getattr(experts, "dropout", None),
            gate_up_proj=up_weight,
            up_proj=up_weight,
            down_proj=down_weight,
        )
        return sorted_dispatch(view, hidden, index, weights)

    up = experts.gate_up_proj if gated else experts.up_proj
    return run, up.detach().clone().requires_grad_(), experts.down_proj.detach().clone().requires_grad_()


@pytest.mark.parametrize("gated", [True, False])
def test_dispatch_passes_gradcheck_in_float64(gated):
    experts = _experts(4, gated, d_model=8, d_ff=4).double()
    hidden = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    index, weights = _routing(7, 4, 2, unused=0.2, seed=3, idle=(1,))
    run, up, down = _as_inputs(experts, index)
    assert torch.autograd.gradcheck(run, (hidden, weights.double().requires_grad_(), up, down))


@pytest.mark.parametrize(("gated", "act"), [(True, None), (False, "linear")])
def test_dropout_backward_replays_the_forward_mask(gated, act):
    """With dropout on, gradcheck with the RNG reseeded per call: the backward must use the forward's mask.

    "linear" hands back its input: the dispatch must not then scale the saved projection in place."""
    experts = _experts(2, gated, d_model=8, d_ff=4, dropout=0.3).double()
    if act is not None:
        experts.act_fn.act = ACT2FN[act]
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    index, weights = _routing(6, 2, 2, seed=4)
    run, up, down = _as_inputs(experts, index)

    def seeded(hidden, up, down):
        torch.manual_seed(0)
        return run(hidden, weights.double(), up, down)

    with torch.no_grad():
        dropped = seeded(hidden, up, down)
        experts.eval()
        kept = seeded(hidden, up, down)
        experts.train()
    assert not torch.allclose(dropped, kept)
    assert torch.autograd.gradcheck(seeded, (hidden, up, down))


def test_gradients_of_expert_weights_alone():
    """Frozen inputs and router (e.g. only the experts train): the weight gradients still match the reference."""
    experts = _experts(4)
    hidden = torch.randn(11, D_MODEL)
    index, weights = _routing(11, 4, 2, unused=0.2, idle=(3,))
    inputs = [experts.gate_up_proj, experts.down_proj]
    got = _grads(sorted_dispatch(experts, hidden, index, weights), inputs)
    want = _grads(_reference(experts, hidden, index, weights), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"])
def test_fused_activations_match_the_modules(act):
    module = ACT2FN[act]
    experts = _experts(2)
    experts.act_fn = module
    activation = expert_activation(experts)
    assert (activation.fused is None) == (act == "quick_gelu")  # quick_gelu has no fused kernel: generic path
    x = torch.randn(50, 7, dtype=torch.float64, requires_grad=True) * 3
    torch.testing.assert_close(activation.forward(x), module(x))
    grad = torch.randn_like(x)
    (expected,) = torch.autograd.grad(module(x), x, grad)
    torch.testing.assert_close(activation.backward(grad, x.detach()), expected)


def test_no_per_expert_index_of_3d_parameters_in_autograd():
    """The 3-D weights feed one hand-written node each; no `SelectBackward` (an O(E) index per expert)."""
    layer = MixT5LayerSparseFF(
        MixT5Config(moe={"num_experts": 8, "moe_layers": "all"}, **tiny_config(dropout_rate=0.0).to_dict()), "topk"
    )
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.2)
    out = layer(torch.randn(1, 6, D_MODEL))
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    assert names.count("_ExpertsFeedForwardBackward") == 1
    assert not {"SelectBackward0", "UnbindBackward0", "IndexBackward0"} & set(names)


@given(
    counts=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=9),
    rows_per_block=st.integers(min_value=1, max_value=16),
)
@settings(max_examples=200, deadline=None)
def test_row_blocks_cover_every_pair_once_in_order(counts, rows_per_block):
    blocks = row_blocks(counts, rows_per_block)
    segments = [segment for block in blocks for segment in block.segments]
    row = 0
    for expert, start, end in segments:
        assert start == row and end > start
        assert sum(counts[:expert]) <= start and end <= sum(counts[: expert + 1])
        row = end
    assert row == sum(counts)
    for block in blocks:
        assert block.start == block.segments[0][1] and block.end == block.segments[-1][2]
        assert block.end - block.start <= 4 * rows_per_block
        assert len(block.segments) == 1 or block.end - block.start <= rows_per_block


def test_blocks_smaller_than_experts_give_the_same_result(monkeypatch):
    """Experts cut over several blocks accumulate their weight gradients across blocks."""
    import mixt5.modeling.experts as experts_module

    experts = _experts(3)
    hidden = torch.randn(20, D_MODEL, requires_grad=True)
    index, weights = _routing(20, 3, 2, skew=True)
    inputs = [hidden, experts.gate_up_proj, experts.down_proj]
    out = sorted_dispatch(experts, hidden, index, weights)
    expected_grads = _grads(out, inputs)
    monkeypatch.setattr(experts_module, "BLOCK_BYTES", 2 * D_FF * 4)  # 2 rows per block, experts cut in 8-row pieces
    cut = sorted_dispatch(experts, hidden, index, weights)
    torch.testing.assert_close(cut, out)
    for got, want in zip(_grads(cut, inputs), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernel_choice_and_overrides(tmp_path):
    experts = _experts(2)
    assert default_kernel(*experts.parameters()) == "mm"  # CPU: the hand-written loop measures fastest
    assert handles_unused_slots("eager") and handles_unused_slots("mixt5_grouped_mm")
    assert not handles_unused_slots("grouped_mm")
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:2", capacity_factor=0.5))
    model.save_pretrained(tmp_path)
    inputs = batch()
    logits = {}
    for implementation in ("eager", "mixt5_mm", "mixt5_grouped_mm"):  # MixT5's, registered with transformers
        loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, experts_implementation=implementation).eval()
        assert loaded.config._experts_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded(**inputs).logits
    loaded.set_experts_implementation("grouped_mm")  # transformers' kernel: sentinel slots are clamped for it
    with torch.no_grad():
        logits["grouped_mm"] = loaded(**inputs).logits
    for implementation, value in logits.items():
        torch.testing.assert_close(value, logits["eager"], rtol=1e-4, atol=1e-5, msg=implementation)


def test_autocast_and_mixed_dtypes_run_in_the_expected_precision():
    experts = _experts(4)
    hidden = torch.randn(9, D_MODEL)
    index, weights = _routing(9, 4, 2)
    full = sorted_dispatch(experts, hidden, index, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sorted_dispatch(experts, hidden, index, weights)
    assert low.dtype == torch.float32  # the caller's dtype
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)
    # fp16/bf16 checkpoints keep `down_proj` in fp32, as T5's `wo`
    experts.gate_up_proj.data = experts.gate_up_proj.data.bfloat16()
    mixed = sorted_dispatch(experts, hidden.bfloat16(), index, weights)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)


def test_zero_tokens_and_all_slots_unused_give_zeros():
    experts = _experts(4)
    empty = sorted_dispatch(experts, torch.randn(0, D_MODEL), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, D_MODEL)
    hidden = torch.randn(3, D_MODEL)
    out = sorted_dispatch(experts, hidden, torch.full((3, 2), 4), torch.zeros(3, 2))
    assert torch.equal(out, torch.zeros_like(hidden))


@pytest.mark.parametrize("kernel", ["mm", "grouped_mm"])
@pytest.mark.parametrize(("num_experts", "top_k", "skew", "unused", "idle"), CASES[1:3])
def test_dispatch_with_biases_matches_a_per_token_reference(kernel, num_experts, top_k, skew, unused, idle):
    """Biased experts (BERT's FFN): `down(act(up x + b_up)) + b_down` per slot; outputs and every gradient."""
    from transformers import BertConfig

    from mixt5.config import MixBertConfig
    from mixt5.modeling.modeling_mixbert import MixBertExperts

    config = MixBertConfig(
        moe={"num_experts": num_experts, "moe_layers": "all"},
        **BertConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_attention_heads=2, num_hidden_layers=1).to_dict(),
    )
    experts = MixBertExperts(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    hidden = torch.randn(13, D_MODEL, generator=generator, requires_grad=True)
    index, weights = _routing(13, num_experts, top_k, skew=skew, unused=unused, idle=idle)
    weights.requires_grad_()
    out = sorted_dispatch(experts, hidden, index, weights, kernel)
    rows = []
    for token in range(13):
        acc = hidden.new_zeros(D_MODEL)
        for slot in range(top_k):
            e = int(index[token, slot])
            if e < num_experts:
                inner = experts.act_fn(experts.up_proj[e] @ hidden[token] + experts.up_proj_bias[e])
                acc = acc + weights[token, slot] * (experts.down_proj[e] @ inner + experts.down_proj_bias[e])
        rows.append(acc)
    expected = torch.stack(rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    inputs = [hidden, weights, experts.up_proj, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias]
    for got, want in zip(_grads(out, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
