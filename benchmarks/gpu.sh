#!/usr/bin/env bash
# The GPU measurements in bf16 on one CUDA GPU, prepared to be run once, in one call of under 10 minutes:
#
#   bash benchmarks/gpu.sh [OUTPUT_DIR] [more `python -m benchmarks` flags, given to every stage]
#
# Four stages, each its own process with its own timeout, writing OUTPUT_DIR/STAGE.json (rewritten after each
# benchmark) and OUTPUT_DIR/STAGE.txt, so a stage that runs out of time keeps what it finished and the next still runs:
#   layer           one MoE FF layer at T5-v1.1-base and t5-small dims, forward and forward+backward, against the floor
#                   (dense FF x k) and transformers' grouped_mm backend. On CUDA in bf16 MixT5's automatic choice is
#                   the grouped_mm kernel with its dispatch kept on the device (no host synchronisation); `mixt5_mm`
#                   times the hand-written loop forced. If the automatic choice does not measure fastest, change
#                   `default_kernel` in src/mixt5/modeling/experts.py.
#   decode-dynamic  greedy generation (16 x 192 tokens, 30 new), against its FLOP and weight-bytes ratios, and
#                   SQuAD-shaped evaluation throughput (64 questions x 192 tokens per call, up to 30 new; questions/s),
#                   dense against upcycled, with transformers' default dynamic KV cache;
#   decode-static   the same with `cache_implementation="static"`: transformers compiles the decoding step (inductor,
#                   "reduce-overhead", i.e. CUDA graphs); the 3 warmup rounds take the compilation;
#   step            one training step (forward, backward, AdamW), the previous run's third benchmark.
#
# BENCHMARK_DEVICE / BENCHMARK_DTYPE (default cuda / bfloat16) exist for the CPU smoke test of this script.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmark_results_gpu}"
shift || true
python="${PYTHON:-python}"
device="${BENCHMARK_DEVICE:-cuda}"
dtype="${BENCHMARK_DTYPE:-bfloat16}"
mkdir -p "$out"
if [[ "$device" == cuda* ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: CUDA is not available')"
fi

extra=("$@")  # the caller's flags come last, so they override the stages' own

stage() {  # stage NAME TIMEOUT_S ARGUMENTS...: one `python -m benchmarks ARGUMENTS...` with the common flags
    local name="$1" limit="$2"
    shift 2
    local status=0
    timeout --signal=INT "$limit" "$python" -m benchmarks "$@" --device "$device" --dtype "$dtype" \
        --repeats 10 --warmup 3 --output "$out/$name.json" "${extra[@]}" 2>&1 | tee "$out/$name.txt" || status=$?
    if ((status != 0)); then
        echo "benchmarks/gpu.sh: stage $name ended with status $status (124: its ${limit} s ran out)" >&2
    fi
}

# 150 + 120 + 240 + 60 s: under 10 minutes with the start-up
stage layer 150 layer
stage decode-dynamic 120 generate evaluate --gen-cache dynamic
stage decode-static 240 generate evaluate --gen-cache static
stage step 60 step
echo "benchmarks/gpu.sh: results in $out/"
