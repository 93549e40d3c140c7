#!/usr/bin/env bash
# Benchmarks 1-3 (MoE layer, training step, generation) in bf16 on one CUDA GPU, in one call of under 8 minutes:
#
#   bash benchmarks/gpu.sh [OUTPUT_JSON] [more `python -m benchmarks` flags]
#
# On CUDA the layer benchmark also times MixT5's dispatch with the hand-written loop forced (`mixt5_mm`) against
# the automatic choice (torch's grouped GEMM in bf16) and transformers' `grouped_mm` backend: if the automatic
# choice does not measure fastest, change `default_kernel` in src/mixt5/modeling/experts.py.
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-benchmark_results_gpu.json}"
shift || true
python="${PYTHON:-python}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: CUDA is not available')"
# 470 s leaves room under 8 minutes for start-up; every benchmark rewrites the JSON, so a timeout keeps what ran
timeout --signal=INT 470 "$python" -m benchmarks layer step generate --device cuda --dtype bfloat16 \
    --repeats 10 --warmup 3 --output "$output" "$@"
