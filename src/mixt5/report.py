"""`mixt5 report RUN_OR_SWEEP_DIR`: tables and plots of what a run (or every run of a sweep) did.

Writes into the directory:

- for a sweep (a folder with `sweep.json`, written by `mixt5 sweep`): `results.md`, `results.csv`, `results.json`:
  per arm, EM and F1 as mean ± 95% CI over seeds, and against the baseline arm a paired bootstrap over questions
  (see `mixt5.stats`);
- for both: `report.md` with the tables and the plots `plots/*.png` (EM/F1 with CIs per arm, training curves,
  expert-load heat-map, expert similarity over training), and beside each plot the numbers behind it as
  `plots/*.json`.

Runs that have not finished (no metrics.json or predictions.json) are listed as missing; the rest is reported.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .diagnostics import DIAGNOSTICS_FILE, read_diagnostics
from .stats import MeanCI, PairedBootstrap, mean_ci, paired_bootstrap
from .utils import atomic_write, read_json, write_json_atomic

MANIFEST = "sweep.json"
METRICS = ("exact_match", "f1")
METRIC_LABELS = {"exact_match": "EM", "f1": "F1"}


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
    """What one run folder holds: final metrics (if finished), the Trainer's log history, the routing diagnostics."""

    arm: str
    seed: int | None
    command: str
    path: Path
    argv: list[str] = field(default_factory=list)
    status: str = "pending"
    metrics: dict[str, Any] | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.arm if self.seed is None else f"{self.arm} seed {self.seed}"

    def score(self, metric: str) -> float:
        """`exact_match` or `f1` in percent, as the run's final evaluation reported it."""
        evaluation = self.metrics.get("eval", self.metrics) if self.metrics else {}
        value = evaluation.get(f"eval_{metric}", evaluation.get(metric))
        if value is None:
            raise ValueError(f"{self.path / 'metrics.json'} has no eval_{metric}")
        return float(value)


def load_run(
    path: str | os.PathLike, arm: str, seed: int | None = None, command: str = "train", argv: Sequence[str] = ()
) -> RunRecord:
    path = Path(path)
    run = RunRecord(arm, seed, command, path, list(argv), run_status(path))
    if (path / "metrics.json").is_file():
        run.metrics = read_json(path / "metrics.json")
    state_file = path / "trainer_state.json"
    if not state_file.is_file() and (checkpoint := _latest_checkpoint(path)) is not None:
        state_file = checkpoint / "trainer_state.json"  # an unfinished run: its curves so far
    if state_file.is_file():
        run.log_history = list(read_json(state_file).get("log_history", []))
    if (path / DIAGNOSTICS_FILE).is_file():
        run.diagnostics = read_diagnostics(path / DIAGNOSTICS_FILE)
    return run


# --- per-question scores ---------------------------------------------------------------------------------------------


class GoldAnswers:
    """Gold answers of the validation set a run was scored on, loaded once per distinct data setting."""

    def __init__(self) -> None:
        self._cache: dict[tuple, dict[str, list[str]]] = {}

    def __call__(self, argv: Sequence[str]) -> dict[str, list[str]]:
        from transformers import HfArgumentParser

        from .arguments import DataArguments
        from .data.sources import load_split

        parser = HfArgumentParser(DataArguments, allow_abbrev=False)
        data_args, _ = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
        key = (
            data_args.validation_file,
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.max_eval_samples,
        )
        if key not in self._cache:
            examples = load_split(data_args, "validation")
            if examples is None:
                raise ValueError(f"no validation data in the arguments {list(argv)}")
            self._cache[key] = {example.id: example.answers for example in examples}
        return self._cache[key]


def per_question_matrix(runs: Sequence[RunRecord], gold_answers: GoldAnswers) -> tuple[list[str], np.ndarray]:
    """(question ids, scores of shape (runs, questions, 2) in percent: EM and F1 per question and run)."""
    from .metrics import per_question_scores, read_predictions

    ids: list[str] | None = None
    rows = []
    for run in runs:
        gold = gold_answers(run.argv)
        if ids is None:
            ids = list(gold)
        elif list(gold) != ids:
            raise ValueError(f"{run.label} was scored on other questions than the other seeds of its arm")
        scores = per_question_scores(gold, read_predictions(run.path / "predictions.json"))
        rows.append([scores[qid] for qid in ids])
    return ids or [], 100.0 * np.asarray(rows, dtype=np.float64)


