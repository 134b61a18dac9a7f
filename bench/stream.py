"""Streaming against a running service: time to first token, and total time against ``/translate``.

For each number of concurrent clients, the same sentences are sent twice through one asyncio
event loop (aiohttp, as ``bench serve``'s load): first to ``POST /translate``, then to
``POST /translate_stream``, each client sending its next sentence when the last is answered. For a
stream, *time to first token* is until the first ``event: token`` has arrived and *total* until
the ``done`` event has; for ``/translate`` the total is until the whole body has arrived. The ratio
is the stream's p50 total over ``/translate``'s (issue 13's target: at most 1.1).

Use it on a service that ``bench serve`` started (adaptive batching on)::

    rows = bench_stream(url, texts, (1, 8))
    table("Streaming (POST /translate_stream against /translate)", HEADERS, rows)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

HEADERS = ["clients", "first token p50 ms", "first token p95 ms", "stream total p50 ms", "/translate p50 ms",
           "stream ÷ /translate", "errors"]


def _pick(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds (NaN when there are none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(url: str, texts: list[str], clients: int, body: dict, stream: bool
               ) -> tuple[list[float], list[float], int]:
    """Each sentence once, ``clients`` at a time: (first-token times, totals, errors)."""
    import aiohttp

    first: list[float] = []
    totals: list[float] = []
    errors = 0
    queue = list(texts)
    path = "/translate_stream" if stream else "/translate"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def client() -> None:
            nonlocal errors
            while queue:
                text = queue.pop()
                began = time.perf_counter()
                async with session.post(f"{url}{path}", json={**body, "text": text}) as answer:
                    if answer.status != 200:
                        errors += 1
                        await answer.read()
                        continue
                    if not stream:
                        await answer.read()
                    else:
                        tail, seen_token, done = b"", False, False
                        async for chunk in answer.content.iter_any():
                            window = tail + chunk  # an event's name may straddle two chunks
                            if not seen_token and b"event: token" in window:
                                seen_token = True
                                first.append(time.perf_counter() - began)
                            done = done or b"event: done" in window
                            tail = window[-16:]
                        errors += not done
                totals.append(time.perf_counter() - began)

        await asyncio.gather(*(client() for _ in range(clients)))
    return first, totals, errors


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
        One row per number of clients, in :data:`HEADERS`' order.
    """
    body = {"attention": attention, "beam_size": beam_size}
    asyncio.run(_run(url, list(texts[:8]), 2, body, stream=True))  # warm-up: both paths' first calls
    asyncio.run(_run(url, list(texts[:8]), 2, body, stream=False))
    rows: list[list[object]] = []
    for n in clients:
        _, plain, plain_errors = asyncio.run(_run(url, list(texts), n, body, stream=False))
        first, totals, errors = asyncio.run(_run(url, list(texts), n, body, stream=True))
        rows.append([n, _pick(first, 0.5), _pick(first, 0.95), _pick(totals, 0.5), _pick(plain, 0.5),
                     _pick(totals, 0.5) / _pick(plain, 0.5), errors + plain_errors])
    return rows
