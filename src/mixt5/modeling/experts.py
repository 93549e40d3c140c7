"""Experts as 3-D weights (the transformers 5 experts convention) and their token dispatch.

Gated experts (t5-v1.1, flan-t5, mt5) hold `gate_up_proj` (E, 2*d_ff, d_model), rows `[:d_ff]` the dense
`wi_0` and rows `[d_ff:]` the dense `wi_1`; non-gated (t5 v1.0) hold `up_proj` (E, d_ff, d_model); both hold
`down_proj` (E, d_model, d_ff), the dense `wo`. This layout is the checkpoint format: do not change it.

Kernels, chosen with transformers' `experts_implementation` (`from_pretrained(..., experts_implementation=...)`,
`model.set_experts_implementation(...)`, `mixt5 train --experts_implementation ...`):

- "eager" (MixT5's default): `sorted_dispatch` below, with its GEMM kernel picked by device: "grouped_mm"
  (`torch.nn.functional.grouped_mm`) on CUDA in bf16 where the kernel exists (SM80+), else the hand-written "mm"
  loop. `benchmarks/` measures both against each other and against transformers' kernels.
  The "grouped_mm" kernel keeps the sort, the per-expert offsets and every shape on the device (`dispatch_plan`
  with `on_device=True`): in bf16 on SM90/SM100, where torch's grouped GEMM is one CUTLASS kernel (elsewhere on
  CUDA it is a loop that reads the offsets on the host), the layer never synchronises with the host, forward or
  backward, and can run inside a CUDA graph (`torch.compile(mode="reduce-overhead")`, transformers' static-cache
  decoding).
  The "mm" loop reads the per-expert counts on the host (one synchronisation per layer) to plan its blocks.
- "mixt5_mm" / "mixt5_grouped_mm": `sorted_dispatch` with that kernel forced (registered with transformers).
- transformers' own "grouped_mm", "batched_mm", ...: transformers' kernels, unchanged.

Why a hand-written dispatch (each piece is measured by `python -m benchmarks layer`, see docs/benchmarks.md):
- transformers' eager loop (`MixtralExperts.forward`) indexes the 3-D parameters per expert inside autograd
  (`self.gate_up_proj[expert_idx]`): each index's backward makes a full-size (E, ...) gradient, O(E^2) traffic;
  `_ExpertsFeedForward` writes each expert's weight gradient into its slice of one (E, ...) tensor instead.
- transformers' eager and `grouped_mm` paths run the activation module over all (token, expert) pairs at once:
  T5's `gelu_new` is eight element-wise passes over (tokens x k x d_ff) temporaries (32 MiB each at T5-base size,
  where glibc hands out fresh, page-faulting `mmap`s), and as many again in its autograd backward. Here the pairs
  go through in cache-sized blocks of whole experts, with one fused kernel for the activation each way.
- they combine with `index_add_` (or an un-sort and a `.sum`), and autograd differentiates the gather
  `hidden_states[token_idx]` with an `index_add`, which on CPU runs as a `scatter_add`, far slower than a gather
  of the same rows. `_GatherPairs` and `_CombinePairs` move rows with gathers only, forward and backward, and fold
  the routing weights into the per-token sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from transformers.activations import (
    ACT2FN,
    FastGELUActivation,
    GELUActivation,
    GELUTanh,
    NewGELUActivation,
    SiLUActivation,
)

from .._compat import experts_class, register_experts_kernel
from ..config import MixT5Config

Kernel = Literal["mm", "grouped_mm"]
# experts_implementation -> `sorted_dispatch` kernel (None: chosen by device)
MIXT5_IMPLEMENTATIONS: dict[str, Kernel | None] = {"eager": None, "mixt5_mm": "mm", "mixt5_grouped_mm": "grouped_mm"}


def handles_unused_slots(experts_implementation: str | None) -> bool:
    """Whether the implementation skips slots whose expert id is the sentinel `num_experts` (MixT5's do).

    transformers' kernels know no sentinel: the caller sends those slots to expert 0 with weight 0
    (`mixt5._compat.index_for_transformers_kernels`).
    """
    return experts_implementation is None or experts_implementation in MIXT5_IMPLEMENTATIONS


class ActivationDropout(nn.Module):
    """T5's activation followed by its inner dropout (before `wo`), as one callable for the experts backends."""

    def __init__(self, act_fn: str, dropout_rate: float) -> None:
        super().__init__()
        self.act = ACT2FN[act_fn]
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(hidden_states))