# --- sweep aggregation -----------------------------------------------------------------------------------------------


@dataclass
class ArmResult:
    name: str
    command: str
    description: str
    runs: list[RunRecord]
    scores: dict[str, MeanCI] = field(default_factory=dict)
    versus_baseline: dict[str, PairedBootstrap] = field(default_factory=dict)
    note: str = ""

    @property
    def done(self) -> list[RunRecord]:
        return [run for run in self.runs if run.status == "done"]


@dataclass
class SweepSummary:
    name: str
    description: str
    baseline: str
    arms: list[ArmResult]
    num_resamples: int
    bootstrap_seed: int
    num_questions: int | None = None

    @property
    def missing(self) -> list[RunRecord]:
        return [run for arm in self.arms for run in arm.runs if run.status != "done"]

    def table_markdown(self) -> str:
        """The headline table: one row per arm."""
        base = self.baseline
        header = (
            f"| Arm | Seeds | EM | F1 | ΔEM vs {base} [95% CI] | p (EM) | ΔF1 vs {base} [95% CI] | p (F1) |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        rows = []
        for arm in self.arms:
            name = f"{arm.name} (baseline)" if arm.name == base else arm.name
            seeds = f"{len(arm.done)}/{len(arm.runs)}"
            scores = [arm.scores[m].format() if m in arm.scores else "—" for m in METRICS]
            tests = []
            for metric in METRICS:
                test = arm.versus_baseline.get(metric)
                tests += (
                    [f"{test.mean_difference:+.2f} [{test.low:+.2f}, {test.high:+.2f}]", f"{test.p_value:.3g}"]
                    if test
                    else ["—", "—"]
                )
            rows.append(f"| {name} | {seeds} | {' | '.join(scores)} | {' | '.join(tests)} |")
        return "\n".join([header, *rows])

    def methods_markdown(self) -> str:
        questions = f"the {self.num_questions} validation questions" if self.num_questions else "the questions"
        return (
            "EM and F1: mean ± half-width of the 95% Student-t interval over the seeds that finished (n − 1 degrees "
            "of freedom; one seed gives no interval). Seeds: finished / planned. Δ: the arm minus the baseline, from "
            f"a paired bootstrap over {questions} (each question's score averaged over an arm's seeds first; "
            f"{self.num_resamples:,} resamples, seed {self.bootstrap_seed}; 95% percentile interval); p: two-sided, "
            "2 · (min(#Δ* ≤ 0, #Δ* ≥ 0) + 1) / (resamples + 1). See `mixt5/stats.py`."
        )

    def runs_markdown(self) -> str:
        lines = ["| Arm | Seed | EM | F1 | Status |", "|---|---|---|---|---|"]
        for arm in self.arms:
            for run in arm.runs:
                done = run.status == "done"
                em, f1 = (f"{run.score(m):.2f}" for m in METRICS) if done else ("—", "—")
                lines.append(f"| {arm.name} | {run.seed} | {em} | {f1} | {run.status} |")
        return "\n".join(lines)

    def missing_markdown(self) -> str:
        if not self.missing:
            return "All planned runs finished."
        lines = [f"{len(self.missing)} run(s) have no results yet and are left out of the statistics:", ""]
        lines += [f"- {run.label}: {run.status} (`{run.path}`)" for run in self.missing]
        return "\n".join(lines)

    def notes_markdown(self) -> str:
        notes = [f"- {arm.name}: {arm.note}" for arm in self.arms if arm.note]
        return "\n".join(notes)

    def to_markdown(self, command: str) -> str:
        parts = [f"# Sweep `{self.name}`", ""]
        if self.description:
            parts += [self.description.strip(), ""]
        parts += [f"Produced by `{command}`.", "", self.table_markdown(), "", self.methods_markdown(), ""]
        if self.notes_markdown():
            parts += [self.notes_markdown(), ""]
        described = [f"- `{arm.name}` ({arm.command}): {arm.description}" for arm in self.arms if arm.description]
        if described:
            parts += ["## Arms", "", *described, ""]
        parts += ["## Runs", "", self.runs_markdown(), "", self.missing_markdown(), ""]
        return "\n".join(parts)

    def csv_rows(self) -> list[dict[str, Any]]:
        rows = []
        for arm in self.arms:
            row: dict[str, Any] = {
                "arm": arm.name,
                "command": arm.command,
                "baseline": self.baseline,
                "seeds_planned": " ".join(str(run.seed) for run in arm.runs),
                "seeds_done": " ".join(str(run.seed) for run in arm.done),
                "num_seeds": len(arm.done),
            }
            for metric in METRICS:
                ci = arm.scores.get(metric)
                row[f"{metric}_mean"] = ci.mean if ci else ""
                row[f"{metric}_ci_low"] = ci.low if ci and ci.low is not None else ""
                row[f"{metric}_ci_high"] = ci.high if ci and ci.high is not None else ""
            for metric in METRICS:
                test = arm.versus_baseline.get(metric)
                row[f"{metric}_diff"] = test.mean_difference if test else ""
                row[f"{metric}_diff_ci_low"] = test.low if test else ""
                row[f"{metric}_diff_ci_high"] = test.high if test else ""
                row[f"{metric}_p_value"] = test.p_value if test else ""
            row["num_questions"] = self.num_questions or ""
            row["note"] = arm.note
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "baseline": self.baseline,
            "num_questions": self.num_questions,
            "bootstrap": {"num_resamples": self.num_resamples, "seed": self.bootstrap_seed},
            "arms": [
                {
                    "name": arm.name,
                    "command": arm.command,
                    "runs": [
                        {
                            "seed": run.seed,
                            "status": run.status,
                            "path": str(run.path),
                            **({m: run.score(m) for m in METRICS} if run.status == "done" else {}),
                        }
                        for run in arm.runs
                    ],
                    "scores": {m: ci.to_dict() for m, ci in arm.scores.items()},
                    "versus_baseline": {m: test.to_dict() for m, test in arm.versus_baseline.items()},
                    "note": arm.note,
                }
                for arm in self.arms
            ],
        }


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


