"""The micro-batcher without a model: batch sizes, the wait, grouping by settings, a full queue, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mixt5.serve import MicroBatcher, QueueFullError


class Recorder:
    """A `run_batch` that doubles numbers, records each call, and can be made slow or failing."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.calls: list[tuple[object, list[int]]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.threads: set[str] = set()

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on in items:
            raise RuntimeError(f"cannot handle {self.fail_on}")
        return [2 * item for item in items]


def _run(coroutine):
    return asyncio.run(coroutine)


async def _with_batcher(run_batch, body, **kwargs):
    batcher = MicroBatcher(run_batch, **kwargs)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_concurrent_submissions_share_calls_up_to_the_batch_size():
    recorder = Recorder()

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit("greedy", i) for i in range(10)))

    results = _run(_with_batcher(recorder, body, max_batch_size=4, max_wait_ms=50))
    assert results == [2 * i for i in range(10)]
    sizes = [len(items) for _, items in recorder.calls]
    assert sizes == [4, 4, 2] and sorted(i for _, items in recorder.calls for i in items) == list(range(10))
    assert recorder.threads == {"mixt5-generate_0"}  # one worker thread, off the event loop


def test_batch_size_one_means_no_batching():
    recorder = Recorder()

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit("greedy", i) for i in range(5)))

    assert _run(_with_batcher(recorder, body, max_batch_size=1, max_wait_ms=50)) == [0, 2, 4, 6, 8]
    assert [items for _, items in recorder.calls] == [[0], [1], [2], [3], [4]]


def test_the_first_request_waits_at_most_max_wait_for_company():
    recorder = Recorder()

    async def body(batcher):
        first = asyncio.create_task(batcher.submit("greedy", 1))
        await asyncio.sleep(0.02)  # within the 500 ms wait: joins the first
        second = asyncio.create_task(batcher.submit("greedy", 2))
        await asyncio.gather(first, second)
        started = time.monotonic()
        await batcher.submit("greedy", 3)  # alone: waits the whole max_wait, then runs
        return time.monotonic() - started

    alone_s = _run(_with_batcher(recorder, body, max_batch_size=8, max_wait_ms=500))
    assert [items for _, items in recorder.calls] == [[1, 2], [3]]
    assert 0.45 < alone_s < 5


def test_requests_with_different_settings_are_grouped():
    recorder = Recorder()

    async def body(batcher):
        keys = ["greedy", ("beams", 2), "greedy", ("beams", 2), "short"]
        return await batcher.submit_many(list(zip(keys, range(5), strict=True)))

    assert _run(_with_batcher(recorder, body, max_batch_size=8, max_wait_ms=10)) == [0, 2, 4, 6, 8]
    assert recorder.calls == [("greedy", [0, 2]), (("beams", 2), [1, 3]), ("short", [4])]


def test_a_full_queue_is_refused_whole_and_nothing_is_dropped():
    recorder = Recorder(delay_s=0.5)

    async def body(batcher):
        running = asyncio.create_task(batcher.submit("greedy", 0))
        await asyncio.sleep(0.05)  # the worker is busy with item 0; the queue (3 places) is empty
        queued = asyncio.create_task(batcher.submit_many([("greedy", i) for i in (1, 2)]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="max_queue_size=3"):
            await batcher.submit_many([("greedy", i) for i in (3, 4)])  # 2 + 2 > 3: none of it goes in
        return await running, await queued, await batcher.submit("greedy", 5)

    assert _run(_with_batcher(recorder, body, max_batch_size=8, max_wait_ms=0, max_queue_size=3)) == (0, [2, 4], 10)
    assert sorted(i for _, items in recorder.calls for i in items) == [0, 1, 2, 5]


def test_a_failing_call_fails_only_its_requests():
    recorder = Recorder(fail_on=13)

    async def body(batcher):
        bad = batcher.submit_many([("greedy", 13), ("greedy", 1)])
        good = batcher.submit("other", 7)
        results = await asyncio.gather(bad, good, return_exceptions=True)
        return results, await batcher.submit("greedy", 2)

    (bad, good), after = _run(_with_batcher(recorder, body, max_batch_size=8, max_wait_ms=20))
    assert isinstance(bad, RuntimeError) and "13" in str(bad)
    assert (good, after) == (14, 4)


def test_a_caller_that_gives_up_is_skipped():
    recorder = Recorder(delay_s=0.5)

    async def body(batcher):
        first = asyncio.create_task(batcher.submit("greedy", 1))
        await asyncio.sleep(0.03)
        gone = asyncio.create_task(batcher.submit("greedy", 2))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected while the worker was busy
        return await first, await batcher.submit("greedy", 3)

    assert _run(_with_batcher(recorder, body, max_batch_size=8, max_wait_ms=0)) == (2, 6)
    assert [items for _, items in recorder.calls] == [[1], [3]]


def test_bad_settings_and_use_before_start_raise():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(Recorder(), max_batch_size=0)
    with pytest.raises(RuntimeError, match="start"):
        _run(MicroBatcher(Recorder()).submit("greedy", 1))


def test_requests_whose_client_has_gone_are_not_run():
    from mixt5.serve.batcher import ClientGoneError

    recorder = Recorder(delay_s=0.2)
    gone = set()

    def client(number):
        async def is_gone():
            return number in gone

        return is_gone

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit("k", 0, client(0)))
        await asyncio.sleep(0.05)  # the first call is running: the rest queue behind it
        rest = [asyncio.ensure_future(batcher.submit("k", n, client(n))) for n in range(1, 7)]
        await asyncio.sleep(0.01)
        gone.update({2, 3, 5})  # their clients disconnect while they wait
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        return results, batcher.stats.abandoned

    results, abandoned = _run(_with_batcher(recorder, body, max_batch_size=8, max_wait_ms=1))
    assert [n for _, items in recorder.calls for n in items] == [0, 1, 4, 6]  # never generated: 2, 3, 5
    assert [results[n] for n in (0, 1, 4, 6)] == [0, 2, 8, 12]
    assert all(isinstance(results[n], ClientGoneError) for n in (2, 3, 5)) and abandoned == 3
