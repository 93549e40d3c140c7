"""`mixt5 upcycle` end to end, and its handling of bad input."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import torch
from transformers import AutoModelForSeq2SeqLM

import mixt5  # noqa: F401  (registers the Auto classes)
from mixt5.cli import main
from tiny import batch, tiny_dense


def test_upcycle_cli_writes_model_and_provenance(tmp_path, capsys):
    dense = tiny_dense()
    dense.save_pretrained(tmp_path / "dense")
    argv = ["upcycle", "--model_name_or_path", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "moe")]
    argv += ["--num_experts", "4", "--top_k", "1", "--moe_layers", "last:2", "--expert_init", "drop_upcycling"]
    argv += ["--drop_ratio", "0.25", "--seed", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])  # some optional packages print warnings on import
    assert summary["moe_layers"] == {"encoder": [2, 3], "decoder": [1, 2]}
    assert summary["tokenizer_saved"] is False  # the source folder has no tokenizer files
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "mixt5"
    assert config["moe"]["num_experts"] == 4 and config["moe"]["top_k"] == 1
    assert config["upcycled_from"] == {
        "base_model": str(tmp_path / "dense"),
        "base_model_type": "t5",
        "base_architecture": "T5ForConditionalGeneration",
        "method": "drop_upcycling",
        "drop_ratio": 0.25,
        "seed": 3,
        "command": shlex.join(["mixt5", *argv]),
    }
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe")
    with torch.no_grad():
        assert torch.isfinite(model(**batch()).logits).all()


def test_upcycle_cli_bad_flags_write_nothing(tmp_path, capsys):
    tiny_dense().save_pretrained(tmp_path / "dense")
    argv = ["upcycle", "--model_name_or_path", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "out")]
    for i, (flags, message) in enumerate(
        [(["--moe_layers", "last:99"], "last:99"), (["--num_experts", "2", "--top_k", "3"], "top_k"),
         (["--drop_ratio", "2"], "drop_ratio")]
    ):  # fmt: skip
        if i == 0:  # once through `python -m mixt5`, as a user runs it
            result = subprocess.run([sys.executable, "-m", "mixt5", *argv, *flags], capture_output=True, text=True)
            code, err = result.returncode, result.stderr
        else:
            code, err = main([*argv, *flags]), capsys.readouterr().err
        assert code == 2, err
        assert message in err
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written staging folder


def test_upcycle_cli_refuses_non_empty_output_dir(tmp_path, capsys):
    tiny_dense().save_pretrained(tmp_path / "dense")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    argv = ["upcycle", "--model_name_or_path", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "out")]
    assert main([*argv, "--moe_layers", "last:1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_unknown_command():
    assert main(["frobnicate"]) == 2
    assert main([]) == 0
