"""The offline demo's synthetic QA generator and its shipped pretrained checkpoint."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import pytest

from mixt5.data import demo
from mixt5.data.demo import (
    QUESTION_TEMPLATES,
    is_heldout_word,
    iter_examples,
    make_demo_squad,
    most_frequent_answer,
    pretraining_documents,
    write_demo_splits,
)

CHECKPOINT = Path(demo.__file__).resolve().parents[1] / "resources" / "demo-t5"
_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")


def _template_words() -> set[str]:
    """Capitalised words the templates themselves contain (they may fall in either hash bucket)."""
    texts = [*QUESTION_TEMPLATES, *demo._ORG_KINDS]
    for table in (demo._PERSON_SENTENCES, demo._ORG_SENTENCES):
        texts += [t for templates in table.values() for t in templates]
    return {word.capitalize() for text in texts for word in re.findall(r"[A-Za-z]+", text)}


def _name_words(texts: list[str]) -> set[str]:
    fixed = _template_words()
    return {word for text in texts for word in _CAPITALISED.findall(text) if word not in fixed}


def _texts(squad: dict) -> list[str]:
    examples = list(iter_examples(squad))
    return [e["context"] for e in examples] + [e["question"] for e in examples]


def test_generator_is_deterministic() -> None:
    assert make_demo_squad(20, seed=3) == make_demo_squad(20, seed=3)
    assert make_demo_squad(20, seed=3) != make_demo_squad(20, seed=4)
    assert make_demo_squad(5, seed=3, name_pool="heldout") == make_demo_squad(5, seed=3, name_pool="heldout")
    assert list(pretraining_documents(10, seed=1)) == list(pretraining_documents(10, seed=1))
    assert list(pretraining_documents(10, seed=1)) != list(pretraining_documents(10, seed=2))


@pytest.mark.parametrize("pool", ["train", "heldout"])
def test_squad_layout_and_answer_spans(pool: str) -> None:
    squad = make_demo_squad(50, seed=0, name_pool=pool, questions_per_paragraph=4)
    assert squad["version"] == "1.1"
    ids = set()
    for article in squad["data"]:
        assert article["title"]
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            assert 1 <= len(paragraph["qas"]) <= 4
            for qa in paragraph["qas"]:
                ids.add(qa["id"])
                assert qa["question"].endswith("?")
                for answer in qa["answers"]:
                    start, text = answer["answer_start"], answer["text"]
                    assert text and context[start : start + len(text)] == text
    assert len(ids) == sum(len(p["qas"]) for a in squad["data"] for p in a["paragraphs"])


def test_heldout_names_never_seen_in_training_or_pretraining_text() -> None:
    train = _texts(make_demo_squad(300, seed=0))
    pretraining = [document.text for document in pretraining_documents(300, seed=0)]
    heldout = _texts(make_demo_squad(100, seed=0, name_pool="heldout"))
    train_words, pretraining_words, heldout_words = map(_name_words, (train, pretraining, heldout))
    assert len(heldout_words) > 500
    assert all(is_heldout_word(w) for w in heldout_words)
    assert not any(is_heldout_word(w) for w in train_words | pretraining_words)
    assert heldout_words.isdisjoint(train_words | pretraining_words)
    seen = " ".join(train + pretraining)
    for question in islice((e["question"] for e in iter_examples(make_demo_squad(30, 0, "heldout"))), 100):
        for name in _CAPITALISED.findall(question):
            if name in heldout_words:
                assert not re.search(rf"\b{name}\b", seen)


def test_pretraining_documents_copy_spans_repeat_the_paragraph() -> None:
    for document in pretraining_documents(50, seed=2):
        text, spans = document.text, document.copy_spans
        assert "?" in text and spans  # at least one question-answer line
        for start, end in spans:
            value = text[start:end]
            assert value and value.strip() == value
            assert value in text[:start]  # stated before, so a masked copy can be recovered


def test_write_splits_and_baseline(tmp_path: Path) -> None:
    train_path, validation_path = write_demo_splits(tmp_path, num_train_paragraphs=30, num_validation_paragraphs=10)
    train, validation = (json.loads(p.read_text()) for p in (train_path, validation_path))
    assert train == make_demo_squad(30, seed=0) and validation == make_demo_squad(10, seed=0, name_pool="heldout")
    answer = most_frequent_answer(train)
    answers = [e["answers"][0] for e in iter_examples(train)]
    assert answers.count(answer) == max(answers.count(a) for a in answers)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHECKPOINT, local_files_only=True)


def test_checkpoint_size_and_files() -> None:
    files = {p.name: p.stat().st_size for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files.keys()
    assert sum(files.values()) <= 20 * 2**20


def test_tokenizer_is_t5_compatible(tokenizer) -> None:
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 2)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert sentinels == list(range(len(tokenizer) - 1, len(tokenizer) - 101, -1))
    assert tokenizer("Where was Kalo Veradi born?").input_ids[-1] == tokenizer.eos_token_id
    for example in islice(iter_examples(make_demo_squad(20, seed=0, name_pool="heldout")), 40):
        context_ids = tokenizer(example["context"], add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in context_ids
        assert tokenizer.decode(context_ids) == example["context"]
        answer_ids = tokenizer(example["answers"][0], add_special_tokens=False).input_ids
        # the answer is a token span of the context, so it can be copied token by token
        assert any(context_ids[i : i + len(answer_ids)] == answer_ids for i in range(len(context_ids)))


def test_checkpoint_loads_offline_and_generates(tokenizer) -> None:
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(CHECKPOINT, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.feed_forward_proj == "gated-gelu" and model.config.decoder_start_token_id == 0
    assert next(model.parameters()).dtype == torch.float32
    inputs = tokenizer(["Kalo Veradi was born in <extra_id_0> in 1874."], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and out[0, 0].item() == 0
