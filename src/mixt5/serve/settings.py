"""`mixt5 serve` flags: the model, the address, generation defaults, input limits and micro-batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..utils import read_json

DEFAULT_MAX_LENGTH = 30  # Seq2SeqTrainer's generation_max_length in `mixt5 train` (and the study)
DEFAULT_NUM_BEAMS = 1  # greedy


@dataclass
class ServeArguments:
    model_name_or_path: str = field(metadata={"help": "Fine-tuned checkpoint folder (MixT5 or dense T5)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if present)."})
    prompt_format: Literal["t5", "seed"] = field(default="t5", metadata={"help": "t5 or seed, as in training."})
    max_sequence_length: int = field(
        default=512, metadata={"help": "Input tokens (question + context prompt) allowed; longer inputs get 413."}
    )
    generation_max_length: int | None = field(
        default=None,
        metadata={"help": "Default max answer length; default: the model's training_args.json, else 30."},
    )
    generation_num_beams: int | None = field(
        default=None, metadata={"help": "Default beams; default: the model's training_args.json, else 1 (greedy)."}
    )
    max_generation_length_limit: int = field(
        default=64, metadata={"help": "Largest max_length a request may ask for (a larger one gets 422)."}
    )
    max_num_beams_limit: int = field(default=4, metadata={"help": "Largest num_beams a request may ask for."})
    max_question_chars: int = field(default=1_000, metadata={"help": "Longer questions get 413."})
    max_context_chars: int = field(default=20_000, metadata={"help": "Longer contexts get 413."})
    max_batch_requests: int = field(default=32, metadata={"help": "Largest list POST /v1/answer:batch accepts."})
    max_body_bytes: int = field(default=8 * 2**20, metadata={"help": "Largest request body (bytes); more gets 413."})
    max_batch_size: int = field(default=16, metadata={"help": "Requests per generate() call (1: no micro-batching)."})
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "How long the first request of a micro-batch waits for company."}
    )
    max_queue_size: int = field(default=256, metadata={"help": "Requests waiting at most; more get 503."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads of torch (torch.set_num_threads); 1 suits small models on busy machines."},
    )
    timeout_request_read: float = field(
        default=10.0,
        metadata={
            "help": "Seconds a client has to send a whole request (headers and body) once it connects or starts one; "
            "a slower one is disconnected."
        },
    )
    timeout_keep_alive: float = field(
        default=5.0, metadata={"help": "Seconds an idle keep-alive connection is kept open (uvicorn's)."}
    )
    max_header_bytes: int = field(
        default=16 * 1024,
        metadata={"help": "Largest request line plus headers (bytes); more gets 400 (uvicorn's h11 limit)."},
    )
    limit_concurrency: int = field(
        default=512,
        metadata={"help": "Open connections plus requests in flight beyond which new requests get 503 (uvicorn's)."},
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn log level."})

    def __post_init__(self) -> None:
        positive = (
            "port",
            "max_sequence_length",
            "max_generation_length_limit",
            "max_num_beams_limit",
            "max_question_chars",
            "max_context_chars",
            "max_batch_requests",
            "max_body_bytes",
            "max_batch_size",
            "max_queue_size",
            "max_header_bytes",
            "limit_concurrency",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("generation_max_length", "generation_num_beams", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.port > 65535:
            raise ValueError(f"--port must be a TCP port (1..65535), got {self.port}.")
        for name in ("timeout_request_read", "timeout_keep_alive"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"--{name} must be a positive number of seconds, got {getattr(self, name)}.")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must be >= 0, got {self.max_wait_ms}.")
        if self.max_queue_size < self.max_batch_requests:
            raise ValueError(
                f"--max_queue_size={self.max_queue_size} must hold one whole batch request "
                f"(--max_batch_requests={self.max_batch_requests})."
            )


@dataclass(frozen=True)
class GenerationDefaults:
    max_length: int
    num_beams: int
    source: str  # where they came from, for /healthz


def generation_defaults(args: ServeArguments) -> GenerationDefaults:
    """The flags if given, else what the model was trained (and evaluated) with, else greedy with 30 tokens.

    `mixt5 train` saves `Seq2SeqTrainingArguments.to_dict()` as `training_args.json` next to the model.
    """
    path = Path(args.model_name_or_path) / "training_args.json"
    trained: dict[str, Any] = read_json(path) if path.is_file() else {}
    max_length = args.generation_max_length or trained.get("generation_max_length") or DEFAULT_MAX_LENGTH
    num_beams = args.generation_num_beams or trained.get("generation_num_beams") or DEFAULT_NUM_BEAMS
    source = (
        "flags" if args.generation_max_length and args.generation_num_beams else str(path) if trained else "default"
    )
    if max_length > args.max_generation_length_limit or num_beams > args.max_num_beams_limit:
        raise ValueError(
            f"default generation (max_length={max_length}, num_beams={num_beams}, from {source}) exceeds "
            f"--max_generation_length_limit={args.max_generation_length_limit} / "
            f"--max_num_beams_limit={args.max_num_beams_limit}"
        )
    return GenerationDefaults(int(max_length), int(num_beams), source)
