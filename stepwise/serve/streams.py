"""Streams: a search's progress as each streamed request's events, and those events over HTTP.

On the decoding thread, :class:`StreamFollowers` is the ``on_step`` of one search
(:func:`stepwise.serve.translation.translate`): it hands each streamed request of the search its
own sentences' progress, which a :class:`Follower` turns into events, ``emit(event, data)``:

* ``start``: ``{"sentences": [{"source": text, "source_tokens": [...]}, ...]}``, before the
  first step: what will be translated (one sentence, or a split paragraph's), so a reader can
  label the attention rows that follow.
* ``token``: ``{"index": i, "token": piece, "id": id, "sentence": j, "cross_attention": row}``,
  the target token at position ``i`` of the answer's ``target_tokens``; ``sentence`` is the
  sentence of a split paragraph it belongs to (0 otherwise); ``cross_attention`` (only when
  ``attention`` is ``cross`` or ``all``) is that position's row ``[layer][head][source]`` over
  the sentence's own source tokens, the ``layers``/``heads`` asked for, in ``attention_format``
  (nested lists, or a compact object of :mod:`stepwise.serve.attention_codec`).
* ``replace``: ``{"from": i}``, beam search only: the best hypothesis so far (the one the search
  would return if it stopped now) has parted from what was sent at position ``i``; the reader
  drops its tokens from ``i`` on, and ``token`` events from ``i`` follow. Greedy search never
  replaces.

A split paragraph's sentences are streamed in order, a sentence once the ones before it are
finished. When an ``emit`` raises :class:`StreamClosed` (its reader left), that stream gets no
more events; when every request of a search has left, the search stops at that step.

On the event loop, :class:`ServerSentEvents` is one ``/translate_stream`` answer: its ``emit``
is what the decoding thread calls, and it writes the events as server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from stepwise.decode.search import Progress
from stepwise.errors import StepwiseError
from stepwise.serve.options import TranslateOptions
from stepwise.serve.responses import as_error, encode_attention, finish, json_bytes, select_attention
from stepwise.serve.store import LoadedModel

log = logging.getLogger(__name__)

# A stream's events leave at most this late (the first token at once): each hand-over wakes the
# event loop and writes to the socket, which on two cores slows the search that shares them.
STREAM_FLUSH_S = float(os.environ.get("STEPWISE_STREAM_FLUSH_MS", "10")) / 1000


class StreamClosed(Exception):  # noqa: N818 - control flow, not an error: the stream's reader left
    """Raised by a stream's ``emit`` when nobody reads the stream any more."""


Emit = Callable[[str, dict[str, Any]], None]


class StreamFollowers:
    """The ``on_step`` of one search: hands each stream of it its own sentences' progress.

    ``members`` are the search's requests: each one's options, sentences and ``emit`` (None: not
    a stream); the search numbers the flattened list of their sentences, member by member. Sends
    every stream its ``start`` event when built.
    """

    def __init__(self, loaded: LoadedModel, members: list[tuple[TranslateOptions, list[str], Emit | None]]) -> None:
        self.followers: dict[int, tuple[range, Follower]] = {}
        self.left: set[int] = set()
        self._chunk: list[int] | None = None  # the search batch the mapping below is for
        self._batches: dict[int, dict[int, int]] = {}  # per member: its sentence -> number in progress
        self.all_streams = all(emit is not None for _, _, emit in members)
        translator = loaded.translator
        start = 0
        for member, (options, texts, emit) in enumerate(members):
            if emit is not None:
                try:
                    emit("start", {"sentences": [{"source": text, "source_tokens": translator.tokenizer.pieces(
                        translator.encode_text(text))} for text in texts]})
                    self.followers[member] = (range(start, start + len(texts)),
                                              Follower(loaded, options, len(texts), emit))
                except StreamClosed:
                    self._leave(member, 0)
            start += len(texts)

    def _leave(self, member: int, tokens: int) -> None:
        self.left.add(member)
        self.followers.pop(member, None)
        log.info("stream closed by its client after %d token event(s)", tokens)

    def __call__(self, chunk: list[int], progress: Progress) -> None:
        """``chunk``: the flat indices of the search's sentences, in the order ``progress`` numbers them
        (the same list for every step of one translator batch: mapped once per batch)."""
        if chunk is not self._chunk:
            self._chunk, self._batches = chunk, {}
            owner = {flat: member for member, (own, _) in self.followers.items() for flat in own}
            for b, flat in enumerate(chunk):
                if flat in owner:
                    member = owner[flat]
                    self._batches.setdefault(member, {})[flat - self.followers[member][0].start] = b
        for member, (_, follower) in list(self.followers.items()):
            batch = self._batches.get(member)
            if not batch:
                continue
            try:
                follower(batch, progress)
            except StreamClosed:
                self._leave(member, follower.tokens_sent)
        if self.all_streams and not self.followers:
            log.info("every reader of this search left: decoding stopped")
            raise StreamClosed


