"""Bad input to every command: one line naming the file or flag, exit code 2, no traceback, nothing written.

Most cases run through `mixt5.cli.main` in this process (one subprocess checks what a user's terminal shows).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixt5.cli import main
from mixt5.config import MixT5Config, MoEConfig
from mixt5.data.squad import load_examples
from mixt5.upcycle import upcycle
from tiny import SAMPLE_SQUAD, save_tiny_qa_model, tiny_dense

UPCYCLE_MODULE = sys.modules["mixt5.upcycle"]  # `mixt5.upcycle` itself is the function


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny dense T5 with a tokenizer, saved as `save_pretrained` does."""
    return save_tiny_qa_model(tmp_path_factory.mktemp("model") / "dense")


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _fails(argv: list[str], capfd, *needles: str, root: Path | None = None) -> str:
    """Run `mixt5 ARGV`; assert exit 2, one error line holding every needle, no traceback, nothing new under root."""
    before = _files(root) if root else set()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage, then one error line
        code = exit_.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"mixt5 {argv[0]}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if root:
        assert _files(root) == before, sorted(map(str, _files(root) - before))
    return lines[0]


# --- data files ------------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_data(tmp_path) -> dict[str, Path]:
    raw = gzip.compress(SAMPLE_SQUAD.read_bytes())
    files = {"not_gzip": tmp_path / "plain.json.gz", "truncated": tmp_path / "cut.json.gz", "dir": tmp_path / "d.json"}
    files["not_gzip"].write_bytes(SAMPLE_SQUAD.read_bytes())
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["dir"].mkdir()
    return files


def test_bad_data_files(model_dir, bad_data, tmp_path, capfd):
    predictions = tmp_path / "predictions.json"
    predictions.write_text("{}")
    expected = {"not_gzip": "not a valid gzip file", "truncated": "truncated gzip file", "dir": "is a directory"}
    out = str(tmp_path / "out")
    for kind, path in bad_data.items():
        commands = [
            ["score", str(path), str(predictions)],
            ["train", "--model_name_or_path", str(model_dir), "--train_file", str(path), "--output_dir", out],
            ["evaluate", "--model_name_or_path", str(model_dir), "--validation_file", str(path), "--output_dir", out],
        ]
        if kind == "dir":
            commands.append(["predict", "--model_name_or_path", str(model_dir), "--input_file", str(path)])
        for argv in commands:
            _fails(argv, capfd, str(path), expected[kind], root=tmp_path)