class DispatchPlan(NamedTuple):
    """Where each (token, slot) pair goes once the pairs are sorted by expert; built once per layer call.

    Two forms, one index computation (`dispatch_plan`):
    - host plan ("mm" kernel): `counts` on the host (one synchronisation), the pairs trimmed to the assigned ones;
    - device plan ("grouped_mm" kernel): `offsets` stay on the device and all tokens x slots pairs are kept, the
      unused (sentinel) ones sorted last, past `offsets[-1]`, where the grouped GEMM skips them. No tensor's size
      depends on the routing, so the layer never waits for the device and can be captured in a CUDA graph.
    """

    token_of_pair: torch.Tensor  # (pairs,) token of each pair, pairs grouped by expert
    slot_of_pair: torch.Tensor  # (pairs,) flat slot id (token * slots + slot) of each pair
    pair_of_slot: torch.Tensor  # (tokens * slots,) row of each slot among the pairs (any row for an unused slot)
    unused_slots: torch.Tensor | None  # (tokens * slots, 1) True for a sentinel slot; None when all are used
    counts: list[int] | None  # host plan: pairs per expert
    offsets: torch.Tensor | None  # device plan: (num_experts,) int32, end row of each expert's pairs
    num_tokens: int
    num_slots: int


def dispatch_plan(expert_index: torch.Tensor, num_experts: int, on_device: bool = False) -> DispatchPlan:
    """Sort the (token, slot) pairs by expert once (stable: token order within an expert); sentinels go last.

    `on_device`: keep every count on the device (the "grouped_mm" kernel); else copy the per-expert counts to the
    host (one synchronisation) and drop the unused pairs, as the hand-written "mm" loop needs.
    """
    num_tokens, num_slots = expert_index.shape
    flat_index = expert_index.reshape(-1)  # (tokens * slots,)
    sorted_index, order = torch.sort(flat_index, stable=True)
    rows = torch.arange(order.numel(), device=order.device)
    pair_of_slot = torch.empty_like(order).scatter_(0, order, rows)  # inverse permutation
    unused_slots = (flat_index >= num_experts).unsqueeze(-1)
    if on_device:
        # end of expert e's rows = number of sorted ids <= e; `bincount` would synchronise on CUDA (it reads the max)
        boundaries = torch.arange(1, num_experts + 1, device=order.device, dtype=sorted_index.dtype)
        offsets = torch.searchsorted(sorted_index, boundaries, out_int32=True)
        return DispatchPlan(order // num_slots, order, pair_of_slot, unused_slots, None, offsets, num_tokens, num_slots)
    counts = torch.bincount(flat_index, minlength=num_experts + 1)[:num_experts].tolist()  # one host sync
    num_pairs = sum(counts)
    if num_pairs == order.numel():
        unused_slots = None
    else:
        pair_of_slot = pair_of_slot.clamp(max=max(num_pairs - 1, 0))  # a valid row; masked out by `unused_slots`
    slot_of_pair = order[:num_pairs]
    return DispatchPlan(
        slot_of_pair // num_slots, slot_of_pair, pair_of_slot, unused_slots, counts, None, num_tokens, num_slots
    )


class _GatherPairs(torch.autograd.Function):
    """`hidden[token_of_pair]`, whose backward sums each token's pair gradients with a gather.

    autograd's own backward of that index is an `index_add` into a zeroed (tokens, d_model) tensor (a
    `scatter_add` on CPU); here the pair gradients are gathered back into slot order and summed over the slots.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return hidden.index_select(0, plan.token_of_pair)

    @staticmethod
    def backward(ctx: Any, grad_pairs: torch.Tensor) -> tuple[torch.Tensor, None]:
        plan: DispatchPlan = ctx.plan
        grad_slots = grad_pairs.index_select(0, plan.pair_of_slot)  # (tokens * slots, d_model)
        if plan.unused_slots is not None:
            grad_slots.masked_fill_(plan.unused_slots, 0.0)
        grad_slots = grad_slots.view(plan.num_tokens, plan.num_slots, -1)
        grad_hidden = grad_slots[:, 0] if plan.num_slots == 1 else grad_slots.sum(dim=1)
        return grad_hidden, None


class _CombinePairs(torch.autograd.Function):
    """`out[t] = sum_s weight[t, s] * pair_out[pair_of_slot[t, s]]`: per slot one gather and one fused multiply-add.

    Replaces `pair_out * weight` followed by an `index_add` (or an un-sort and a `.sum`): the routing weights are
    folded into the reduction, and the backward (gradients of the pair outputs and of the weights, i.e. the
    router) is gathers and row-wise products, with no scatter. (A batched (1 x k) @ (k x d) `bmm` does the same in
    one call but loops over the tokens on CPU.)
    """

    @staticmethod
    def forward(ctx: Any, pair_out: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        slot_index = plan.pair_of_slot.view(plan.num_tokens, plan.num_slots)
        if plan.unused_slots is not None:  # their rows are some other pair's: give them no weight
            weights = weights.masked_fill(plan.unused_slots.view_as(weights), 0.0)
        out = None
        for slot in range(plan.num_slots):
            rows = pair_out.index_select(0, slot_index[:, slot]).to(weights.dtype)  # (tokens, d_model)
            if plan.unused_slots is not None:  # their rows may be ones the grouped GEMM left unwritten (NaN * 0)
                rows.masked_fill_(plan.unused_slots.view_as(weights)[:, slot : slot + 1], 0.0)
            weight = weights[:, slot : slot + 1]
            out = rows.mul_(weight) if out is None else out.addcmul_(rows, weight)
        ctx.plan = plan
        ctx.save_for_backward(pair_out, weights)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        pair_out, weights = ctx.saved_tensors
        plan: DispatchPlan = ctx.plan
        grad_out = grad_out.to(weights.dtype)
        grad_pairs = grad_weights = None
        if ctx.needs_input_grad[0]:
            pair_weights = weights.reshape(-1).index_select(0, plan.slot_of_pair).unsqueeze(-1)  # (pairs, 1)
            grad_pairs = grad_out.index_select(0, plan.token_of_pair).mul_(pair_weights).to(pair_out.dtype)
        if ctx.needs_input_grad[1]:
            slot_index = plan.pair_of_slot.view(plan.num_tokens, plan.num_slots)
            grad_weights = torch.stack(
                [
                    pair_out.index_select(0, slot_index[:, slot]).to(weights.dtype).mul_(grad_out).sum(dim=-1)
                    for slot in range(plan.num_slots)
                ],
                dim=1,
            )  # (tokens, slots)
            if plan.unused_slots is not None:
                grad_weights.masked_fill_(plan.unused_slots.view_as(grad_weights), 0.0)
        return grad_pairs, grad_weights, None


# Activations with one fused ATen kernel for the same function, forward and backward (transformers' `GELUTanh`
# notes that `gelu_new` is the tanh approximation): T5's `NewGELUActivation` is written as eight element-wise ops,
# each a pass over (tokens x d_ff), with about as many again for its autograd backward.
_FUSED = {
    NewGELUActivation: "gelu_tanh",
    GELUTanh: "gelu_tanh",
    FastGELUActivation: "gelu_tanh",
    GELUActivation: "gelu",
    nn.GELU: None,  # may be either approximation: generic path
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    SiLUActivation: "silu",
}


class ExpertActivation(NamedTuple):
    """What runs between the two projections: `dropout(act(gate) * up)` (gated) or `dropout(act(up))`."""

    act: Callable[[torch.Tensor], torch.Tensor]  # the experts' activation module
    fused: str | None  # its fused kernel, if it has one (`_FUSED`)
    gated: bool
    dropout: float  # drop probability in effect now (0 in eval mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused in ("gelu_tanh", "gelu"):
            return nn.functional.gelu(x, approximate="tanh" if self.fused == "gelu_tanh" else "none")
        if self.fused == "relu":
            return torch.relu(x)
        if self.fused == "silu":
            return nn.functional.silu(x)
        return self.act(x)

    def backward(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d act(x) / dx applied to `grad`; autograd's derivative (recomputing `act`) where no fused kernel exists."""
        if self.fused in ("gelu_tanh", "gelu"):
            return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if self.fused == "gelu_tanh" else "none")
        if self.fused == "relu":
            return torch.ops.aten.threshold_backward(grad, x, 0)
        if self.fused == "silu":
            return torch.ops.aten.silu_backward(grad, x)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (grad_x,) = torch.autograd.grad(self.act(leaf), leaf, grad)
        return grad_x


