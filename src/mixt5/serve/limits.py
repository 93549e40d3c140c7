"""Connection limits for `mixt5 serve`: how long a client may take to send a request, and how long an idle one stays.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`), the size of a request's head
(`h11_max_incomplete_event_size`) and the connections and requests in flight (`limit_concurrency`, 503 beyond), but
not the time a client takes to send its request: one that stops half-way through its headers, promises a body it never
sends, or connects and sends nothing holds its connection (and a file descriptor) for as long as it likes.
`BoundedH11Protocol` adds that bound, as nginx's `client_header_timeout` / `client_body_timeout` and gunicorn's
`--timeout` do: a request must arrive whole within `request_read_timeout` seconds of the connection opening or of its
first byte, else the connection is closed. It is uvicorn's own h11 protocol with a timer; h11 rather than httptools so
that the bound holds whichever is installed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeArguments

logger = logging.getLogger(__name__)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's `H11Protocol`, closing connections whose request is not whole within `request_read_timeout` s."""

    def __init__(self, *args: Any, request_read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_read_timeout = request_read_timeout
        self.request_read_task: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()  # a connection that sends nothing is dropped too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the first bytes of a request (or of the connection's first)
            self._arm_read_timer()
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm_read_timer()  # the whole request is in (or the connection is finished)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms the keep-alive timer; the next request re-arms the read timer
        self._disarm_read_timer()

    def _arm_read_timer(self) -> None:
        if self.request_read_task is None:
            self.request_read_task = self.loop.call_later(self.request_read_timeout, self._request_read_timed_out)

    def _disarm_read_timer(self) -> None:
        if self.request_read_task is not None:
            self.request_read_task.cancel()
            self.request_read_task = None

    def _request_read_timed_out(self) -> None:
        self.request_read_task = None
        if self.transport.is_closing():
            return
        logger.info(  # not a warning: a slow-client flood must not flood the log too
            "%s: closed the connection: no whole request within %g s (--timeout_request_read).",
            f"{self.client[0]}:{self.client[1]}" if self.client else "client",
            self.request_read_timeout,
        )
        self.transport.close()  # a request being handled sees `http.disconnect`


def uvicorn_options(args: ServeArguments) -> dict[str, Any]:
    """The `uvicorn.Config` keyword arguments that carry the connection limits of `args`."""
    return {
        "http": functools.partial(BoundedH11Protocol, request_read_timeout=args.timeout_request_read),
        "timeout_keep_alive": args.timeout_keep_alive,
        "h11_max_incomplete_event_size": args.max_header_bytes,
        "limit_concurrency": args.limit_concurrency,
    }
