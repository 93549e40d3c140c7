"""`mixt5 train` → `evaluate` → `predict` → `score` end to end on a tiny model, offline; kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from mixt5.cli import main
from mixt5.train import parse_train_args
from mixt5.utils import umask_mode
from tiny import SAMPLE_SQUAD, save_tiny_qa_model

EVAL_SAMPLES = 8


def _train_argv(model_dir, output_dir, *extra):
    # the study's README flags, unchanged, plus small sizes
    return [
        "train",
        "--pretrained_model_name_or_path", str(model_dir),
        "--reference_model_name_or_path", str(model_dir),
        "--save_dir", str(output_dir),
        "--save_strategy", "epoch",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--num_train_epochs", "2",
        "--wandb_model_name", "tiny_run",
        "--project_name", "moe",
        "--gradient_accumulation_steps", "2",
        "--seed", "42",
        "--evaluation_strategy", "epoch",
        "--eval_accumulation_steps", "2",
        "--weight_decay", "0.01",
        "--max_grad_norm", "1.0",
        "--max_sequence_length", "64",
        "--generation_max_length", "8",
        "--generation_num_beams", "1",
        "--train_file", str(SAMPLE_SQUAD),
        "--validation_file", str(SAMPLE_SQUAD),
        "--max_train_samples", "16",
        "--max_eval_samples", str(EVAL_SAMPLES),
        "--use_cpu",
        "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_qa_model(tmp_path_factory):
    return save_tiny_qa_model(tmp_path_factory.mktemp("model") / "dense")


def test_study_flags_map_to_trainer_arguments(tmp_path):
    model_args, data_args, moe_args, training_args, _ = parse_train_args(
        _train_argv("m", tmp_path / "out", "--use_wandb", "--entity", "lab")[1:]
    )
    assert model_args.model_name_or_path == "m" and model_args.enable_moe is False
    assert training_args.output_dir == str(tmp_path / "out")
    assert training_args.run_name == "tiny_run"
    assert training_args.eval_strategy == "epoch" and training_args.load_best_model_at_end
    assert training_args.report_to == ["wandb"]
    assert os.environ["WANDB_PROJECT"] == "moe" and os.environ["WANDB_ENTITY"] == "lab"
    assert data_args.max_sequence_length == 64
    assert (moe_args.num_experts, moe_args.top_k, moe_args.moe_layers) == (8, 2, "last:6")  # the study's defaults


@pytest.mark.slow
@pytest.mark.parametrize("enable_moe", [False, True])
def test_train_evaluate_predict_score(tiny_qa_model, tmp_path, capsys, enable_moe):
    out = tmp_path / "run"
    moe_flags = ["--enable_moe", "--num_experts", "4", "--moe_layers", "last:1"] if enable_moe else []
    assert main(_train_argv(tiny_qa_model, out, *moe_flags)) == 0
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_args.json", "metrics.json"} <= files
    assert {"predictions.json", "trainer_state.json", "checkpoint-2", "checkpoint-4"} <= files
    assert not [name for name in files if name.startswith(".")]  # no staging left behind
    assert "model.safetensors" in os.listdir(out / "checkpoint-2")
    assert not [p for p in out.rglob("*.bin") if p.name == "pytorch_model.bin"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("mixt5" if enable_moe else "t5")
    if enable_moe:
        assert config["moe"]["num_experts"] == 4 and config["upcycled_from"]["seed"] == 42
        state = json.loads((out / "trainer_state.json").read_text())
        logged = {key for entry in state["log_history"] for key in entry}
        assert {"moe/aux_loss", "moe/z_loss", "moe/load/encoder.1/e0", "moe/load/decoder.1/e3"} <= logged
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == EVAL_SAMPLES == metrics["eval"]["eval_num_questions"]
    assert "eval_exact_match_symbols_stripped" in metrics["eval"]
    assert "train_answers_cut_by_truncation" in metrics["train"]
    # the run folder describes itself (what `mixt5 report` reads instead of reloading data): arguments, and each
    # question's scores, whose means are the reported EM and F1
    described = json.loads((out / "run.json").read_text())
    assert described["command"] == "train" and ("moe" in described["arguments"]) == enable_moe
    assert described["arguments"]["data"]["max_eval_samples"] == EVAL_SAMPLES
    assert described["arguments"]["training"]["seed"] == 42
    question_scores = json.loads((out / "question_scores.json").read_text())["scores"]
    assert list(question_scores) == list(predictions)
    for column, metric in enumerate(("exact_match", "f1")):
        mean = 100 * sum(scores[column] for scores in question_scores.values()) / EVAL_SAMPLES
        assert mean == pytest.approx(metrics["eval"][f"eval_{metric}"])
    assert main(["report", str(out)]) == 0
    assert (
        f"Run: `mixt5 train` of `{tiny_qa_model}`, scored on `{SAMPLE_SQUAD}` (first {EVAL_SAMPLES})"
        in (out / "report.md").read_text()
    )
    capsys.readouterr()

    # evaluate the saved model: same predictions, same scores
    assert main(["evaluate", "--model_name_or_path", str(out), "--validation_file", str(SAMPLE_SQUAD),
                 "--max_eval_samples", str(EVAL_SAMPLES), "--output_dir", str(tmp_path / "eval"),
                 "--per_device_eval_batch_size", "3", "--max_sequence_length", "64",
                 "--generation_max_length", "8", "--use_cpu"]) == 0  # fmt: skip
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == predictions
    assert evaluated["eval_f1"] == pytest.approx(metrics["eval"]["eval_f1"])
    assert json.loads((tmp_path / "eval" / "question_scores.json").read_text())["scores"] == question_scores
    assert json.loads((tmp_path / "eval" / "run.json").read_text())["command"] == "evaluate"
    # an evaluation records its routing too (a dense model has none)
    diagnostics = tmp_path / "eval" / "diagnostics.jsonl"
    assert diagnostics.is_file() == enable_moe
    if enable_moe:
        (record,) = [json.loads(line) for line in diagnostics.read_text().splitlines()]
        assert record["phase"] == "eval" and set(record["layers"]) == {"encoder.1", "decoder.1"}

    # score the predictions file like the official script
    capsys.readouterr()
    assert main(["score", str(SAMPLE_SQUAD), str(out / "predictions.json")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert set(scored) == {"exact_match", "f1"}
    # the official script scores all 200 questions of the file; our eval covered the first 8
    assert scored["f1"] == pytest.approx(metrics["eval"]["eval_f1"] * EVAL_SAMPLES / 200)

    # predict: batch file and a single question agree with the evaluation's predictions
    questions = json.loads(SAMPLE_SQUAD.read_text())["data"][0]["paragraphs"][0]
    rows = [
        {"id": qa["id"], "question": qa["question"], "context": questions["context"]} for qa in questions["qas"][:3]
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", "--model_name_or_path", str(out), "--input_file", str(tmp_path / "in.jsonl"),
                 "--output_file", str(tmp_path / "out.jsonl"), "--max_sequence_length", "64",
                 "--generation_max_length", "8"]) == 0  # fmt: skip
    answered = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answered] == [predictions[r["id"]] for r in rows]
    capsys.readouterr()
    flags = ["--max_sequence_length", "64", "--generation_max_length", "8"]
    assert main(["predict", "--model_name_or_path", str(out), "--question", rows[0]["question"],
                 "--context", rows[0]["context"], "--show_routing", *flags]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == predictions[rows[0]["id"]]
    if enable_moe:
        assert printed[1].strip().startswith("encoder.1:") and any("decoder.1:" in line for line in printed)


def test_bad_data_fails_before_training(tiny_qa_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q", "context": "c", "answers": ["c"]}) + "\n"
                   + json.dumps({"id": "b", "question": "q", "answers": ["x"]}) + "\n")  # fmt: skip
    argv = _train_argv(tiny_qa_model, tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(bad)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "context" in err
    assert not (tmp_path / "out").exists()
    argv = _train_argv(tiny_qa_model, tmp_path / "out", "--prompt_format", "fancy")
    assert main(argv) == 2  # argparse's status for a bad flag, returned: only the console script exits
    assert "fancy" in capsys.readouterr().err


# Runs `mixt5 train` and SIGKILLs it at a named point: KILL_AT_STEP alone kills after that optimizer step; with KILL_AT
# it kills at that point of the checkpoint save (or the results write) of that step. The points are reached by wrapping
# the functions that the save calls in order, so each kill lands at the same place every time (no timing).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import transformers.modeling_utils
    from transformers import TrainerCallback
    import mixt5._compat, mixt5.trainer, mixt5.utils
    from mixt5.train import parse_train_args, run_training

    step, point = int(os.environ["KILL_AT_STEP"]), os.environ.get("KILL_AT", "step_end")
    current = {"step": 0}

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)  # a real, uncatchable kill

    class KillAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            current["step"] = state.global_step
            if point == "step_end" and state.global_step == step:
                kill()

    def kill_in(owner, name, when):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            target = os.path.basename(args[1]) if when == "results" else "metrics.json"
            if point == when and current["step"] == step and target == "metrics.json":
                if when == "model_file":  # half of model.safetensors on disk
                    original(*args, **kwargs)
                    path = args[1]
                    os.truncate(path, os.path.getsize(path) // 2)
                kill()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    kill_in(transformers.modeling_utils, "safe_save_file", "model_file")  # while writing the weights
    kill_in(mixt5.trainer.MixT5Trainer, "_save_optimizer_and_scheduler", "optimizer")  # weights written, no optimizer
    kill_in(mixt5.trainer, "replace_dir", "rename")  # every file written, not yet renamed into place
    kill_in(mixt5._compat, "rotate_checkpoints", "rotate")  # renamed into place, older ones not yet rotated
    kill_in(mixt5.utils.os, "replace", "results")  # metrics.json's temporary file written, not renamed over it

    run_training(*parse_train_args(sys.argv[1:]), callbacks=[KillAfter()])
    """
)


