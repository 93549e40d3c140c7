"""Reading run and sweep folders: what `mixt5 train` / `evaluate` / `sweep` wrote, nothing recomputed."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..arguments import RUN_FILE
from ..diagnostics import DIAGNOSTICS_FILE, read_diagnostics
from ..metrics import QUESTION_SCORES_FILE, read_question_scores
from ..utils import read_json

MANIFEST = "sweep.json"
METRICS = ("exact_match", "f1")
PHASES = ("train", "eval")  # the timed phases of a run (`RunRecord.runtime`)


def run_status(path: str | os.PathLike) -> str:
    """`done` (metrics.json and predictions.json), `no predictions` (metrics only), `partial` (a checkpoint-*, no
    metrics yet) or `pending` (nothing)."""
    path = Path(path)
    has_metrics = (path / "metrics.json").is_file()
    if has_metrics and (path / "predictions.json").is_file():
        return "done"
    if has_metrics:
        return "no predictions"
    if path.is_dir() and any(path.glob("checkpoint-*")):
        return "partial"
    return "pending"


def _latest_checkpoint(path: Path) -> Path | None:
    checkpoints = [p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


@dataclass
class RunRecord:
    """What one run folder holds: final metrics (if finished), the Trainer's log history, the routing diagnostics and
    the run's own description (`run.json`: command and arguments)."""

    arm: str
    seed: int | None
    command: str
    path: Path
    argv: list[str] = field(default_factory=list)
    status: str = "pending"
    metrics: dict[str, Any] | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    description: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.arm if self.seed is None else f"{self.arm} seed {self.seed}"

    def phase_metrics(self, phase: str) -> dict[str, Any]:
        """The metrics.json section of `phase` (`train` or `eval`); `mixt5 evaluate` writes its eval metrics flat."""
        metrics = self.metrics or {}
        values = metrics.get("eval", metrics) if phase == "eval" else metrics.get(phase)
        return values if isinstance(values, dict) else {}

    def score(self, metric: str) -> float:
        """`exact_match` or `f1` in percent, as the run's final evaluation reported it."""
        evaluation = self.phase_metrics("eval")
        value = evaluation.get(f"eval_{metric}", evaluation.get(metric))
        if value is None:
            raise ValueError(f"{self.path / 'metrics.json'} has no eval_{metric}")
        return float(value)

    def runtime(self, phase: str) -> float | None:
        """Wall-clock seconds of `phase` (`train` or `eval`) as the Trainer timed it (`<phase>_runtime`); None where
        not recorded, and for the training of a resumed run (the Trainer then times only the part after the
        checkpoint; `mixt5 train` records `train_resumed_from`)."""
        values = self.phase_metrics(phase)
        if phase == "train" and values.get("train_resumed_from") is not None:
            return None
        seconds = values.get(f"{phase}_runtime")
        return None if seconds is None else float(seconds)

    def question_scores(self) -> dict[str, tuple[float, float]]:
        """`{id: (EM 0/1, F1 0..1)}` from the run's `question_scores.json`; for a run folder written before training
        and evaluation wrote that file, a `FileNotFoundError` that says how to make it from predictions.json."""
        path = self.path / QUESTION_SCORES_FILE
        if not path.is_file():
            argv = dict(zip(self.argv[::2], self.argv[1::2], strict=False))
            data = argv.get("--validation_file", "VALIDATION_FILE.json")
            command = shlex.join(["mixt5", "score", data, str(self.path / "predictions.json")])
            raise FileNotFoundError(
                f"{path} is missing (the run predates it); write it with `{command} --question_scores_file {path}`"
            )
        return read_question_scores(path)


def load_run(
    path: str | os.PathLike, arm: str, seed: int | None = None, command: str = "train", argv: Sequence[str] = ()
) -> RunRecord:
    path = Path(path)
    run = RunRecord(arm, seed, command, path, list(argv), run_status(path))
    if (path / "metrics.json").is_file():
        run.metrics = read_json(path / "metrics.json")
    if (path / RUN_FILE).is_file():
        run.description = read_json(path / RUN_FILE)
        run.command = run.description.get("command", command)
    state_file = path / "trainer_state.json"
    if not state_file.is_file() and (checkpoint := _latest_checkpoint(path)) is not None:
        state_file = checkpoint / "trainer_state.json"  # an unfinished run: its curves so far
    if state_file.is_file():
        run.log_history = list(read_json(state_file).get("log_history", []))
    if (path / DIAGNOSTICS_FILE).is_file():
        run.diagnostics = read_diagnostics(path / DIAGNOSTICS_FILE)
    return run


def load_sweep_runs(sweep_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, list[RunRecord]]]:
    """The manifest of a sweep folder and its runs per arm (in the spec's order)."""
    sweep_dir = Path(sweep_dir)
    manifest = read_json(sweep_dir / MANIFEST)
    arms: dict[str, list[RunRecord]] = {arm["name"]: [] for arm in manifest["arms"]}
    for entry in manifest["runs"]:
        arms[entry["arm"]].append(
            load_run(sweep_dir / entry["output_dir"], entry["arm"], entry["seed"], entry["command"], entry["argv"])
        )
    return manifest, arms


def question_score_matrix(runs: Sequence[RunRecord]) -> tuple[list[str], np.ndarray]:
    """(question ids, scores of shape (runs, questions, 2) in percent: EM and F1 per question and run)."""
    ids: list[str] | None = None
    rows = []
    for run in runs:
        scores = run.question_scores()
        if ids is None:
            ids = list(scores)
        elif list(scores) != ids:
            raise ValueError(f"{run.label} was scored on other questions than the other seeds of its arm")
        rows.append([scores[qid] for qid in ids])
    return ids or [], 100.0 * np.asarray(rows, dtype=np.float64)
