"""`mixt5 serve` on encoder QA models (BERT, dense and upcycled): span answers, encoder-only routing, health."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from mixt5 import MoEConfig, upcycle
from mixt5.data.extractive import prepare_eval_features
from mixt5.data.squad import load_squad_json
from mixt5.predict import ExtractiveQAPredictor, load_predictor
from mixt5.serve import ServeArguments, create_app
from mixt5.testing import SAMPLE_SQUAD, save_tiny_bert_qa_model

QUESTIONS = load_squad_json(SAMPLE_SQUAD)


def _request(index: int) -> dict:
    return {"question": QUESTIONS[index].question, "context": QUESTIONS[index].context}


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bert")
    dense = save_tiny_bert_qa_model(root / "dense")
    moe = upcycle(
        AutoModelForQuestionAnswering.from_pretrained(dense), MoEConfig(num_experts=4, top_k=2, moe_layers="all")
    )
    moe.save_pretrained(root / "moe")
    AutoTokenizer.from_pretrained(dense).save_pretrained(root / "moe")
    return dense, root / "moe"


def test_moe_encoder_answers_with_encoder_routing(bert_dirs):
    _, moe_dir = bert_dirs
    predictor = load_predictor(str(moe_dir), max_source_length=256, device="cpu")
    assert isinstance(predictor, ExtractiveQAPredictor) and predictor.is_moe
    args = ServeArguments(str(moe_dir), device="cpu", max_sequence_length=256, max_context_chars=3000)
    with TestClient(create_app(args, predictor=predictor)) as client:
        health = client.get("/healthz").json()
        assert health["moe_layers"] == {"encoder": [0, 1], "decoder": []} and health["num_moe_layers"] == 2
        assert (health["num_experts"], health["top_k"]) == (4, 2)
        request = _request(0)
        body = client.post("/v1/answer", json=request).json()
    (expected,) = predictor.answer([request["question"]], [request["context"]], show_routing=True)
    assert body["answer"] == expected["answer"]
    assert request["context"][expected["start"] : expected["end"]] == body["answer"]  # a span of the context
    routing = body["routing"]
    assert routing["decoder"] == []  # an encoder has no decoder layers
    assert [layer["layer"] for layer in routing["encoder"]] == ["encoder.0", "encoder.1"]
    tokens = predictor.tokenizer.convert_ids_to_tokens(
        predictor.tokenizer(request["question"], request["context"])["input_ids"]
    )
    for layer in routing["encoder"]:
        assert layer["tokens"] == tokens  # one window holds the whole input at 256 tokens
        assert all(len(experts) == 2 and len(set(experts)) == 2 for experts in layer["experts"])
    assert routing["encoder"] == expected["routing"]["encoder"]


def test_dense_encoder_has_empty_routing(bert_dirs):
    dense_dir, _ = bert_dirs
    with TestClient(create_app(ServeArguments(str(dense_dir), device="cpu"))) as client:
        health = client.get("/healthz").json()
        assert (health["num_moe_layers"], health["num_experts"], health["model_type"]) == (0, 0, "bert")
        request = _request(1)
        body = client.post("/v1/answer", json=request).json()
        assert body["routing"] == {"encoder": [], "decoder": []}
        assert body["answer"] and body["answer"] in request["context"]


def test_routing_is_that_of_the_window_holding_the_answer(bert_dirs):
    """A context cut into several windows: the routing shown is the first window whose context holds the answer."""
    _, moe_dir = bert_dirs
    predictor = load_predictor(str(moe_dir), max_source_length=48, doc_stride=16, device="cpu")
    features, _ = prepare_eval_features(QUESTIONS, predictor.tokenizer, max_sequence_length=48, doc_stride=16)
    checked = 0
    for index, example in enumerate(QUESTIONS):
        rows = [i for i, window_id in enumerate(features["example_id"]) if window_id == example.id]
        if len(rows) < 2:
            continue
        (result,) = predictor.answer([example.question], [example.context], show_routing=True)
        holding = [
            row
            for row in rows
            if result["start"] >= 0
            and (chars := [o for o in features[row]["offset_mapping"] if o is not None])[0][0] <= result["start"]
            and result["end"] <= chars[-1][1]
        ]
        expected_row = holding[0] if holding else rows[0]
        tokens = predictor.tokenizer.convert_ids_to_tokens(features[expected_row]["input_ids"])
        for layer in result["routing"]["encoder"]:
            assert layer["tokens"] == tokens, (index, rows, expected_row)
        checked += expected_row != rows[0]
        if checked == 3:
            break
    assert checked > 0  # some answers lie past the first window: the first window's routing would be wrong there