def expert_activation(experts: nn.Module) -> ExpertActivation:
    act, dropout = experts.act_fn, getattr(experts, "dropout", None)
    if isinstance(act, ActivationDropout):
        act, dropout = act.act, act.dropout
    probability = dropout.p if dropout is not None and dropout.training else 0.0
    return ExpertActivation(act, _FUSED.get(type(act)), bool(experts.has_gate), probability)


# Rows per block of `_ExpertsFeedForward`: whole experts are packed into blocks of about BLOCK_BYTES of
# (rows x d_ff) temporaries (512 rows at T5-base's d_ff in fp32), so the element-wise passes run on data that
# stays in cache; an expert with more than 4x that many rows is cut, keeping every temporary under 32 MiB, the
# size from which glibc serves each allocation with a fresh `mmap` that page-faults again (the layer benchmark
# times that cost as "writing the weight gradients into fresh memory").
BLOCK_BYTES = 4 * 2**20


class RowBlock(NamedTuple):
    start: int
    end: int
    segments: list[tuple[int, int, int]]  # (expert, start, end): the block's rows of each expert, in order


def row_blocks(counts: list[int], rows_per_block: int) -> list[RowBlock]:
    """Pack the pairs (grouped by expert, `counts` per expert) into blocks of whole experts."""
    blocks: list[RowBlock] = []
    segments: list[tuple[int, int, int]] = []
    max_rows = 4 * rows_per_block

    def flush() -> None:
        if segments:
            blocks.append(RowBlock(segments[0][1], segments[-1][2], list(segments)))
            segments.clear()

    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        if segments and segments[-1][2] - segments[0][1] + count > rows_per_block:
            flush()
        for piece in range(start, start + count, max_rows):
            segments.append((expert, piece, min(piece + max_rows, start + count)))
            if segments[-1][2] - segments[0][1] >= rows_per_block:
                flush()
        start += count
    flush()
    return blocks