def _resume_argv(model_dir, output_dir, *extra):
    args = _train_argv(model_dir, output_dir, "--save_strategy", "steps", "--save_steps", "3",
                       "--evaluation_strategy", "no", "--num_train_epochs", "3", "--enable_moe",
                       "--num_experts", "4", "--moe_layers", "last:1",
                       "--router_jitter_noise", "0.05", *extra)  # fmt: skip
    return args[1:]  # 2 steps an epoch: checkpoint-3, checkpoint-6 (the last step)


@pytest.fixture(scope="module")
def straight_run(tiny_qa_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *_resume_argv(tiny_qa_model, out)]) == 0
    return out


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at, step",
    [
        ("step_end", 5),  # mid-epoch, after checkpoint-3
        ("model_file", 6),  # half of checkpoint-6's model.safetensors written
        ("optimizer", 6),  # checkpoint-6's weights written, its optimizer and trainer state not
        ("rename", 6),  # checkpoint-6 complete in its staging folder, not yet renamed into place
        ("rotate", 6),  # checkpoint-6 in place, older checkpoints not yet rotated
        ("results", 6),  # metrics.json half-way through its atomic write
    ],
)
def test_killed_run_resumes_to_the_same_metrics(tiny_qa_model, straight_run, tmp_path, kill_at, step):
    resumed_dir = tmp_path / "resumed"
    env = {**os.environ, "KILL_AT_STEP": str(step), "KILL_AT": kill_at}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *_resume_argv(tiny_qa_model, resumed_dir)], env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (resumed_dir / "checkpoint-3").is_dir() and not (resumed_dir / "metrics.json").exists()
    leftovers = [p.name for p in resumed_dir.iterdir() if p.name.startswith(".")]
    if kill_at in ("model_file", "optimizer", "rename"):  # checkpoint-6 is only in its staging folder
        assert not (resumed_dir / "checkpoint-6").exists()
        assert [name for name in leftovers if name.startswith(".checkpoint-6.")], leftovers
    if kill_at == "results":
        assert [name for name in leftovers if name.startswith(".metrics.json.")], leftovers

    assert main(["train", *_resume_argv(tiny_qa_model, resumed_dir, "--resume_from_checkpoint", "last")]) == 0
    assert not [p.name for p in resumed_dir.iterdir() if p.name.startswith(".")]  # the killed run's staging is gone
    resumed = json.loads((resumed_dir / "trainer_state.json").read_text())["log_history"]
    straight = json.loads((straight_run / "trainer_state.json").read_text())["log_history"]
    losses = lambda history: [(e["step"], e["loss"]) for e in history if "loss" in e]  # noqa: E731
    assert [s for s, _ in losses(resumed)][-1] == 6
    for (step, loss), (step_straight, loss_straight) in zip(losses(resumed)[-2:], losses(straight)[-2:], strict=True):
        assert step == step_straight and loss == pytest.approx(loss_straight, rel=1e-5)
    # the final weights and evaluation: the same (Trainer's `train_loss` averages only the resumed steps)
    for name, tensor in _weights(straight_run).items():
        torch.testing.assert_close(_weights(resumed_dir)[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    resumed_eval = json.loads((resumed_dir / "metrics.json").read_text())["eval"]
    straight_eval = json.loads((straight_run / "metrics.json").read_text())["eval"]
    for key in ("eval_exact_match", "eval_f1", "eval_loss"):
        assert resumed_eval[key] == pytest.approx(straight_eval[key], rel=1e-5)
    # a resumed run says so: its train_runtime timed only the part after the checkpoint (reports leave it out)
    resumed_train = json.loads((resumed_dir / "metrics.json").read_text())["train"]
    whole = "checkpoint-6" if kill_at in ("rotate", "results") else "checkpoint-3"  # the newest whole checkpoint
    assert resumed_train["train_resumed_from"] == whole
    assert "train_resumed_from" not in json.loads((straight_run / "metrics.json").read_text())["train"]
    predictions = [json.loads((run / "predictions.json").read_text()) for run in (resumed_dir, straight_run)]
    assert predictions[0] == predictions[1]


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing(tiny_qa_model, straight_run, tmp_path, caplog):
    import shutil

    run = shutil.copytree(straight_run, tmp_path / "run")
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    with caplog.at_level("INFO", logger="mixt5"):
        assert main(["train", *_resume_argv(tiny_qa_model, run, "--resume_from_checkpoint", "last")]) == 0
    assert "is complete (step 6 of 6): nothing to train" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == before  # nothing written, no checkpoint-7
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in run.rglob("*") if path.is_file()}
    assert set(modes.values()) == {umask_mode(0o666)}, modes  # safetensors writes 0600 itself
    # asking for more steps than it trained resumes it
    more = ["--resume_from_checkpoint", "last", "--max_steps", "7"]
    assert main(["train", *_resume_argv(tiny_qa_model, run, *more)]) == 0
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 7


def test_train_refuses_a_non_empty_output_dir(tiny_qa_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main(["train", *_resume_argv(tiny_qa_model, out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite_output_dir" in err and "--resume_from_checkpoint last" in err
    # resuming a folder that holds no run is refused too
    assert main(["train", *_resume_argv(tiny_qa_model, out, "--resume_from_checkpoint", "last")]) == 2
    assert "no whole checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_last_checkpoint_skips_incomplete_ones(tmp_path, caplog):
    from mixt5.train import last_whole_checkpoint

    for step, state in [(3, '{"global_step": 3}'), (6, '{"global_step": 6}'), (9, '{"global_st'), (12, None)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-best").mkdir()
    with caplog.at_level("WARNING", logger="mixt5"):
        assert last_whole_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert "checkpoint-12 is incomplete" in caplog.text and "checkpoint-9 is incomplete" in caplog.text


def test_overwrite_output_dir_removes_old_checkpoints_only(tmp_path):
    from mixt5.train import _resolve_resume

    out = tmp_path / "out"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": 9}')
    (out / "notes.txt").write_text("kept")
    training_args = parse_train_args(["--model_name_or_path", "m", "--output_dir", str(out), "--use_cpu",
                                      "--overwrite_output_dir", "--resume_from_checkpoint", "last"])[3]  # fmt: skip
    assert _resolve_resume(training_args) is None  # a fresh run: another run's checkpoint is never resumed
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
