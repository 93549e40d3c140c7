"""Benchmark 4: peak resident memory of `mixt5 upcycle` on a saved checkpoint, against the final model's bytes.

The dense checkpoint (random weights, a `MODEL_PRESETS` architecture) is saved to a temporary folder; then
`mixt5 upcycle` runs in a child process, whose peak RSS (`VmHWM`) is compared with the size of the safetensors it
writes. A second child that only imports what `mixt5 upcycle` imports gives the
fixed cost of the interpreter, torch and transformers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import T5ForConditionalGeneration

from mixt5 import MoEConfig

from .model import dense_config

# The child reports its own peak: `VmHWM` belongs to the address space it exec'd into, while `ru_maxrss` (from
# `wait4` or `getrusage`) also counts what the parent had resident when it forked.
_REPORT_PEAK = (
    "import sys\n"
    "{body}\n"
    "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print('PEAK_RSS_KB', peak.split()[1], file=sys.stderr)\n"
)
_UPCYCLE = _REPORT_PEAK.format(body="from mixt5.cli import main\ncode = main(sys.argv[1:])\nassert code == 0, code")
_IMPORTS_ONLY = _REPORT_PEAK.format(
    body="import mixt5.cli, mixt5.upcycle\nfrom transformers import AutoModelForSeq2SeqLM"
)


def _peak_rss(arguments: list[str], program: str) -> int:
    """Run `python -c program *arguments`; return the child's peak resident set size in bytes."""
    command = [sys.executable, "-c", program, *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments) or 'imports'} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    kilobytes = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return int(kilobytes[-1]) * 1024


def _folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(file.stat().st_size for file in path.glob(pattern))


def run_upcycle_memory_benchmark(preset: str, moe: MoEConfig, workdir: str | None = None) -> dict[str, Any]:
    """Peak RSS of `mixt5 upcycle` (fp32 checkpoint) over the bytes of the checkpoint it writes."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="mixt5-upcycle-bench-") as tmp:
        source, target = Path(tmp) / "dense", Path(tmp) / "upcycled"
        torch.manual_seed(0)
        T5ForConditionalGeneration(dense_config(preset)).save_pretrained(source)
        arguments = ["upcycle", "--model_name_or_path", str(source), "--output_dir", str(target)]
        arguments += [
            "--num_experts",
            str(moe.num_experts),
            "--top_k",
            str(moe.top_k),
            "--moe_layers",
            str(moe.moe_layers),
        ]
        peak = _peak_rss(arguments, _UPCYCLE)
        baseline = _peak_rss([], _IMPORTS_ONLY)
        dense_bytes, final_bytes = _folder_bytes(source), _folder_bytes(target)
    return {
        "model": preset,
        "num_experts": moe.num_experts,
        "moe_layers": moe.moe_layers,
        "dense_checkpoint_bytes": dense_bytes,
        "final_model_bytes": final_bytes,
        "peak_rss_bytes": peak,
        "imports_only_peak_rss_bytes": baseline,
        "ratio": peak / final_bytes,
        "ratio_without_imports": (peak - baseline) / final_bytes,
    }
