"""The grouped kernel's device-side dispatch: no host synchronisation, CUDA graphs, compile, static-cache decoding.

On CPU: the device plan against the host plan, rows the grouped GEMM leaves unwritten, capacities counted on the
device, `torch.compile(fullgraph=True)` of the layer and of decoding. On an SM90/SM100 GPU in bf16: no
synchronisation in forward or backward (`torch.cuda.set_sync_debug_mode("error")`), a CUDA-graph replay, and
static-cache generation compiled with CUDA graphs (transformers' default for a static cache on CUDA) against eager
tokens.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dispatch import CASES, D_MODEL, _experts, _grads, _reference, _routing
from transformers import CompileConfig

from mixt5 import MixT5Config, MoEConfig, upcycle
from mixt5._compat import set_experts_implementation
from mixt5.modeling import MixT5LayerSparseFF
from mixt5.modeling import experts as experts_module
from mixt5.modeling.experts import dispatch_plan, sorted_dispatch
from mixt5.modeling.router import expert_capacity
from tiny import batch, tiny_config, tiny_dense

# torch's grouped GEMM runs its CUTLASS kernel in bf16 on SM90/SM100; elsewhere on CUDA it falls back to a loop
# that copies the offsets to the host (a synchronisation)
CUDA_GROUPED = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)
needs_cuda = pytest.mark.skipif(not CUDA_GROUPED, reason="needs an SM90/SM100 GPU (torch's bf16 grouped GEMM kernel)")


@given(
    num_experts=st.integers(min_value=1, max_value=6),
    rows=st.lists(st.lists(st.integers(min_value=0, max_value=6), min_size=2, max_size=2), min_size=1, max_size=12),
)
@settings(max_examples=150, deadline=None)
def test_device_plan_matches_host_plan(num_experts, rows):
    """Same sort, same rows: the device plan only keeps the unused pairs, after `offsets[-1]`."""
    expert_index = torch.tensor(rows).clamp(max=num_experts)  # `num_experts` is the unused-slot sentinel
    host = dispatch_plan(expert_index, num_experts)
    device = dispatch_plan(expert_index, num_experts, on_device=True)
    assert device.counts is None and host.offsets is None
    assert device.offsets.dtype == torch.int32
    assert device.offsets.tolist() == torch.tensor(host.counts).cumsum(0).tolist()
    num_pairs = sum(host.counts)
    assert torch.equal(device.slot_of_pair[:num_pairs], host.slot_of_pair)
    assert torch.equal(device.token_of_pair[:num_pairs], host.token_of_pair)
    used = expert_index.reshape(-1) < num_experts
    assert torch.equal(device.pair_of_slot[used], host.pair_of_slot[used])
    assert torch.equal(device.unused_slots.squeeze(-1), ~used)
    # every slot's row holds that slot's pair
    assert torch.equal(device.slot_of_pair[device.pair_of_slot], torch.arange(used.numel()))


def _unwritten_tail_grouped_mm(grouped_mm):
    """`grouped_mm` that writes NaN into the rows past `offsets[-1]` of its output, and of its input's gradient.

    torch's CUDA kernel leaves those rows uninitialised (forward output and backward input gradient alike); on
    CPU fresh memory is often zero, so the test makes the garbage explicit.
    """

    class Tail(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, offsets, in_forward):
            ctx.end, ctx.in_forward = int(offsets[-1]), in_forward
            x = x.clone()
            if in_forward:
                x[ctx.end :] = float("nan")
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            if not ctx.in_forward:
                grad[ctx.end :] = float("nan")
            return grad, None, None

    def poisoned(x, weight, offsets):
        return Tail.apply(grouped_mm(Tail.apply(x, offsets, False), weight, offsets), offsets, True)

    return poisoned


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(("num_experts", "top_k", "skew", "unused", "idle"), CASES)
def test_rows_the_grouped_kernel_leaves_unwritten_never_reach_outputs_or_gradients(
    monkeypatch, gated, num_experts, top_k, skew, unused, idle
):
    monkeypatch.setattr(experts_module, "_grouped_mm", _unwritten_tail_grouped_mm(experts_module._grouped_mm))
    experts = _experts(num_experts, gated)
    up = experts.gate_up_proj if gated else experts.up_proj
    hidden = torch.randn(13, D_MODEL, generator=torch.Generator().manual_seed(1), requires_grad=True)
    index, weights = _routing(13, num_experts, top_k, skew=skew, unused=unused, idle=idle)
    weights.requires_grad_()
    out = sorted_dispatch(experts, hidden, index, weights, "grouped_mm")
    expected = _reference(experts, hidden, index, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    inputs = [hidden, weights, up, experts.down_proj]
    for got, want in zip(_grads(out, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_all_slots_unused_on_the_device_path_gives_zeros_and_zero_gradients():
    experts = _experts(4)
    hidden = torch.randn(3, D_MODEL, requires_grad=True)
    out = sorted_dispatch(experts, hidden, torch.full((3, 2), 4), torch.zeros(3, 2), "grouped_mm")
    assert torch.equal(out, torch.zeros_like(hidden))
    grads = _grads(out, [hidden, experts.gate_up_proj, experts.down_proj])
    assert not any(grad.any() for grad in grads)


@given(
    capacity_factor=st.floats(min_value=0.01, max_value=4.0),
    num_tokens=st.integers(min_value=0, max_value=5000),
    top_k=st.integers(min_value=1, max_value=4),
    num_experts=st.integers(min_value=1, max_value=64),
)
@settings(max_examples=300, deadline=None)
def test_capacity_counted_on_the_device_equals_the_host_formula(capacity_factor, num_tokens, top_k, num_experts):
    on_device = expert_capacity(capacity_factor, torch.tensor(num_tokens), top_k, num_experts)
    assert int(on_device) == expert_capacity(capacity_factor, num_tokens, top_k, num_experts)


def test_expert_choice_under_padding_takes_each_experts_best_real_tokens():
    """The top-k runs at the bound set by all tokens; each expert keeps the best min(real, capacity) of them."""
    config = MixT5Config(
        moe={"moe_layers": "all", "num_experts": 4, "top_k": 1, "capacity_factor": 1.5},
        **tiny_config(dropout_rate=0.0).to_dict(),
    )
    router = MixT5LayerSparseFF(config, "expert_choice").router
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(12, D_MODEL, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([True, False] * 3 + [True] * 3 + [False] * 3)  # 6 real tokens
    out = router(hidden, mask)
    capacity = 3  # ceil(1.5 * 6 real tokens * 1 / 4); the bound over 12 tokens is 5
    for expert in range(4):
        chosen = (out.expert_index[:, expert] == expert).nonzero().squeeze(-1)
        real = mask.nonzero().squeeze(-1)
        best = real[out.router_probs[real, expert].topk(capacity).indices]
        assert sorted(chosen.tolist()) == sorted(best.tolist())


def _layer(router_type: str = "topk", device: str = "cpu", dtype=torch.bfloat16, **moe) -> MixT5LayerSparseFF:
    config = MixT5Config(moe={"moe_layers": "all", "num_experts": 4, **moe}, **tiny_config(dropout_rate=0.0).to_dict())
    set_experts_implementation(config, "mixt5_grouped_mm")
    layer = MixT5LayerSparseFF(config, router_type)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return layer.to(device=device, dtype=dtype)


LAYER_ROUTINGS = [
    pytest.param("topk", {}, id="dropless"),
    pytest.param("topk", {"capacity_factor": 0.75}, id="capacity"),
    pytest.param("expert_choice", {"capacity_factor": 1.0}, id="expert-choice"),
]


def _layer_inputs(device: str = "cpu", dtype=torch.bfloat16):
    hidden = torch.randn(3, 7, D_MODEL, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    token_mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    token_mask[-1, -3:] = False  # padding: the capacity counts real tokens
    return hidden, token_mask


def _forward_backward(layer, hidden, token_mask):
    layer.zero_grad()
    layer.token_mask = token_mask
    hidden = hidden.detach().requires_grad_()
    out = layer(hidden)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype))
    return [out.detach(), hidden.grad, *(param.grad for param in layer.parameters())]


HOST_READS = {"item", "tolist", "numpy", "__int__", "__bool__", "__float__"}


def _recording_backend(host_reads: list[str]):
    """The "aot_eager" backend, noting first every value the traced code reads back to the host.

    With `fullgraph=True` dynamo captures an `int(tensor)` as an `item` node instead of breaking the graph: on
    CUDA each one is a synchronisation, so the graphs must have none.
    """
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(graph_module, example_inputs):
        host_reads.extend(str(node.target) for node in graph_module.graph.nodes if str(node.target) in HOST_READS)
        return aot_eager(graph_module, example_inputs)

    return backend


@pytest.mark.parametrize(("router_type", "moe"), LAYER_ROUTINGS)
def test_layer_compiles_as_one_graph_with_no_host_read_and_the_eager_results(router_type, moe):
    """`fullgraph=True`, no value read back to the host, forward and backward equal to eager. (torch's grouped
    GEMM traces in bf16 only; "aot_eager" keeps the test quick.)"""
    layer = _layer(router_type, **moe).train()
    hidden, token_mask = _layer_inputs()
    eager = _forward_backward(layer, hidden, token_mask)
    torch._dynamo.reset()
    host_reads: list[str] = []
    compiled = torch.compile(layer, fullgraph=True, backend=_recording_backend(host_reads))
    got = _forward_backward(compiled, hidden, token_mask)
    assert host_reads == []
    for got_tensor, eager_tensor in zip(got, eager, strict=True):
        torch.testing.assert_close(got_tensor, eager_tensor)


def _generation_model(dtype=torch.float32, device: str = "cpu"):
    dense = tiny_dense(num_layers=2, num_decoder_layers=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than T5's init: tokens that differ from step to step
        for param in dense.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model = upcycle(dense, MoEConfig(num_experts=4, top_k=2, moe_layers="all"))
    return model.to(device=device, dtype=dtype).eval()


def _generate(model, **kwargs):
    inputs = {key: value.to(model.device) for key, value in batch().items() if key != "labels"}
    return model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, **kwargs)


def test_static_cache_generation_gives_the_eager_tokens():
    model = _generation_model()
    eager = _generate(model)
    assert len(set(eager[:, 1:].reshape(-1).tolist())) > 2  # a model whose tokens vary: the check can fail
    assert torch.equal(_generate(model, cache_implementation="static"), eager)


def test_compiled_static_cache_decoding_is_one_graph_with_the_eager_tokens():
    """What a GPU user gets from `cache_implementation="static"` (transformers then compiles the decoding step),
    here on CPU with `fullgraph=True`: no graph break anywhere in the step, MoE layers included."""
    model = _generation_model(torch.bfloat16)
    model.set_experts_implementation("mixt5_grouped_mm")  # CUDA's choice in bf16; "eager" picks the mm loop on CPU
    eager = _generate(model)
    host_reads: list[str] = []
    config = CompileConfig(fullgraph=True, dynamic=False, backend=_recording_backend(host_reads), mode=None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    compiled = _generate(model, cache_implementation="static", compile_config=config)
    assert hasattr(model, "_compiled_call")  # the decoding steps ran the compiled forward
    assert host_reads == []
    assert torch.equal(compiled, eager)


@needs_cuda
@pytest.mark.parametrize(("router_type", "moe"), LAYER_ROUTINGS)
def test_layer_never_synchronises_with_the_host_on_cuda(router_type, moe):
    layer = _layer(router_type, device="cuda", **moe).train()
    hidden, token_mask = _layer_inputs("cuda")
    expected = _forward_backward(layer, hidden, token_mask)  # warm-up (lazy initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _forward_backward(layer, hidden, token_mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got_tensor, expected_tensor in zip(got, expected, strict=True):
        torch.testing.assert_close(got_tensor, expected_tensor)


@needs_cuda
def test_layer_replays_in_a_cuda_graph():
    """Decoding shapes (one token per sequence, dropless): captured once, replayed on new inputs."""
    layer = _layer(device="cuda").eval()
    layer.token_mask = None
    static_input = torch.zeros(8, 1, D_MODEL, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            layer(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_output = layer(static_input)
    for seed in range(3):
        fresh = torch.randn(8, 1, D_MODEL, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        static_input.copy_(fresh)
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_output, layer(fresh))


@needs_cuda
@pytest.mark.slow
def test_static_cache_generation_with_cuda_graphs_gives_the_eager_tokens_on_cuda():
    """bf16 on CUDA: "eager" picks the grouped kernel; a static cache makes transformers compile the decoding step
    with its default `CompileConfig` (inductor, "reduce-overhead": CUDA graphs)."""
    model = _generation_model(torch.bfloat16, "cuda")
    eager = _generate(model)
    torch._dynamo.reset()
    assert torch.equal(_generate(model, cache_implementation="static"), eager)
    assert hasattr(model, "_compiled_call")
