"""The benchmark suite's one entry point: `python -m benchmarks [BENCHMARK ...] [flags]`.

Runs the chosen benchmarks (layer, step, generate and upcycle by default; evaluate when named), prints a table per
benchmark and the targets, and writes every measurement to `--output` (JSON, rewritten after each benchmark). Sizes
are flags; see `--help` and docs/benchmarks.md for the commands behind the published numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from mixt5 import MoEConfig
from mixt5.utils import write_json_atomic

from .layer import LAYER_SIZES, LayerSize, run_layer_benchmark
from .memory import run_upcycle_memory_benchmark
from .model import CACHES, MODEL_PRESETS, Workload, run_evaluate_benchmark, run_generate_benchmark, run_step_benchmark

BENCHMARKS = ("layer", "step", "generate", "evaluate", "upcycle")
# what runs when none is named: evaluate (64 questions x 192 tokens per call) is slow on a CPU
DEFAULT_BENCHMARKS = ("layer", "step", "generate", "upcycle")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the issue's targets, as ratios
LAYER_FLOOR_TARGET, LAYER_SPEEDUP_TARGET = 1.05, 1.15
STEP_TARGET, GENERATE_TARGET, MEMORY_TARGET = 1.05, 1.10, 1.5
GENERATE_YARDSTICK_TARGET = 1.05  # generation: measured / the larger of its FLOP and weight-bytes ratios
# environment variables that change the timings, recorded with the results
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "MALLOC_MMAP_THRESHOLD_")
LAYER_SIZES_FOR_TESTS = {"tiny": LayerSize(32, 64, "gated-gelu"), "tiny-relu": LayerSize(32, 64, "relu")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"any of {', '.join(BENCHMARKS)} (default: {', '.join(DEFAULT_BENCHMARKS)})",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=list(DTYPES), help="float32 on CPU, bfloat16 on CUDA by default")
    run.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, the core count)")
    run.add_argument("--timer", choices=["wall", "cpu"], default="wall", help="what the ratios use (both recorded)")
    run.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    run.add_argument("--output", default="benchmark_results.json", help="JSON written after each benchmark")
    layer = parser.add_argument_group("layer: one MoE FF layer against dense T5LayerFF x k and the alternatives")
    layer.add_argument(
        "--layer-sizes",
        default="t5-v1.1-base,t5-small",
        help=f"comma-separated, of {', '.join([*LAYER_SIZES, *LAYER_SIZES_FOR_TESTS])}",
    )
    layer.add_argument("--tokens", type=int, default=2048, help="tokens through the layer")
    layer.add_argument("--experts", type=int, default=8, help="experts per MoE layer (all benchmarks)")
    layer.add_argument("--top-k", type=int, default=2, help="experts per token (all benchmarks)")
    layer.add_argument("--capacity-factor", type=float, help="expert capacity factor (layer only; default dropless)")
    model = parser.add_argument_group("step / generate / upcycle: dense against upcycled, random weights")
    model.add_argument("--model", choices=list(MODEL_PRESETS), default="t5-v1.1-base", help="architecture")
    model.add_argument("--moe-layers", default="last:6", help="MoEConfig.moe_layers of the upcycled copy")
    model.add_argument("--batch", type=int, default=4, help="step: batch size")
    model.add_argument("--source-len", type=int, default=256, help="step: input tokens")
    model.add_argument("--target-len", type=int, default=16, help="step: label tokens")
    model.add_argument("--gen-batch", type=int, default=16, help="generate: batch size")
    model.add_argument("--gen-source-len", type=int, default=192, help="generate: input tokens (SQuAD-like)")
    model.add_argument("--new-tokens", type=int, default=30, help="generate: new tokens per row (greedy)")
    model.add_argument(
        "--gen-cache",
        choices=CACHES,
        default="dynamic",
        help="generate/evaluate: the KV cache; static makes transformers compile decoding on CUDA (CUDA graphs)",
    )
    model.add_argument("--eval-batch", type=int, default=64, help="evaluate: questions per generate() call")
    model.add_argument("--eval-source-len", type=int, default=192, help="evaluate: tokens per question + context")
    model.add_argument("--eval-new-tokens", type=int, default=30, help="evaluate: answer tokens at most (greedy)")
    model.add_argument("--upcycle-workdir", help="upcycle: folder for the temporary checkpoints (default: $TMPDIR)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; impossible sizes exit with a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    args.benchmarks = args.benchmarks or list(DEFAULT_BENCHMARKS)
    positive = ["tokens", "experts", "top_k", "repeats", "batch", "source_len", "target_len", "gen_batch"]
    positive += ["gen_source_len", "new_tokens", "eval_batch", "eval_source_len", "eval_new_tokens"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is more than --experts {args.experts}: a token cannot pick more experts")
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        parser.error(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    sizes = {**LAYER_SIZES, **LAYER_SIZES_FOR_TESTS}
    args.layer_sizes = [name.strip() for name in args.layer_sizes.split(",") if name.strip()]
    bad = [name for name in args.layer_sizes if name not in sizes]
    if bad or not args.layer_sizes:
        parser.error(f"--layer-sizes {bad or '(empty)'}: choose from {list(sizes)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        args.moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, moe_layers=args.moe_layers)
        num_layers = MODEL_PRESETS[args.model]["num_layers"]
        args.moe.resolve_layers({"encoder": num_layers, "decoder": num_layers})
    except (TypeError, ValueError) as err:
        parser.error(f"--moe-layers/--experts/--top-k: {err}")
    return args


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "timer": args.timer,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


def _verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    met = value >= target if higher_is_better else value <= target
    if met:
        return "met"
    return f"MISSED by {abs(value / target - 1) * 100:.1f}%"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _layer_report(result: dict[str, Any], timer: str, targets: list[dict[str, Any]]) -> str:
    key = f"median_{timer}_s"
    header = f"layer {result['size']} (d_model {result['d_model']}, d_ff {result['d_ff']}, {result['activation']}), "
    header += f"{result['tokens']} tokens, {result['num_experts']} experts, top-{result['top_k']}"
    if result["capacity_factor"] is not None:
        header += f", capacity factor {result['capacity_factor']}"
    rows = [["case", "fwd ms", "fwd / floor", "fwd+bwd ms", "fwd+bwd / floor"]]
    floor = result["floor_s"]
    rows.append(["floor: dense T5LayerFF x k", f"{floor['forward'] * 1e3:.1f}", "1.00"])
    rows[-1] += [f"{floor['forward_backward'] * 1e3:.1f}", "1.00"]
    for name in result["ratio_to_floor"]["forward"]:
        label = f"{name} ({result['default_kernel']})" if name == "mixt5" else name
        label = "dense_fused_act x k" if name == "dense_fused_act" else label
        row = [label]
        scale = result["top_k"] if name == "dense_fused_act" else 1
        for pass_name in ("forward", "forward_backward"):
            row.append(f"{result['timings'][pass_name][name][key] * scale * 1e3:.1f}")
            row.append(f"{result['ratio_to_floor'][pass_name][name]:.3f}")
        rows.append(row)
    for name, reason in result["skipped"].items():
        rows.append([name, "skipped", reason, "", ""])
    lines = [header, _table(rows)]
    backward = result["timings"]["forward_backward"]
    if "grad_buffers_experts" in backward:
        experts, dense = backward["grad_buffers_experts"][key], backward["grad_buffers_dense_x_k"][key]
        lines.append(
            f"  writing the weight gradients into fresh memory: experts {experts * 1e3:.1f} ms, dense x k "
            f"{dense * 1e3:.1f} ms (E/k = {result['num_experts'] / result['top_k']:g}x the bytes), "
            f"{(experts - dense) / result['floor_s']['forward_backward'] * 100:.1f}% of the fwd+bwd floor"
        )
    for pass_name in ("forward", "forward_backward"):
        ratios = result["ratio_to_floor"][pass_name]
        if "hf_grouped_mm" in ratios:
            versus_hf = ratios["mixt5"] / ratios["hf_grouped_mm"]
            lines.append(
                f"  {result['size']} {pass_name}: mixt5 / hf_grouped_mm = {versus_hf:.3f}"
                " (transformers' grouped_mm backend; below 1: MixT5 faster)"
            )
        ratio, speedup = ratios["mixt5"], ratios["modulelist"] / ratios["mixt5"]
        for what, value, target, higher in (
            (f"{result['size']} {pass_name}: mixt5 / floor", ratio, LAYER_FLOOR_TARGET, False),
            (f"{result['size']} {pass_name}: modulelist / mixt5", speedup, LAYER_SPEEDUP_TARGET, True),
        ):
            verdict = _verdict(value, target, higher)
            targets.append({"what": what, "value": value, "target": target, "verdict": verdict})
            lines.append(f"  {what} = {value:.3f} (target {'>=' if higher else '<='} {target}): {verdict}")
    return "\n".join(lines)


def _model_report(name: str, result: dict[str, Any], timer: str, target: float, targets: list[dict]) -> str:
    key = f"median_{timer}_s"
    params = result["parameters"]
    work = f"batch {result['batch']}, source {result['source_len']}, "
    work += f"target {result['target_len']}" if name == "step" else f"{result['new_tokens']} new tokens"
    title = f"{name}: {result['model']} dense vs upcycled ({result['moe_layers']}), {work}"
    if "cache" in result:
        title += f", {result['cache']} cache"
    lines = [title]
    rows = [["model", "parameters", "GFLOP", f"median {timer} s"]]
    for model in ("dense", "upcycled"):
        rows.append(
            [
                model,
                f"{params[model] / 1e6:.1f}M",
                f"{result['flops'][model] / 1e9:.1f}",
                f"{result['timings'][model][key]:.3f}",
            ]
        )
    lines.append(_table(rows))
    if name == "step":
        phases = result["phases"]
        for phase in ("forward_backward", "optimizer"):
            dense, sparse = phases["dense"][phase][key], phases["upcycled"][phase][key]
            lines.append(f"  {phase}: dense {dense:.3f} s, upcycled {sparse:.3f} s, ratio {sparse / dense:.3f}")
        lines.append(
            f"  forward+backward ratio / FLOP ratio = {result['forward_backward_over_flop_ratio']:.3f} "
            "(the optimizer's update is left out of the FLOPs: it is memory-bound and scales with parameters)"
        )
    if name in ("generate", "evaluate"):
        decode = result["decode_step_weight_bytes"]
        lines.append(
            f"  each decoding step streams {decode['dense'] / 2**20:.0f} MiB of weights (dense) vs "
            f"{decode['upcycled'] / 2**20:.0f} MiB (upcycled): {result['bytes_ratio']:.2f}x, "
            "where the FLOPs grow far less; small-batch decoding is bound by those bytes"
        )
        tokens = result["mean_new_tokens"]
        lines.append(f"  new tokens per row: dense {tokens['dense']:.1f}, upcycled {tokens['upcycled']:.1f}")
    if name == "evaluate":
        per_s = result["questions_per_s"]
        lines.append(
            f"  questions/s: dense {per_s['dense']:.1f}, upcycled {per_s['upcycled']:.1f} "
            f"(dense / upcycled = {per_s['dense'] / per_s['upcycled']:.3f})"
        )
    value = result["measured_over_flop_ratio"]
    verdict = _verdict(value, target)
    lines.append(
        f"  FLOP ratio {result['flop_ratio']:.3f}, measured ratio {result['measured_ratio']:.3f}: "
        f"measured / FLOP = {value:.3f} (target <= {target}): {verdict}"
    )
    targets.append({"what": f"{name}: measured / FLOP ratio", "value": value, "target": target, "verdict": verdict})
    if name in ("generate", "evaluate"):
        value = result["measured_over_yardstick"]
        verdict = _verdict(value, GENERATE_YARDSTICK_TARGET)
        what = f"{name}: measured / max(FLOP, bytes) ratio"
        lines.append(
            f"  FLOP ratio {result['flop_ratio']:.3f}, weight-bytes ratio {result['bytes_ratio']:.3f}: measured / "
            f"the larger = {value:.3f} (target <= {GENERATE_YARDSTICK_TARGET}): {verdict}"
        )
        targets.append({"what": what, "value": value, "target": GENERATE_YARDSTICK_TARGET, "verdict": verdict})
    return "\n".join(lines)


def _memory_report(result: dict[str, Any], targets: list[dict]) -> str:
    gib = 2**30
    value = result["ratio"]
    verdict = _verdict(value, MEMORY_TARGET)
    targets.append({"what": "upcycle: peak RSS / final model bytes", "value": value, "target": MEMORY_TARGET})
    targets[-1]["verdict"] = verdict
    return "\n".join(
        [
            f"upcycle: mixt5 upcycle on a saved {result['model']} checkpoint ({result['moe_layers']}, "
            f"{result['num_experts']} experts)",
            f"  dense checkpoint {result['dense_checkpoint_bytes'] / gib:.2f} GiB, final model "
            f"{result['final_model_bytes'] / gib:.2f} GiB, peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB "
            f"(imports alone {result['imports_only_peak_rss_bytes'] / gib:.2f} GiB)",
            f"  peak RSS / final model = {value:.3f} (target <= {MEMORY_TARGET}): {verdict}; without the imports' "
            f"share {result['ratio_without_imports']:.3f}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    timing = dict(repeats=args.repeats, warmup=args.warmup, device=device, dtype=dtype, timer=args.timer)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"command": command, "environment": _environment(args), "targets": []}
    targets = results["targets"]
    print(f"{command}\n{json.dumps(results['environment'])}\n", flush=True)

    def save(name: str, result: Any, report: str) -> None:
        results[name] = result
        write_json_atomic(args.output, results)
        print(report + "\n", flush=True)

    if "layer" in args.benchmarks:
        sizes = {**LAYER_SIZES, **LAYER_SIZES_FOR_TESTS}
        layer_results, reports = [], []
        for size_name in args.layer_sizes:
            result = run_layer_benchmark(
                size_name,
                sizes[size_name],
                tokens=args.tokens,
                num_experts=args.experts,
                top_k=args.top_k,
                capacity_factor=args.capacity_factor,
                **timing,
            )
            layer_results.append(result)
            reports.append(_layer_report(result, args.timer, targets))
            save("layer", layer_results, reports[-1])
    if "step" in args.benchmarks:
        work = Workload(args.batch, args.source_len, args.target_len)
        result = run_step_benchmark(args.model, args.moe, work, **timing)
        save("step", result, _model_report("step", result, args.timer, STEP_TARGET, targets))
    if "generate" in args.benchmarks:
        work = Workload(args.gen_batch, args.gen_source_len, args.new_tokens)
        result = run_generate_benchmark(args.model, args.moe, work, cache=args.gen_cache, **timing)
        save("generate", result, _model_report("generate", result, args.timer, GENERATE_TARGET, targets))
    if "evaluate" in args.benchmarks:
        work = Workload(args.eval_batch, args.eval_source_len, args.eval_new_tokens)
        result = run_evaluate_benchmark(args.model, args.moe, work, cache=args.gen_cache, **timing)
        save("evaluate", result, _model_report("evaluate", result, args.timer, GENERATE_TARGET, targets))
    if "upcycle" in args.benchmarks:
        result = run_upcycle_memory_benchmark(args.model, args.moe, args.upcycle_workdir)
        save("upcycle", result, _memory_report(result, targets))
    print("targets:")
    for target in targets:
        print(f"  {target['what']}: {target['value']:.3f} vs {target['target']}: {target['verdict']}")
    print(f"wrote {args.output}")
    return 0
