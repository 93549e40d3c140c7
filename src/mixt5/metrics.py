"""The official SQuAD v1.1 metric (exact match and F1), with the study's symbol-stripped variant beside it.

`normalize_answer`, `exact_match_score`, `f1_score` and the corpus averages follow the official `evaluate-v1.1.py`
exactly, down to the order of the floating-point sums, so `score_files` prints the numbers that script prints.
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from mixt5.data.squad import load_squad_json
from mixt5.utils import read_json, write_json_atomic

logger = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_IDS_SHOWN = 5
# Per-question scores of an evaluation, in the run folder beside predictions.json; `mixt5 report` pairs runs on them.
QUESTION_SCORES_FILE = "question_scores.json"


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, and collapse whitespace (official v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_answer_study(s: str) -> str:
    """Non-standard, for comparison with the study's table only: remove every character that is neither alphanumeric
    (`str.isalnum`, so accented letters and CJK stay) nor whitespace, then apply `normalize_answer`."""
    return normalize_answer("".join(ch for ch in s if ch.isalnum() or ch.isspace()))


def exact_match_score(
    prediction: str, ground_truth: str, *, normalizer: Callable[[str], str] = normalize_answer
) -> bool:
    """Whether prediction and ground truth are equal after normalisation."""
    return normalizer(prediction) == normalizer(ground_truth)


def f1_score(prediction: str, ground_truth: str, *, normalizer: Callable[[str], str] = normalize_answer) -> float:
    """Token-overlap F1 of the normalised strings; 0 when they share no token (even when both are empty)."""
    prediction_tokens = normalizer(prediction).split()
    ground_truth_tokens = normalizer(ground_truth).split()
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def per_question_scores(
    gold: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    *,
    normalizer: Callable[[str], str] = normalize_answer,
) -> dict[str, tuple[float, float]]:
    """`{id: (exact match 0/1, F1 0..1)}` for every gold question, each the best over its gold answers.

    A question without a prediction scores `(0.0, 0.0)`. A question without gold answers raises `ValueError`.
    """
    scores = {}
    for qid, ground_truths in gold.items():
        if not ground_truths:
            raise ValueError(f"question {qid!r} has no gold answers")
        if qid not in predictions:
            scores[qid] = (0.0, 0.0)
            continue
        prediction = predictions[qid]
        exact_match = max(exact_match_score(prediction, truth, normalizer=normalizer) for truth in ground_truths)
        f1 = max(f1_score(prediction, truth, normalizer=normalizer) for truth in ground_truths)
        scores[qid] = (float(exact_match), f1)
    return scores


def _percentages(scores: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    # A left-to-right `+=` as in the official script; `sum()` is compensated since Python 3.12 and can differ in the
    # last digit.
    total_exact_match = total_f1 = 0.0
    for exact_match, f1 in scores.values():
        total_exact_match += exact_match
        total_f1 += f1
    return 100.0 * total_exact_match / len(scores), 100.0 * total_f1 / len(scores)


def squad_metrics(
    gold: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    *,
    include_study_variant: bool = True,
) -> dict[str, Any]:
    """Corpus exact match and F1 in percent, averaged over ALL gold questions; a missing prediction scores 0.

    Returns `exact_match`, `f1`, `num_questions` and `num_missing_predictions`, then, with `include_study_variant`,
    `exact_match_symbols_stripped` and `f1_symbols_stripped`: non-standard (`normalize_answer_study`), for comparison
    with the study's table only. Predictions for ids not in `gold` are ignored, as in the official script.
    """
    if not gold:
        raise ValueError("no gold questions to score")
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        logger.warning(
            "%d of %d questions have no prediction and score 0 (first ids: %s)",
            len(missing),
            len(gold),
            ", ".join(missing[:_IDS_SHOWN]),
        )
    exact_match, f1 = _percentages(per_question_scores(gold, predictions))
    metrics: dict[str, Any] = {
        "exact_match": exact_match,
        "f1": f1,
        "num_questions": len(gold),
        "num_missing_predictions": len(missing),
    }
    if include_study_variant:
        scores = per_question_scores(gold, predictions, normalizer=normalize_answer_study)
        metrics["exact_match_symbols_stripped"], metrics["f1_symbols_stripped"] = _percentages(scores)
    return metrics


def gold_answers_from_squad_json(path: str | os.PathLike) -> dict[str, list[str]]:
    """`{id: [answer text, ...]}` from a file in the official SQuAD v1.1 layout."""
    return {example.id: example.answers for example in load_squad_json(path, split_name="evaluation")}


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read a predictions file: a JSON object mapping question id to predicted answer text."""
    predictions = read_json(path)
    if not isinstance(predictions, dict):
        raise ValueError(
            f"{os.fspath(path)}: expected a JSON object mapping question id to answer text, "
            f"got {type(predictions).__name__}"
        )
    for qid, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise ValueError(
                f"{os.fspath(path)}: the prediction for {qid!r} is {type(prediction).__name__}, expected a string"
            )
    return predictions


def score_files(
    dataset_json: str | os.PathLike,
    predictions_json: str | os.PathLike,
    *,
    full: bool = False,
    question_scores_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a predictions file against a SQuAD v1.1 file, like the official `evaluate-v1.1.py`.

    Returns `{"exact_match": ..., "f1": ...}` as the official script prints it; with `full`, the whole
    `squad_metrics` dict (the official two keys first, then the counts and the non-standard study variant). With
    `question_scores_file`, also writes the per-question scores of the questions the predictions answer (a run
    evaluated with `--max_eval_samples N` answered the first N) as `mixt5 train` / `evaluate` write them.
    """
    examples = load_squad_json(dataset_json, split_name="evaluation")
    if examples.version != "1.1":
        logger.warning("%s: evaluation expects v-1.1, but got dataset with v-%s", examples.source, examples.version)
    gold = {example.id: example.answers for example in examples}
    predictions = read_predictions(predictions_json)
    metrics = squad_metrics(gold, predictions, include_study_variant=full)
    if question_scores_file is not None:
        answered = {qid: answers for qid, answers in gold.items() if qid in predictions}
        if not answered:
            raise ValueError(f"{os.fspath(predictions_json)}: answers none of the questions of {examples.source}")
        write_question_scores(question_scores_file, answered, predictions)
    return metrics if full else {"exact_match": metrics["exact_match"], "f1": metrics["f1"]}


def write_question_scores(
    path: str | os.PathLike, gold: Mapping[str, list[str]], predictions: Mapping[str, str]
) -> None:
    """Write each gold question's official EM (0/1) and F1 (0..1), in the order of `gold`, as JSON:
    `{"metric": "squad-v1.1", "columns": ["exact_match", "f1"], "scores": {id: [em, f1], ...}}`.

    Their means times 100 are `squad_metrics`' exact match and F1; `mixt5 report` reads them to pair runs question
    by question without loading the data set again.
    """
    scores = per_question_scores(gold, predictions)
    write_json_atomic(
        path,
        {"metric": "squad-v1.1", "columns": ["exact_match", "f1"], "scores": {q: list(s) for q, s in scores.items()}},
        indent=None,
    )


def read_question_scores(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """`{id: (exact match, F1)}` from a file of `write_question_scores`, in its order; `ValueError` naming the file
    if it is not one."""
    data = read_json(path)
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, dict) or data.get("columns") != ["exact_match", "f1"]:
        raise ValueError(f"{os.fspath(path)}: not a question-scores file (expected columns exact_match, f1)")
    try:
        return {qid: (float(em), float(f1)) for qid, (em, f1) in scores.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{os.fspath(path)}: a question's scores are not [exact_match, f1] numbers") from err
