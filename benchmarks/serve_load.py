"""Load test of `mixt5 serve` over loopback, with and without micro-batching.

    python benchmarks/serve_load.py [--model_name_or_path DIR] [--requests 200] [--concurrency 16] [--rounds 3]

Starts one server per setting (`--max_batch_size 1`, i.e. no micro-batching, and `--max_batch_size 16`) as
`python -m mixt5 serve` subprocesses on 127.0.0.1, then, round after round and alternating between them, sends
`--requests` POST /v1/answer requests from `--concurrency` concurrent clients (a bounded run: it stops by itself).
Every answer is checked against the answer `QAPredictor` gives for that question alone; a non-200 response, a
failed connection or a different answer counts as an error. Prints a table (medians over rounds of p50/p95
latency and throughput, and the medians of their per-round ratios) and writes JSON. Without `--model_name_or_path`
it builds the tests' tiny random MixT5 model (`mixt5.testing`; 4 experts, top-2, every block) in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForSeq2SeqLM

from mixt5 import MoEConfig, upcycle
from mixt5.data.squad import load_squad_json
from mixt5.modeling.tying import load_pretrained
from mixt5.predict import QAPredictor
from mixt5.testing import SAMPLE_SQUAD, save_tiny_qa_model
from mixt5.utils import copy_tokenizer, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", help="checkpoint to serve (default: a tiny random MixT5 model)")
    parser.add_argument("--requests", type=int, default=200, help="requests per round and setting")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--distinct_questions", type=int, default=40, help="SQuAD questions the requests cycle over")
    parser.add_argument("--batch_sizes", default="1,16", help="--max_batch_size of each server (1: no batching)")
    parser.add_argument("--max_wait_ms", type=float, default=5.0, help="--max_wait_ms of the servers")
    parser.add_argument("--torch_threads", type=int, default=1, help="--torch_threads of the servers (0: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table gives medians")
    parser.add_argument("--output_file", default=str(ROOT / "runs" / "serve_load.json"))
    parser.add_argument("--startup_timeout_s", type=float, default=300.0)
    args = parser.parse_args()
    for name in ("requests", "concurrency", "distinct_questions", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def tiny_moe_model(folder: Path) -> Path:
    """The tests' tiny random QA model, upcycled as `mixt5 upcycle --num_experts 4 --top_k 2 --moe_layers all
    --seed 0` does it, saved with its tokenizer."""
    dense = save_tiny_qa_model(folder / "dense")
    model = upcycle(
        load_pretrained(AutoModelForSeq2SeqLM, dense),
        MoEConfig(num_experts=4, top_k=2, moe_layers="all", seed=0),
        base_model=str(dense),
    )
    model.save_pretrained(folder / "moe")
    copy_tokenizer(str(dense), folder / "moe")
    return folder / "moe"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m mixt5 serve` in a subprocess on 127.0.0.1."""

    def __init__(self, model: str, max_batch_size: int, max_wait_ms: float, threads: int, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_batch_size = max_batch_size
        command = [sys.executable, "-m", "mixt5", "serve", "--model_name_or_path", model, "--port", str(self.port),
                   "--max_batch_size", str(max_batch_size), "--max_wait_ms", str(max_wait_ms), "--device", "cpu",
                   "--log_level", "warning"] + (["--torch_threads", str(threads)] if threads else [])  # fmt: skip
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                return httpx.get(self.url + "/healthz", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        raise TimeoutError(f"the server did not answer /healthz within {timeout_s} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def load(url: str, requests: list[dict], expected: list[str], concurrency: int) -> dict:
    """Send every request once from `concurrency` clients; latencies of the correct answers, and the errors."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = iter(range(len(requests)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:  # shared iterator: each request is sent exactly once
            started = time.perf_counter()
            try:
                response = await http.post("/v1/answer", json=requests[i])
            except httpx.HTTPError as err:
                errors.append(f"request {i}: {type(err).__name__}: {err}")
                continue
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                errors.append(f"request {i}: HTTP {response.status_code}: {response.text[:200]}")
            elif response.json()["answer"] != expected[i]:
                errors.append(f"request {i}: answer {response.json()['answer']!r} != {expected[i]!r}")
            else:
                latencies.append(elapsed)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    quantile = lambda q: latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] if latencies else None  # noqa: E731
    return {
        "answered": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:5],
        "p50_ms": 1000 * quantile(0.5) if latencies else None,
        "p95_ms": 1000 * quantile(0.95) if latencies else None,
        "throughput_rps": len(requests) / wall,
        "wall_s": wall,
    }


