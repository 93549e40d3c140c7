"""The SQuAD v1.1 metric against an independently written reference of the official algorithm."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import string

import pytest

from mixt5.metrics import (
    exact_match_score,
    f1_score,
    gold_answers_from_squad_json,
    normalize_answer,
    normalize_answer_study,
    per_question_scores,
    read_predictions,
    score_files,
    squad_metrics,
)
from mixt5.utils import read_json, write_json_atomic

# --- reference: the official evaluate-v1.1.py algorithm, written differently ------------------------------------------
# Punctuation goes with one regex character class instead of a set test; tokens come from re.findall(r"\S+"), which
# splits on exactly the characters str.split() splits on (both use Py_UNICODE_ISSPACE); overlap is counted by removing
# matched tokens from a list instead of a Counter intersection; F1 = 2·same / (|pred| + |gold|), the same value as
# 2PR / (P + R).

_REF_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


def ref_tokens(text: str) -> list[str]:
    text = _REF_PUNCTUATION.sub("", text.lower())
    text = re.sub(r"\b(?:a|an|the)\b", " ", text)
    return re.findall(r"\S+", text)


def ref_exact_match(prediction: str, ground_truths: list[str]) -> float:
    return float(any(ref_tokens(prediction) == ref_tokens(truth) for truth in ground_truths))


def ref_f1(prediction: str, ground_truths: list[str]) -> float:
    best = 0.0
    for truth in ground_truths:
        predicted, unmatched = ref_tokens(prediction), ref_tokens(truth)
        same = 0
        for token in predicted:
            if token in unmatched:
                unmatched.remove(token)
                same += 1
        if same:
            best = max(best, 2 * same / (len(predicted) + len(ref_tokens(truth))))
    return best


def assert_agrees_with_reference(prediction: str, ground_truths: list[str]) -> None:
    (exact_match, f1) = per_question_scores({"q": ground_truths}, {"q": prediction})["q"]
    assert exact_match == ref_exact_match(prediction, ground_truths), (prediction, ground_truths)
    assert math.isclose(f1, ref_f1(prediction, ground_truths), rel_tol=1e-12), (prediction, ground_truths)


ADVERSARIAL = [
    ("The Cat", ["cat"]),
    ("CAT!!!", ["cat"]),
    ("cat.", ["Cat"]),
    ("  a   cat\tsat\n", ["cat sat"]),
    ("the", ["a"]),
    ("", [""]),
    ("", ["cat"]),
    ("cat", [""]),
    ("an", ["an apple"]),
    ("theatre", ["atre"]),
    ("A-ha", ["a ha"]),
    ("the_cat", ["thecat"]),
    ("Café", ["cafe"]),
    ("Café au lait", ["café"]),
    ("北京", ["北京。"]),
    ("北京 the", ["北京"]),
    ("北the京", ["北 京"]),
    ("1990—1995", ["1990-1995"]),
    ("1990–1995", ["19901995"]),
    ("“Hello”", ['"hello"']),
    ("don’t", ["don't"]),
    ("New\u00a0York", ["new york"]),
    ("New\u2003York", ["New York"]),
    ("Denver Broncos", ["Broncos"]),
    ("the the cat cat", ["cat"]),
    ("Carolina Panthers", ["Denver Broncos", "Panthers", "the Carolina Panthers"]),
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara", "Levi's Stadium in the San Francisco Bay Area"]),
    ("İstanbul", ["istanbul"]),
    ("STRASSE", ["straße"]),
    ("$1,000", ["1000"]),
    ("10 %", ["10%"]),
]


@pytest.mark.parametrize(("prediction", "ground_truths"), ADVERSARIAL)
def test_agrees_with_reference_on_adversarial_answers(prediction: str, ground_truths: list[str]) -> None:
    assert_agrees_with_reference(prediction, ground_truths)


_PIECES = [
    "the", "a", "an", "The", "AN", "A", "cat", "Cat", "café", "北京", "İ", "ß", "1", "x",
    " ", "  ", "\t", "\n", "\u00a0", "\u2003", ".", ",", "'", "’", "—", "–", "“", "”", "-", "_", "(", ")", "$",
]  # fmt: skip


def test_agrees_with_reference_on_seeded_random_answers() -> None:
    rng = random.Random(1234)

    def answer() -> str:
        return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 10)))

    for _ in range(3000):
        assert_agrees_with_reference(answer(), [answer() for _ in range(rng.randint(1, 3))])


def test_agrees_with_reference_on_hypothesis_strings() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    answers = st.one_of(st.text(max_size=30), st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(answers, st.lists(answers, min_size=1, max_size=3))
    def check(prediction: str, ground_truths: list[str]) -> None:
        assert_agrees_with_reference(prediction, ground_truths)

    check()


def test_official_quirks() -> None:
    assert normalize_answer("  The Cat's   HAT!  ") == "cats hat"
    assert normalize_answer("“Hello”—world") == "“hello”—world"  # only ASCII punctuation goes
    assert exact_match_score("the", "a") is True
    assert f1_score("the", "a") == 0.0  # both normalise to nothing: no common token, so 0
    assert f1_score("", "") == 0.0
    assert f1_score("Denver Broncos", "Broncos") == pytest.approx(2 / 3)
    assert f1_score("the the cat cat", "cat") == pytest.approx(2 / 3)


def test_study_variant_strips_every_symbol() -> None:
    assert normalize_answer_study("“Hello”, world!") == "hello world"
    assert normalize_answer_study("1990—1995") == "19901995"
    assert normalize_answer_study("北京。") == "北京"
    assert normalize_answer_study("Café au lait") == "café au lait"
    assert exact_match_score("“Hello”", "hello", normalizer=normalize_answer_study)
    assert not exact_match_score("“Hello”", "hello")


def test_gold_answers_score_100() -> None:
    gold = {"a": ["Denver Broncos", "Broncos"], "b": ["“Hello”"], "c": ["the end"]}
    metrics = squad_metrics(gold, {qid: answers[0] for qid, answers in gold.items()})
    assert metrics == {
        "exact_match": 100.0,
        "f1": 100.0,
        "num_questions": 3,
        "num_missing_predictions": 0,
        "exact_match_symbols_stripped": 100.0,
        "f1_symbols_stripped": 100.0,
    }
    assert list(metrics)[:2] == ["exact_match", "f1"]


def test_averages_over_all_gold_questions_like_the_official_script(caplog: pytest.LogCaptureFixture) -> None:
    gold = {f"q{i}": ["Denver Broncos"] for i in range(10)}
    predictions = {"q0": "Denver Broncos", "q1": "Broncos", "q2": "Carolina", "extra": "ignored"}
    with caplog.at_level(logging.WARNING, logger="mixt5.metrics"):
        metrics = squad_metrics(gold, predictions, include_study_variant=False)
    official_f1 = 0
    for f1 in [1.0, 2 / 3, 0] + [0] * 7:  # the official script's accumulation order
        official_f1 += f1
    assert metrics == {
        "exact_match": 10.0,
        "f1": 100.0 * official_f1 / 10,
        "num_questions": 10,
        "num_missing_predictions": 7,
    }
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "7 of 10" in warnings[0].getMessage() and "q3, q4, q5" in warnings[0].getMessage()


def test_per_question_scores() -> None:
    scores = per_question_scores({"a": ["x y"], "b": ["z"], "c": ["w"]}, {"a": "x", "b": "Z."})
    assert scores == {"a": (0.0, pytest.approx(2 / 3)), "b": (1.0, 1.0), "c": (0.0, 0.0)}
    with pytest.raises(ValueError, match="'a' has no gold answers"):
        per_question_scores({"a": []}, {"a": "x"})
    with pytest.raises(ValueError, match="no gold questions"):
        squad_metrics({}, {})


SMALL_SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Denver Broncos beat the Carolina Panthers.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Who won?",
                            "answers": [{"text": "Denver Broncos", "answer_start": 0}],
                        },
                        {
                            "id": "q2",
                            "question": "Who?",
                            "answers": [{"text": "Carolina Panthers", "answer_start": 24}],
                        },
                    ],
                }
            ],
        }
    ],
}


def test_score_files(tmp_path) -> None:
    dataset = tmp_path / "dev.json"
    predictions = tmp_path / "predictions.json"
    write_json_atomic(dataset, SMALL_SQUAD)
    write_json_atomic(predictions, {"q1": "the Denver Broncos", "q2": "Panthers"})
    assert gold_answers_from_squad_json(dataset) == {"q1": ["Denver Broncos"], "q2": ["Carolina Panthers"]}
    assert score_files(dataset, predictions) == {"exact_match": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2)}
    full = score_files(dataset, predictions, full=True)
    assert list(full)[:2] == ["exact_match", "f1"] and full["f1_symbols_stripped"] == full["f1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('["q1", "q2"]', r"predictions\.json: expected a JSON object mapping question id to answer text, got list"),
        ('{"q1": ["Denver"]}', r"predictions\.json: the prediction for 'q1' is list, expected a string"),
        ('{"q1": "Denver",}', r"predictions\.json: invalid JSON at line 1, column 17"),
    ],
)
def test_bad_predictions_file(tmp_path, content: str, message: str) -> None:
    (tmp_path / "predictions.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_predictions(tmp_path / "predictions.json")
    write_json_atomic(tmp_path / "dev.json", SMALL_SQUAD)
    with pytest.raises(ValueError, match=message):
        score_files(tmp_path / "dev.json", tmp_path / "predictions.json")


def test_write_json_atomic_replaces_whole_file(tmp_path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")
    write_json_atomic(path, {"é": [1, 2]})
    assert read_json(path) == {"é": [1, 2]}
    assert json.loads(path.read_text(encoding="utf-8")) == {"é": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert read_json(path) == {"é": [1, 2]} and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_official_dev_set_gold_answers_score_100(shared_dir, tmp_path) -> None:
    dev = shared_dir / "data" / "squad" / "dev-v1.1.json"
    if not dev.exists():
        pytest.skip(f"{dev} is absent")
    gold = gold_answers_from_squad_json(dev)
    assert len(gold) == 10_570
    write_json_atomic(tmp_path / "predictions.json", {qid: answers[0] for qid, answers in gold.items()})
    assert score_files(dev, tmp_path / "predictions.json") == {"exact_match": 100.0, "f1": 100.0}
