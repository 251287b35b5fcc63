"""Dynamic micro-batching: concurrent requests to one model become one onnxruntime call.

A CNN on a CPU runs a batch of 32 images several times faster per image than 32 calls of one
image, but HTTP clients send one request at a time. The batcher queues each request's rows and a
single loop per model takes everything waiting -- up to ``max_batch`` rows -- once the oldest
request has waited ``max_delay`` (or at once, when a full batch is already queued). The
onnxruntime call runs in the batcher's own worker thread so the event loop keeps accepting and
parsing requests meanwhile; with one worker per model, calls to one session never overlap and
its intra-op thread pool is the only parallelism, as configured.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Batches :meth:`submit` calls for one model; start with :meth:`start`, drain with :meth:`close`.

    ``run`` gets the batch as the list of the requests' row arrays, in order, and returns the
    outputs of all their rows concatenated (row i of the output belongs to row i overall); it must
    accept any total size, since a single request larger than ``max_batch`` is passed whole.
    ``on_batch(size, seconds)`` and ``on_queue(depth)`` report to metrics.
    """

    def __init__(self, name: str, run: Callable[[list[np.ndarray]], np.ndarray], *, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int, float], None] = lambda n, s: None,
                 on_queue: Callable[[int], None] = lambda d: None) -> None:
        if max_batch < 1 or max_delay_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_delay_s >= 0, got {max_batch}, {max_delay_s}")
        self.name, self._run, self.max_batch, self.max_delay_s = name, run, int(max_batch), float(max_delay_s)
        self._on_batch, self._on_queue = on_batch, on_queue
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._depth = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{self.name}")
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Finish every queued request, then stop the loop and its worker thread."""
        if self._queue is None or self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._executor.shutdown(wait=True)
        self._queue = self._task = None

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """The outputs for ``rows`` (N, ...), computed in some micro-batch."""
        if not self.running:
            raise RuntimeError(f"batcher for {self.name!r} is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(rows, future))
        self._set_depth(self._depth + len(rows))
        return await future

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._on_queue(depth)

    async def _next(self, timeout: float) -> _Item | None | bool:
        """The next queued item, waiting at most ``timeout`` s; False when none came."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return False
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11
            return False

    async def _loop(self) -> None:
        carry: _Item | None = None
        stopping = False
        while not stopping:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            if first is None:
                break
            batch, n = [first], len(first.rows)
            deadline = first.enqueued + self.max_delay_s
            while n < self.max_batch:
                item = await self._next(deadline - time.monotonic())
                if item is False:
                    break
                if item is None:  # close() was called: run what we have, then stop
                    stopping = True
                    break
                if n + len(item.rows) > self.max_batch:
                    carry = item
                    break
                batch.append(item)
                n += len(item.rows)
            self._set_depth(self._depth - n)
            await self._run_batch(batch, n)

    async def _run_batch(self, batch: list[_Item], n: int) -> None:
        parts = [it.rows for it in batch]
        t0 = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, parts)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        self._on_batch(n, time.perf_counter() - t0)
        start = 0
        for it in batch:
            end = start + len(it.rows)
            if not it.future.done():  # a client that disconnected cancelled its future
                it.future.set_result(out[start:end])
            start = end
