"""The service's decoding queue (``stepwise.serve.batching.BatchQueue``) with a made-up decoding function:
a lone request is not held back, requests arriving while a batch decodes form the next one,
stragglers are gathered, ``max_batch`` holds, and failures reach the right callers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from stepwise.serve.batching import BatchQueue

pytestmark = pytest.mark.unit


class Recorder:
    """Decodes by echoing ``item * 10`` after ``seconds``; remembers each batch it ran and in which thread."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.started = threading.Event()  # set once a batch is decoding

    def __call__(self, items: Sequence[int]) -> list[object]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        self.started.set()
        time.sleep(self.seconds)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def decoding(run: Recorder, timeout: float = 30) -> None:
    """Return once ``run`` is decoding a batch (its event polled from the event loop, with a deadline)."""
    deadline = time.monotonic() + timeout
    while not run.started.is_set():
        assert time.monotonic() < deadline, "no batch started decoding"
        await asyncio.sleep(0.001)


def test_a_lone_request_decodes_at_once_and_the_waiting_ones_together() -> None:
    run = Recorder()

    async def main() -> list[int]:
        queue = BatchQueue(run, max_batch=64)
        first = queue.submit(1)
        await decoding(run)  # the first is decoding now
        later = [queue.submit(i) for i in range(2, 12)]
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [i * 10 for i in range(1, 12)]
    assert run.batches == [[1], list(range(2, 12))]  # in arrival order, one batch for those that waited
    assert run.threads and all(name.startswith("decode") for name in run.threads)  # never the event loop


@pytest.mark.parametrize(("max_batch", "expected"), [(4, [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]),
                                                     (1, [[i] for i in range(10)])])
def test_max_batch_and_one_at_a_time(max_batch: int, expected: list[list[int]]) -> None:
    run = Recorder(seconds=0.02)

    async def main() -> list[int]:
        queue = BatchQueue(run, max_batch=max_batch)
        first = queue.submit(0)
        await decoding(run)  # the first is decoding now
        return await asyncio.gather(first, *(queue.submit(i) for i in range(1, 10)))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert run.batches == expected


def test_stragglers_join_the_batch_their_peers_left_in() -> None:
    """After a batch of 8, the next requests arrive a millisecond apart: they still go together."""
    run = Recorder(seconds=0.05)

    async def main() -> None:
        queue = BatchQueue(run, max_batch=64, gather=5, max_gather_s=0.25)
        await asyncio.gather(*(queue.submit(i) for i in range(8)))
        futures = []
        for i in range(8):
            futures.append(queue.submit(100 + i))
            await asyncio.sleep(0.001)
        await asyncio.gather(*futures)

    asyncio.run(main())
    assert run.batches == [list(range(8)), [100 + i for i in range(8)]]


def test_failures_reach_their_callers_only() -> None:
    def broken(items: Sequence[int]) -> list[int]:
        if 99 in items:
            raise RuntimeError("the batch broke")
        return Recorder(seconds=0)(items)  # type: ignore[return-value]

    async def main() -> tuple[list[object], list[object]]:
        queue = BatchQueue(broken, max_batch=8)
        one = await asyncio.gather(queue.submit(1), queue.submit(-2), queue.submit(3), return_exceptions=True)
        both = await asyncio.gather(queue.submit(99), queue.submit(4), return_exceptions=True)
        return one, both

    one, both = asyncio.run(main())
    assert one[0] == 10 and one[2] == 30 and isinstance(one[1], ValueError) and str(one[1]) == "bad -2"
    assert all(isinstance(r, RuntimeError) for r in both)  # a batch that raises fails every member


def test_a_caller_that_left_is_skipped() -> None:
    run = Recorder(seconds=0.03)

    async def main() -> int:
        queue = BatchQueue(run, max_batch=8)
        queue.submit(1)
        await decoding(run)  # the first is decoding now
        gone = queue.submit(2)
        gone.cancel()
        return await queue.submit(3)

    assert asyncio.run(main()) == 30
    assert run.batches == [[1], [3]]


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchQueue(Recorder(), max_batch=0)