def test_jsonl_gz_data_and_questions(model_dir, tmp_path, capfd):
    rows = [{"id": f"q{i}", "question": "Who?", "context": "Denver Broncos won.", "answers": ["Denver"]} for i in "ab"]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "data.jsonl").write_text(text)
    with gzip.open(tmp_path / "data.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    assert load_examples(tmp_path / "data.jsonl.gz") == load_examples(tmp_path / "data.jsonl")
    argv = ["predict", "--model_name_or_path", str(model_dir), "--max_sequence_length", "32"]
    argv += ["--generation_max_length", "4", "--input_file", str(tmp_path / "data.jsonl.gz")]
    assert main([*argv, "--output_file", str(tmp_path / "answers.jsonl")]) == 0
    assert [json.loads(line)["id"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()] == ["qa", "qb"]
    capfd.readouterr()


def test_predict_bad_questions_and_flags(model_dir, tmp_path, capfd):
    (tmp_path / "list.jsonl").write_text('{"question": "q", "context": "c"}\n["q", "c"]\n')
    base = ["predict", "--model_name_or_path", str(model_dir)]
    _fails([*base, "--input_file", str(tmp_path / "list.jsonl")], capfd, "list.jsonl:2", "JSON object", root=tmp_path)
    for flag in ("--generation_num_beams", "--generation_max_length", "--batch_size", "--max_sequence_length"):
        _fails([*base, "--question", "q", "--context", "c", flag, "0"], capfd, flag, root=tmp_path)


# --- models ----------------------------------------------------------------------------------------------------------


def _broken_copies(model_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of a good checkpoint, each damaged one way, with what the error must say."""
    cases: dict[str, tuple[Path, str]] = {}

    def copy(name: str) -> Path:
        return Path(shutil.copytree(model_dir, root / name))

    weights = (model_dir / "model.safetensors").read_bytes()
    for name, content in [("empty", b""), ("truncated", weights[: len(weights) // 2]), ("random", os.urandom(4096))]:
        folder = copy(f"weights-{name}")
        (folder / "model.safetensors").write_bytes(content)
        cases[f"weights-{name}"] = (folder, "model.safetensors")
    folder = copy("config-invalid")
    (folder / "config.json").write_text('{"model_type": "t5", ')
    cases["config-invalid"] = (folder, "config.json")
    folder = copy("config-shapes")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_model": config["d_model"] * 2}))
    cases["config-shapes"] = (folder, "do not match config.json")
    return cases


def test_bad_model_folders(model_dir, tmp_path, capfd):
    cases = _broken_copies(model_dir, tmp_path)
    cases["missing"] = (tmp_path / "no-such-model", "no such folder")
    cases["a file"] = (SAMPLE_SQUAD, "is a file")
    for folder, needle in cases.values():
        argv = ["predict", "--model_name_or_path", str(folder), "--question", "q", "--context", "c"]
        line = _fails(argv, capfd, "--model_name_or_path", str(folder), needle, root=tmp_path)
        assert "LOAD REPORT" not in line
    # transformers' many-line load report is not printed before the one-line error either
    _fails(
        ["predict", "--model_name_or_path", str(cases["config-shapes"][0]), "--question", "q", "--context", "c"], capfd
    )
    assert "LOAD REPORT" not in capfd.readouterr().err
    argv = ["upcycle", "--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]
    _fails(argv, capfd, "no such folder", root=tmp_path)


def test_moe_checkpoint_naming_blocks_past_the_stack(model_dir, tmp_path, capfd):
    moe = upcycle(tiny_dense(num_layers=2, num_decoder_layers=2), MoEConfig(num_experts=2, moe_layers="last:1"))
    moe.save_pretrained(tmp_path / "moe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / "moe" / name)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["moe_layer_indices"]["encoder"] = [1, 7]
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    argv = ["predict", "--model_name_or_path", str(tmp_path / "moe"), "--question", "q", "--context", "c"]
    _fails(argv, capfd, "moe_layer_indices", "[7]", "0..1", root=tmp_path)


def test_folder_without_tokenizer(tmp_path, capfd, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("serve started without a tokenizer"))
    argv = ["upcycle", "--model_name_or_path", "builtin:t5-v1_1-tiny", "--output_dir", str(tmp_path / "moe")]
    assert main([*argv, "--num_experts", "2", "--moe_layers", "last:1"]) == 0
    capfd.readouterr()
    argv = ["predict", "--model_name_or_path", str(tmp_path / "moe"), "--question", "q", "--context", "c"]
    line = _fails(argv, capfd, "has no tokenizer", "save_pretrained", root=tmp_path)
    assert "sentencepiece" not in line.split("(none of")[0]
    serve = ["serve", "--model_name_or_path", str(tmp_path / "moe"), "--port", "8765"]
    _fails(serve, capfd, "has no tokenizer", root=tmp_path)


# --- outputs ---------------------------------------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(model_dir, tmp_path, capfd):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "q", "context": "c"}\n')
    model = ["--model_name_or_path", str(model_dir)]
    train = ["train", *model, "--train_file", str(SAMPLE_SQUAD), "--use_cpu", "--output_dir"]
    evaluate = ["evaluate", *model, "--validation_file", str(SAMPLE_SQUAD), "--use_cpu", "--output_dir"]
    upcycle_argv = ["upcycle", *model, "--moe_layers", "last:1", "--output_dir"]
    predict = ["predict", *model, "--input_file", str(questions), "--output_file"]
    for argv, path, needle in [
        (["demo", "--output_dir"], a_file, "is not a folder"), (["demo", "--output_dir"], a_file / "d", "is a file"),
        (upcycle_argv, a_file, "is not a folder"), (train, a_file, "is not a folder"),
        (evaluate, a_file, "is not a folder"), (predict, tmp_path, "is not a file"),
        (upcycle_argv, a_file / "sub", "is a file"), (train, a_file / "sub", "is a file"),
        (evaluate, a_file / "sub" / "deeper", "is a file"), (predict, a_file / "answers.jsonl", "is a file"),
    ]:  # fmt: skip
        _fails([*argv, str(path)], capfd, str(path), needle, root=tmp_path)
    assert a_file.read_text() == "keep"


def test_unwritable_output_dir(model_dir, tmp_path, capfd):
    if os.geteuid() != 0:
        unwritable = tmp_path / "locked"
        unwritable.mkdir(mode=0o500)
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        unwritable = Path("/proc/sys")  # root may write into any folder whatever its mode, but not a read-only mount
    else:
        pytest.skip("root may write into any folder whatever its mode, and /proc/sys is writable here")
    argv = ["upcycle", "--model_name_or_path", str(model_dir), "--moe_layers", "last:1"]
    _fails([*argv, "--output_dir", str(unwritable / "out")], capfd, "not writable", root=tmp_path)
    assert not (unwritable / "out").exists()


# --- flags -----------------------------------------------------------------------------------------------------------


def test_flag_values_refused_before_any_work(model_dir, tmp_path, capfd):
    up = ["upcycle", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"), "--moe_layers"]
    up.append("last:1")
    _fails([*up, "--dtype", "float8"], capfd, "--dtype", "float8", root=tmp_path)
    _fails(["predict", "--model_name_or_path", str(model_dir), "--prompt_format", "fancy"], capfd, "--prompt_format")
    # the port is checked before the (missing) model is looked at
    _fails(["serve", "--model_name_or_path", str(tmp_path / "none"), "--port", "99999"], capfd, "--port", "99999")
    for flags in (["--expert_init", "noisytune", "--noise_lambda", "nan"], ["--expert_init", "noisytune",
                  "--noise_lambda", "inf"], ["--expert_init", "gaussian", "--noise_std", "inf"]):  # fmt: skip
        _fails([*up, *flags], capfd, flags[-2].lstrip("-"), "not a finite number", root=tmp_path)
    _fails([*up, "--noise_lambda", "0.3"], capfd, "noise_lambda", "expert_init", "noisytune", root=tmp_path)
    _fails([*up, "--expert_init", "noisytune", "--drop_ratio", "0.3"], capfd, "drop_ratio", root=tmp_path)


def test_builtin_upcycle_honours_dtype(tmp_path, capfd):
    argv = ["upcycle", "--model_name_or_path", "builtin:t5-v1_1-tiny", "--output_dir", str(tmp_path / "moe")]
    assert main([*argv, "--num_experts", "2", "--moe_layers", "last:1", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["dtype"] == "bfloat16"
    capfd.readouterr()


@pytest.mark.parametrize("name", ["noise_lambda", "drop_ratio", "noise_std", "router_jitter_noise", "router_init_std",
                                  "router_aux_loss_coef", "router_z_loss_coef", "capacity_factor"])  # fmt: skip
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_moe_config_refuses_non_finite_values(name, value):
    with pytest.raises(ValueError, match=f"{name}=.*not a finite number"):
        MoEConfig(**{name: value})


def test_ignored_settings_refused_only_where_a_user_sets_them():
    with pytest.raises(ValueError, match=r"noise_std=0\.5 has no effect"):
        upcycle(tiny_dense(), MoEConfig(moe_layers="last:1", noise_std=0.5))
    with pytest.raises(ValueError, match="router_init_std"):
        MoEConfig(router_init_std=0.1).check_settings_used()
    MoEConfig(router_init="normal", router_init_std=0.1).check_settings_used()
    # a saved `moe` block lists every field, whatever it holds: it still loads
    saved = {**MoEConfig(moe_layers="last:1").to_dict(), "noise_lambda": 0.3, "drop_ratio": 0.9}
    config = MixT5Config(moe=saved, num_layers=2, num_decoder_layers=2)
    assert config.moe_config.noise_lambda == 0.3


def test_train_moe_flags_that_would_be_ignored(model_dir, tmp_path, capfd):
    moe_dir = tmp_path / "moe"
    moe = upcycle(tiny_dense(num_layers=2, num_decoder_layers=2), MoEConfig(num_experts=2, moe_layers="last:1"))
    moe.save_pretrained(moe_dir)
    train = ["train", "--train_file", str(SAMPLE_SQUAD), "--use_cpu", "--output_dir", str(tmp_path / "run")]
    _fails([*train, "--model_name_or_path", str(model_dir), "--num_experts", "4"], capfd, "--num_experts",
           "--enable_moe", root=tmp_path)  # fmt: skip
    _fails([*train, "--model_name_or_path", str(moe_dir), "--enable_moe", "--top_k", "1"], capfd, "already a MixT5",
           "--top_k", root=tmp_path)  # fmt: skip


# --- memory ----------------------------------------------------------------------------------------------------------


def test_upcycle_refuses_what_memory_cannot_hold(monkeypatch):
    dense = tiny_dense()
    moe = MoEConfig(num_experts=6, moe_layers="all")
    new_bytes = sum(
        p.numel() * p.element_size()
        for name, p in upcycle(tiny_dense(), moe).named_parameters()
        if "experts" in name or "router" in name
    )
    for available, refused in [(new_bytes - 1, True), (new_bytes * 3 // 2, False)]:  # the estimate is tight
        monkeypatch.setattr(UPCYCLE_MODULE, "available_memory", lambda device, n=available: (n, "test figure"))
        if refused:
            with pytest.raises(MemoryError, match=r"num_experts=6: upcycling needs about .* GiB on cpu .*test figure"):
                upcycle(dense, moe)
            assert not any("experts" in name for name, _ in dense.named_parameters())  # dense model untouched
        else:
            upcycle(tiny_dense(), moe)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_memory_available_is_capped_by_the_cgroup_limit(tmp_path, version):
    """A container's limit (here written as the kernel shows it) caps the estimate; page cache counts as free."""
    import psutil
    import torch

    folder = tmp_path if version == "v2" else tmp_path / "memory"
    folder.mkdir(exist_ok=True)
    names = {
        "v2": ("memory.max", "memory.current", "inactive_file"),
        "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    }[version]
    gib = 2**30
    (folder / names[0]).write_text(f"{4 * gib}\n")
    (folder / names[1]).write_text(f"{3 * gib}\n")
    (folder / "memory.stat").write_text(f"anon 1000\n{names[2]} {gib}\nactive_file 5\n")
    assert UPCYCLE_MODULE.cgroup_headroom(tmp_path) == (2 * gib, str(folder / names[0]))  # 4 - (3 - 1) GiB
    cpu = torch.device("cpu")
    assert UPCYCLE_MODULE.available_memory(cpu, tmp_path)[0] == min(2 * gib, psutil.virtual_memory().available)

    (folder / names[0]).write_text("max\n" if version == "v2" else "9223372036854771712\n")  # no limit
    assert UPCYCLE_MODULE.cgroup_headroom(tmp_path) is None
    assert UPCYCLE_MODULE.available_memory(cpu, tmp_path) == (
        pytest.approx(psutil.virtual_memory().available, rel=0.05),
        "psutil.virtual_memory().available",
    )
    assert UPCYCLE_MODULE.cgroup_headroom(tmp_path / "none") is None


def test_upcycle_cli_refuses_experts_beyond_memory(model_dir, tmp_path, capfd):
    argv = ["upcycle", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out")]
    _fails([*argv, "--moe_layers", "all", "--num_experts", "100000000"], capfd, "num_experts=100000000", "GiB",
           "available", root=tmp_path)  # fmt: skip


def test_terminal_shows_one_line(tmp_path):
    """What a user's terminal gets, in a real process: no traceback, one line on stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(UPCYCLE_MODULE.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    argv = [sys.executable, "-m", "mixt5", "predict", "--model_name_or_path", str(tmp_path / "none")]
    result = subprocess.run([*argv, "--question", "q", "--context", "c"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "mixt5 predict" in line or "Traceback" in line]
    assert lines == [f"mixt5 predict: error: --model_name_or_path {tmp_path / 'none'}: no such folder (and not a hub "
                     "id like `org/name`)."], result.stderr  # fmt: skip


# --- windows longer than the position table --------------------------------------------------------------------------


def test_windows_longer_than_the_position_table(tmp_path, capfd):
    from transformers import BertConfig, RobertaConfig, T5Config

    from mixt5.loading import check_sequence_length
    from mixt5.predict import load_predictor
    from mixt5.testing import save_tiny_bert_qa_model

    bert = save_tiny_bert_qa_model(tmp_path / "bert")  # 512 positions
    out = tmp_path / "eval"
    evaluate = ["evaluate", "--model_name_or_path", str(bert), "--validation_file", str(SAMPLE_SQUAD)]
    _fails([*evaluate, "--max_sequence_length", "600", "--output_dir", str(out), "--use_cpu"], capfd,
           "--max_sequence_length 600", "at most 512 tokens", root=tmp_path)  # fmt: skip
    train = ["train", "--model_name_or_path", str(bert), "--train_file", str(SAMPLE_SQUAD), "--use_cpu"]
    _fails([*train, "--max_sequence_length", "513", "--output_dir", str(out)], capfd, "at most 512", root=tmp_path)
    with pytest.raises(ValueError, match="at most 512 tokens"):
        load_predictor(str(bert), max_source_length=1024)
    assert load_predictor(str(bert), max_source_length=512).max_source_length == 512

    # RoBERTa numbers positions from pad_token_id + 1: 514 embeddings take 512 tokens; T5's positions are relative
    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    check_sequence_length(roberta, 512)
    with pytest.raises(ValueError, match="at most 512 tokens"):
        check_sequence_length(roberta, 513)
    check_sequence_length(BertConfig(max_position_embeddings=128), 128)
    check_sequence_length(T5Config(), 100_000)
