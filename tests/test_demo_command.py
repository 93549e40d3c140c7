"""`mixt5 demo`, the README's main job: its target, its outputs, and its error without the checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mixt5 import demo
from mixt5.cli import main
from mixt5.data import demo as demo_data
from mixt5.metrics import gold_answers_from_squad_json, squad_metrics


def test_missing_checkpoint_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_data, "DEMO_CHECKPOINT", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*make_demo_checkpoint"):
        demo.run(argparse.Namespace(output_dir=str(tmp_path / "out"), seed=0))
    assert not (tmp_path / "out").exists()


def test_table_has_the_studys_rows() -> None:
    scores = {"exact_match": 12.345, "f1": 50.0}
    table = demo.format_table({"baseline": scores, "dense": {**scores, "seconds": 3.0}, "moe": scores})
    lines = table.splitlines()
    assert lines[0] == "| Model | EM | F1 | time (s) |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "Most frequent answer", "Simple FT (dense)", "MoE FT (upcycled)",
    ]  # fmt: skip
    assert "| 12.35 | 50.00 | 3.0 |" in lines[3]


@pytest.mark.slow
def test_demo_meets_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Held-out EM >= 50 for the dense and the upcycled model, on questions about names never seen in training."""
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["dense"]["exact_match"] >= 50 and results["moe"]["exact_match"] >= 50, results
    assert results["num_heldout_questions"] == demo.VALIDATION_PARAGRAPHS * demo.QUESTIONS_PER_PARAGRAPH
    # the numbers in results.json are the official metric over the predictions written beside them
    gold = gold_answers_from_squad_json(out / "data" / "validation.json")
    for name in ("dense", "moe"):
        predictions = json.loads((out / name / "predictions.json").read_text())
        scores = squad_metrics(gold, predictions, include_study_variant=False)
        assert scores["exact_match"] == pytest.approx(results[name]["exact_match"])
        assert f"| {results[name]['exact_match']:.2f} |" in printed
    # the trivial baseline is far below both, and the MoE copy really is sparse
    assert results["baseline"]["exact_match"] < 5
    loads = json.loads((out / "routing_load.json").read_text())
    assert len(loads) == 4 and all(sum(load) == pytest.approx(1.0, abs=1e-3) for load in loads.values())
    assert (out / "routing_load.png").stat().st_size > 1000
