"""The one load generator of ``bench serve``: concurrent clients against a running service.

Every client is a coroutine of one asyncio event loop (aiohttp, which BentoML itself uses), so
the generator takes little CPU from the service it measures. Each client sends its next sentence
when the last one is answered. A latency is until the whole answer has arrived: the body of
``POST /translate``, or the ``done`` event of ``POST /translate_stream``, for which the *time to
first token* (until the first ``event: token`` has arrived) is kept too.

Streaming rows (:func:`bench_stream`) send the same sentences to both endpoints and compare the
stream's p50 total with ``/translate``'s (issue 13's target: at most 1.1)::

    rows = bench_stream(url, texts, (1, 8))
    table("Streaming (POST /translate_stream against /translate)", STREAM_HEADERS, rows)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STREAM_HEADERS = ["clients", "first token p50 ms", "first token p95 ms", "stream total p50 ms", "/translate p50 ms",
                  "stream ÷ /translate", "errors"]


@dataclass
class Load:
    """What one load run saw: latencies and times to first token (seconds), errors, wall time."""

    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def ms(self, q: float, values: list[float] | None = None) -> float:
        """The ``q`` quantile of the latencies (or of ``values``) in milliseconds; NaN when none."""
        ordered = sorted(self.latencies if values is None else values)
        if not ordered:
            return float("nan")
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float]:
        """Requests/s, p50/p95/p99 latency (ms) and errors: one row of the serving table."""
        return {"rps": len(self.latencies) / self.seconds, "p50": self.ms(0.5), "p95": self.ms(0.95),
                "p99": self.ms(0.99), "errors": self.errors}


async def _drive(url: str, texts: Sequence[str], clients: int, body: dict[str, Any], stream: bool) -> Load:
    import aiohttp

    load = Load()
    queue = list(texts)
    path = "/translate_stream" if stream else "/translate"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def client() -> None:
            while queue:
                text = queue.pop()
                began = time.perf_counter()
                async with session.post(f"{url}{path}", json={**body, "text": text}) as answer:
                    if answer.status != 200 or not stream:
                        await answer.read()
                        load.errors += answer.status != 200
                    else:
                        tail, seen_token, done = b"", False, False
                        async for chunk in answer.content.iter_any():
                            window = tail + chunk  # an event's name may straddle two chunks
                            if not seen_token and b"event: token" in window:
                                seen_token = True
                                load.first_token.append(time.perf_counter() - began)
                            done = done or b"event: done" in window
                            tail = window[-16:]
                        load.errors += not done
                load.latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        load.seconds = time.perf_counter() - started
    return load


def run_load(url: str, texts: Sequence[str], clients: int, body: dict[str, Any], *, stream: bool = False) -> Load:
    """Send each of ``texts`` once (with ``body``'s options), ``clients`` at a time.

    Args:
        url: the service, e.g. ``http://127.0.0.1:3000``.
        texts: the sentences.
        clients: concurrent clients.
        body: the request's other fields (``attention``, ``beam_size``, ...).
        stream: ``POST /translate_stream`` instead of ``/translate``.
    """
    return asyncio.run(_drive(url, texts, clients, body, stream))


def bench_stream(url: str, texts: Sequence[str], clients: Sequence[int] = (1, 8), *, attention: str = "cross",
                 beam_size: int = 1) -> list[list[object]]:
    """Time to first token and total time of ``/translate_stream`` against ``/translate``.

    Args:
        url: the service, e.g. ``http://127.0.0.1:3000``.
        texts: the sentences; each is sent once per endpoint and number of clients.
        clients: the numbers of concurrent clients to measure.
        attention: what both endpoints are asked to return (the stream sends each token's row).
        beam_size: the search both use.

    Returns:
        One row per number of clients, in :data:`STREAM_HEADERS`' order.
    """
    body = {"attention": attention, "beam_size": beam_size}
    run_load(url, texts[:8], 2, body, stream=True)  # warm-up: both paths' first calls
    run_load(url, texts[:8], 2, body)
    rows: list[list[object]] = []
    for n in clients:
        plain = run_load(url, texts, n, body)
        streamed = run_load(url, texts, n, body, stream=True)
        total, first = streamed.ms(0.5), streamed.first_token
        rows.append([n, streamed.ms(0.5, first), streamed.ms(0.95, first), total, plain.ms(0.5),
                     total / plain.ms(0.5), streamed.errors + plain.errors])
    return rows
