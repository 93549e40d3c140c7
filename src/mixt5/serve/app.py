"""The FastAPI app: `POST /v1/answer`, `POST /v1/answer:batch`, `GET /healthz`, `GET /v1/examples` and the page at `/`.

Answers come from `mixt5.predict.QAPredictor` through the micro-batcher. Input is checked before it is queued: bad JSON
or fields give 422, a question, context or batch over its limit gives 413 naming the limit, a full queue gives 503.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.squad import load_squad_json
from ..predict import QAPredictor, load_predictor
from .batcher import ClientGoneError, MicroBatcher, QueueFullError
from .schemas import AnswerRequest, AnswerResponse, Example, Health
from .settings import GenerationDefaults, ServeArguments, generation_defaults

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
NUM_EXAMPLES = 4


class LimitExceededError(Exception):
    """An input over a configured limit (HTTP 413); `limit` is the flag's name."""

    def __init__(self, message: str, limit: str, value: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


@dataclass(frozen=True)
class GenerationKey:
    """The settings one `generate()` call shares; requests of a micro-batch are grouped by it."""

    max_length: int
    num_beams: int
    show_routing: bool


@dataclass(frozen=True)
class Question:
    question: str
    context: str


class AnswerService:
    """Checks requests against the limits, queues them, and answers micro-batches with a `QAPredictor`."""

    def __init__(self, args: ServeArguments, predictor: QAPredictor, defaults: GenerationDefaults) -> None:
        self.args = args
        self.predictor = predictor
        self.defaults = defaults
        # Requests are measured on the event loop while the generate thread tokenises: a fast tokenizer must not be
        # used from two threads at once ("Already borrowed"), so the measuring one is a copy.
        self._measuring_tokenizer = copy.deepcopy(predictor.tokenizer)
        self.batcher: MicroBatcher[Question, dict[str, Any]] = MicroBatcher(
            self._run_batch,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_queue_size=args.max_queue_size,
        )

    def check(self, request: AnswerRequest, where: str = "") -> GenerationKey:
        """The request's generation settings; raises `LimitExceededError` (413) or `HTTPException` (422)."""
        args = self.args
        for name, text, limit in (
            ("question", request.question, args.max_question_chars),
            ("context", request.context, args.max_context_chars),
        ):
            if len(text) > limit:
                flag = f"max_{name}_chars"
                raise LimitExceededError(
                    f"{where}{name} has {len(text)} characters; the limit is {flag}={limit}", flag, limit
                )
        num_tokens = self.predictor.count_input_tokens(request.question, request.context, self._measuring_tokenizer)
        if num_tokens > args.max_sequence_length:
            raise LimitExceededError(
                f"{where}question and context are {num_tokens} tokens; the limit is "
                f"max_sequence_length={args.max_sequence_length}",
                "max_sequence_length",
                args.max_sequence_length,
            )
        max_length = request.max_length or self.defaults.max_length
        num_beams = request.num_beams or self.defaults.num_beams
        limit = args.max_generation_length_limit
        if max_length > limit:
            raise HTTPException(
                422,
                f"{where}max_length={max_length} is over max_generation_length_limit={limit}",
            )
        if num_beams > args.max_num_beams_limit:
            raise HTTPException(
                422, f"{where}num_beams={num_beams} is over max_num_beams_limit={args.max_num_beams_limit}"
            )
        show_routing = num_beams == 1 if request.show_routing is None else request.show_routing
        if show_routing and num_beams != 1:
            raise HTTPException(
                422, f"{where}routing is shown for greedy decoding only: num_beams=1 or show_routing=false"
            )
        return GenerationKey(max_length, num_beams, show_routing)

    def _run_batch(self, key: Hashable, questions: list[Question]) -> list[dict[str, Any]]:
        """One `generate()` for a group of a micro-batch (runs in the batcher's thread)."""
        assert isinstance(key, GenerationKey)
        results = self.predictor.answer(
            [q.question for q in questions],
            [q.context for q in questions],
            show_routing=key.show_routing,
            max_length=key.max_length,
            num_beams=key.num_beams,
        )
        empty = {"encoder": [], "decoder": []}
        return [
            {"answer": r["answer"], "routing": r.get("routing", empty) if key.show_routing else None} for r in results
        ]

    async def answer(
        self, requests: list[AnswerRequest], batch: bool, gone: Callable[[], Awaitable[bool]] | None = None
    ) -> list[dict[str, Any]]:
        keyed = [
            (self.check(r, f"requests[{i}]: " if batch else ""), Question(r.question, r.context))
            for i, r in enumerate(requests)
        ]
        try:
            return await self.batcher.submit_many(keyed, gone)
        except (QueueFullError, ClientGoneError):
            raise
        except Exception as err:  # the batcher logged it; the other requests are served
            raise HTTPException(500, f"generation failed: {type(err).__name__}: {err}") from err

    def health(self) -> dict[str, Any]:
        model = self.predictor.model
        layers = {"encoder": [], "decoder": []}
        if self.predictor.is_moe:
            for stack, block, _ in model.sparse_layers():
                layers[stack].append(block)
        args = self.args
        return {
            "status": "ok",
            "model": self.predictor.model_name,
            "model_type": model.config.model_type,
            "device": str(self.predictor.device),
            "num_moe_layers": len(layers["encoder"]) + len(layers["decoder"]),
            "moe_layers": layers,
            "num_experts": model.config.num_experts if self.predictor.is_moe else 0,
            "top_k": model.config.moe_config.top_k if self.predictor.is_moe else 0,
            "generation": asdict(self.defaults),
            "limits": {
                name: getattr(args, name)
                for name in (
                    "max_question_chars",
                    "max_context_chars",
                    "max_sequence_length",
                    "max_batch_requests",
                    "max_body_bytes",
                    "max_generation_length_limit",
                    "max_num_beams_limit",
                )
            },
            "micro_batching": {
                "max_batch_size": args.max_batch_size,
                "max_wait_ms": args.max_wait_ms,
                "max_queue_size": args.max_queue_size,
                "requests": self.batcher.stats.requests,
                "generate_calls": self.batcher.stats.calls,
                "largest_call": self.batcher.stats.largest_call,
                "abandoned": self.batcher.stats.abandoned,
            },
        }


def load_examples(args: ServeArguments, limit: int = NUM_EXAMPLES) -> list[dict[str, Any]]:
    """The first question of each of the first few paragraphs of the bundled SQuAD dev sample."""
    path = resources.files("mixt5") / "resources" / "squad_dev_sample.json"
    examples, seen = [], set()
    for example in load_squad_json(str(path)):
        if example.context in seen or len(example.context) > args.max_context_chars:
            continue
        seen.add(example.context)
        examples.append(
            {
                "title": example.title,
                "context": example.context,
                "question": example.question,
                "answers": example.answers,
            }
        )
        if len(examples) == limit:
            break
    return examples


def _limit_response(message: str, limit: str, value: int) -> JSONResponse:
    return JSONResponse({"detail": message, "limit": limit, "value": value}, status_code=413)


class BodyLimitMiddleware:
    """413 for a body over `max_body_bytes`, announced (Content-Length) or streamed, as the same JSON as every limit.

    Written here rather than FastAPI's `max_body_size` because that one answers in plain text from a middleware outside
    the app's exception handlers. An announced size is refused before the body is read; a streamed one when it passes
    the limit (an `HTTPException` from `receive`, which FastAPI's body parsing passes on to `http_error`).
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def response(self) -> JSONResponse:
        return body_too_large(self.max_body_bytes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self.response()(scope, receive, send)
        received = 0

        async def receive_within_limit() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, receive_within_limit, send)


def body_too_large(limit: int) -> JSONResponse:
    return _limit_response(
        f"the body is over {limit} bytes; the limit is max_body_bytes={limit}", "max_body_bytes", limit
    )


def create_app(args: ServeArguments, predictor: QAPredictor | None = None) -> FastAPI:
    """The app for `args`; pass a ready `predictor` to reuse a loaded model (tests, notebooks)."""
    defaults = generation_defaults(args)
    if predictor is None:
        predictor = load_predictor(  # an encoder QA model: max_sequence_length is also its window
            args.model_name_or_path,
            prompt_format=args.prompt_format,
            max_source_length=args.max_sequence_length,
            max_length=defaults.max_length,
            num_beams=defaults.num_beams,
            device=args.device,
        )
    service = AnswerService(args, predictor, defaults)
    examples = load_examples(args)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.close()

    app = FastAPI(
        title="MixT5",
        summary="Answers to questions about a paragraph, and the experts each token used.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=args.max_body_bytes)  # streamed bodies included

    @app.exception_handler(LimitExceededError)
    async def limit_exceeded(_: Request, err: LimitExceededError) -> JSONResponse:
        return _limit_response(str(err), err.limit, err.value)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> Response:
        # FastAPI's own handler, but ASCII JSON: an echoed input with a lone surrogate cannot be encoded as UTF-8
        content = json.dumps({"detail": jsonable_encoder(err.errors())}, ensure_ascii=True)
        return Response(content, status_code=422, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code == 400:  # FastAPI's "error parsing the body": not UTF-8, hence not JSON (RFC 8259)
            return JSONResponse({"detail": f"the body is not valid JSON: {err.detail}"}, status_code=422)
        if err.status_code == 413:  # a streamed body over the limit (`BodyLimitMiddleware`)
            return body_too_large(args.max_body_bytes)
        return await http_exception_handler(request, err)

    @app.exception_handler(ClientGoneError)
    async def client_gone(_: Request, err: ClientGoneError) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, err: QueueFullError) -> JSONResponse:
        return JSONResponse({"detail": f"busy: {err}"}, status_code=503, headers={"Retry-After": "1"})

    @app.post("/v1/answer", response_model=AnswerResponse)
    async def answer(request: AnswerRequest, http: Request) -> dict[str, Any]:
        (result,) = await service.answer([request], batch=False, gone=http.is_disconnected)
        return result

    @app.post("/v1/answer:batch", response_model=list[AnswerResponse])
    async def answer_batch(
        requests: Annotated[list[AnswerRequest], Body(min_length=1)], http: Request
    ) -> list[dict[str, Any]]:
        if len(requests) > args.max_batch_requests:
            raise LimitExceededError(
                f"the batch has {len(requests)} requests; the limit is max_batch_requests={args.max_batch_requests}",
                "max_batch_requests",
                args.max_batch_requests,
            )
        return await service.answer(requests, batch=True, gone=http.is_disconnected)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/examples", response_model=list[Example])
    async def get_examples() -> list[dict[str, Any]]:
        return examples

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