def summarize_sweep(sweep_dir: str | os.PathLike) -> SweepSummary:
    """Per-arm mean ± CI over seeds and paired bootstrap tests against the baseline arm, from the finished runs."""
    manifest, runs = load_sweep_runs(sweep_dir)
    bootstrap = manifest.get("bootstrap", {})
    summary = SweepSummary(
        name=manifest["name"],
        description=manifest.get("description", ""),
        baseline=manifest["baseline"],
        arms=[
            ArmResult(arm["name"], arm["command"], arm.get("description", ""), runs[arm["name"]])
            for arm in manifest["arms"]
        ],
        num_resamples=int(bootstrap.get("num_resamples", 10_000)),
        bootstrap_seed=int(bootstrap.get("seed", 0)),
    )
    for arm in summary.arms:
        if arm.done:
            arm.scores = {metric: mean_ci([run.score(metric) for run in arm.done]) for metric in METRICS}

    gold_answers = GoldAnswers()
    per_question: dict[str, tuple[list[str], np.ndarray]] = {}
    for arm in summary.arms:
        if not arm.done:
            arm.note = "no finished run"
            continue
        try:
            ids, matrix = per_question_matrix(arm.done, gold_answers)
            per_question[arm.name] = ids, matrix.mean(axis=0)  # (questions, 2): averaged over seeds
        except (OSError, ValueError) as err:
            arm.note = f"no per-question scores ({err})"
    if summary.baseline not in per_question:
        for arm in summary.arms:
            if arm.name != summary.baseline and not arm.note:
                arm.note = "no paired test: the baseline arm has no per-question scores"
        return summary
    base_ids, base_scores = per_question[summary.baseline]
    summary.num_questions = len(base_ids)
    for arm in summary.arms:
        if arm.name == summary.baseline or arm.name not in per_question:
            continue
        ids, scores = per_question[arm.name]
        if ids != base_ids:
            arm.note = "no paired test: scored on other questions than the baseline"
            continue
        arm.versus_baseline = {
            metric: paired_bootstrap(
                base_scores[:, column],
                scores[:, column],
                num_resamples=summary.num_resamples,
                seed=summary.bootstrap_seed,
            )
            for column, metric in enumerate(METRICS)
        }
    return summary


