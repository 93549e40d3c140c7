"""Micro-batching: concurrent requests share one `generate()` call.

One asyncio worker takes the first waiting request, then gathers more until it has `max_batch_size` of them or
`max_wait_ms` has passed since the first, and runs them in a single worker thread (so the event loop keeps accepting
requests while the model runs). Requests in one micro-batch may ask for different generation settings: they are
grouped by their `key` and each group is one call. A full queue is refused up front (`QueueFullError`), a failed call
fails only the requests of that call, and a request whose client has gone (its `gone()` says so when its micro-batch
is formed) is not generated: it fails with `ClientGoneError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue holds; retry later (HTTP 503)."""


class ClientGoneError(RuntimeError):
    """The request's client disconnected before its micro-batch ran: it was not generated."""


@dataclass
class _Job(Generic[Item, Result]):
    key: Hashable
    item: Item
    future: asyncio.Future[Result]
    gone: Callable[[], Awaitable[bool]] | None = None


@dataclass
class BatcherStats:
    requests: int = 0
    calls: int = 0  # run_batch calls (one per settings group of a micro-batch)
    abandoned: int = 0  # requests skipped because their client had gone
    largest_call: int = 0
    call_sizes: dict[int, int] = field(default_factory=dict)  # size -> how many calls had it

    def record(self, size: int) -> None:
        self.requests += size
        self.calls += 1
        self.largest_call = max(self.largest_call, size)
        self.call_sizes[size] = self.call_sizes.get(size, 0) + 1


class MicroBatcher(Generic[Item, Result]):
    """Runs `run_batch(key, items) -> results` (one result per item, same order) on micro-batches of submissions."""

    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Item]], Sequence[Result]],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue_size: int = 256,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_wait_ms < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue_size >= 1, max_wait_ms >= 0; got {max_batch_size}, "
                f"{max_queue_size}, {max_wait_ms}"
            )
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_size = max_queue_size
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Job[Item, Result]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is not None:
            raise RuntimeError("MicroBatcher already started")
        self._queue = asyncio.Queue(self.max_queue_size)
        # one thread: one generate() at a time, and a torch model is not called from two threads at once
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixt5-generate")
        self._worker = asyncio.create_task(self._work(), name="mixt5-micro-batcher")

    async def close(self) -> None:
        """Stop the worker; requests still waiting fail with `RuntimeError`."""
        if self._worker is None:
            return
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._worker = self._queue = self._executor = None

    async def submit(self, key: Hashable, item: Item, gone: Callable[[], Awaitable[bool]] | None = None) -> Result:
        """Queue one item and wait for its result."""
        (result,) = await self.submit_many([(key, item)], gone)
        return result

    async def submit_many(
        self, keyed_items: Sequence[tuple[Hashable, Item]], gone: Callable[[], Awaitable[bool]] | None = None
    ) -> list[Result]:
        """Queue all items or none (`QueueFullError`), then wait for all their results, in order.

        `gone()` (e.g. Starlette's `Request.is_disconnected`) is asked when the items' micro-batch is formed; if it says
        the client has gone, they are not run and fail with `ClientGoneError`.
        """
        if self._queue is None:
            raise RuntimeError("MicroBatcher is not running; call start() first")
        free = self.max_queue_size - self._queue.qsize()
        if len(keyed_items) > free:
            raise QueueFullError(f"{self._queue.qsize()} requests are waiting (max_queue_size={self.max_queue_size})")
        loop = asyncio.get_running_loop()
        jobs = [_Job(key, item, loop.create_future(), gone) for key, item in keyed_items]
        for job in jobs:  # no await in between: the whole list goes in, or (above) nothing
            self._queue.put_nowait(job)
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        finally:  # a caller that gave up (client gone) cancels its jobs: the worker skips them
            for job in jobs:
                job.future.cancel()

    async def _gather(self) -> list[_Job[Item, Result]]:
        """The first waiting job, plus those that arrive within `max_wait_s`, up to `max_batch_size`."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # not asyncio.wait_for: before Python 3.12 it could drop an item that arrived as the timeout fired.
            # A cancelled Queue.get leaves its item in the queue.
            getter = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({getter}, timeout=remaining)
            if getter in done:
                batch.append(getter.result())
            else:
                getter.cancel()
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            groups: dict[Hashable, list[_Job[Item, Result]]] = {}
            for job in batch:
                if not job.future.done() and job.gone is not None and await job.gone():
                    job.future.set_exception(ClientGoneError("the client disconnected before its request ran"))
                    self.stats.abandoned += 1
                if not job.future.done():  # skip jobs whose caller has gone
                    groups.setdefault(job.key, []).append(job)
            for key, jobs in groups.items():
                self.stats.record(len(jobs))
                try:
                    results = await loop.run_in_executor(self._executor, self.run_batch, key, [j.item for j in jobs])
                    if len(results) != len(jobs):
                        raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} items")
                except Exception as err:  # fail this call's requests, keep serving the others
                    logger.exception("micro-batch of %d failed", len(jobs))
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                for job, result in zip(jobs, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
