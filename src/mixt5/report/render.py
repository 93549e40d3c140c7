"""Writing what `aggregate` and `plots` made: `results.md`, `results.csv`, `results.json` for a sweep, and `report.md`
with its plots and their numbers (`plots/*.png`, `plots/*.json`) for a sweep or a run."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ..arguments import RUN_FILE
from ..utils import atomic_write, read_json, write_json_atomic
from .aggregate import SweepSummary, curve_data, routing_data, score_data, similarity_data, summarize_sweep
from .plots import plot_curves, plot_load, plot_scores, plot_similarity
from .runs import MANIFEST, METRICS, PHASES, load_run


def table_markdown(summary: SweepSummary) -> str:
    """The headline table: one row per arm."""
    base = summary.baseline
    header = (
        f"| Arm | Seeds | EM | F1 | ΔEM vs {base} [95% CI] | p (EM) | ΔF1 vs {base} [95% CI] | p (F1) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for arm in summary.arms:
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


def methods_markdown(summary: SweepSummary) -> str:
    questions = f"the {summary.num_questions} validation questions" if summary.num_questions else "the questions"
    return (
        "EM and F1: mean ± half-width of the 95% Student-t interval over the seeds that finished (n − 1 degrees "
        "of freedom; one seed gives no interval). Seeds: finished / planned. Δ: the arm minus the baseline, from "
        f"a paired bootstrap over {questions} (each question's score averaged over an arm's seeds first; "
        f"{summary.num_resamples:,} resamples, seed {summary.bootstrap_seed}; 95% percentile interval); p: two-sided, "
        "2 · (min(#Δ* ≤ 0, #Δ* ≥ 0) + 1) / (resamples + 1). See `mixt5/stats.py`."
    )


def timing_markdown(summary: SweepSummary) -> str:
    """Training and evaluation time per arm, and training time as a multiple of the baseline's; empty when no run
    recorded its times."""
    if not any(arm.runtimes for arm in summary.arms):
        return ""
    base = next((arm.runtimes.get("train") for arm in summary.arms if arm.name == summary.baseline), None)
    lines = [
        f"| Arm | Training (s) | Training × {summary.baseline} | Evaluation (s) | Runs timed: training, evaluation |",
        "|---|---|---|---|---|",
    ]
    for arm in summary.arms:
        train, evaluation = arm.runtimes.get("train"), arm.runtimes.get("eval")
        ratio = f"{train.mean / base.mean:.2f}" if train and base else "—"
        timed = ", ".join(f"{ci.n if ci else 0}/{len(arm.done)}" for ci in (train, evaluation))
        cells = [train.format(0) if train else "—", ratio, evaluation.format(0) if evaluation else "—", timed]
        lines.append(f"| {arm.name} | {' | '.join(cells)} |")
    note = (
        "Wall-clock seconds per run as the Trainer timed them (`train_runtime`, `eval_runtime` in each run's "
        "metrics.json), mean ± 95% CI over the finished runs; a run resumed from a checkpoint is not counted in "
        "training time (only its last part was timed). Other load on the machine shows in these times."
    )
    return "\n".join([*lines, "", note])


def runs_markdown(summary: SweepSummary) -> str:
    lines = ["| Arm | Seed | EM | F1 | Status |", "|---|---|---|---|---|"]
    for arm in summary.arms:
        for run in arm.runs:
            done = run.status == "done"
            em, f1 = (f"{run.score(m):.2f}" for m in METRICS) if done else ("—", "—")
            lines.append(f"| {arm.name} | {run.seed} | {em} | {f1} | {run.status} |")
    return "\n".join(lines)


def missing_markdown(summary: SweepSummary) -> str:
    if not summary.missing:
        return "All planned runs finished."
    lines = [f"{len(summary.missing)} run(s) have no results yet and are left out of the statistics:", ""]
    lines += [f"- {run.label}: {run.status} (`{run.path}`)" for run in summary.missing]
    return "\n".join(lines)


def notes_markdown(summary: SweepSummary) -> str:
    notes = [f"- {arm.name}: {arm.note}" for arm in summary.arms if arm.note]
    return "\n".join(notes)


def results_markdown(summary: SweepSummary, command: str) -> str:
    parts = [f"# Sweep `{summary.name}`", ""]
    if summary.description:
        parts += [summary.description.strip(), ""]
    parts += [f"Produced by `{command}`.", "", table_markdown(summary), "", methods_markdown(summary), ""]
    if notes_markdown(summary):
        parts += [notes_markdown(summary), ""]
    if timing_markdown(summary):
        parts += ["## Time per run", "", timing_markdown(summary), ""]
    described = [f"- `{arm.name}` ({arm.command}): {arm.description}" for arm in summary.arms if arm.description]
    if described:
        parts += ["## Arms", "", *described, ""]
    parts += ["## Runs", "", runs_markdown(summary), "", missing_markdown(summary), ""]
    return "\n".join(parts)


def csv_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    rows = []
    for arm in summary.arms:
        row: dict[str, Any] = {
            "arm": arm.name,
            "command": arm.command,
            "baseline": summary.baseline,
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
        for phase in PHASES:
            ci = arm.runtimes.get(phase)
            row[f"{phase}_seconds_mean"] = ci.mean if ci else ""
            row[f"{phase}_seconds_timed_runs"] = ci.n if ci else 0
        row["num_questions"] = summary.num_questions or ""
        row["note"] = arm.note
        rows.append(row)
    return rows


def results_json(summary: SweepSummary) -> dict[str, Any]:
    return {
        "name": summary.name,
        "baseline": summary.baseline,
        "num_questions": summary.num_questions,
        "bootstrap": {"num_resamples": summary.num_resamples, "seed": summary.bootstrap_seed},
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
                        **{f"{phase}_seconds": run.runtime(phase) for phase in PHASES if run.status == "done"},
                    }
                    for run in arm.runs
                ],
                "scores": {m: ci.to_dict() for m, ci in arm.scores.items()},
                "versus_baseline": {m: test.to_dict() for m, test in arm.versus_baseline.items()},
                "seconds": {phase: ci.to_dict() for phase, ci in arm.runtimes.items()},
                "note": arm.note,
            }
            for arm in summary.arms
        ],
    }


def write_results(sweep_dir: str | os.PathLike) -> SweepSummary:
    """`results.md`, `results.csv` and `results.json` of a sweep folder."""
    sweep_dir = Path(sweep_dir)
    summary = summarize_sweep(sweep_dir)
    command = f"mixt5 sweep {read_json(sweep_dir / MANIFEST).get('source', 'SPEC')} --output_dir {sweep_dir}"
    with atomic_write(sweep_dir / "results.md") as handle:
        handle.write(results_markdown(summary, command))
    rows = csv_rows(summary)
    with atomic_write(sweep_dir / "results.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_json_atomic(sweep_dir / "results.json", results_json(summary))
    return summary


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


def _run_settings(description: dict[str, Any]) -> str:
    """One line from a run's `run.json`: command, model, evaluation data, seed and, for MoE, the expert settings."""
    groups = description.get("arguments", {})
    model, data, training = (groups.get(name, {}) for name in ("model", "data", "training"))
    parts = [f"`mixt5 {description.get('command', '?')}` of `{model.get('model_name_or_path')}`"]
    evaluation = data.get("validation_file") or data.get("dataset_name")
    if evaluation:
        parts.append(f"scored on `{evaluation}`" + (f" (first {n})" if (n := data.get("max_eval_samples")) else ""))
    if "seed" in training:
        parts.append(f"seed {training['seed']}")
    if moe := groups.get("moe"):
        parts.append(f"MoE: {moe.get('num_experts')} experts, top-{moe.get('top_k')}, layers {moe.get('moe_layers')}")
    return "Run: " + ", ".join(parts) + f" (all arguments: `{RUN_FILE}`)."


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
        lines += ["## Results", "", table_markdown(summary), "", methods_markdown(summary), ""]
        if notes_markdown(summary):
            lines += [notes_markdown(summary), ""]
        lines += [runs_markdown(summary), "", missing_markdown(summary), ""]
        if timing_markdown(summary):
            lines += ["## Time per run", "", timing_markdown(summary), ""]
    else:
        (run,) = arms[path.name]
        if run.description is not None:
            lines += [_run_settings(run.description), ""]
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
