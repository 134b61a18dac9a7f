"""Adaptive batching: requests that arrive while a batch decodes are decoded together next.

A decoder step costs nearly the same for one row as for dozens (the weights are read once per
step either way), so a service under load should decode its waiting requests as one batch. This
is the continuous form of what BentoML's adaptive batching does between two services, inside
the one process that serves HTTP: an asyncio front (``submit``) and one decoding thread.

* When the thread is idle, a request starts decoding at once: one client never waits for a
  batch to fill.
* While a batch decodes, arriving requests queue; when it ends they all (up to ``max_batch``)
  form the next batch.
* Clients answered together send their next requests together, but not in the same instant
  (the answers themselves leave one by one, and large ones take a while to write): when fewer
  requests wait than the last batch held, the queue waits for the rest while they keep coming,
  until none has arrived for ``quiet_s``, at most ``gather`` times the last batch's decoding time
  (and ``max_gather_s``). So a batch does not leave half full while its peers arrive a few
  milliseconds later, and a lone request after a busy spell waits one quiet gap at most.

The decoding function runs in the thread and answers one result per item, in order; an item's
result may be an exception, which that item's caller receives. If the function itself raises,
every item of the batch gets that exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class BatchQueue(Generic[Item]):
    """Collects items submitted from one event loop and runs them through ``run`` in batches.

    Args:
        run: decodes a batch (in the queue's thread): one result per item, in order; a result
            that is an exception is raised to that item's caller.
        max_batch: most items per batch (1: every item alone, in arrival order).
        gather: fraction of the last batch's decoding time to wait for stragglers, at most.
        max_gather_s: the longest such wait.
        quiet_s: the wait ends when no request has arrived for this long.
    """

    def __init__(self, run: Callable[[Sequence[Item]], Sequence[Any]], *, max_batch: int, gather: float = 0.5,
                 max_gather_s: float = 0.05, quiet_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run, self.max_batch = run, max_batch
        self.gather, self.max_gather_s, self.quiet_s = gather, max_gather_s, quiet_s
        self._pending: list[tuple[Item, asyncio.Future[Any]]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._last_size, self._last_seconds = 1, 0.0

    def submit(self, item: Item) -> asyncio.Future[Any]:
        """Queue ``item``; the future resolves to its result (or raises its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return future

    async def _gather_stragglers(self) -> None:
        """Wait briefly while fewer items wait than the last batch had (see the module docstring)."""
        assert self._arrived is not None
        budget = min(self.max_gather_s, self.gather * self._last_seconds)
        deadline = time.perf_counter() + budget
        while len(self._pending) < min(self._last_size, self.max_batch):
            remaining = min(deadline - time.perf_counter(), self.quiet_s)
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self.max_batch > 1:
                await self._gather_stragglers()
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            live = [(item, future) for item, future in batch if not future.cancelled()]  # callers gone
            if not live:
                continue
            began = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._thread, self.run, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} answered {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - every caller of the batch hears of it
                results = [exc] * len(live)
            self._last_size, self._last_seconds = len(live), time.perf_counter() - began
            for (_, future), result in zip(live, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