class Follower:
    """Turns each step's :class:`stepwise.decode.search.Progress` into ``token``/``replace`` events (see above)."""

    def __init__(self, loaded: LoadedModel, options: TranslateOptions, sentences: int, emit: Emit) -> None:
        self.pieces = loaded.translator.tokenizer.pieces
        self.options, self.emit, self.sentences = options, emit, sentences
        self.with_rows = options.attention in ("cross", "all")
        self.sent: list[list[int]] = [[] for _ in range(sentences)]  # token ids sent, per sentence
        self.waiting: dict[int, tuple[list[int], np.ndarray | None]] = {}  # finished before their turn
        self.current = 0  # the sentence being streamed: the ones before it are sent in full
        self.offset = 0  # the answer's target position of its first token
        self.tokens_sent = 0

    def __call__(self, batch: dict[int, int], progress: Progress) -> None:
        """``batch``: this request's sentences in this search, each sentence's number in ``progress``."""
        while self.current < self.sentences:
            j = self.current
            if j in self.waiting:
                ids, rows = self.waiting.pop(j)
                self._send(j, ids, lambda start, rows=rows: rows[:, :, start:])  # type: ignore[index]
            elif j in batch:
                b = batch[j]
                self._send(j, progress.best(b), lambda start, b=b: progress.cross_attention(b, start))
                if not progress.done(b):
                    break
            else:
                break
            self.offset += len(self.sent[j])
            self.current += 1
        for j, b in batch.items():  # later sentences that finished first wait for their turn
            if j > self.current and j not in self.waiting and progress.done(b):
                self.waiting[j] = (progress.best(b), progress.cross_attention(b) if self.with_rows else None)

    def _send(self, sentence: int, ids: list[int], rows_from: Callable[[int], np.ndarray]) -> None:
        """Bring what was sent of ``sentence`` to ``ids``: a ``replace`` if they part, then new tokens."""
        sent = self.sent[sentence]
        keep = 0
        while keep < min(len(sent), len(ids)) and sent[keep] == ids[keep]:
            keep += 1
        if keep < len(sent):
            self.emit("replace", {"from": self.offset + keep, "sentence": sentence})
            del sent[keep:]
        if len(ids) == keep:
            return
        rows = rows_from(keep) if self.with_rows else None
        for n, (token_id, piece) in enumerate(zip(ids[keep:], self.pieces(ids[keep:]), strict=True)):
            data: dict[str, Any] = {"index": self.offset + keep + n, "token": piece, "id": token_id,
                                    "sentence": sentence}
            if rows is not None:
                row = select_attention({"cross": rows[:, :, n]}, self.options, kinds=("cross",))["cross"]
                data["cross_attention"] = encode_attention(row, self.options)
            self.emit("token", data)
            sent.append(token_id)
            self.tokens_sent += 1


def server_sent_event(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its name and its data as one line of JSON."""
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


class ServerSentEvents:
    """One ``/translate_stream`` answer: events from the decoding thread to the client's connection.

    ``emit`` (the decoding thread) encodes each event and hands them to the event loop in
    groups: ``start`` and the first token at once, later ones with the first event emitted
    ``STREAM_FLUSH_S`` or more after the last hand-over, or at the end (each hand-over wakes the
    event loop and writes to the socket, which on two cores slows the search sharing them; one
    per token made a one-client stream 1.47x ``/translate``'s time, one per 10 ms 1.27x).
    ``finish`` (the event loop, when the request's future resolves) adds ``done`` or ``error``.
    ``relay`` is the response body; when it stops early (the client left), the next ``emit``
    raises :class:`StreamClosed`.
    """

    def __init__(self, options: TranslateOptions, started: float) -> None:
        self.options, self.started = options, started
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.reader_left = threading.Event()
        self.lock = threading.Lock()
        self.held: list[bytes] = []  # encoded events not yet handed to the event loop
        self.handed_at = 0.0
        self.tokens = 0

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """The search's callback (decoding thread)."""
        if self.reader_left.is_set():
            raise StreamClosed
        with self.lock:
            self.held.append(server_sent_event(event, data))
            self.tokens += event == "token"
            if self.tokens <= 1 or time.perf_counter() - self.handed_at >= STREAM_FLUSH_S:
                self.loop.call_soon_threadsafe(self.events.put_nowait, b"".join(self.held))
                self.held.clear()
                self.handed_at = time.perf_counter()

    def finish(self, future: asyncio.Future[Any]) -> None:
        """The events still held, then ``done`` with the answer or ``error``, then the end (event loop)."""
        with self.lock:
            if self.held:
                self.events.put_nowait(b"".join(self.held))
                self.held.clear()
        outcome = None if future.cancelled() else as_error(future.exception() or future.result())
        if isinstance(outcome, StepwiseError):
            self.events.put_nowait(server_sent_event("error", {"error": str(outcome)}))
        elif outcome is not None:  # None: the reader left
            finish([outcome], self.options, self.started)
            self.events.put_nowait(server_sent_event("done", outcome))
        self.events.put_nowait(None)

    async def relay(self) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk."""
        try:
            while (chunk := await self.events.get()) is not None:
                yield chunk
        finally:  # finished, or the client left (Starlette cancels or closes this generator)
            self.reader_left.set()
