"""Benchmarks 2-4: a training step, greedy generation and SQuAD-shaped evaluation, dense T5 against its upcycled copy.

Both models are built from a config (random weights; nothing is downloaded); the upcycled one is
`upcycle(copy.deepcopy(dense), MoEConfig(...))`. The measured time ratio (upcycled / dense) is set against the
theoretical FLOP ratio from `t5_flops`, which counts every matrix product: attention projections and scores,
feed-forward (k experts per token in MoE blocks), router and `lm_head`. Element-wise work (norms, activations,
softmax) and the optimizer's update are left out of the FLOPs; the step benchmark times the optimizer separately.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import T5Config, T5ForConditionalGeneration

from mixt5 import MoEConfig, upcycle

from .timing import Measurement, interleaved, synchronize

MODEL_PRESETS = {
    # google/t5-v1_1-base's architecture
    "t5-v1.1-base": dict(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu"
    ),
    # t5-small's architecture (ReLU, tied embeddings)
    "t5-small": dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"
    ),
    # for smoke tests of the benchmark itself
    "tiny": dict(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    ),
}


def dense_config(preset: str) -> T5Config:
    values = dict(MODEL_PRESETS[preset])
    values.update(tie_word_embeddings=values["feed_forward_proj"] == "relu", decoder_start_token_id=0)
    values.update(pad_token_id=0, eos_token_id=1, dropout_rate=0.1)
    return T5Config(**values)


@dataclass(frozen=True)
class Workload:
    """Sequences through the model: `batch` rows of `source_len` input and `target_len` output tokens."""

    batch: int
    source_len: int
    target_len: int


def t5_flops(
    config: T5Config,
    work: Workload,
    moe_layers: dict[str, list[int]] | None = None,
    top_k: int = 1,
    num_experts: int = 0,
    generate: bool = False,
) -> float:
    """Forward matrix-product FLOPs (2 per multiply-add) of a T5 encoder-decoder on `work`.

    `generate`: greedy decoding with a KV cache, `target_len` steps of one token per row; otherwise one teacher-
    forced pass over `target_len` decoder tokens. MoE blocks cost `top_k` FFNs per token plus the router.
    """
    moe_layers = moe_layers or {"encoder": [], "decoder": []}
    d, inner, d_ff, vocab = config.d_model, config.d_kv * config.num_heads, config.d_ff, config.vocab_size
    ffn = 2 * d * d_ff * (3 if config.is_gated_act else 2)
    src_tokens = work.batch * work.source_len
    dec_tokens = work.batch * work.target_len

    def ffn_flops(stack: str, block: int, tokens: float) -> float:
        if block in moe_layers.get(stack, []):
            return tokens * (top_k * ffn + 2 * d * num_experts)
        return tokens * ffn

    flops = 0.0
    for block in range(config.num_layers):
        flops += src_tokens * (4 * 2 * d * inner + 2 * 2 * work.source_len * inner)
        flops += ffn_flops("encoder", block, src_tokens)
    # decoder self-attention context per token: all `target_len` (teacher forcing) or the cache so far (decoding)
    self_context = (work.target_len + 1) / 2 if generate else work.target_len
    for block in range(config.num_decoder_layers):
        flops += dec_tokens * (4 * 2 * d * inner + 2 * 2 * self_context * inner)  # self-attention
        flops += dec_tokens * 2 * 2 * d * inner + src_tokens * 2 * 2 * d * inner  # cross q, o; k, v once
        flops += dec_tokens * 2 * 2 * work.source_len * inner  # cross-attention scores and values
        flops += ffn_flops("decoder", block, dec_tokens)
    flops += dec_tokens * 2 * d * vocab  # lm_head
    return flops


def build_models(
    preset: str, moe: MoEConfig, device: torch.device, dtype: torch.dtype
) -> tuple[T5ForConditionalGeneration, Any]:
    torch.manual_seed(0)
    dense = T5ForConditionalGeneration(dense_config(preset))
    sparse = upcycle(copy.deepcopy(dense), moe)
    return dense.to(device, dtype), sparse.to(device, dtype)


def _inputs(config: T5Config, work: Workload, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, config.vocab_size, (work.batch, work.source_len), generator=generator)
    labels = torch.randint(2, config.vocab_size, (work.batch, work.target_len), generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as `Trainer` builds it by default (`adamw_torch_fused`), falling back to foreach where fused is absent."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)


def run_step_benchmark(
    preset: str,
    moe: MoEConfig,
    work: Workload,
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    timer: str,
) -> dict[str, Any]:
    """forward + backward + AdamW step, dense against upcycled; the optimizer's share is timed on its own too."""
    dense, sparse = build_models(preset, moe, device, dtype)
    inputs = _inputs(dense.config, work, device)
    phases: dict[str, dict[str, Measurement]] = {}

    def make_step(name: str, model: torch.nn.Module):
        model.train()
        optimizer = _adamw(model)
        phases[name] = {"forward_backward": Measurement(), "optimizer": Measurement()}

        def step() -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            model(**inputs).loss.backward()
            synchronize(device)
            mid_wall, mid_cpu = time.perf_counter(), time.process_time()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            end_wall, end_cpu = time.perf_counter(), time.process_time()
            phases[name]["forward_backward"].wall.append(mid_wall - wall)
            phases[name]["forward_backward"].cpu.append(mid_cpu - cpu)
            phases[name]["optimizer"].wall.append(end_wall - mid_wall)
            phases[name]["optimizer"].cpu.append(end_cpu - mid_cpu)

        return step

    timings = interleaved(
        {"dense": make_step("dense", dense), "upcycled": make_step("upcycled", sparse)}, repeats, warmup, device
    )
    for per_phase in phases.values():  # drop the warmup rounds
        for measurement in per_phase.values():
            measurement.wall, measurement.cpu = measurement.wall[warmup:], measurement.cpu[warmup:]
    layers = sparse.config.moe_layer_indices
    dense_flops = 3 * t5_flops(dense.config, work)  # backward ~ 2x forward
    sparse_flops = 3 * t5_flops(dense.config, work, layers, moe.top_k, moe.num_experts)
    result = _comparison(preset, moe, work, (dense, sparse), (dense_flops, sparse_flops), timings, timer)
    fwd_bwd = phases["upcycled"]["forward_backward"].median(timer) / phases["dense"]["forward_backward"].median(timer)
    return {
        **result,
        "target_len": work.target_len,
        "forward_backward_ratio": fwd_bwd,
        "forward_backward_over_flop_ratio": fwd_bwd / result["flop_ratio"],
        "phases": {name: {p: m.to_dict() for p, m in per.items()} for name, per in phases.items()},
    }


