"""`mixt5 train` → `evaluate` end to end on a tiny BERT encoder (extractive QA), offline; task detection."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForQuestionAnswering, BertConfig, T5Config

from mixt5 import MoEConfig, upcycle
from mixt5.cli import main
from mixt5.data.squad import load_squad_json
from mixt5.loading import model_task
from mixt5.metrics import gold_answers_from_squad_json, read_question_scores, squad_metrics
from mixt5.testing import SAMPLE_SQUAD, save_tiny_bert_qa_model, save_tiny_qa_model

TRAIN_SAMPLES, EVAL_SAMPLES, GUESSED = 12, 8, 3
WINDOW_FLAGS = ["--max_sequence_length", "64", "--doc_stride", "16"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    # a bare BertModel, as sentence-transformers checkpoints (all-MiniLM-L6-v2) are stored: the QA head is new
    return save_tiny_bert_qa_model(tmp_path_factory.mktemp("model") / "bert", head=False)


@pytest.fixture(scope="module")
def reconstructed_train(tmp_path_factory):
    """The shipped sample as a reconstructed train file, with the sidecar listing guessed answer offsets."""
    folder = tmp_path_factory.mktemp("data")
    train = folder / "train.reconstructed.json"
    shutil.copy(SAMPLE_SQUAD, train)
    examples = load_squad_json(SAMPLE_SQUAD)[:TRAIN_SAMPLES]
    guessed = [{"id": e.id, "text": e.answers[0], "chosen": 0, "candidates": [0]} for e in examples[:GUESSED]]
    (folder / "train.reconstructed.ambiguous-answer-starts.json").write_text(json.dumps(guessed))
    return train


def test_task_follows_from_the_model() -> None:
    assert model_task(BertConfig(architectures=["BertForQuestionAnswering"])) == "extractive"
    assert model_task(BertConfig(architectures=["BertModel"])) == "extractive"  # bare encoder: the QA head is new
    assert model_task(T5Config(architectures=["T5ForConditionalGeneration"])) == "generative"
    assert model_task(T5Config()) == "generative"  # t5 is also in the QA mapping: encoder-decoder wins


def test_extractive_flags_refused_for_a_seq2seq_model(tmp_path, capsys) -> None:
    t5 = save_tiny_qa_model(tmp_path / "t5")
    argv = ["evaluate", "--model_name_or_path", str(t5), "--validation_file", str(SAMPLE_SQUAD)]
    assert main([*argv, "--output_dir", str(tmp_path / "out"), "--doc_stride", "16", "--use_cpu"]) == 2
    assert "--doc_stride: extractive QA flags" in capsys.readouterr().err


@pytest.mark.parametrize("moe_flags", [[], ["--enable_moe", "--num_experts", "4", "--moe_layers", "last:1"]])
def test_train_evaluate_extractive(bert_folder, reconstructed_train, tmp_path, capsys, moe_flags) -> None:
    out = tmp_path / "run"
    argv = [
        "train", "--model_name_or_path", str(bert_folder), "--output_dir", str(out),
        "--train_file", str(reconstructed_train), "--validation_file", str(SAMPLE_SQUAD),
        "--max_train_samples", str(TRAIN_SAMPLES), "--max_eval_samples", str(EVAL_SAMPLES),
        *WINDOW_FLAGS, "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--learning_rate", "3e-3", "--use_cpu", "--report_to", "none", "--seed", "1", *moe_flags,
    ]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixBertForQuestionAnswering" if moe_flags else "BertForQuestionAnswering"]
    assert (out / "diagnostics.jsonl").is_file() == bool(moe_flags)
    metrics = json.loads((out / "metrics.json").read_text())
    train, evaluation = metrics["train"], metrics["eval"]
    assert train["train_skipped_guessed_answer_starts"] == GUESSED
    assert train["train_runtime"] > 0 and "train_resumed_from" not in train  # timed whole: reports count it
    assert train["train_labelled_examples"] == TRAIN_SAMPLES - GUESSED
    assert train["train_windows"] > train["train_labelled_examples"]  # contexts longer than a 64-token window

    # predictions in the official format, spans of their contexts, scored by the official metric
    predictions = json.loads((out / "predictions.json").read_text())
    examples = {e.id: e for e in load_squad_json(SAMPLE_SQUAD)[:EVAL_SAMPLES]}
    assert set(predictions) == set(examples)
    assert all(text in examples[qid].context for qid, text in predictions.items())
    gold = {qid: answers for qid, answers in gold_answers_from_squad_json(SAMPLE_SQUAD).items() if qid in examples}
    official = squad_metrics(gold, predictions)
    assert evaluation["eval_f1"] == pytest.approx(official["f1"])
    assert evaluation["eval_exact_match"] == pytest.approx(official["exact_match"])
    scores = read_question_scores(out / "question_scores.json")
    assert 100 * sum(f1 for _, f1 in scores.values()) / len(scores) == pytest.approx(official["f1"])
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "train" and run["arguments"]["extractive"]["doc_stride"] == 16
    assert run["arguments"]["data"]["max_sequence_length"] == 64
    assert run["arguments"]["training"]["predict_with_generate"] is False

    # `mixt5 evaluate` of the saved model reproduces the run's predictions and scores
    evaluated = tmp_path / "evaluated"
    argv = [
        "evaluate", "--model_name_or_path", str(out), "--validation_file", str(SAMPLE_SQUAD),
        "--max_eval_samples", str(EVAL_SAMPLES), *WINDOW_FLAGS, "--output_dir", str(evaluated), "--use_cpu",
        "--report_to", "none",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert json.loads((evaluated / "predictions.json").read_text()) == predictions
    again = json.loads((evaluated / "metrics.json").read_text())
    assert again["eval_f1"] == pytest.approx(evaluation["eval_f1"])
    assert (evaluated / "question_scores.json").is_file()
    assert json.loads((evaluated / "run.json").read_text())["command"] == "evaluate"

    # `mixt5 predict` answers with the same windows and post-processing
    rows = [{"id": e.id, "question": e.question, "context": e.context} for e in examples.values()]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [
        "predict", "--model_name_or_path", str(out), "--input_file", str(tmp_path / "questions.jsonl"),
        "--output_file", str(tmp_path / "answers.jsonl"), *WINDOW_FLAGS, "--show_routing",
    ]  # fmt: skip
    assert main(argv) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert {row["id"]: row["answer"] for row in answers} == predictions
    for row in answers:
        assert examples[row["id"]].context[row["start"] : row["end"]] == row["answer"]
        assert ("routing" in row) == bool(moe_flags)


def test_moe_flags_refused_for_an_upcycled_encoder(bert_folder, tmp_path, capsys) -> None:
    moe = upcycle(
        AutoModelForQuestionAnswering.from_pretrained(bert_folder), MoEConfig(num_experts=2, moe_layers="all")
    )
    moe.save_pretrained(tmp_path / "moe")
    argv = [
        "train", "--model_name_or_path", str(tmp_path / "moe"), "--train_file", str(SAMPLE_SQUAD),
        "--output_dir", str(tmp_path / "out"), "--enable_moe", "--num_experts", "4", "--use_cpu",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "is already a MixT5 model" in capsys.readouterr().err


def test_extractive_sequence_length_defaults_to_384(bert_folder, tmp_path) -> None:
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--model_name_or_path", str(bert_folder), "--validation_file", str(SAMPLE_SQUAD),
        "--max_eval_samples", "2", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
    ]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["arguments"]["data"]["max_sequence_length"] == 384
