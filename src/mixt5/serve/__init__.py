"""`mixt5 serve`: an HTTP API and a web page that answer questions and show which experts each token used.

    mixt5 serve --model_name_or_path runs/squad-moe [--host 127.0.0.1] [--port 8000] [--max_batch_size 16]

`POST /v1/answer`, `POST /v1/answer:batch`, `GET /healthz`, `GET /v1/examples`, and the page at `/` (see docs/serve.md).
"""

from __future__ import annotations

import argparse

from ..commands import add_dataclass_arguments, dataclasses_from_namespace
from .app import create_app
from .batcher import MicroBatcher, QueueFullError
from .settings import ServeArguments

__all__ = ["MicroBatcher", "QueueFullError", "ServeArguments", "add_arguments", "create_app", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ServeArguments)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it with uvicorn until interrupted."""
    import uvicorn

    (args,) = dataclasses_from_namespace(args, ServeArguments)
    if args.torch_threads is not None:  # process-wide, so here and not in create_app
        import torch

        torch.set_num_threads(args.torch_threads)
    from .limits import uvicorn_options

    app = create_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options(args))
    return 0
