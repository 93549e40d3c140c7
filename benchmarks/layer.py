"""Benchmark 1: one MoE feed-forward layer against the floor (dense `T5LayerFF` x k) and the alternatives.

Every MoE case is a whole T5 FF sub-layer (layer norm, router, experts, residual) with the same router and
weights; only the experts' dispatch differs:
- `mixt5`: MixT5's default (`experts_implementation="eager"`, kernel picked by device);
- `mixt5_mm` / `mixt5_grouped_mm`: MixT5's dispatch with the hand-written loop / torch's grouped GEMM forced;
- `modulelist`: a Mixtral-style loop over an `nn.ModuleList` of dense T5 FF blocks (the study's design);
- `hf_eager`: transformers' eager 3-D experts loop (`MixtralExperts.forward`), which indexes the 3-D weights;
- `hf_grouped_mm` / `hf_batched_mm`: transformers' `grouped_mm` / `batched_mm` experts backends.
The floor is the stock dense `T5LayerFF` on the same tokens, timed side by side, times k: what the layer would
cost if its k expert FFNs ran as fast as one dense FFN, with no routing at all. MixT5's experts run `gelu_new` as
torch's fused tanh-GELU (the same function); `dense_fused_act` is the floor with that kernel too (x k, as a ratio
to the floor), which separates what the activation kernel gains from what the dispatch costs.
"""

from __future__ import annotations

import copy
import os
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import T5Config
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense, T5LayerFF

from mixt5 import MixT5Config
from mixt5._compat import set_experts_implementation
from mixt5.modeling import MixT5LayerSparseFF
from mixt5.modeling.experts import default_kernel

from .timing import Measurement, interleaved


@dataclass(frozen=True)
class LayerSize:
    d_model: int
    d_ff: int
    feed_forward_proj: str


LAYER_SIZES = {
    "t5-v1.1-base": LayerSize(768, 2048, "gated-gelu"),
    "t5-small": LayerSize(512, 2048, "relu"),
}
PASSES = ("forward", "forward_backward")


