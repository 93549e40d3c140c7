"""SQuAD / JSON Lines loading, prompts and tokenisation (tiny tokenizer built here; the real T5 one when present)."""

from __future__ import annotations

import copy
import gzip
import json
import logging
from importlib import resources
from types import SimpleNamespace

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from mixt5.data.squad import (
    PROMPT_FORMATS,
    SEED_SPECIAL_TOKENS,
    SquadExample,
    SquadFormatError,
    add_prompt_special_tokens,
    examples_from_hf,
    examples_to_dataset,
    format_prompt,
    load_examples,
    load_jsonl,
    load_squad_json,
    tokenize_dataset,
)

CONTEXT = "Denver Broncos beat the Carolina Panthers."


def qa(qid: str, question: str, text: str, answer_start: int) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": answer_start}]}


SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Super_Bowl",
            "paragraphs": [
                {
                    "context": CONTEXT,
                    "qas": [qa("q1", "Who won?", "Denver Broncos", 0), qa("q2", "Who lost?", "Carolina Panthers", 24)],
                },
                {"context": "Nobody.", "qas": [qa("q3", "Who?", "Nobody", 0)]},
            ],
        }
    ],
}


def write_squad(tmp_path, obj, name: str = "dev.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_load_squad_json(tmp_path) -> None:
    examples = load_squad_json(write_squad(tmp_path, SQUAD))
    assert [example.id for example in examples] == ["q1", "q2", "q3"]
    assert examples[1] == SquadExample("q2", "Who lost?", CONTEXT, ["Carolina Panthers"], [24], "Super_Bowl")
    assert examples.version == "1.1" and examples.num_bad_answer_starts == 0 and examples.bad_answer_start_ids == []

    path = tmp_path / "dev.json.gz"
    path.write_bytes(gzip.compress(json.dumps(SQUAD).encode()))
    assert load_examples(path) == examples


def test_shipped_sample_loads() -> None:
    sample = resources.files("mixt5") / "resources" / "squad_dev_sample.json"
    with resources.as_file(sample) as path:
        examples = load_squad_json(path)
    assert len(examples) == 200 and len({example.id for example in examples}) == 200
    assert examples.version == "1.1" and examples.num_bad_answer_starts == 0
    assert examples[0].id == "56be4db0acb8001400a502ec"


def test_official_dev_set_counts(shared_dir) -> None:
    dev = shared_dir / "data" / "squad" / "dev-v1.1.json"
    if not dev.exists():
        pytest.skip(f"{dev} is absent")
    examples = load_examples(dev)
    assert len(examples) == 10_570 and sum(len(example.answers) for example in examples) == 34_726
    assert examples.num_bad_answer_starts == 0 and examples.bad_answer_start_ids == []


def _broken(edit) -> dict:
    squad = copy.deepcopy(SQUAD)
    edit(squad)
    return squad


def _qa(squad: dict, q: int = 1) -> dict:
    return squad["data"][0]["paragraphs"][0]["qas"][q]


MALFORMED = {
    "no data": ({"version": "1.1"}, r"dev\.json: missing 'data'$"),
    "no paragraphs": (_broken(lambda s: s["data"][0].pop("paragraphs")), r"dev\.json: data\[0\]: missing 'paragraphs'"),
    "no context": (
        _broken(lambda s: s["data"][0]["paragraphs"][1].pop("context")),
        r"dev\.json: data\[0\]\.paragraphs\[1\]: missing 'context'",
    ),
    "no qas": (
        _broken(lambda s: s["data"][0]["paragraphs"][1].pop("qas")),
        r"dev\.json: data\[0\]\.paragraphs\[1\]: missing 'qas'",
    ),
    "no id": (_broken(lambda s: _qa(s).pop("id")), r"dev\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: missing 'id'"),
    "no question": (
        _broken(lambda s: _qa(s).pop("question")),
        r"dev\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id 'q2'\): missing 'question'",
    ),
    "no answers": (
        _broken(lambda s: _qa(s).pop("answers")),
        r"dev\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id 'q2'\): missing 'answers'",
    ),
    "empty answers": (
        _broken(lambda s: _qa(s).update(answers=[])),
        r"dev\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id 'q2'\): empty 'answers'",
    ),
    "answer without text": (
        _broken(lambda s: _qa(s).update(answers=[{"answer_start": 24}])),
        r"\(id 'q2'\): missing 'text'",
    ),
    "question not a string": (_broken(lambda s: _qa(s).update(question=None)), r"\(id 'q2'\): 'question' has type"),
    "duplicate id": (_broken(lambda s: _qa(s).update(id="q1")), r"qas\[1\] \(id 'q1'\): duplicate id"),
    "no questions": ({"version": "1.1", "data": []}, r"dev\.json: no questions in the validation data"),
}


@pytest.mark.parametrize(("squad", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_squad_names_file_and_record(tmp_path, squad: dict, message: str) -> None:
    with pytest.raises(SquadFormatError, match=message):
        load_squad_json(write_squad(tmp_path, squad))


def test_invalid_json_names_line_and_column(tmp_path) -> None:
    path = tmp_path / "dev.json"
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(SquadFormatError, match=r"dev\.json: invalid JSON at line 2, column 19"):
        load_squad_json(path)


def test_answers_optional_without_require_answers(tmp_path) -> None:
    squad = _broken(lambda s: (_qa(s, 0).pop("answers"), _qa(s, 1).update(answers=[])))
    examples = load_squad_json(write_squad(tmp_path, squad), split_name="test", require_answers=False)
    assert [(example.answers, example.answer_starts) for example in examples][:2] == [([], []), ([], [])]


def test_bad_answer_start_is_counted_and_warned_or_raised(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    squad = _broken(
        lambda s: (_qa(s, 0)["answers"][0].update(answer_start=1), _qa(s, 1)["answers"][0].update(answer_start=99))
    )
    path = write_squad(tmp_path, squad)
    with caplog.at_level(logging.WARNING, logger="mixt5.data.squad"):
        examples = load_squad_json(path)
    assert examples.num_bad_answer_starts == 2 and examples.bad_answer_start_ids == ["q1", "q2"]
    assert examples[0].answer_starts == [1]  # kept as given
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "dev.json" in warning and "2 answer_start" in warning and "q1, q2" in warning
    with pytest.raises(SquadFormatError, match=r"qas\[0\] \(id 'q1'\): answer_start 1 does not index"):
        load_squad_json(path, strict=True)


def test_load_jsonl_answer_layouts(tmp_path) -> None:
    lines = [
        {"id": "a", "question": "Who won?", "context": CONTEXT, "answers": ["Denver Broncos", "Broncos"]},
        {"id": "b", "question": "Who?", "context": CONTEXT, "answers": [{"text": "Panthers", "answer_start": 33}]},
        {"id": 3, "question": "Who?", "context": CONTEXT, "answers": {"text": ["Carolina"], "answer_start": [24]}},
        {"id": "d", "question": "Who?", "context": CONTEXT, "answers": ["absent"], "title": "T"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n".join(json.dumps(line) for line in lines) + "\n\n")
    examples = load_jsonl(path, split_name="train")
    assert [(e.id, e.answers, e.answer_starts) for e in examples] == [
        ("a", ["Denver Broncos", "Broncos"], [0, 7]),
        ("b", ["Panthers"], [33]),
        ("3", ["Carolina"], [24]),
        ("d", ["absent"], [-1]),  # no offset given and not in the context
    ]
    assert examples[3].title == "T" and examples.num_bad_answer_starts == 0

    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_examples(gz) == examples


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"id": "b", "context": "c", "answers": ["c"]}', r"train\.jsonl: line 3 \(id 'b'\): missing 'question'"),
        ('{"id": "b", "question": "q", "answers": ["c"]}', r"train\.jsonl: line 3 \(id 'b'\): missing 'context'"),
        ('{"question": "q", "context": "c", "answers": ["c"]}', r"train\.jsonl: line 3: missing 'id'"),
        ('{"id": "b", "question": "q", "context": "c"}', r"train\.jsonl: line 3 \(id 'b'\): missing 'answers'"),
        ('{"id": "b", "question": "q", "context": "c", "answers": {"text": ["c"], "answer_start": []}}', "lengths"),
        ('{"id": "b", "question": "q", "context": "c", "answers": ["c"],}', r"train\.jsonl: line 3: invalid JSON"),
        ('["b", "q", "c"]', r"train\.jsonl: line 3: expected a JSON object, got list"),
    ],
)
def test_jsonl_errors_name_line_and_column(tmp_path, second_line: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "question": "q", "context": "c", "answers": ["c"]}\n\n' + second_line + "\n")
    with pytest.raises(SquadFormatError, match=message):
        load_jsonl(path)


def test_empty_jsonl_names_file_and_split(tmp_path) -> None:
    path = tmp_path / "valid.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"valid\.jsonl: no questions in the validation data"):
        load_examples(path)


def test_unknown_suffix(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"dev\.csv: unknown data file type; expected \.json, \.json\.gz"):
        load_examples(tmp_path / "dev.csv")


def test_examples_from_hf_matches_file_loader(tmp_path) -> None:
    file_examples = load_squad_json(write_squad(tmp_path, SQUAD))
    rows = {
        "id": [e.id for e in file_examples],
        "title": [e.title for e in file_examples],
        "context": [e.context for e in file_examples],
        "question": [e.question for e in file_examples],
        "answers": [{"text": e.answers, "answer_start": e.answer_starts} for e in file_examples],
    }
    assert examples_from_hf(datasets.Dataset.from_dict(rows)) == file_examples
    with pytest.raises(ValueError, match=r"dataset\[validation\]: no questions"):
        examples_from_hf(datasets.Dataset.from_dict({key: [] for key in rows}))


def test_examples_to_dataset(tmp_path) -> None:
    dataset = examples_to_dataset(load_squad_json(write_squad(tmp_path, SQUAD)))
    assert dataset.column_names == ["id", "question", "context", "answers", "answer_starts"]
    assert dataset[1] == {
        "id": "q2",
        "question": "Who lost?",
        "context": CONTEXT,
        "answers": ["Carolina Panthers"],
        "answer_starts": [24],
    }


def test_format_prompt() -> None:
    assert format_prompt("Who?", "Ctx.", "t5") == "question: Who? context: Ctx."
    assert format_prompt("Who?", "Ctx.", "seed") == "[squad][question]Who?[context]Ctx."
    for prompt_format in PROMPT_FORMATS:  # tokenize_dataset relies on the context coming last
        assert format_prompt("Who?", "Ctx.", prompt_format) == format_prompt("Who?", "", prompt_format) + "Ctx."
    with pytest.raises(ValueError, match="Unknown prompt format 'bart'; valid formats are: t5, seed"):
        format_prompt("Who?", "Ctx.", "bart")


# --- tokenisation ---------------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(20)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with T5's special tokens (pad 0, eos 1, unk 2) and an eos after every text."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in ["question", "context", ":", "?", "where", "zzz", *WORDS]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def example(qid: str, answer: str, *, context: str = " ".join(WORDS), start: int | None = None) -> SquadExample:
    return SquadExample(qid, "where ?", context, [answer], [context.find(answer) if start is None else start])


# The prompt keeps 9 context words (w0 ... w8) before the cut: the prefix "question : where ? context :" is 6 tokens
# in the t5 format, "[squad] [question] where ? [context]" 5 in the seed format, and eos takes one.
CUT_EXAMPLES = [
    example("inside", "w3"),
    example("last-kept", "w8"),
    example("straddles", "w8 w9"),
    example("beyond", "w15"),
    example("bad-start", "w12", start=0),
    example("not-in-context", "zzz"),
    example("short", "w1", context="w0 w1"),
]


@pytest.mark.parametrize(("prompt_format", "max_source_length"), [("t5", 16), ("seed", 15)])
def test_truncation_stats_count_answers_past_the_cut(
    prompt_format: str, max_source_length: int, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = tiny_tokenizer()
    add_prompt_special_tokens(tokenizer, None, prompt_format)
    with caplog.at_level(logging.WARNING, logger="mixt5.data.squad"):
        features, stats = tokenize_dataset(
            examples_to_dataset(CUT_EXAMPLES),
            tokenizer,
            prompt_format=prompt_format,
            max_source_length=max_source_length,
            max_target_length=2,
        )
    assert stats.num_examples == 7
    assert stats.num_answers_cut == 3 and stats.answer_cut_ids == ["straddles", "beyond", "bad-start"]
    assert stats.num_inputs_truncated == 6  # all but "short"
    assert stats.num_labels_truncated == 1  # "w8 w9" + eos is 3 tokens
    assert "3 of 7 examples" in caplog.text and "straddles, beyond, bad-start" in caplog.text

    assert features.column_names == ["id", "input_ids", "attention_mask", "labels", "length"]
    first = features[1]
    assert first["id"] == "last-kept" and len(first["input_ids"]) == max_source_length == first["length"]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"])[-2:] == ["w8", "</s>"]
    assert tokenizer.convert_ids_to_tokens(first["labels"]) == ["w8", "</s>"]
    assert tokenizer.convert_ids_to_tokens(features[2]["labels"]) == ["w8", "</s>"]  # cut at max_target_length


def test_tokenize_dataset_rejects_bad_input() -> None:
    dataset = examples_to_dataset(CUT_EXAMPLES)
    kwargs = {"prompt_format": "t5", "max_source_length": 16, "max_target_length": 4}
    with pytest.raises(ValueError, match="fast"):
        tokenize_dataset(dataset, SimpleNamespace(is_fast=False), **kwargs)
    with pytest.raises(ValueError, match="lacks column"):
        tokenize_dataset(dataset.remove_columns("answer_starts"), tiny_tokenizer(), **kwargs)
    with pytest.raises(ValueError, match="valid formats are: t5, seed"):
        tokenize_dataset(dataset, tiny_tokenizer(), **{**kwargs, "prompt_format": "bart"})


def test_add_prompt_special_tokens_grows_never_shrinks() -> None:
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    config = dict(d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=size, **config))
    assert add_prompt_special_tokens(tokenizer, model, "t5") == 0 and len(tokenizer) == size
    assert add_prompt_special_tokens(tokenizer, model, "seed") == 3
    assert model.get_input_embeddings().num_embeddings == size + 3
    assert tokenizer.convert_ids_to_tokens(tokenizer("[squad][question]w1")["input_ids"]) == [
        *SEED_SPECIAL_TOKENS[:2],
        "w1",
        "</s>",
    ]
    assert add_prompt_special_tokens(tokenizer, model, "seed") == 0  # already there

    roomy = T5ForConditionalGeneration(T5Config(vocab_size=size + 10, **config))
    assert add_prompt_special_tokens(tiny_tokenizer(), roomy, "seed") == 3
    assert roomy.get_input_embeddings().num_embeddings == size + 10
    with pytest.raises(ValueError, match="valid formats are: t5, seed"):
        add_prompt_special_tokens(tokenizer, model, "bart")


@pytest.fixture(scope="module")
def t5_tokenizer(shared_dir):
    path = shared_dir / "data" / "t5-tokenizer"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{path} is absent")
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
def test_t5_tokenizer_truncation_stats_match_independent_count(t5_tokenizer, prompt_format: str) -> None:
    """On the shipped 200-question sample, recount from an untruncated tokenisation: the cut keeps `max - 1` tokens."""
    tokenizer = copy.deepcopy(t5_tokenizer)
    add_prompt_special_tokens(tokenizer, None, prompt_format)
    with resources.as_file(resources.files("mixt5") / "resources" / "squad_dev_sample.json") as path:
        examples = load_squad_json(path)
    max_source_length = 160
    _, stats = tokenize_dataset(
        examples_to_dataset(examples),
        tokenizer,
        prompt_format=prompt_format,
        max_source_length=max_source_length,
        max_target_length=8,
    )
    expected = []
    for e in examples:
        prompt = format_prompt(e.question, e.context, prompt_format)
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        answer_end = prompt.rindex(e.context) + e.answer_starts[0] + len(e.answers[0].rstrip())
        if len(offsets) > max_source_length - 1 and answer_end > offsets[max_source_length - 2][1]:
            expected.append(e.id)
    assert 0 < stats.num_answers_cut == len(expected) < len(examples)
    assert stats.answer_cut_ids == expected[:5]
