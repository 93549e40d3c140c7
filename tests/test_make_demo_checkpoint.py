"""`scripts/make_demo_checkpoint.py`: its denoising objective, and that the shipped tokenizer is what it makes."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest

from mixt5.data.demo import DEMO_CHECKPOINT, pretraining_documents

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_checkpoint.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_demo_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corrupt_replaces_spans_by_sentinels_and_targets_them(script) -> None:
    ids = list(range(10, 20))
    inputs, labels = script.corrupt(ids, [(2, 4), (7, 8)], sentinel_ids=[99, 98], eos_id=1)
    assert inputs == [10, 11, 99, 14, 15, 16, 98, 18, 19, 1]
    assert labels == [99, 12, 13, 98, 17, 1]
    # overlapping or empty spans are skipped, not merged
    inputs, labels = script.corrupt(ids, [(2, 4), (3, 5), (6, 6)], sentinel_ids=[99, 98, 97], eos_id=1)
    assert inputs == [10, 11, 99, *range(14, 20), 1] and labels == [99, 12, 13, 1]


@pytest.mark.parametrize("n", [1, 7, 40, 127])
def test_random_spans_are_disjoint_and_cover_the_density(script, n: int) -> None:
    spans = script._random_spans(n, random.Random(n), density=0.15, mean_span=3.0)
    assert all(0 <= start < end <= n for start, end in spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert sum(end - start for start, end in spans) == max(1, round(n * 0.15))


def test_shipped_tokenizer_is_what_the_script_makes(script) -> None:
    documents = [d.text for d in pretraining_documents(20000, seed=1)]  # the script's defaults: seed 0 + 1
    made = script.train_tokenizer(script.tokenizer_corpus(documents), 2100)
    shipped = json.loads((DEMO_CHECKPOINT / "tokenizer.json").read_text())
    assert made.get_vocab() == {piece: i for i, (piece, _) in enumerate(shipped["model"]["vocab"])}
