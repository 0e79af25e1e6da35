"""Request batching for a busy model: a batch is gathered when the model is free, not while it runs.

Ray Serve's ``@serve.batch`` (2.60) keeps forming batches while the previous one is still computing: each
closes ``batch_wait_timeout_s`` after its first request and then waits for the model. Under load, a replica
therefore runs a queue of small batches (measured: the Expert ran batches of 1 at 8 req/s offered, batches the
size of each upstream Router batch in a closed loop, while 10 requests sat in its queue), which wastes the
GPU's batch parallelism. :class:`Batcher` gathers instead when the model becomes free: everything that arrived
meanwhile (up to ``max_batch_size``) forms the next batch at once, and only a lone request waits up to
``wait_s`` for company. Plain asyncio; the Serve deployments own one per batched method.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable


class Batcher:
    """``await batcher.submit(item)`` returns ``fn(batch)[i]`` for the item's place ``i`` in its batch.

    ``fn``: ``list[item] -> list[result]`` (same length), awaited; it runs one batch at a time. A result that is
    an ``Exception`` fails its own request only (e.g. a row refused by validation). When ``fn`` raises for a
    batch of several, each of its items is run again alone, so one bad row fails alone and the others get
    their answers. ``log`` keeps ``(start, end, size)`` of the last 1000 batches (``time.time()``) for tests
    and load tests.
    """

    def __init__(self, fn: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.fn, self.max_batch_size, self.wait_s = fn, int(max_batch_size), float(wait_s)
        self.log: list[tuple[float, float, int]] = []
        self._items: deque[tuple[float, Any, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._items)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None or self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut = loop.create_future()
        self._items.append((time.monotonic(), item, fut))
        self._arrived.set()
        return await fut

    async def _gather(self) -> list[tuple[float, Any, asyncio.Future]]:
        assert self._arrived is not None
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._items[0][0] + self.wait_s  # a request that waited for the model waits no longer
        while len(self._items) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        n = min(len(self._items), self.max_batch_size)
        batch = [self._items.popleft() for _ in range(n)]
        return [b for b in batch if not b[2].done()]  # callers that gave up are not computed

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            t0 = time.time()
            try:
                results = await self._call([b[1] for b in batch])
            except BaseException as e:  # a cancelled worker cancels its callers
                for _, _, fut in batch:
                    if not fut.done():
                        fut.cancel() if isinstance(e, asyncio.CancelledError) else fut.set_exception(e)
                raise
            else:
                for (_, _, fut), r in zip(batch, results):
                    if not fut.done():
                        fut.set_exception(r) if isinstance(r, Exception) else fut.set_result(r)
            finally:
                self.log.append((t0, time.time(), len(batch)))
                del self.log[:-1000]

    async def _call(self, items: list) -> list:
        """``fn(items)``; when it fails, each item alone: a result per item, an exception for a failed one."""
        try:
            results = await self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batched function returned {len(results)} results for {len(items)} items")
            return list(results)
        except Exception as e:  # noqa: BLE001 - handed to the caller(s) it belongs to
            if len(items) == 1:
                return [e]
        return [(await self._call([item]))[0] for item in items]