class _ExpertsFeedForward(torch.autograd.Function):
    """All experts' FFNs over the pairs sorted by expert, forward and backward written by hand ("mm" kernel).

    In each row block (`row_blocks`), every expert's GEMMs run on its rows by `torch.mm(..., out=)` into the
    block's buffers, and the activation (and dropout) runs once over the block. Why by hand, rather than autograd
    over `F.linear` and the activation module (the study's ModuleList, transformers' eager loop):
    - each 3-D weight gets one gradient of its own size, whose expert slices are written in place: never E of
      them (autograd of an index per expert) and no `stack`/`cat`;
    - the temporaries are one block's, not all pairs', and the gate/up projections are two outputs, so no `chunk`
      whose backward concatenates;
    - the activation is one fused kernel each way where it has one (`_FUSED`), recomputed per block in backward
      from the saved gate/up instead of autograd keeping its intermediates for all pairs; the dropout mask is
      saved, so the recomputation is exact.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        up_weight: torch.Tensor,
        down_weight: torch.Tensor,
        up_bias: torch.Tensor | None,
        down_bias: torch.Tensor | None,
        blocks: list[RowBlock],
        activation: ExpertActivation,
        save: bool,
    ) -> torch.Tensor:
        d_ff = down_weight.shape[-1]
        out = x.new_empty(x.shape[0], down_weight.shape[1], dtype=down_weight.dtype)
        saved = []
        for block in blocks:
            rows = block.end - block.start
            up = x.new_empty(rows, d_ff)
            gate = x.new_empty(rows, d_ff) if activation.gated else None
            for expert, start, end in block.segments:
                local = slice(start - block.start, end - block.start)
                if activation.gated:
                    torch.mm(x[start:end], up_weight[expert, :d_ff].t(), out=gate[local])
                    torch.mm(x[start:end], up_weight[expert, d_ff:].t(), out=up[local])
                    if up_bias is not None:
                        gate[local] += up_bias[expert, :d_ff]
                        up[local] += up_bias[expert, d_ff:]
                else:
                    torch.mm(x[start:end], up_weight[expert].t(), out=up[local])
                    if up_bias is not None:
                        up[local] += up_bias[expert]
            # out of place where `act` may hand back its input (e.g. "linear"): gate and up are saved for backward
            hidden = activation.forward(gate) * up if activation.gated else activation.forward(up)
            mask = None
            if activation.dropout > 0:
                mask = torch.empty_like(hidden).bernoulli_(1 - activation.dropout).div_(1 - activation.dropout)
                hidden = hidden * mask
            hidden = hidden.to(down_weight.dtype)
            for expert, start, end in block.segments:
                local = slice(start - block.start, end - block.start)
                torch.mm(hidden[local], down_weight[expert].t(), out=out[start:end])
                if down_bias is not None:
                    out[start:end] += down_bias[expert]
            if save:
                saved.append((gate, up, mask))
        if save:
            ctx.blocks, ctx.activation, ctx.per_block = blocks, activation, saved
            ctx.has_bias = (up_bias is not None, down_bias is not None)
            ctx.save_for_backward(x, up_weight, down_weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, up_weight, down_weight = ctx.saved_tensors
        activation: ExpertActivation = ctx.activation
        need_x, need_up, need_down, need_up_bias, need_down_bias = ctx.needs_input_grad[:5]
        d_ff = down_weight.shape[-1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_up_weight = torch.empty_like(up_weight) if need_up else None
        grad_down_weight = torch.empty_like(down_weight) if need_down else None
        # a bias gradient is each expert's column sum of its rows' output gradients; (E, n): small, zero-initialised
        grad_up_bias = up_weight.new_zeros(up_weight.shape[:2]) if need_up_bias else None
        grad_down_bias = down_weight.new_zeros(down_weight.shape[:2]) if need_down_bias else None
        grad_out = grad_out.to(down_weight.dtype)
        written: set[int] = set()  # experts whose weight gradients hold a first contribution

        def weight_grad(grad: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, first: bool) -> None:
            if first:
                torch.mm(grad.t(), rows, out=target)
            else:  # an expert cut over several blocks
                target.addmm_(grad.t(), rows)

        for block, (gate, up, mask) in zip(ctx.blocks, ctx.per_block, strict=True):
            act_input = gate if activation.gated else up
            act_out = activation.forward(act_input)  # recomputed: one fused pass
            hidden = act_out * up if activation.gated else act_out
            if mask is not None:
                hidden = hidden.mul_(mask) if activation.gated else hidden * mask
            hidden = hidden.to(down_weight.dtype)
            grad_hidden = hidden.new_empty(hidden.shape)
            for expert, start, end in block.segments:
                local = slice(start - block.start, end - block.start)
                if need_down:
                    weight_grad(grad_out[start:end], hidden[local], grad_down_weight[expert], expert not in written)
                if need_down_bias:
                    grad_down_bias[expert] += grad_out[start:end].sum(dim=0)
                if need_x or need_up or need_up_bias:
                    torch.mm(grad_out[start:end], down_weight[expert], out=grad_hidden[local])
            if not (need_x or need_up or need_up_bias):
                written.update(expert for expert, _, _ in block.segments)
                continue
            grad_hidden = grad_hidden.to(x.dtype)
            if mask is not None:
                grad_hidden.mul_(mask)
            if activation.gated:
                grad_gate = activation.backward(grad_hidden * up, gate)
                grad_projections = ((grad_gate, slice(0, d_ff)), (grad_hidden.mul_(act_out), slice(d_ff, None)))
            else:
                grad_projections = ((activation.backward(grad_hidden, up), slice(None)),)
            for expert, start, end in block.segments:
                local = slice(start - block.start, end - block.start)
                for index, (grad, cols) in enumerate(grad_projections):
                    if need_up_bias:
                        grad_up_bias[expert, cols] += grad[local].sum(dim=0)
                    if need_up:
                        weight_grad(grad[local], x[start:end], grad_up_weight[expert, cols], expert not in written)
                    if need_x:
                        if index == 0:
                            torch.mm(grad[local], up_weight[expert, cols], out=grad_x[start:end])
                        else:
                            grad_x[start:end].addmm_(grad[local], up_weight[expert, cols])
                written.add(expert)
        for expert in range(up_weight.shape[0]):
            if expert not in written:  # an expert that got no tokens
                for grad in (grad_up_weight, grad_down_weight):
                    if grad is not None:
                        grad[expert].zero_()
        return grad_x, grad_up_weight, grad_down_weight, grad_up_bias, grad_down_bias, None, None, None


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM (one kernel for all experts on CUDA, with its own autograd): (pairs, in) @ W[e].T."""
    return nn.functional.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