def transformers_eager_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager 3-D experts loop: `MixtralExperts.forward`, and the same loop for non-gated experts."""
    if self.has_gate:
        return MixtralExperts.forward(self, hidden_states, top_k_index, top_k_weights)
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = self.act_fn(nn.functional.linear(hidden_states[token_idx], self.up_proj[expert_idx]))
        current = nn.functional.linear(current, self.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


class ModuleListSparseFF(nn.Module):
    """The study's / Mixtral (transformers 4) design: E dense T5 FF blocks in an `nn.ModuleList`, one loop."""

    def __init__(self, layer: MixT5LayerSparseFF, config: T5Config) -> None:
        super().__init__()
        self.layer_norm = copy.deepcopy(layer.layer_norm)
        self.router = copy.deepcopy(layer.router)
        self.dropout = nn.Dropout(config.dropout_rate)
        block = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.experts = nn.ModuleList(block(config) for _ in range(layer.experts.num_experts))
        experts = layer.experts
        with torch.no_grad():
            for e, expert in enumerate(self.experts):
                if config.is_gated_act:
                    gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
                    expert.wi_0.weight.copy_(gate)
                    expert.wi_1.weight.copy_(up)
                else:
                    expert.wi.weight.copy_(experts.up_proj[e])
                expert.wo.weight.copy_(experts.down_proj[e])
        self.to(experts.down_proj.device, experts.down_proj.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = hidden_states.shape
        normed = self.layer_norm(hidden_states).reshape(-1, d_model)
        routing = self.router(normed)
        final = torch.zeros_like(normed)
        expert_mask = nn.functional.one_hot(routing.expert_index, len(self.experts) + 1).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            out = expert(normed[token]) * routing.expert_weights[token, slot, None]
            final.index_add_(0, token, out.to(final.dtype))
        return hidden_states + self.dropout(final.view(batch, seq_len, d_model))


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_layers(
    size: LayerSize, num_experts: int, top_k: int, capacity_factor: float | None, device: torch.device, dtype
) -> tuple[T5Config, nn.Module, dict[str, nn.Module]]:
    """The dense floor and one MoE layer per implementation, all with the same weights and router."""
    config = T5Config(d_model=size.d_model, d_ff=size.d_ff, feed_forward_proj=size.feed_forward_proj, dropout_rate=0.0)
    torch.manual_seed(0)
    dense = T5LayerFF(config)
    moe = {"num_experts": num_experts, "top_k": top_k, "moe_layers": "all", "capacity_factor": capacity_factor}
    moe_config = MixT5Config(moe=moe, **config.to_dict())
    base = MixT5LayerSparseFF(moe_config, "topk")
    with torch.no_grad():
        experts = base.experts
        up = experts.gate_up_proj if config.is_gated_act else experts.up_proj
        nn.init.normal_(up, std=size.d_model**-0.5)
        nn.init.normal_(experts.down_proj, std=size.d_ff**-0.5)
        nn.init.normal_(base.router.weight, std=size.d_model**-0.5)
        nn.init.ones_(base.layer_norm.weight)
    base.to(device, dtype)
    other_kernel = "grouped_mm" if default_kernel(*base.experts.parameters()) == "mm" else "mm"
    layers: dict[str, nn.Module] = {}
    for name, implementation in (
        ("mixt5", "eager"),  # the automatic choice
        (f"mixt5_{other_kernel}", f"mixt5_{other_kernel}"),  # the other kernel, forced
        ("hf_eager", "eager"),
        ("hf_grouped_mm", "grouped_mm"),
        ("hf_batched_mm", "batched_mm"),
    ):
        layer = copy.deepcopy(base)
        layer.experts.config = copy.copy(moe_config)
        set_experts_implementation(layer.experts.config, implementation)
        if name == "hf_eager":
            layer.experts.forward = types.MethodType(transformers_eager_experts_forward, layer.experts)
        layers[name] = layer
    layers["modulelist"] = ModuleListSparseFF(base, config)
    if config.dense_act_fn == "gelu_new":  # the floor with MixT5's activation kernel, for comparison
        layers["dense_fused_act"] = copy.deepcopy(dense)
        layers["dense_fused_act"].DenseReluDense.act = nn.GELU(approximate="tanh")
    dense.to(device, dtype)
    for layer in layers.values():
        layer.to(device, dtype)
    return config, dense, layers


def _fresh_buffers(shapes: list[torch.Size], device: torch.device, dtype: torch.dtype) -> None:
    """Allocate and write one gradient per shape, as a backward pass does after `zero_grad(set_to_none=True)`."""
    for shape in shapes:
        torch.empty(shape, device=device, dtype=dtype).fill_(1.0)


def _step(module: nn.Module, hidden: torch.Tensor, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            module(hidden)
        return
    module(hidden).float().sum().backward()
    for param in module.parameters():
        param.grad = None
    hidden.grad = None


def run_layer_benchmark(
    size_name: str,
    size: LayerSize,
    *,
    tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    timer: str,
    memory_fraction: float = 0.5,
) -> dict[str, Any]:
    """Time every case forward and forward+backward, interleaved; ratios are to the floor (dense x k)."""
    config, dense, layers = build_layers(size, num_experts, top_k, capacity_factor, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(1, tokens, size.d_model, generator=generator).to(device, dtype).requires_grad_()

    skipped: dict[str, str] = {}
    up_rows = (2 if config.is_gated_act else 1) * size.d_ff
    element = torch.finfo(dtype).bits // 8
    # batched_mm gathers one full weight matrix per (token, expert) pair, and its gradient in backward
    batched_bytes = 2 * tokens * top_k * (up_rows + size.d_ff) * size.d_model * element
    if batched_bytes > memory_fraction * _available_bytes(device):
        skipped["hf_batched_mm"] = f"needs ~{batched_bytes / 2**30:.0f} GiB for per-pair weight copies"
    if device.type != "cuda" and size.d_model * element % 16:
        for name in ("mixt5_grouped_mm", "hf_grouped_mm"):
            skipped[name] = "torch grouped_mm on CPU needs 16-byte row strides"
    layers = {name: layer for name, layer in layers.items() if name not in skipped}

    # the same output from every implementation, or the timings compare different things
    with torch.no_grad():
        reference = layers["mixt5"](hidden).float()
        max_diff = {
            name: float((layer(hidden).float() - reference).abs().max())
            for name, layer in layers.items()
            if name != "dense_fused_act"
        }

    result: dict[str, Any] = {
        "size": size_name,
        "d_model": size.d_model,
        "d_ff": size.d_ff,
        "activation": config.dense_act_fn + (" (gated)" if config.is_gated_act else ""),
        "tokens": tokens,
        "num_experts": num_experts,
        "top_k": top_k,
        "capacity_factor": capacity_factor,
        "skipped": skipped,
        "max_abs_diff_vs_mixt5": max_diff,
        "default_kernel": default_kernel(*layers["mixt5"].experts.parameters()),
        "timings": {},
        "floor_s": {},
        "ratio_to_floor": {},
    }
    experts_shapes = [p.shape for p in layers["mixt5"].experts.parameters()]
    dense_shapes = [p.shape for p in dense.DenseReluDense.parameters()] * top_k
    for pass_name in PASSES:
        backward = pass_name == "forward_backward"
        cases = {"dense": lambda m=dense, b=backward: _step(m, hidden, b)}
        cases.update({name: (lambda m=layer, b=backward: _step(m, hidden, b)) for name, layer in layers.items()})
        if backward:  # what writing the weight gradients into fresh memory costs, for the experts and for the floor
            cases["grad_buffers_experts"] = lambda: _fresh_buffers(experts_shapes, device, dtype)
            cases["grad_buffers_dense_x_k"] = lambda: _fresh_buffers(dense_shapes, device, dtype)
        timings: dict[str, Measurement] = interleaved(cases, repeats, warmup, device)
        floor = top_k * timings["dense"].median(timer)
        result["timings"][pass_name] = {name: m.to_dict() for name, m in timings.items()}
        result["floor_s"][pass_name] = floor
        result["ratio_to_floor"][pass_name] = {
            name: m.median(timer) * (top_k if name == "dense_fused_act" else 1) / floor
            for name, m in timings.items()
            if name != "dense" and not name.startswith("grad_buffers")
        }
    return result
