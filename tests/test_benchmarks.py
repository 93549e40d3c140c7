"""Smoke test of the benchmark suite's entry point at tiny sizes (no timing is asserted) and its bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmarks(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_suite_runs_every_benchmark_at_tiny_sizes(tmp_path):
    output = tmp_path / "results.json"
    tiny = ["--layer-sizes", "tiny,tiny-relu", "--tokens", "24", "--experts", "4", "--model", "tiny"]
    tiny += ["--moe-layers", "last:1", "--batch", "2", "--source-len", "6", "--target-len", "3", "--gen-batch", "2"]
    tiny += ["--gen-source-len", "5", "--new-tokens", "3", "--repeats", "1", "--warmup", "0"]
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
    assert report["step"]["flop_ratio"] > 1 and report["generate"]["flop_ratio"] > 1
    assert report["upcycle"]["final_model_bytes"] > report["upcycle"]["dense_checkpoint_bytes"]
    assert {target["what"] for target in report["targets"]} >= {"step: measured / FLOP ratio"}


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