def default_kernel(*weights: torch.Tensor) -> Kernel:
    """The kernel "eager" uses: torch's grouped GEMM on CUDA when every weight runs in bf16 (SM80+), else the loop.

    On CPU the hand-written loop measures faster than `torch.nn.functional.grouped_mm`; on an H200 in bf16 the
    grouped kernel is 1.4-1.6x faster than the loop, forward and forward+backward (docs/benchmarks.md).
    """
    device = weights[0].device
    autocast = torch.is_autocast_enabled(device.type)
    dtypes = {torch.get_autocast_dtype(device.type)} if autocast else {weight.dtype for weight in weights}
    if (
        device.type == "cuda"
        and dtypes == {torch.bfloat16}
        and hasattr(nn.functional, "grouped_mm")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    ):
        return "grouped_mm"
    return "mm"


def sorted_dispatch(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weights: torch.Tensor,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """Run each expert on one contiguous slice of the (token, slot) pairs sorted by expert.

    Args:
        experts: a MixT5 experts module (or any with transformers' concatenated, non-transposed layout); with
            `has_bias`, its `gate_up_proj_bias` / `up_proj_bias` (E, rows) and `down_proj_bias` (E, d_model) are
            added after each expert's projections (transformers' names, as its kernels read them).
        hidden_states: (tokens, d_model).
        expert_index: (tokens, slots) expert ids; `num_experts` marks an unused slot (skipped).
        expert_weights: (tokens, slots) combine weights (differentiable: the router's gradient).
        kernel: "mm" (hand-written loop) or "grouped_mm" (torch's grouped GEMM); None picks by device.
    Returns:
        (tokens, d_model): the weighted sum of each token's experts, in `hidden_states.dtype`.
    """
    if getattr(experts, "is_transposed", False):
        raise NotImplementedError(f"sorted_dispatch supports non-transposed experts, not {experts}.")
    up_weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
    down_weight = experts.down_proj
    up_bias = down_bias = None
    if getattr(experts, "has_bias", False):
        up_bias = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
        down_bias = experts.down_proj_bias
    kernel = kernel or default_kernel(up_weight, down_weight)
    if expert_index.numel() == 0:
        return torch.zeros_like(hidden_states)
    plan = dispatch_plan(expert_index, experts.num_experts, on_device=kernel == "grouped_mm")
    if plan.counts is not None and sum(plan.counts) == 0:
        return torch.zeros_like(hidden_states)
    pair_inputs = _GatherPairs.apply(hidden_states, plan)  # (pairs, d_model), grouped by expert
    activation = expert_activation(experts)
    device_type = hidden_states.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else up_weight.dtype
    down_dtype = compute_dtype if autocast else down_weight.dtype
    pair_inputs, up_weight, down_weight = (
        pair_inputs.to(compute_dtype),
        up_weight.to(compute_dtype),
        down_weight.to(down_dtype),
    )
    if up_bias is not None:
        up_bias, down_bias = up_bias.to(compute_dtype), down_bias.to(down_dtype)
    with torch.autocast(device_type, enabled=False):
        if kernel == "grouped_mm":
            # every pair's row, the unused ones past `offsets[-1]`: the kernel skips them and leaves their output
            # rows unwritten, which the combine (forward) and the gather's backward mask
            projected = _grouped_mm(pair_inputs, up_weight, plan.offsets)
            if up_bias is not None:
                # each pair's expert's bias, on the used pairs only: `where` (not a product) keeps the garbage the
                # grouped GEMM's backward leaves in the unused rows out of the bias gradients
                expert_of_pair = expert_index.reshape(-1)[plan.slot_of_pair].clamp(max=experts.num_experts - 1)
                used_pair = ~plan.unused_slots[plan.slot_of_pair]  # (pairs, 1)
                projected = torch.where(used_pair, projected + up_bias[expert_of_pair], projected)
            if activation.gated:
                gate, up = projected.chunk(2, dim=-1)
                hidden = activation.forward(gate) * up
            else:
                hidden = activation.forward(projected)
            if activation.dropout > 0:
                hidden = nn.functional.dropout(hidden, activation.dropout)
            pair_out = _grouped_mm(hidden.to(down_dtype), down_weight, plan.offsets)  # (pairs, d_model)
            if down_bias is not None:
                pair_out = torch.where(used_pair, pair_out + down_bias[expert_of_pair], pair_out)
        else:
            differentiable = (pair_inputs, up_weight, down_weight, up_bias, down_bias)
            save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
            rows_per_block = max(1, BLOCK_BYTES // (down_weight.shape[-1] * pair_inputs.element_size()))
            blocks = row_blocks(plan.counts, rows_per_block)
            pair_out = _ExpertsFeedForward.apply(*differentiable, blocks, activation, save)
        weights = expert_weights.to(torch.promote_types(pair_out.dtype, torch.float32))
        combined = _CombinePairs.apply(pair_out, weights, plan)
    return combined.to(hidden_states.dtype)


def _registered(kernel: Kernel) -> Callable[..., torch.Tensor]:
    def experts_forward(
        self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sorted_dispatch(self, hidden_states, top_k_index, top_k_weights, kernel)

    experts_forward.__name__ = f"mixt5_{kernel}_experts_forward"
    return experts_forward


for _name, _kernel in MIXT5_IMPLEMENTATIONS.items():
    if _kernel is not None:
        register_experts_kernel(_name, _registered(_kernel))


@experts_class(has_gate=True)
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
        # T5's dropout(act(wi_0 x) * wi_1 x): (pairs, 2 * d_ff) -> (pairs, d_ff); transformers' backends call this
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.dropout(self.act_fn(gate) * up)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sorted_dispatch(self, hidden_states, top_k_index, top_k_weights)


@experts_class(has_gate=False)
class MixT5Experts(nn.Module):
    """Experts of a non-gated T5 FF block (`T5DenseActDense`, t5 v1.0 ReLU)."""

    def __init__(self, config: MixT5Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.up_proj = nn.Parameter(torch.empty(config.num_experts, config.d_ff, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.d_model, config.d_ff))
        # transformers' backends call `act_fn` alone between the projections: it carries the inner dropout
        self.act_fn = ActivationDropout(config.dense_act_fn, config.dropout_rate)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sorted_dispatch(self, hidden_states, top_k_index, top_k_weights)
