"""From runs to numbers: per-arm means with CIs, paired tests against the baseline, and the series behind each plot."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..stats import MeanCI, PairedBootstrap, mean_ci, paired_bootstrap
from .runs import METRICS, PHASES, RunRecord, load_sweep_runs, question_score_matrix


@dataclass
class ArmResult:
    name: str
    command: str
    description: str
    runs: list[RunRecord]
    scores: dict[str, MeanCI] = field(default_factory=dict)
    versus_baseline: dict[str, PairedBootstrap] = field(default_factory=dict)
    runtimes: dict[str, MeanCI] = field(default_factory=dict)  # "train" / "eval" → seconds over the timed runs
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
        for phase in PHASES:
            seconds = [value for run in arm.done if (value := run.runtime(phase)) is not None]
            if seconds:
                arm.runtimes[phase] = mean_ci(seconds)

    per_question: dict[str, tuple[list[str], np.ndarray]] = {}
    for arm in summary.arms:
        if not arm.done:
            arm.note = "no finished run"
            continue
        try:
            ids, matrix = question_score_matrix(arm.done)
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