def main() -> int:
    args = parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # `mixt5 upcycle` turns on INFO logging: one line a request
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="mixt5-serve-load-") as tmp:
        model = args.model_name_or_path or str(tiny_moe_model(Path(tmp)))
        questions = load_squad_json(SAMPLE_SQUAD)[: args.distinct_questions]
        requests = [
            {"question": q.question, "context": q.context}
            for q in (questions[i % len(questions)] for i in range(args.requests))
        ]
        servers = [
            Server(model, size, args.max_wait_ms, args.torch_threads, Path(tmp) / f"server-{size}.log")
            for size in batch_sizes
        ]
        try:
            health = [server.wait_ready(args.startup_timeout_s) for server in servers]
            # the reference: each question answered alone, with the server's generation settings
            generation = health[0]["generation"]
            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)
            predictor = QAPredictor(model, device="cpu", max_length=generation["max_length"])
            alone = {q.id: predictor.answer([q.question], [q.context])[0]["answer"] for q in questions}
            expected = [alone[questions[i % len(questions)].id] for i in range(args.requests)]
            del predictor
            rounds: dict[int, list[dict]] = {size: [] for size in batch_sizes}
            for round_index in range(args.rounds):
                order = servers if round_index % 2 == 0 else servers[::-1]  # interleaved, alternating order
                for server in order:
                    result = asyncio.run(load(server.url, requests, expected, args.concurrency))
                    stats = httpx.get(server.url + "/healthz", timeout=30).json()["micro_batching"]
                    result["generate_calls_total"] = stats["generate_calls"]
                    result["requests_total"] = stats["requests"]
                    result["largest_call"] = stats["largest_call"]
                    rounds[server.max_batch_size].append(result)
                    print(f"round {round_index + 1}, max_batch_size {server.max_batch_size}: "
                          f"{result['throughput_rps']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, "
                          f"{result['errors']} errors", flush=True)  # fmt: skip
        finally:
            for server in servers:
                server.stop()

    def median(size: int, key: str) -> float:
        values = [r[key] for r in rounds[size] if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    summary = {
        size: {
            "p50_ms": median(size, "p50_ms"),
            "p95_ms": median(size, "p95_ms"),
            "throughput_rps": median(size, "throughput_rps"),
            "errors_total": sum(r["errors"] for r in rounds[size]),
            "answered_total": sum(r["answered"] for r in rounds[size]),
            "mean_call_size": rounds[size][-1]["requests_total"] / max(1, rounds[size][-1]["generate_calls_total"]),
        }
        for size in batch_sizes
    }
    base = batch_sizes[0]
    for size in batch_sizes:  # ratios within each round (the two servers measured back to back), then their median
        for key in ("throughput_rps", "p50_ms"):
            ratios = [r[key] / b[key] for r, b in zip(rounds[size], rounds[base], strict=True) if r[key] and b[key]]
            summary[size][f"{key}_vs_{base}"] = statistics.median(ratios) if ratios else float("nan")
    label = args.model_name_or_path or "tiny random MixT5 (mixt5.testing, 4 experts, top-2, every block)"
    print(f"\n{args.requests} requests x {args.rounds} rounds, {args.concurrency} concurrent clients, model: {label}")
    print(f"greedy, max_length {generation['max_length']}, routing returned; servers: --torch_threads "
          f"{args.torch_threads or 'default'}, --max_wait_ms {args.max_wait_ms}")  # fmt: skip
    header = f"{'max_batch_size':>14} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'errors':>7} {'answered':>9} " \
             f"{'mean call':>9} {'req/s vs ' + str(base):>11} {'p50 vs ' + str(base):>10}"  # fmt: skip
    print(header)
    for size in batch_sizes:
        row = summary[size]
        print(f"{size:>14} {row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f} {row['throughput_rps']:>7.1f} "
              f"{row['errors_total']:>7} {row['answered_total']:>9} {row['mean_call_size']:>9.1f} "
              f"{row[f'throughput_rps_vs_{base}']:>11.2f} {row[f'p50_ms_vs_{base}']:>10.2f}")  # fmt: skip
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": label,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "max_wait_ms": args.max_wait_ms,
        "generation": generation,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "server_torch_threads": args.torch_threads or torch.get_num_threads(),
        "summary": {str(size): row for size, row in summary.items()},
        "rounds_detail": {str(size): rows for size, rows in rounds.items()},
    }
    write_json_atomic(args.output_file, result)
    print(f"wrote {args.output_file}")
    failed = sum(row["errors_total"] for row in summary.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
