"""`mixt5 upcycle` end to end, and its handling of bad input; the one CLI convention every command follows."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
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


# --- one CLI convention ----------------------------------------------------------------------------------------------

FLAGS = {  # a few flags per command that its --help must list, the study's aliases included
    "demo": ["--output_dir", "--seed"],
    "train": ["--pretrained_model_name_or_path", "--save_dir", "--wandb_model_name", "--evaluation_strategy",
              "--max_source_length", "--num_experts", "--moe_seed", "--no_predict_with_generate", "--train_file"],
    "evaluate": ["--model_name_or_path", "--validation_file", "--per_device_eval_batch_size"],
    "predict": ["--model_name_or_path", "--question", "--show_routing", "--input_file"],
    "score": ["dataset_file", "prediction_file", "--full", "--question_scores_file"],
    "upcycle": ["--model_name_or_path", "--output_dir", "--dtype", "--num_experts", "--expert_init"],
    "convert-seed": ["src", "dst", "--overwrite_output_dir"],
    "sweep": ["spec", "--output_dir", "--dry_run", "--launcher", "--list"],
    "report": ["path"],
    "serve": ["--model_name_or_path", "--port", "--max_batch_size"],
}  # fmt: skip


def test_every_command_has_its_own_arguments_and_lists_them(capsys):
    from mixt5.cli import COMMANDS

    assert set(COMMANDS) == set(FLAGS)
    for name, (load, _) in COMMANDS.items():
        module = load()
        assert callable(module.add_arguments) and callable(module.run), name
        assert main([name, "--help"]) == 0
        listed = capsys.readouterr().out
        assert listed.startswith(f"usage: mixt5 {name} ")
        for flag in FLAGS[name]:
            assert f" {flag}" in listed, (name, flag)


def test_help_imports_no_command_module():
    code = (
        "import sys\nfrom mixt5.cli import main\nassert main(['--help']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mixt5', 'matplotlib', 'fastapi', 'datasets')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(result.stdout.strip().splitlines()[-1])
    heavy = {"mixt5.train", "mixt5.trainer", "mixt5.evaluate", "mixt5.predict", "mixt5.demo", "mixt5.sweep",
             "mixt5.report", "mixt5.serve", "mixt5.arguments", "mixt5.commands.upcycle", "matplotlib",
             "fastapi"}  # fmt: skip
    assert "mixt5.cli" in loaded and not heavy & set(loaded)
    assert "train" in result.stdout and "serve" in result.stdout  # the commands are listed all the same


def test_parsers_raise_instead_of_exiting(tmp_path):
    from mixt5.commands import ParserExit, UsageError
    from mixt5.train import parse_train_args

    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError, match="argument --expert_init/--expert-init: invalid choice: 'bogus'"):
        parse_train_args([*argv, "--expert_init", "bogus"])
    with pytest.raises(ParserExit) as done:
        parse_train_args([*argv, "--help"])
    assert done.value.status == 0


def test_only_the_console_script_imports_the_cli():
    root = Path(__file__).resolve().parents[1]
    importers = [
        path.relative_to(root).as_posix()
        for folder in ("src", "benchmarks", "scripts")
        for path in (root / folder).rglob("*.py")
        if re.search(r"^\s*(from\s+(mixt5)?\.?cli\s+import|import\s+mixt5\.cli|from\s+mixt5\s+import\s+cli)",
                     path.read_text(), re.M)
    ]  # fmt: skip
    assert importers == ["src/mixt5/__main__.py"]
    serve_load = (root / "benchmarks" / "serve_load.py").read_text()
    assert "sys.path" not in serve_load and "tests" not in re.findall(r"^from (\w+)", serve_load, re.M)