CACHES = ("dynamic", "static")


def run_generate_benchmark(
    preset: str,
    moe: MoEConfig,
    work: Workload,
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    timer: str,
    cache: str = "dynamic",
    exact_length: bool = True,
) -> dict[str, Any]:
    """Greedy `generate()` of `target_len` new tokens, dense against upcycled.

    `exact_length`: EOS is held back until `target_len` (the generate benchmark); else up to `target_len`, stopping
    at EOS as evaluation does (the evaluate benchmark; the new tokens are counted). `cache="static"`:
    `cache_implementation="static"`, with which transformers compiles the decoding step on CUDA (inductor,
    "reduce-overhead": CUDA graphs); the warmup rounds take the compilation.
    The measured ratio is set against the FLOP ratio and against the ratio of weight bytes one decoding step reads
    (`decode_weight_bytes`): small-batch decoding is bound by the larger of the two.
    """
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    dense, sparse = build_models(preset, moe, device, dtype)
    inputs = _inputs(dense.config, work, device)
    del inputs["labels"]
    kwargs: dict[str, Any] = dict(max_new_tokens=work.target_len, do_sample=False, num_beams=1)
    if exact_length:
        kwargs["min_new_tokens"] = work.target_len
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    outputs: dict[str, torch.Tensor] = {}

    def make(name: str, model: torch.nn.Module):
        model.eval()

        def run() -> None:
            with torch.inference_mode():
                outputs[name] = model.generate(**inputs, **kwargs)
            if exact_length and outputs[name].shape[1] != work.target_len + 1:  # + decoder_start_token
                raise RuntimeError(f"generate() returned {outputs[name].shape[1] - 1} tokens, not {work.target_len}")

        return run

    models = {"dense": dense, "upcycled": sparse}
    timings = interleaved({name: make(name, model) for name, model in models.items()}, repeats, warmup, device)
    layers = sparse.config.moe_layer_indices
    dense_flops = t5_flops(dense.config, work, generate=True)
    sparse_flops = t5_flops(dense.config, work, layers, moe.top_k, moe.num_experts, generate=True)
    result = _comparison(preset, moe, work, (dense, sparse), (dense_flops, sparse_flops), timings, timer)
    weight_bytes = {
        "dense": decode_weight_bytes(dense, work.batch),
        "upcycled": decode_weight_bytes(sparse, work.batch, moe.top_k, moe.num_experts),
    }
    bytes_ratio = weight_bytes["upcycled"] / weight_bytes["dense"]
    yardstick = max(result["flop_ratio"], bytes_ratio)
    return {
        **result,
        "cache": cache,
        "new_tokens": work.target_len,
        "exact_length": exact_length,
        "mean_new_tokens": {
            name: _mean_new_tokens(out, models[name].config.eos_token_id) for name, out in outputs.items()
        },
        "decode_step_weight_bytes": weight_bytes,
        "bytes_ratio": bytes_ratio,
        "measured_over_bytes_ratio": result["measured_ratio"] / bytes_ratio,
        "yardstick_ratio": yardstick,
        "measured_over_yardstick": result["measured_ratio"] / yardstick,
    }


