"""`mixt5 serve`'s HTTP API on a tiny MixT5 model: answers, routing, health, limits, bad input, concurrency."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from mixt5.cli import main
from mixt5.data.squad import load_squad_json
from mixt5.predict import QAPredictor
from mixt5.serve import ServeArguments, create_app
from tiny import SAMPLE_SQUAD, save_tiny_qa_model

QUESTIONS = load_squad_json(SAMPLE_SQUAD)
GENERATION_MAX_LENGTH = 8  # the tiny model's training_args.json (tests/serve/conftest.py)


def _request(index: int, **overrides) -> dict:
    return {"question": QUESTIONS[index].question, "context": QUESTIONS[index].context, **overrides}


@pytest.fixture(scope="module")
def predictor(tiny_moe_dir) -> QAPredictor:
    return QAPredictor(str(tiny_moe_dir), max_length=GENERATION_MAX_LENGTH, device="cpu")


@pytest.fixture(scope="module")
def client(tiny_moe_dir, predictor):
    args = ServeArguments(str(tiny_moe_dir), device="cpu", max_sequence_length=256, max_context_chars=3000)
    with TestClient(create_app(args, predictor=predictor)) as test_client:
        yield test_client


def _tokens(predictor: QAPredictor, request: dict) -> list[str]:
    prompt = f"question: {request['question']} context: {request['context']}"
    return predictor.tokenizer.convert_ids_to_tokens(predictor.tokenizer(prompt)["input_ids"])


def test_health_reports_model_layers_experts_device_and_trained_generation(client, tiny_moe_dir):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == str(tiny_moe_dir) and health["device"] == "cpu"
    assert health["model_type"] == "mixt5"
    assert health["moe_layers"] == {"encoder": [0, 1], "decoder": [0, 1]} and health["num_moe_layers"] == 4
    assert (health["num_experts"], health["top_k"]) == (4, 2)
    # no generation flags given: the defaults come from the model's training_args.json
    assert health["generation"]["max_length"] == GENERATION_MAX_LENGTH and health["generation"]["num_beams"] == 1
    assert health["generation"]["source"].endswith("training_args.json")
    trained = json.loads((tiny_moe_dir / "training_args.json").read_text())
    assert trained["generation_max_length"] == GENERATION_MAX_LENGTH != 30  # 30: the default without the file
    assert health["limits"]["max_sequence_length"] == 256


def test_answer_and_routing_match_the_predictor(client, predictor):
    request = _request(0)
    body = client.post("/v1/answer", json=request).json()
    (expected,) = predictor.answer([request["question"]], [request["context"]], show_routing=True)
    assert body["answer"] == expected["answer"] and body["answer"]
    routing = body["routing"]
    assert [layer["layer"] for layer in routing["encoder"]] == ["encoder.0", "encoder.1"]
    assert [layer["layer"] for layer in routing["decoder"]] == ["decoder.0", "decoder.1"]
    for layer in routing["encoder"]:
        assert layer["tokens"] == _tokens(predictor, request)
        assert all(len(experts) == 2 and len(set(experts)) == 2 for experts in layer["experts"])
        assert all(0 <= e < 4 for experts in layer["experts"] for e in experts)
        assert all(w[0] >= w[1] and sum(w) == pytest.approx(1, abs=1e-3) for w in layer["weights"])
    answer_tokens = predictor.tokenizer.tokenize(body["answer"])
    for layer in routing["decoder"]:
        assert layer["tokens"][: len(answer_tokens)] == answer_tokens
        assert len(layer["tokens"]) == len(layer["experts"]) <= GENERATION_MAX_LENGTH - 1
    assert [layer["experts"] for layer in routing["encoder"]] == [
        layer["experts"] for layer in expected["routing"]["encoder"]
    ]


def test_generation_overrides_within_limits(client, predictor):
    request = _request(1)
    short = client.post("/v1/answer", json={**request, "max_length": 3}).json()
    (expected,) = predictor.answer([request["question"]], [request["context"]], max_length=3)
    assert short["answer"] == expected["answer"]
    assert all(len(layer["tokens"]) <= 2 for layer in short["routing"]["decoder"])
    beams = client.post("/v1/answer", json={**request, "num_beams": 2})
    assert beams.status_code == 200 and beams.json()["routing"] is None  # routing is shown for greedy decoding only
    assert (
        beams.json()["answer"]
        == predictor.answer([request["question"]], [request["context"]], num_beams=2)[0]["answer"]
    )
    for bad, limit in (
        ({"max_length": 65}, "max_generation_length_limit=64"),
        ({"num_beams": 5}, "max_num_beams_limit"),
    ):
        response = client.post("/v1/answer", json={**request, **bad})
        assert response.status_code == 422 and limit in response.json()["detail"]
    response = client.post("/v1/answer", json={**request, "num_beams": 2, "show_routing": True})
    assert response.status_code == 422 and "greedy" in response.json()["detail"]


def test_batch_answers_in_order(client, predictor):
    requests = [_request(i) for i in (3, 40, 7)] + [_request(3, max_length=3)]
    response = client.post("/v1/answer:batch", json=requests)
    assert response.status_code == 200
    answers = [row["answer"] for row in response.json()]
    expected = [
        a["answer"]
        for a in predictor.answer([r["question"] for r in requests[:3]], [r["context"] for r in requests[:3]])
    ]
    expected += [predictor.answer([requests[3]["question"]], [requests[3]["context"]], max_length=3)[0]["answer"]]
    assert answers == expected
    assert all(row["routing"]["encoder"] for row in response.json())


MALFORMED = {
    "truncated JSON": (b'{"question": "Who?", "context": ', "json_invalid"),
    "unclosed list": (b"[1, 2", "json_invalid"),
    "missing field": (json.dumps({"question": "Who?"}).encode(), "context"),
    "wrong type": (json.dumps({"question": 3, "context": "c"}).encode(), "question"),
    "unknown field": (json.dumps({"question": "q", "context": "c", "colour": "red"}).encode(), "colour"),
    "bad override": (json.dumps({"question": "q", "context": "c", "max_length": 0}).encode(), "max_length"),
    "empty body": (b"", "body"),
    "not UTF-8": (b'{"question": "q", "context": "c"}\xff', "not valid JSON"),
    "lone surrogate": (b'{"question": "\\ud800", "context": "c"}', "not valid Unicode"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
}


def test_wrong_types_are_not_converted(client):
    for field, value in [("max_length", "10"), ("show_routing", "yes"), ("num_beams", 1.0), ("question", 5)]:
        response = client.post("/v1/answer", json=_request(0, **{field: value}))
        assert response.status_code == 422, (field, response.text)
        assert field in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(("body", "where"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_422(client, body, where):
    response = client.post("/v1/answer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert where in json.dumps(response.json()["detail"])


def test_inputs_over_the_limits_get_413_naming_the_limit(client):
    cases = [
        ({"question": "q" * 1001, "context": "c"}, "max_question_chars"),
        ({"question": "q", "context": "c" * 3001}, "max_context_chars"),
        ({"question": "Who?", "context": " ".join(["Denver"] * 300)}, "max_sequence_length"),  # 300 tokens > 256
    ]
    for request, limit in cases:
        response = client.post("/v1/answer", json=request)
        assert response.status_code == 413, response.text
        assert response.json()["limit"] == limit and limit in response.json()["detail"]
    batch = [_request(0)] * 33
    response = client.post("/v1/answer:batch", json=batch)
    assert response.status_code == 413 and response.json()["limit"] == "max_batch_requests"
    response = client.post("/v1/answer:batch", json=[_request(0), cases[1][0]])
    assert response.status_code == 413 and response.json()["detail"].startswith("requests[1]: context")
    assert client.post("/v1/answer:batch", json=[]).status_code == 422
    huge = json.dumps({"question": "q", "context": "x" * (9 * 2**20)})
    response = client.post("/v1/answer", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413  # over max_body_bytes (8 MiB), refused before it is parsed
    assert response.json() == {"detail": f"the body is over {8 * 2**20} bytes; the limit is max_body_bytes={8 * 2**20}",
                               "limit": "max_body_bytes", "value": 8 * 2**20}  # fmt: skip

    def chunks():  # no Content-Length: the size shows only as the body streams in
        yield b'{"question": "q", "context": "'
        for _ in range(9):
            yield b"x" * 2**20
        yield b'"}'

    response = client.post("/v1/answer", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["limit"] == "max_body_bytes", response.text
    # the server is still answering
    assert client.post("/v1/answer", json=_request(2)).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_a_failing_generate_fails_only_its_request(client, predictor, monkeypatch):
    answer = predictor.answer

    def failing(questions, contexts, **kwargs):
        if "boom" in questions:
            raise RuntimeError("out of memory")
        return answer(questions, contexts, **kwargs)

    monkeypatch.setattr(predictor, "answer", failing)
    response = client.post("/v1/answer", json={"question": "boom", "context": "c"})
    assert response.status_code == 500 and "out of memory" in response.json()["detail"]
    assert (
        client.post("/v1/answer", json=_request(5)).json()["answer"]
        == answer([QUESTIONS[5].question], [QUESTIONS[5].context])[0]["answer"]
    )


def test_the_page_and_its_assets_are_served_locally(client):
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/answer", "/v1/answer:batch", "/healthz"}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/static/app.js"' in page.text and 'href="/static/style.css"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200 and "http" not in response.text
    examples = client.get("/v1/examples").json()
    assert len(examples) >= 3 and len({e["context"] for e in examples}) == len(examples)
    assert all(e["answers"] and e["answers"][0] in e["context"] for e in examples)


def test_dense_model_has_empty_routing(tmp_path):
    dense = save_tiny_qa_model(tmp_path / "dense")
    args = ServeArguments(str(dense), device="cpu", generation_max_length=4)
    with TestClient(create_app(args)) as client:
        health = client.get("/healthz").json()
        assert (health["num_moe_layers"], health["num_experts"], health["generation"]["source"]) == (0, 0, "default")
        body = client.post("/v1/answer", json=_request(0)).json()
        assert body["routing"] == {"encoder": [], "decoder": []} and isinstance(body["answer"], str)


def test_concurrent_requests_are_micro_batched_and_all_answered(tiny_moe_dir, predictor, serve_in_thread):
    args = ServeArguments(str(tiny_moe_dir), device="cpu", max_batch_size=8, max_wait_ms=100)
    app = create_app(args, predictor=predictor)
    requests = [_request(i * 7 % len(QUESTIONS), **({"max_length": 4} if i % 3 == 0 else {})) for i in range(24)]
    expected = [
        predictor.answer([r["question"]], [r["context"]], max_length=r.get("max_length"))[0]["answer"] for r in requests
    ]
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda r: http.post("/v1/answer", json=r), requests))
        stats = http.get("/healthz").json()["micro_batching"]
    assert [r.status_code for r in responses] == [200] * len(requests)
    assert [r.json()["answer"] for r in responses] == expected
    assert stats["requests"] == len(requests)
    assert 1 < stats["largest_call"] <= 8 and stats["generate_calls"] < len(requests)


def test_cli_parses_flags_and_runs_uvicorn(tiny_moe_dir, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    flags = ["--model_name_or_path", str(tiny_moe_dir), "--port", "8123", "--max_batch_size", "4", "--device", "cpu",
             "--timeout_request_read", "3", "--limit_concurrency", "20"]  # fmt: skip
    assert main(["serve", *flags]) == 0
    ((app, kwargs),) = calls
    http = kwargs.pop("http")
    assert http.keywords == {"request_read_timeout": 3.0}  # mixt5.serve.limits.BoundedH11Protocol
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "log_level": "info", "timeout_keep_alive": 5.0,
                      "h11_max_incomplete_event_size": 16384, "limit_concurrency": 20}  # fmt: skip
    assert app.state.service.batcher.max_batch_size == 4
    assert main(["serve", "--model_name_or_path", str(tiny_moe_dir), "--max_batch_size", "0"]) == 2
    assert "--max_batch_size must be >= 1" in capsys.readouterr().err
