"""`mixt5 score DATASET PREDICTIONS`: official SQuAD v1.1 EM/F1 of a predictions file, as `evaluate-v1.1.py`."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Official SQuAD v1.1 EM/F1 of a predictions file."
    parser.add_argument("dataset_file", help="SQuAD v1.1 JSON (the gold answers)")
    parser.add_argument("prediction_file", help="JSON object {question id: predicted answer}")
    parser.add_argument("--full", action="store_true", help="also print counts and the study's non-standard variant")
    parser.add_argument(
        "--question_scores_file",
        help="also write each answered question's EM/F1 here (mixt5 train/evaluate write RUN/question_scores.json; "
        "`mixt5 report` pairs runs on it)",
    )


def run(args: argparse.Namespace) -> int:
    from ..metrics import score_files

    metrics = score_files(
        args.dataset_file, args.prediction_file, full=args.full, question_scores_file=args.question_scores_file
    )
    print(json.dumps(metrics))
    return 0
