"""The stepwise translation service: ``bentoml serve`` from the repository root.

One BentoML service, ``Translator`` (port 3000 by default): it validates flat JSON bodies
against the schemas below and answers ``POST /translate``, ``POST /translate_batch``,
``POST /translate_stream``, ``POST /model`` (also ``GET /info/model``) and ``POST /reload``,
plus BentoML's ``/readyz``, ``/livez`` and ``/metrics``. It owns the models
(``stepwise.serve.store.ModelStore``) and decodes in the same process: every translation request
joins one queue (``stepwise.serve.batching.BatchQueue``), whose thread decodes the requests that
arrived while the last batch decoded as the next batch (adaptive batching, continuous form;
``STEPWISE_ADAPTIVE_BATCHING=0`` decodes them one at a time, only to measure it). There each
request is checked against the model that will run it (``serving.check_request``) and
translated (``serving.serve_batch``). An earlier design decoded in a second BentoML service
behind the first: that hop (HTTP, pickling, the batching dispatcher) cost ~3 ms a request, a
fifth of a sentence's decoding time (``bench/results/serve-cpu.md``).

``POST /translate_stream`` takes ``/translate``'s body and answers server-sent events
(``text/event-stream``) as the search decodes: ``event: start`` (the sentences and their source
tokens), ``event: token`` per target token (with its cross-attention row when asked),
``event: replace`` when a beam's best hypothesis changes its mind (``serving.translate``
defines them), then one ``event: done`` whose data is what ``/translate`` answers for the same
request (only the ``timings`` differ), or ``event: error`` with ``{"error": message}`` if decoding
fails midway. A request that fails its checks is a normal JSON 4xx before any event. A stream
decodes in the same batches as every other request; when its client disconnects, its next event
finds nobody reading, it gets no more, and a search that only it (or only streams whose readers
left) was waiting for stops at that step.

Which model: ``STEPWISE_MODEL_DIR`` (an export directory from ``stepwise export``) or, when it is
unset, the registry's ``production`` version resolved through ClearML at start-up (its ONNX
export is pulled, or made by running the exporter). ``POST /reload`` (or a periodic check every
``STEPWISE_RELOAD_INTERVAL`` seconds) swaps in a new ``production`` version without dropping
in-flight requests. ONNX Runtime runs on CUDA when ``onnxruntime-gpu`` sees a GPU, else on CPU;
threads come from ``STEPWISE_ORT_THREADS`` (default: all cores). No torch is imported here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any, Literal

import anyio
import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from stepwise.errors import DeviceUnavailable, InvalidRequest, ModelNotFound, RegistryUnavailable, StepwiseError
from stepwise.serve.batching import BatchQueue
from stepwise.serve.store import (
    DECODE_BATCH,
    MAX_BATCH_TEXTS,
    MAX_BEAM_SIZE,
    MAX_OUTPUT_TOKENS,
    MAX_TEXT_CHARS,
    Job,
    ModelStore,
    StreamClosed,
    check_request,
    encode_attention,
    json_bytes,
    model_cache_limits,
    serve_batch,
)

RELOAD_INTERVAL = float(os.environ.get("STEPWISE_RELOAD_INTERVAL", "0"))
ADAPTIVE_BATCHING = os.environ.get("STEPWISE_ADAPTIVE_BATCHING", "1") != "0"  # off only to measure it
# A stream's events leave at most this late (the first token at once): each hand-over wakes the
# event loop and writes to the socket, which on two cores slows the search that shares them.
STREAM_FLUSH_S = float(os.environ.get("STEPWISE_STREAM_FLUSH_MS", "10")) / 1000
try:  # checked here, at start, so a bad value is one line and not a worker's traceback
    model_cache_limits(os.environ.get("STEPWISE_MODEL_CACHE"))
except ValueError as exc:  # ConfigError
    raise SystemExit(f"error: {exc}") from None

# the one mapping from stepwise.errors to HTTP status codes (first match wins)
STATUS: list[tuple[type[StepwiseError], int]] = [
    (InvalidRequest, 400),
    (ModelNotFound, 404),
    (RegistryUnavailable, 503),
    (DeviceUnavailable, 503),
    (StepwiseError, 500),  # a checkpoint or export that cannot be loaded: not the client's fault
]

log = logging.getLogger("stepwise.service")
logging.getLogger("stepwise").setLevel(logging.INFO)  # BentoML's handlers print it into the server log


# -- schemas ---------------------------------------------------------------------------------------
def _not_blank(text: str, where: str = "") -> str:
    if not text.strip():
        raise ValueError(f"{where}must not be empty or whitespace")
    return text


class _Options(bentoml.IODescriptor):
    """Options shared by both translation endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    beam_size: int = Field(default=1, ge=1, le=MAX_BEAM_SIZE, description="1 = greedy search")
    max_length: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS,
                                   description="most target tokens (default 2 x source + 10)")
    attention: Literal["none", "cross", "all"] = Field(default="cross", description="attention kinds to return")
    layers: list[int] | None = Field(default=None, description="only these layers (0-based)")
    heads: list[int] | None = Field(default=None, description="only these heads (0-based)")
    model: str | None = Field(default=None, description="a registry tag or version id (default: production)")
    mask_heads: dict[Literal["encoder", "decoder", "cross"], list[list[int]]] | None = Field(
        default=None, description="heads to switch off (ablation): per kind [[layer, head], ...], 0-based")
    attention_format: Literal["json", "float16", "uint10"] = Field(
        default="json", description="json: nested lists; float16 / uint10: compact base64 arrays "
                                    "(stepwise.serve.attention_codec)")
    alignment: Literal["none", "soft", "hard"] = Field(
        default="none", description="word alignment from cross-attention: soft = word matrix, hard = Pharaoh i-j")
    alignment_layer: int | Literal["average"] | None = Field(
        default=None, description="cross-attention layer to align with, or average (the default)")
    alignment_head: int | Literal["average"] | None = Field(
        default=None, description="head to align with, or average (the default)")
    split: Literal["none", "sentences"] = Field(
        default="none", description="sentences: split a paragraph, translate the sentences as one batch, join")

    @field_validator("layers", "heads")
    @classmethod
    def _indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(i < 0 for i in value)):
            raise ValueError("must be a non-empty list of indices >= 0")
        return value

    @field_validator("alignment_layer", "alignment_head")
    @classmethod
    def _index_or_average(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError('must be an index >= 0 or "average"')
        return value

    @field_validator("mask_heads")
    @classmethod
    def _pairs(cls, value: dict[str, list[list[int]]] | None) -> dict[str, list[list[int]]] | None:
        for kind, pairs in (value or {}).items():
            for pair in pairs:
                if len(pair) != 2 or any(i < 0 for i in pair):
                    raise ValueError(f"{kind}: each item must be [layer, head], indices >= 0 (got {pair})")
        return value


class TranslateRequest(_Options):
    """``POST /translate``."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the sentence to translate")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _not_blank(value)


class TranslateBatchRequest(_Options):
    """``POST /translate_batch``."""

    texts: list[str] = Field(min_length=1, max_length=MAX_BATCH_TEXTS, description="sentences to translate")

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            _not_blank(text, f"item {i} ")
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"item {i} is longer than {MAX_TEXT_CHARS} characters")
        return value


class WordAlignmentResult(BaseModel):
    """``alignment`` (when asked for): the words, which cross-attention aligned them, and the links."""

    source_words: list[str]
    target_words: list[str]
    layer: int | Literal["average"]
    head: int | Literal["average"]
    soft: list[list[float]] | None = Field(default=None, description="[target word][source word], rows sum to 1")
    hard: str | None = Field(default=None, description='Pharaoh "i-j" pairs: source word i, target word j, 0-based')


class SentenceResult(BaseModel):
    """One sentence of a split paragraph."""

    source: str
    translation: str
    source_tokens: list[str]
    target_tokens: list[str]
    attention: dict[str, list[list[list[list[float]]]]]
    alignment: WordAlignmentResult | None = None
    score: float


class TranslationResult(BaseModel):
    """One translation (what ``/translate`` answers, and each item of ``/translate_batch``)."""

    translation: str
    source_tokens: list[str]
    target_tokens: list[str]
    attention: dict[str, list[list[list[list[float]]]] | dict[str, Any]] = Field(
        description="per kind asked for: [layer][head][query][key], or a compact object (attention_format); "
                    "{} when split into sentences")
    alignment: WordAlignmentResult | None = Field(default=None, description="only when asked for")
    model: dict[str, Any] = Field(description="id, name, tags of the version that translated")
    score: float
    timings: dict[str, float]
    sentences: list[SentenceResult] | None = Field(
        default=None, description='with split "sentences" and more than one sentence: each one, in order')


class TranslationResults(RootModel[list[TranslationResult]]):
    """``/translate_batch``: one result per text, in order."""


# ``/translate_stream``'s answer as its schema shows it (the method answers the Response itself)
EventStream = Annotated[str, ContentType("text/event-stream")]


# -- the HTTP side ---------------------------------------------------------------------------------
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
    raises :class:`stepwise.serve.store.StreamClosed`.
    """

    def __init__(self, request: dict[str, Any], started: float) -> None:
        self.request, self.started = request, started
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
        outcome = None if future.cancelled() else _as_error(future.exception() or future.result())
        if isinstance(outcome, StepwiseError):
            self.events.put_nowait(server_sent_event("error", {"error": str(outcome)}))
        elif outcome is not None:  # None: the reader left
            encode_attention([outcome], self.request.get("attention_format", "json"))
            outcome["timings"]["total_ms"] = round((time.perf_counter() - self.started) * 1000, 3)
            self.events.put_nowait(server_sent_event("done", outcome))
        self.events.put_nowait(None)

    async def relay(self) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk."""
        try:
            while (chunk := await self.events.get()) is not None:
                yield chunk
        finally:  # finished, or the client left (Starlette cancels or closes this generator)
            self.reader_left.set()


def error_response(error: StepwiseError) -> JSONResponse:
    """The one mapping: a ``stepwise.errors`` exception as a status and a body naming the field."""
    status = next(code for kind, code in STATUS if isinstance(error, kind))
    message = str(error)
    if error.field and not message.startswith(error.field):
        message = f"{error.field}: {message}"
    body: dict[str, Any] = {"error": message}
    if error.field:
        body["detail"] = [{"loc": [error.field], "msg": message}]
    return JSONResponse(body, status_code=status)


def _respond(results: list[Any], started: float, *, single: bool, attention_format: str = "json") -> Response:
    """The first failed request's error, or the results as JSON with the total time."""
    for result in results:
        if isinstance(result, StepwiseError):
            return error_response(result)
    encode_attention(results, attention_format)
    total = round((time.perf_counter() - started) * 1000, 3)
    for result in results:
        result["timings"]["total_ms"] = total
    return Response(json_bytes(results[0] if single else results), media_type="application/json")


def _as_error(outcome: Any) -> Any:
    """A queued request's outcome with any exception that is not a ``stepwise.errors`` one (a bug,
    an ONNX Runtime failure) logged and replaced by a StepwiseError (a 500 or an ``error`` event)."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, StepwiseError):
        log.error("translation failed", exc_info=outcome)
        return StepwiseError("translation failed; see the server log")
    return outcome


async def _outcomes(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Each queued request's answer, or the ``stepwise.errors`` exception it failed with (:func:`_as_error`)."""
    return [_as_error(outcome) for outcome in await asyncio.gather(*futures, return_exceptions=True)]


async def _model_info(_: Request) -> JSONResponse:
    """``GET /info/model``: the same answer as ``POST /model``, for browsers and curl."""
    service = bentoml.get_current_service()
    return JSONResponse(await anyio.to_thread.run_sync(service.store.describe))


info_app = Starlette(routes=[Route("/model", _model_info, methods=["GET"])])


@bentoml.asgi_app(info_app, path="/info")
@bentoml.service(name="stepwise", traffic={"timeout": 300}, workers=1)
class Translator:
    """The HTTP entry point: the schemas, the models, the decoding queue and the status mapping."""

    def __init__(self) -> None:
        self.store = ModelStore()
        log.info("serving %s on %s", self.store.default.identity(), self.store.default.translator.provider)
        self.queue: BatchQueue[Job] = BatchQueue(partial(serve_batch, self.store),
                                                 max_batch=DECODE_BATCH if ADAPTIVE_BATCHING else 1)
        if RELOAD_INTERVAL > 0:
            threading.Thread(target=self._watch, daemon=True, name="reload-watch").start()

    def _watch(self) -> None:
        while True:
            time.sleep(RELOAD_INTERVAL)
            try:
                self.store.reload()
            except RegistryUnavailable:  # the store logged it once and /model shows it
                pass
            except Exception as exc:  # noqa: BLE001 - keep serving the current model
                log.warning("periodic reload failed: %s", exc)

    def _check(self, request: dict[str, Any]) -> StepwiseError | None:
        """A stream's check against its model before the first event (None: it may start)."""
        try:
            check_request(request, self.store.get(request.get("model")))
        except StepwiseError as exc:
            return exc
        return None

    @bentoml.api(route="/translate", input_spec=TranslateRequest, output_spec=TranslationResult)
    async def translate(self, **request: Any) -> Response:
        """Translate one sentence; attention as ``[layer][head][query][key]`` for the kinds asked."""
        started = time.perf_counter()
        attention_format = request.pop("attention_format", "json")
        results = await _outcomes([self.queue.submit(Job(request))])
        return _respond(results, started, single=True, attention_format=attention_format)

    @bentoml.api(route="/translate_batch", input_spec=TranslateBatchRequest, output_spec=TranslationResults)
    async def translate_batch(self, **request: Any) -> Response:
        """Translate several sentences with the same options; one result per text."""
        started = time.perf_counter()
        texts = request.pop("texts")
        attention_format = request.pop("attention_format", "json")
        results = await _outcomes([self.queue.submit(Job({**request, "text": text})) for text in texts])
        return _respond(results, started, single=False, attention_format=attention_format)

    @bentoml.api(route="/translate_stream", input_spec=TranslateRequest)
    async def translate_stream(self, **request: Any) -> EventStream:
        """Translate one sentence as server-sent events: ``token`` (and ``replace``) events, then ``done``.

        The body is ``/translate``'s; ``done`` carries ``/translate``'s answer. A request that
        fails the check against its model is a JSON 4xx before any event is sent.
        """
        started = time.perf_counter()
        problem = await anyio.to_thread.run_sync(self._check, request)
        if problem is not None:
            return error_response(problem)  # type: ignore[return-value]
        stream = ServerSentEvents(request, started)
        self.queue.submit(Job(request, stream.emit)).add_done_callback(stream.finish)
        return StreamingResponse(stream.relay(), media_type="text/event-stream",  # type: ignore[return-value]
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @bentoml.api(route="/model")
    async def model(self) -> dict[str, Any]:
        """What is loaded: manifest, registry identity and state, execution provider, load time."""
        return await anyio.to_thread.run_sync(self.store.describe)

    @bentoml.api(route="/reload")
    async def reload(self) -> Any:
        """Re-resolve ``production`` (or re-read STEPWISE_MODEL_DIR) and swap if it changed.

        With the registry unreachable: a 503, and the current model keeps serving.
        """
        try:
            return await anyio.to_thread.run_sync(self.store.reload)
        except StepwiseError as exc:
            return error_response(exc)
