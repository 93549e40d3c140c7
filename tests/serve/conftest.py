"""A tiny MixT5 QA checkpoint (every block MoE, 4 experts, top-2) and a live uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixt5.cli import main
from tiny import save_tiny_qa_model

GENERATION_MAX_LENGTH = 8  # written to training_args.json: the server's default must come from there


def save_tiny_moe_qa_model(path: Path, *, training_args: dict | None = None) -> Path:
    """`save_tiny_qa_model`, upcycled by `mixt5 upcycle` (4 experts, top-2, every block), tokenizer included."""
    dense_dir = save_tiny_qa_model(path.parent / f"{path.name}-dense")
    moe_flags = ["--num_experts", "4", "--top_k", "2", "--moe_layers", "all", "--seed", "0"]
    if main(["upcycle", "--model_name_or_path", str(dense_dir), "--output_dir", str(path), *moe_flags]) != 0:
        raise RuntimeError("mixt5 upcycle failed")
    if training_args is not None:
        (path / "training_args.json").write_text(json.dumps(training_args))
    return path


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    return save_tiny_moe_qa_model(
        tmp_path_factory.mktemp("serve") / "moe",
        training_args={"generation_max_length": GENERATION_MAX_LENGTH, "generation_num_beams": 1, "seed": 42},
    )


@pytest.fixture
def serve_in_thread():
    """`live_server`: `with serve_in_thread(app) as url: ...`."""
    return live_server


@contextlib.contextmanager
def live_server(app, timeout_s: float = 60.0, **config) -> Iterator[str]:
    """Serve `app` with uvicorn (`config`: more `uvicorn.Config` options) in a thread on a free 127.0.0.1 port; yields
    the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
