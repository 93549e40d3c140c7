"""Smoke test of the benchmark suite's entry point at tiny sizes (no timing is asserted) and its bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmarks(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


TINY = ["--layer-sizes", "tiny,tiny-relu", "--tokens", "24", "--experts", "4", "--model", "tiny"]
TINY += ["--moe-layers", "last:1", "--batch", "2", "--source-len", "6", "--target-len", "3", "--gen-batch", "2"]
TINY += ["--gen-source-len", "5", "--new-tokens", "3", "--eval-batch", "3", "--eval-source-len", "6"]
TINY += ["--eval-new-tokens", "4"]


def _check_decoding(result: dict, cache: str, batch: int, max_new: int) -> None:
    assert result["cache"] == cache and result["batch"] == batch
    assert result["bytes_ratio"] > 1 and result["flop_ratio"] > 1
    assert result["yardstick_ratio"] == max(result["bytes_ratio"], result["flop_ratio"])
    assert all(0 < tokens <= max_new for tokens in result["mean_new_tokens"].values())


@pytest.mark.slow
def test_suite_runs_every_benchmark_at_tiny_sizes(tmp_path):
    output = tmp_path / "results.json"
    names = ["layer", "step", "generate", "evaluate", "upcycle"]
    tiny = [*names, *TINY, "--repeats", "1", "--warmup", "0"]
    result = _benchmarks(*tiny, "--upcycle-workdir", str(tmp_path), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets:" in result.stdout
    report = json.loads(output.read_text())
    assert report["environment"]["device"] == "cpu"
    assert [layer["size"] for layer in report["layer"]] == ["tiny", "tiny-relu"]
    for layer in report["layer"]:
        # every implementation computes the same layer, or the timings would compare different work
        assert max(layer["max_abs_diff_vs_mixt5"].values()) < 1e-4
        for pass_name in ("forward", "forward_backward"):
            assert {"mixt5", "modulelist", "hf_eager", "hf_grouped_mm"} <= set(layer["ratio_to_floor"][pass_name])
    assert report["step"]["flop_ratio"] > 1
    _check_decoding(report["generate"], "dynamic", 2, 3)
    assert report["generate"]["mean_new_tokens"] == {"dense": 3.0, "upcycled": 3.0}  # EOS held back
    _check_decoding(report["evaluate"], "dynamic", 3, 4)
    assert set(report["evaluate"]["questions_per_s"]) == {"dense", "upcycled"}
    assert "mixt5 / hf_grouped_mm" in result.stdout and "questions/s" in result.stdout
    assert report["upcycle"]["final_model_bytes"] > report["upcycle"]["dense_checkpoint_bytes"]
    assert {target["what"] for target in report["targets"]} >= {"step: measured / FLOP ratio"}


@pytest.mark.slow
def test_gpu_script_runs_its_stages_at_tiny_sizes_on_cpu(tmp_path):
    """benchmarks/gpu.sh is run once on a GPU by a later session: its stages and flags are checked here, on CPU."""
    env = {**os.environ, "BENCHMARK_DEVICE": "cpu", "BENCHMARK_DTYPE": "float32", "PYTHON": sys.executable}
    script = ROOT / "benchmarks" / "gpu.sh"
    tiny = [*TINY, "--layer-sizes", "tiny", "--repeats", "1", "--warmup", "0"]  # after the script's own: they win
    command = ["bash", str(script), str(tmp_path / "out"), *tiny]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ended with status" not in result.stderr, result.stderr[-3000:]
    reports = {stage: json.loads((tmp_path / "out" / f"{stage}.json").read_text()) for stage in GPU_STAGES}
    assert all((tmp_path / "out" / f"{stage}.txt").read_text() for stage in GPU_STAGES)
    for layer in reports["layer"]["layer"]:
        assert {"mixt5", "hf_grouped_mm"} <= set(layer["ratio_to_floor"]["forward"])
    for cache in ("dynamic", "static"):
        _check_decoding(reports[f"decode-{cache}"]["generate"], cache, 2, 3)
        _check_decoding(reports[f"decode-{cache}"]["evaluate"], cache, 3, 4)
    assert reports["step"]["step"]["flop_ratio"] > 1
    assert reports["layer"]["environment"]["repeats"] == 1


GPU_STAGES = ("layer", "decode-dynamic", "decode-static", "step")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--experts", "2", "--top-k", "3"], "--top-k 3 is more than --experts 2"),
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--layer-sizes", "huge"], "--layer-sizes"),
        (["--moe-layers", "last:40"], "--moe-layers"),
        (["nonsense"], "unknown benchmark"),
    ],
)
def test_impossible_sizes_are_refused_with_a_message_naming_the_flag(flags, message, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.run import parse_args
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit) as excinfo:
        parse_args(["layer", *flags])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_flag_message_reaches_the_user():
    result = _benchmarks("layer", "--experts", "2", "--top-k", "3")
    assert result.returncode == 2
    assert "--top-k 3 is more than --experts 2" in result.stderr