def write_results(sweep_dir: str | os.PathLike) -> SweepSummary:
    """`results.md`, `results.csv` and `results.json` of a sweep folder."""
    sweep_dir = Path(sweep_dir)
    summary = summarize_sweep(sweep_dir)
    command = f"mixt5 sweep {read_json(sweep_dir / MANIFEST).get('source', 'SPEC')} --output_dir {sweep_dir}"
    with atomic_write(sweep_dir / "results.md") as handle:
        handle.write(summary.to_markdown(command))
    rows = summary.csv_rows()
    with atomic_write(sweep_dir / "results.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_json_atomic(sweep_dir / "results.json", summary.to_dict())
    return summary


# --- the numbers behind the plots ------------------------------------------------------------------------------------


def _series(entries: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    """step → value of `key` over log entries. The first entry per step wins: the final re-evaluation of the best
    checkpoint (`load_best_model_at_end`) shares the last step with the evaluation made during training."""
    series: dict[int, float] = {}
    for entry in entries:
        if entry.get(key) is not None and "step" in entry:
            series.setdefault(int(entry["step"]), float(entry[key]))
    return series


def _mean_over_runs(series: Sequence[dict[int, float]]) -> dict[str, list[float]]:
    """The mean over runs at the steps every run has (seeds of one arm share their logging steps)."""
    series = [s for s in series if s]
    if not series:
        return {"step": [], "mean": []}
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return {"step": steps, "mean": [float(np.mean([s[step] for s in series])) for step in steps]}


CURVES = {
    "loss": "training loss",
    "moe/aux_loss": "router load-balancing loss",
    "moe/z_loss": "router z-loss",
    "eval_exact_match": "eval EM",
    "eval_f1": "eval F1",
    "router_entropy": "router entropy / ln E (train)",
}


def curve_data(arms: dict[str, list[RunRecord]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for arm, runs in arms.items():
        per_key = {}
        for key in CURVES:
            if key == "router_entropy":
                per_run = [_entropy_series(run) for run in runs]
            else:
                per_run = [_series(run.log_history, key) for run in runs]
            per_key[key] = {
                **_mean_over_runs(per_run),
                "per_seed": {str(run.seed): dict(sorted(s.items())) for run, s in zip(runs, per_run, strict=True)},
            }
        data[arm] = per_key
    return data


def _entropy_series(run: RunRecord) -> dict[int, float]:
    """step → router entropy / ln E, averaged over the MoE layers, from the run's training routing records."""
    series = {}
    for record in run.diagnostics:
        if record.get("event") == "routing" and record.get("phase") == "train" and record["layers"]:
            layers = record["layers"].values()
            series[int(record["step"])] = float(np.mean([x["entropy"] / x["max_entropy"] for x in layers]))
    return series


def routing_data(arms: dict[str, list[RunRecord]]) -> dict[str, Any]:
    """Per MoE arm and layer: training-time routing averaged over logs (token-weighted) and seeds; the last
    evaluation's routing averaged over seeds."""
    data: dict[str, Any] = {}
    for arm, runs in arms.items():
        per_layer: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for run in runs:
            for phase in ("train", "eval"):
                records = [r for r in run.diagnostics if r.get("event") == "routing" and r.get("phase") == phase]
                if phase == "eval":
                    records = records[-1:]
                for name, layer in _token_weighted(records).items():
                    per_layer[name][phase].append(layer)
        if not per_layer:
            continue
        data[arm] = {
            name: {phase: _mean_of_dicts(values) for phase, values in phases.items()}
            for name, phases in per_layer.items()
        }
    return data


def _token_weighted(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    layers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        for name, layer in record["layers"].items():
            layers[name].append(layer)
    merged = {}
    for name, entries in layers.items():
        weights = np.array([max(e["tokens"], 0) for e in entries], dtype=np.float64)
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(entries), 1 / len(entries))
        merged[name] = {
            "load": (weights[:, None] * np.array([e["load"] for e in entries])).sum(axis=0).tolist(),
            **{
                key: float((weights * np.array([e[key] for e in entries])).sum())
                for key in ("entropy", "dropped_fraction", "unrouted_fraction")
            },
            "max_entropy": entries[0]["max_entropy"],
            "tokens": int(sum(e["tokens"] for e in entries)),
        }
    return merged


def _mean_of_dicts(values: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = {"seeds": len(values)}
    for key in values[0]:
        if key == "load":
            out[key] = np.mean([v[key] for v in values], axis=0).tolist()
        elif key == "tokens":
            out[key] = int(sum(v[key] for v in values))
        else:
            out[key] = float(np.mean([v[key] for v in values]))
    return out


def similarity_data(arms: dict[str, list[RunRecord]]) -> dict[str, Any]:
    """Per MoE arm: mean off-diagonal expert cosine similarity per layer and averaged over layers, per saved step
    (mean over seeds at the steps all seeds saved)."""
    data: dict[str, Any] = {}
    for arm, runs in arms.items():
        per_layer: dict[str, list[dict[int, float]]] = defaultdict(list)
        overall = []
        for run in runs:
            records = [r for r in run.diagnostics if r.get("event") == "similarity"]
            if not records:
                continue
            layer_names = {name for r in records for name in r["layers"]}
            for name in layer_names:
                per_layer[name].append(
                    {int(r["step"]): r["layers"][name]["mean"] for r in records if name in r["layers"]}
                )
            overall.append({int(r["step"]): float(np.mean([x["mean"] for x in r["layers"].values()])) for r in records})
        if overall:
            data[arm] = {
                "mean_over_layers": _mean_over_runs(overall),
                "layers": {name: _mean_over_runs(series) for name, series in sorted(per_layer.items())},
            }
    return data


def score_data(summary: SweepSummary | None, arms: dict[str, list[RunRecord]]) -> dict[str, Any]:
    data = {}
    for arm, runs in arms.items():
        done = [run for run in runs if run.status == "done"]
        entry: dict[str, Any] = {"per_seed": {m: {str(r.seed): r.score(m) for r in done} for m in METRICS}}
        if summary is not None:
            result = next(a for a in summary.arms if a.name == arm)
            entry["ci"] = {m: ci.to_dict() for m, ci in result.scores.items()}
        elif done:
            entry["ci"] = {m: mean_ci([r.score(m) for r in done]).to_dict() for m in METRICS}
        data[arm] = entry
    return data


# --- plots -----------------------------------------------------------------------------------------------------------


def _save_figure(figure: Any, path: Path) -> None:
    """PNG written beside its final name and renamed over it (`utils.atomic_write` is for text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(staging, format="png", dpi=110, bbox_inches="tight")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _figure(rows: int, columns: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    return figure, axes


def plot_scores(data: dict[str, Any], path: Path, colors: dict[str, str]) -> bool:
    arms = [arm for arm in data if any(data[arm]["per_seed"][m] for m in METRICS)]
    if not arms:
        return False
    figure, axes = _figure(1, 2, width=max(4.2, 1.1 * len(arms) + 1.5))
    for axis, metric in zip(axes, METRICS, strict=True):
        for x, arm in enumerate(arms):
            values = list(data[arm]["per_seed"][metric].values())
            axis.scatter([x] * len(values), values, s=14, color="0.55", zorder=2)
            ci = data[arm].get("ci", {}).get(metric)
            if ci:
                error = None if ci["high"] is None else [[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]]
                axis.errorbar([x], [ci["mean"]], yerr=error, fmt="o", color=colors[arm], capsize=5, zorder=3)
        axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        axis.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
        axis.set_title(f"{METRIC_LABELS[metric]}: mean ± 95% CI, dots = seeds")
        axis.grid(axis="y", alpha=0.3)
    _save_figure(figure, path)
    return True


def plot_curves(data: dict[str, Any], path: Path, colors: dict[str, str]) -> bool:
    if not any(data[arm][key]["step"] for arm in data for key in CURVES):
        return False
    figure, axes = _figure(2, 3)
    for axis, (key, title) in zip(axes, CURVES.items(), strict=True):
        for arm, curves in data.items():
            if curves[key]["step"]:
                marker = "o" if key.startswith("eval") else None
                axis.plot(curves[key]["step"], curves[key]["mean"], label=arm, color=colors[arm], marker=marker)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    _save_figure(figure, path)
    return True


def plot_load(data: dict[str, Any], path: Path) -> bool:
    arms = [arm for arm in data if any("train" in layer for layer in data[arm].values())]
    if not arms:
        return False
    columns = min(len(arms), 3)
    rows = math.ceil(len(arms) / columns)
    figure, axes = _figure(rows, columns, width=4.6, height=3.6)
    for axis, arm in zip(axes, arms, strict=False):
        names = [name for name, layer in data[arm].items() if "train" in layer]
        load = np.array([data[arm][name]["train"]["load"] for name in names])  # (layers, experts)
        image = axis.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load.max()), 1e-9))
        axis.set_yticks(range(len(names)), names)
        axis.set_xticks(range(load.shape[1]), [f"e{k}" for k in range(load.shape[1])])
        axis.set_title(f"{arm}: expert load (train; uniform = {1 / load.shape[1]:.3f})", fontsize=9)
        if load.size <= 160:
            for (row, column), value in np.ndenumerate(load):
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        figure.colorbar(image, ax=axis, shrink=0.8)
    for axis in axes[len(arms) :]:
        axis.set_visible(False)
    _save_figure(figure, path)
    return True


def plot_similarity(data: dict[str, Any], path: Path, colors: dict[str, str]) -> bool:
    if not data:
        return False
    figure, axes = _figure(1, 2)
    for arm, entry in data.items():
        steps, means = entry["mean_over_layers"]["step"], np.array(entry["mean_over_layers"]["mean"])
        axes[0].plot(steps, means, marker="o", label=arm, color=colors[arm])
        distance = 1.0 - means
        positive = distance > 0
        if positive.any():
            axes[1].plot(np.array(steps)[positive], distance[positive], marker="o", label=arm, color=colors[arm])
    axes[0].ticklabel_format(axis="y", useOffset=False)
    axes[0].set_title("expert cosine similarity\n(mean over pairs and layers)")
    axes[1].set_title("1 − similarity, log scale\n(exact copies, = 0, omitted)")
    axes[1].set_yscale("log")
    for axis in axes:
        axis.set_xlabel("step (saved checkpoints)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save_figure(figure, path)
    return True


# --- report.md -------------------------------------------------------------------------------------------------------


def _routing_table(data: dict[str, Any], similarity: dict[str, Any]) -> str:
    lines = [
        "| Arm | Layer | Load min–max (train) | Entropy / ln E (train) | Entropy / ln E (eval) | Dropped (train) "
        "| Unrouted (train) | Similarity first → last save |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, layers in data.items():
        for name, phases in layers.items():
            train, evaluation = phases.get("train"), phases.get("eval")
            load = f"{min(train['load']):.3f}–{max(train['load']):.3f}" if train else "—"
            entropy = f"{train['entropy'] / train['max_entropy']:.3f}" if train else "—"
            eval_entropy = f"{evaluation['entropy'] / evaluation['max_entropy']:.3f}" if evaluation else "—"
            dropped = f"{train['dropped_fraction']:.4f}" if train else "—"
            unrouted = f"{train['unrouted_fraction']:.4f}" if train else "—"
            series = similarity.get(arm, {}).get("layers", {}).get(name, {"mean": []})["mean"]
            sim = f"{series[0]:.6f} → {series[-1]:.6f}" if series else "—"
            lines.append(f"| {arm} | {name} | {load} | {entropy} | {eval_entropy} | {dropped} | {unrouted} | {sim} |")
    return "\n".join(lines)


def write_report(path: str | os.PathLike) -> tuple[Path, SweepSummary | None]:
    """`report.md`, `plots/*.png` and `plots/*.json` for a sweep folder (with `sweep.json`: also the results files,
    see `write_results`) or a single run folder. Returns the report's path and, for a sweep, its summary."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or sweep directory")
    summary: SweepSummary | None = None
    if (path / MANIFEST).is_file():
        summary = write_results(path)
        arms = {arm.name: arm.runs for arm in summary.arms}
        title = f"Sweep `{summary.name}`"
    else:
        if not (path / "metrics.json").is_file() and not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"{path}: neither a sweep ({MANIFEST}) nor a run (no metrics.json, trainer_state.json)"
            )
        arms = {path.name: [load_run(path, path.name)]}
        title = f"Run `{path}`"

    plots = path / "plots"
    numbers = {
        "scores": score_data(summary, arms),
        "curves": curve_data(arms),
        "load": routing_data(arms),
        "similarity": similarity_data(arms),
    }
    colors = {arm: f"C{index % 10}" for index, arm in enumerate(arms)}  # one colour per arm in every plot
    drawn = {
        "scores": plot_scores(numbers["scores"], plots / "scores.png", colors),
        "curves": plot_curves(numbers["curves"], plots / "curves.png", colors),
        "load": plot_load(numbers["load"], plots / "load.png"),
        "similarity": plot_similarity(numbers["similarity"], plots / "similarity.png", colors),
    }
    for name, values in numbers.items():
        write_json_atomic(plots / f"{name}.json", values)

    lines = [f"# Report: {title}", "", f"Produced by `mixt5 report {path}`.", ""]
    if summary is not None:
        lines += ["## Results", "", summary.table_markdown(), "", summary.methods_markdown(), ""]
        if summary.notes_markdown():
            lines += [summary.notes_markdown(), ""]
        lines += [summary.runs_markdown(), "", summary.missing_markdown(), ""]
    else:
        (run,) = arms[path.name]
        if run.metrics is not None:
            lines += ["| EM | F1 |", "|---|---|", f"| {run.score('exact_match'):.2f} | {run.score('f1'):.2f} |", ""]
        else:
            lines += [f"This run has no metrics.json yet ({run.status}): no final scores.", ""]
    sections = {
        "scores": ("EM and F1 per arm", "Mean ± 95% CI over seeds (bars), each seed a dot."),
        "curves": ("Training curves", "Mean over seeds at each logged step."),
        "load": ("Expert load", "Fraction of the kept token→expert assignments per expert, during training."),
        "similarity": ("Expert similarity over training", "Cosine similarity of the experts' weights per save."),
    }
    for name, (heading, caption) in sections.items():
        lines += [f"## {heading}", ""]
        if drawn[name]:
            lines += [f"![{heading}](plots/{name}.png)", "", f"{caption} Numbers: `plots/{name}.json`.", ""]
        else:
            lines += ["Nothing to plot (no finished run, or no MoE run with routing diagnostics).", ""]
        if name == "load" and numbers["load"]:
            lines += [_routing_table(numbers["load"], numbers["similarity"]), ""]
    with atomic_write(path / "report.md") as handle:
        handle.write("\n".join(lines))
    return path / "report.md", summary


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mixt5 report", description="report.md with tables and plots (PNG + JSON) for a run or sweep folder."
    )
    parser.add_argument("path", help="a run folder (mixt5 train --output_dir) or a sweep folder (mixt5 sweep)")
    args = parser.parse_args(list(argv))
    report, summary = write_report(args.path)
    if summary is not None:
        print(summary.table_markdown() + "\n\n" + summary.missing_markdown())
    print(f"wrote {report} and {report.parent / 'plots'}/")
    return 0