def _mean_new_tokens(sequences: torch.Tensor, eos_token_id: int) -> float:
    """Generated tokens per row, up to and including the first EOS (the padding after it is no work)."""
    is_eos = (sequences[:, 1:] == eos_token_id).int()  # without the decoder start token
    before_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0
    return float(before_first_eos.sum()) / sequences.shape[0]


def run_evaluate_benchmark(preset: str, moe: MoEConfig, work: Workload, **kwargs: Any) -> dict[str, Any]:
    """SQuAD-shaped evaluation throughput: greedy answers of up to `target_len` tokens for `batch` questions of
    `source_len` tokens per `generate()` call, questions per second for dense and upcycled."""
    result = run_generate_benchmark(preset, moe, work, exact_length=False, **kwargs)
    key = f"median_{kwargs['timer']}_s"
    result["questions_per_s"] = {name: work.batch / t[key] for name, t in result["timings"].items()}
    return result


def _comparison(
    preset: str,
    moe: MoEConfig,
    work: Workload,
    models: tuple[torch.nn.Module, torch.nn.Module],
    flops: tuple[float, float],
    timings: dict[str, Measurement],
    timer: str,
) -> dict[str, Any]:
    """What the step and generate benchmarks both report: sizes, parameters, FLOPs and the measured vs FLOP ratio."""
    dense, sparse = models
    measured = timings["upcycled"].median(timer) / timings["dense"].median(timer)
    flop_ratio = flops[1] / flops[0]
    return {
        "model": preset,
        "moe_layers": sparse.config.moe_layer_indices,
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "batch": work.batch,
        "source_len": work.source_len,
        "parameters": {"dense": _count(dense), "upcycled": _count(sparse)},
        "flops": {"dense": flops[0], "upcycled": flops[1]},
        "flop_ratio": flop_ratio,
        "measured_ratio": measured,
        "measured_over_flop_ratio": measured / flop_ratio,
        "timings": {name: m.to_dict() for name, m in timings.items()},
    }


def decode_weight_bytes(model: torch.nn.Module, batch: int, top_k: int = 1, num_experts: int = 1) -> float:
    """Weight bytes one greedy decoding step streams: decoder blocks and `lm_head` (embedding rows are a lookup).

    With `batch` tokens each picking `top_k` of `num_experts` experts at random, a MoE layer touches
    `E * (1 - (1 - k/E) ** batch)` experts on average (all 8 at batch 16, top-2), so it reads that many FFNs' weights
    while computing only k per token: decoding small batches is bound by these bytes, not by FLOPs.
    """
    touched = num_experts * (1 - (1 - top_k / num_experts) ** batch) if num_experts > 1 else 1
    total = 0.0
    for name, param in model.decoder.named_parameters():
        if "embed_tokens" in name:
            continue
        share = touched / num_experts if ".experts." in name else 1.0
        total += param.numel() * param.element_size() * share
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
