"""`mixt5 report` and the sweep aggregation: statistics from per-question scores, missing runs, plots and their JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mixt5 import sweep
from mixt5.cli import main
from mixt5.metrics import QUESTION_SCORES_FILE, gold_answers_from_squad_json, squad_metrics, write_question_scores
from mixt5.report import write_report
from mixt5.stats import paired_bootstrap
from mixt5.utils import write_json_atomic
from tiny import SAMPLE_SQUAD

QUESTIONS = 60
SPEC = f"""\
name: fake
seeds: [1, 2]
baseline: dense
bootstrap_resamples: 2000
common:
  model_name_or_path: some/model
  train_file: {SAMPLE_SQUAD}
  validation_file: {SAMPLE_SQUAD}
  max_eval_samples: {QUESTIONS}
arms:
  - name: base
    command: evaluate
    seeds: [1]
  - name: dense
  - name: moe
    seeds: [1, 2, 3]
    args: {{enable_moe: true}}
"""
ACCURACY = {"base": 0.05, "dense": 0.5, "moe": 0.7}


def _gold():
    return dict(list(gold_answers_from_squad_json(SAMPLE_SQUAD).items())[:QUESTIONS])


def _fake_sweep(tmp_path, unfinished=None, question_scores=True):
    """A sweep folder whose runs answer a seeded random subset of the questions exactly and the rest with 'zzzz'
    (so EM = F1 per question: 100 or 0). `unfinished`: {(arm, seed): "partial" | "no predictions"}. Each finished run
    has the files training writes; without `question_scores`, as run folders made before question_scores.json."""
    unfinished = unfinished or {}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC)
    out = tmp_path / "sweep"
    spec = sweep.load_spec(str(spec_file))
    runs = sweep.plan_sweep(spec, out)
    out.mkdir()
    sweep.write_manifest(spec, SPEC, str(spec_file), runs, out)
    gold = _gold()
    correct = {}
    for run in runs:
        hits = np.random.default_rng(100 * run.seed + len(run.arm)).random(QUESTIONS) < ACCURACY[run.arm]
        predictions = {
            qid: answers[0] if hit else "zzzz" for (qid, answers), hit in zip(gold.items(), hits, strict=True)
        }
        state = unfinished.get((run.arm, run.seed))
        run.output_dir.mkdir(parents=True)
        if state == "partial":
            (run.output_dir / "checkpoint-2").mkdir()
            continue
        metrics = {f"eval_{k}": v for k, v in squad_metrics(gold, predictions).items()}
        write_json_atomic(run.output_dir / "metrics.json", {"eval": metrics} if run.command == "train" else metrics)
        if state != "no predictions":
            write_json_atomic(run.output_dir / "predictions.json", predictions)
            if question_scores:
                write_question_scores(run.output_dir / QUESTION_SCORES_FILE, gold, predictions)
            correct[(run.arm, run.seed)] = 100.0 * hits
    return out, correct


def _csv(path):
    with open(path) as handle:
        return {row["arm"]: row for row in csv.DictReader(handle)}


def test_sweep_statistics_match_a_hand_computation(tmp_path):
    out, correct = _fake_sweep(tmp_path)
    assert main(["report", str(out)]) == 0
    rows = _csv(out / "results.csv")
    for arm, seeds in {"dense": (1, 2), "moe": (1, 2, 3)}.items():
        em = [correct[(arm, seed)].mean() for seed in seeds]
        low, high = scipy_stats.t.interval(0.95, df=len(em) - 1, loc=np.mean(em), scale=scipy_stats.sem(em))
        for metric in ("exact_match", "f1"):  # F1 = EM here: every answer is exact or shares no token
            assert float(rows[arm][f"{metric}_mean"]) == pytest.approx(np.mean(em))
            assert float(rows[arm][f"{metric}_ci_low"]) == pytest.approx(low)
            assert float(rows[arm][f"{metric}_ci_high"]) == pytest.approx(high)
        assert int(rows[arm]["num_seeds"]) == len(seeds)
    assert rows["base"]["exact_match_ci_low"] == "" and int(rows["base"]["num_seeds"]) == 1

    # paired bootstrap on each question's score averaged over the arm's seeds, with the spec's resamples and seed
    baseline = np.mean([correct[("dense", s)] for s in (1, 2)], axis=0)
    moe = np.mean([correct[("moe", s)] for s in (1, 2, 3)], axis=0)
    expected = paired_bootstrap(baseline, moe, num_resamples=2000, seed=0)
    for metric in ("exact_match", "f1"):
        assert float(rows["moe"][f"{metric}_diff"]) == pytest.approx(moe.mean() - baseline.mean())
        assert float(rows["moe"][f"{metric}_diff_ci_low"]) == pytest.approx(expected.low)
        assert float(rows["moe"][f"{metric}_diff_ci_high"]) == pytest.approx(expected.high)
        assert float(rows["moe"][f"{metric}_p_value"]) == pytest.approx(expected.p_value)
    assert rows["dense"]["exact_match_diff"] == "" and int(rows["moe"]["num_questions"]) == QUESTIONS

    results = (out / "results.md").read_text()
    assert "| dense (baseline) | 2/2 |" in results and "| base | 1/1 | " in results and "n=1: no CI" in results
    assert f"{expected.mean_difference:+.2f} [{expected.low:+.2f}, {expected.high:+.2f}]" in results
    assert "All planned runs finished." in results
    scores = json.loads((out / "plots" / "scores.json").read_text())
    assert scores["moe"]["per_seed"]["exact_match"] == {str(s): correct[("moe", s)].mean() for s in (1, 2, 3)}
    report = (out / "report.md").read_text()
    assert "![EM and F1 per arm](plots/scores.png)" in report and (out / "plots" / "scores.png").stat().st_size > 1000


def test_time_per_arm_leaves_out_resumed_runs(tmp_path):
    out, _ = _fake_sweep(tmp_path)
    seconds = {("dense", 1): 100.0, ("dense", 2): 120.0, ("moe", 1): 150.0, ("moe", 2): 170.0, ("moe", 3): 30.0}
    for (arm, seed), train_seconds in seconds.items():
        path = out / "runs" / arm / f"seed-{seed}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["train"] = {"train_runtime": train_seconds, "train_loss": 1.0}
        metrics["eval"]["eval_runtime"] = train_seconds / 10
        if (arm, seed) == ("moe", 3):  # resumed: the Trainer timed only the part after checkpoint-2
            metrics["train"]["train_resumed_from"] = "checkpoint-2"
        write_json_atomic(path, metrics)
    base_metrics = out / "runs" / "base" / "seed-1" / "metrics.json"  # `mixt5 evaluate` writes its metrics flat
    write_json_atomic(base_metrics, {**json.loads(base_metrics.read_text()), "eval_runtime": 9.0})
    assert main(["report", str(out)]) == 0

    rows = _csv(out / "results.csv")
    assert float(rows["base"]["eval_seconds_mean"]) == 9.0
    assert float(rows["dense"]["train_seconds_mean"]) == pytest.approx(110.0)
    assert float(rows["moe"]["train_seconds_mean"]) == pytest.approx(160.0)  # 30 s of the resumed run left out
    assert int(rows["moe"]["train_seconds_timed_runs"]) == 2 and int(rows["moe"]["eval_seconds_timed_runs"]) == 3
    assert float(rows["moe"]["eval_seconds_mean"]) == pytest.approx((15.0 + 17.0 + 3.0) / 3)
    assert rows["base"]["train_seconds_mean"] == "" and int(rows["base"]["train_seconds_timed_runs"]) == 0
    half_width = scipy_stats.t.ppf(0.975, df=1) * scipy_stats.sem([150.0, 170.0])
    for name in ("results.md", "report.md"):
        text = (out / name).read_text()
        assert "## Time per run" in text and "| Arm | Training (s) | Training × dense |" in text
        assert f"| moe | 160 ± {half_width:.0f} | {160 / 110:.2f} | 12 ± " in text and " | 2/3, 3/3 |" in text
        assert "| base | — | — | 9 (n=1: no CI) | 0/1, 1/1 |" in text
        assert "| dense | 110 ± " in text and "| 1.00 |" in text
    per_run = {r["seed"]: r for r in json.loads((out / "results.json").read_text())["arms"][2]["runs"]}
    assert per_run[1]["train_seconds"] == 150.0 and per_run[3]["train_seconds"] is None


def test_missing_runs_are_named_and_the_rest_reported(tmp_path, capsys):
    out, correct = _fake_sweep(tmp_path, {("moe", 2): "no predictions", ("moe", 3): "partial", ("base", 1): "partial"})
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("moe seed 2: no predictions", "moe seed 3: partial", "base seed 1: partial"):
        assert line in printed and line in (out / "results.md").read_text() and line in (out / "report.md").read_text()
    rows = _csv(out / "results.csv")
    assert rows["moe"]["seeds_done"] == "1" and rows["moe"]["exact_match_ci_low"] == ""
    assert float(rows["moe"]["exact_match_mean"]) == pytest.approx(correct[("moe", 1)].mean())
    assert rows["moe"]["exact_match_p_value"] != ""  # the finished seed is still compared with the baseline
    assert rows["base"]["num_seeds"] == "0" and rows["base"]["note"] == "no finished run"


def test_run_report_plots_curves_load_and_similarity(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "metrics.json", {"eval": {"eval_exact_match": 61.5, "eval_f1": 70.25}})
    history = [{"step": s, "loss": 3.0 / s, "moe/aux_loss": 1.01, "moe/z_loss": 0.5 / s} for s in (1, 2, 3, 4)]
    history += [{"step": s, "eval_exact_match": 10.0 * s, "eval_f1": 12.0 * s} for s in (2, 4)]
    write_json_atomic(run / "trainer_state.json", {"log_history": history})

    def routing(phase, step, load, entropy, tokens):
        layer = {"load": load, "entropy": entropy, "tokens": tokens, "dropped_fraction": 0.0, "unrouted_fraction": 0.0}
        return {
            "event": "routing",
            "phase": phase,
            "step": step,
            "layers": {"encoder.1": {**layer, "max_entropy": 0.7}},
        }

    def similarity(step, value):
        return {"event": "similarity", "step": step, "layers": {"encoder.1": {"matrix": [], "mean": value}}}

    records = [
        similarity(0, 1.0),
        routing("train", 2, [0.5, 0.5], 0.6, 100),
        routing("train", 4, [0.9, 0.1], 0.2, 300),
        routing("eval", 4, [0.7, 0.3], 0.4, 50),
        similarity(4, 0.99),
    ]
    (run / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    report, summary = write_report(run)
    assert summary is None
    text = report.read_text()
    assert "| 61.50 | 70.25 |" in text
    for plot in ("curves", "load", "similarity"):
        assert f"](plots/{plot}.png)" in text and (run / "plots" / f"{plot}.png").stat().st_size > 1000
    load = json.loads((run / "plots" / "load.json").read_text())["run"]["encoder.1"]
    assert load["train"]["load"] == pytest.approx([0.25 * 0.5 + 0.75 * 0.9, 0.25 * 0.5 + 0.75 * 0.1])  # token-weighted
    assert load["train"]["entropy"] == pytest.approx(0.25 * 0.6 + 0.75 * 0.2)
    assert load["eval"]["load"] == [0.7, 0.3]
    similarity = json.loads((run / "plots" / "similarity.json").read_text())["run"]["mean_over_layers"]
    assert similarity == {"step": [0, 4], "mean": [1.0, 0.99]}
    curves = json.loads((run / "plots" / "curves.json").read_text())["run"]
    assert curves["eval_f1"]["step"] == [2, 4] and curves["eval_f1"]["mean"] == [24.0, 48.0]
    assert curves["loss"]["mean"] == pytest.approx([3.0, 1.5, 1.0, 0.75])
    assert "1.000000 → 0.990000" in text  # the routing table's similarity column


def test_report_of_a_folder_without_results_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a sweep" in capsys.readouterr().err


def test_report_reads_files_only(tmp_path, monkeypatch):
    """No data set or model is loaded: the paired tests come from each run's question_scores.json."""
    out, correct = _fake_sweep(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("mixt5 report loaded a data set or a model")

    for target in (
        "datasets.load_dataset",
        "mixt5.data.sources.load_split",
        "mixt5.data.squad.load_squad_json",
        "transformers.AutoModelForSeq2SeqLM.from_pretrained",
        "transformers.AutoTokenizer.from_pretrained",
    ):
        monkeypatch.setattr(target, forbidden)
    assert main(["report", str(out)]) == 0
    rows = _csv(out / "results.csv")
    baseline = np.mean([correct[("dense", s)] for s in (1, 2)], axis=0)
    moe = np.mean([correct[("moe", s)] for s in (1, 2, 3)], axis=0)
    assert float(rows["moe"]["f1_diff"]) == pytest.approx(moe.mean() - baseline.mean())


def test_run_folders_without_question_scores_say_how_to_write_them(tmp_path, capsys):
    out, _ = _fake_sweep(tmp_path, question_scores=False)
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _csv(out / "results.csv")
    assert rows["moe"]["exact_match_p_value"] == ""  # no paired test without per-question scores
    note = rows["dense"]["note"]
    run = out / "runs" / "dense" / "seed-1"
    scores_file = run / QUESTION_SCORES_FILE
    command = f"mixt5 score {SAMPLE_SQUAD} {run / 'predictions.json'} --question_scores_file {scores_file}"
    assert f"{run / QUESTION_SCORES_FILE} is missing" in note and command in note and "\n" not in note
    assert note in printed and note in (out / "results.md").read_text()

    # the command it gives, for every run, restores the paired test: the same numbers as a run that wrote the file
    for run_dir in sorted((out / "runs").glob("*/seed-*")):
        argv = ["score", str(SAMPLE_SQUAD), str(run_dir / "predictions.json")]
        assert main([*argv, "--question_scores_file", str(run_dir / QUESTION_SCORES_FILE)]) == 0
    assert main(["report", str(out)]) == 0
    (tmp_path / "fresh").mkdir()
    fresh, _ = _fake_sweep(tmp_path / "fresh")
    assert main(["report", str(fresh)]) == 0
    regenerated, written = _csv(out / "results.csv"), _csv(fresh / "results.csv")
    for arm in ("dense", "moe"):
        for key in ("exact_match_diff", "f1_diff_ci_low", "f1_p_value", "num_questions", "note"):
            assert regenerated[arm][key] == written[arm][key]
    assert regenerated["moe"]["f1_p_value"] != ""
