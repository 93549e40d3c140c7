"""Slow and stalled clients are disconnected within `mixt5 serve`'s bounds while other requests keep being answered."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from mixt5.serve import ServeArguments, create_app
from mixt5.serve.limits import uvicorn_options

READ_TIMEOUT = 0.6  # seconds: short, so that the test is quick
KEEP_ALIVE = 0.6
SLACK = 2.0  # a closed connection is seen within the bound plus this (a busy CI machine)
HEAD = b"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """Read (and drop) what the server sends until it closes the connection; the seconds that took."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            if not sock.recv(4096):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return float("inf")


@pytest.fixture
def bounded_server(tiny_moe_dir, serve_in_thread):
    args = ServeArguments(
        str(tiny_moe_dir), device="cpu", max_sequence_length=256, max_context_chars=3000,
        timeout_request_read=READ_TIMEOUT, timeout_keep_alive=KEEP_ALIVE, max_header_bytes=4096,
    )  # fmt: skip
    with serve_in_thread(create_app(args), **uvicorn_options(args)) as url:
        yield url


def test_stalled_clients_are_dropped_while_others_are_answered(bounded_server):
    port = _port(bounded_server)
    stalled = {
        "connects and sends nothing": b"",
        "stops in its headers": HEAD,
        "promises a body it never sends": HEAD + b"Content-Length: 500\r\n\r\n" + b'{"question": "Wh',
    }
    sockets = {}
    for name, data in stalled.items():
        for i in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(data)
            sockets[f"{name} #{i}"] = sock
    # one that trickles its headers a byte at a time, never finishing: the bound counts from its first byte
    trickler = socket.create_connection(("127.0.0.1", port), timeout=5)
    opened = time.monotonic()
    closed_after = None
    with httpx.Client(base_url=bounded_server, timeout=30) as client:
        answered = 0
        for byte in HEAD * 4:  # bounded: 4 heads, sent over far longer than the bound unless cut off
            try:
                trickler.sendall(bytes([byte]))
            except OSError:  # the server closed it
                closed_after = time.monotonic() - opened
                break
            time.sleep(0.02)
            if answered < 3:  # normal requests are answered meanwhile
                response = client.get("/healthz")
                assert response.status_code == 200 and response.json()["status"] == "ok"
                answered += 1
        if closed_after is None:
            closed_after = _seconds_until_closed(trickler, READ_TIMEOUT + SLACK) + time.monotonic() - opened
        response = client.post("/v1/answer", json={"question": "Who won?", "context": "The Broncos won."})
        assert response.status_code == 200 and "answer" in response.json()
    assert closed_after < READ_TIMEOUT + SLACK, closed_after
    for name, sock in sockets.items():
        with sock:
            assert _seconds_until_closed(sock, READ_TIMEOUT + SLACK) < READ_TIMEOUT + SLACK, name
    trickler.close()


def test_idle_keep_alive_is_closed_and_an_endless_head_refused(bounded_server):
    port = _port(bounded_server)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        seconds = _seconds_until_closed(sock, KEEP_ALIVE + SLACK)
        assert seconds < KEEP_ALIVE + SLACK and time.monotonic() - start >= KEEP_ALIVE * 0.5
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(HEAD + b"X-Padding: " + b"a" * 8000)  # a head past max_header_bytes, still unfinished
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize(
    "flag", ["timeout_request_read", "timeout_keep_alive", "max_header_bytes", "limit_concurrency"]
)
def test_connection_limits_must_be_positive(flag):
    with pytest.raises(ValueError, match=flag):
        ServeArguments("model", **{flag: 0})


def test_requests_of_disconnected_clients_are_not_generated(tiny_moe_dir, serve_in_thread):
    import json
    import threading

    args = ServeArguments(str(tiny_moe_dir), device="cpu", max_sequence_length=256, max_wait_ms=0)
    app = create_app(args)
    predictor = app.state.service.predictor
    generated, release, original = [], threading.Event(), predictor.answer

    def answer(questions, contexts, **kwargs):
        generated.extend(questions)
        release.wait(timeout=30)  # the first call holds the worker while the others queue
        return original(questions, contexts, **kwargs)

    predictor.answer = answer
    with serve_in_thread(app, **uvicorn_options(args)) as url, httpx.Client(base_url=url, timeout=30) as client:
        kept = threading.Thread(target=lambda: client.post("/v1/answer", json={"question": "first?", "context": "c"}))
        kept.start()
        deadline = time.monotonic() + 10
        while not generated and time.monotonic() < deadline:
            time.sleep(0.01)
        for number in range(5):  # whole requests whose clients hang up before their turn
            body = json.dumps({"question": f"abandoned {number}?", "context": "c"}).encode()
            head = HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
                sock.sendall(head + body)
        time.sleep(0.3)  # the server sees them go
        release.set()
        kept.join(timeout=30)
        answered = client.post("/v1/answer", json={"question": "last?", "context": "c"})
        assert answered.status_code == 200
        stats = client.get("/healthz").json()["micro_batching"]
    assert generated == ["first?", "last?"] and stats["abandoned"] == 5, (generated, stats)


def test_connections_beyond_limit_concurrency_get_503(tiny_moe_dir, serve_in_thread):
    """`--limit_concurrency 3`: with two idle connections open, a third client's request is refused with 503 (its
    own connection makes three); once they close, it is answered."""
    args = ServeArguments(str(tiny_moe_dir), device="cpu", max_sequence_length=256, limit_concurrency=3)
    with serve_in_thread(create_app(args), **uvicorn_options(args)) as url:
        holders = [socket.create_connection(("127.0.0.1", _port(url)), timeout=5) for _ in range(2)]
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 10
            while (status := client.get("/healthz").status_code) == 200 and time.monotonic() < deadline:
                time.sleep(0.05)  # until the server has accepted both holders
            assert status == 503
            for sock in holders:
                sock.close()
            deadline = time.monotonic() + 10
            while (status := client.get("/healthz").status_code) == 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status == 200
            response = client.post("/v1/answer", json={"question": "Who won?", "context": "The Broncos won."})
            assert response.status_code == 200
