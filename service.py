"""The stepwise translation service: ``bentoml serve`` from the repository root.

Two BentoML services in one ``bentoml serve``:

* ``Translator`` (the entry point, port 3000 by default) validates flat JSON bodies against
  the schemas below and answers ``POST /translate``, ``POST /translate_batch``,
  ``POST /translate_stream``, ``POST /model`` (also ``GET /info/model``) and ``POST /reload``,
  plus BentoML's ``/readyz``, ``/livez`` and ``/metrics``.
* ``TranslationRunner`` owns the models (``stepwise.serving.ModelStore``). Its ``run`` method is
  batchable, so BentoML's adaptive batching merges concurrent requests into one decoding batch;
  there each request is checked once against the model that will run it
  (``serving.check_request``), then translated (``serving.translate``).

``POST /translate_stream`` takes ``/translate``'s body and answers server-sent events
(``text/event-stream``) as the search decodes: ``event: start`` (the sentences and their source
tokens), ``event: token`` per target token (with its cross-attention row when asked),
``event: replace`` when a beam's best hypothesis changes its mind (``serving.translate_stream``
defines them), then one ``event: done`` whose data is what ``/translate`` answers for the same
request (only the ``timings`` differ), or ``event: error`` with ``{"error": message}`` if decoding
fails midway. A request that fails its checks is a normal JSON 4xx before any event. The stream
decodes alone (no adaptive batching) in a thread of its own; when the client disconnects, the
relay is meant to close the runner's stream so the search stops at its next step (known gap: the
entry service was seen not to notice the disconnect; see the README).

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
from collections.abc import AsyncGenerator, AsyncIterator
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
from stepwise.serving import (
    DECODE_BATCH,
    MAX_BATCH_TEXTS,
    MAX_BEAM_SIZE,
    MAX_OUTPUT_TOKENS,
    MAX_TEXT_CHARS,
    ModelStore,
    StreamClosed,
    check_request,
    encode_attention,
    json_bytes,
    model_cache_limits,
    translate,
    translate_stream,
)

RELOAD_INTERVAL = float(os.environ.get("STEPWISE_RELOAD_INTERVAL", "0"))
ADAPTIVE_BATCHING = os.environ.get("STEPWISE_ADAPTIVE_BATCHING", "1") != "0"  # off only to measure it
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
                                    "(stepwise.attention_codec)")
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


# -- the model side --------------------------------------------------------------------------------
# runner_connection: BentoML's client to this service replaces its connection pool every 100
# requests (and 5 minutes) by default, closing it under requests still in flight: under load that
# dropped answers every few seconds and, rarely, left one waiting until the traffic timeout.
@bentoml.service(name="stepwise-runner", workers=1, traffic={"timeout": 300},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9})
class TranslationRunner:
    """Holds the models; ``run`` is where adaptive batching happens.

    Every method returns a ``stepwise.errors`` exception instead of raising it, so one bad
    request in a merged batch fails alone and the entry service maps it to a status.
    """

    def __init__(self) -> None:
        self.store = ModelStore()
        log.info("serving %s on %s", self.store.default.identity(), self.store.default.translator.provider)
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

    @bentoml.api(batchable=ADAPTIVE_BATCHING, max_batch_size=DECODE_BATCH, max_latency_ms=30000)
    def run(self, requests: list[dict[str, Any]]) -> list[Any]:
        """Check each request against its model (the one check), then translate per model."""
        log.info("translating a batch of %d request(s)", len(requests))
        results: list[Any] = [None] * len(requests)
        by_model: dict[str, tuple[Any, list[int]]] = {}
        for i, request in enumerate(requests):
            try:
                loaded = self.store.get(request.get("model"))
                check_request(request, loaded)
            except StepwiseError as exc:
                results[i] = exc
                continue
            by_model.setdefault(loaded.id, (loaded, []))[1].append(i)
        for loaded, members in by_model.values():
            for i, result in zip(members, translate(loaded, [requests[i] for i in members]), strict=True):
                result["timings"]["requests_in_batch"] = len(requests)
                results[i] = result
        return results

    @bentoml.api
    def check(self, request: dict[str, Any]) -> Any:
        """``/translate_stream``'s check before it streams: None, or the error to answer with."""
        try:
            check_request(request, self.store.get(request.get("model")))
        except StepwiseError as exc:
            return exc
        return None

    @bentoml.api
    async def stream(self, request: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        """One request's server-sent events, decoded in a thread (see the module docstring).

        Bytes, not str: BentoML's client decodes each chunk it receives on its own, and a chunk
        may end inside a UTF-8 character. Closing this generator (the entry service's relay does
        when its client leaves) makes the thread's next ``emit`` raise ``StreamClosed``.
        """
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[bytes | None] = asyncio.Queue()
        closed = threading.Event()
        tokens_sent = 0

        def put(item: bytes | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody to tell
                closed.set()

        def emit(event: str, data: dict[str, Any]) -> None:
            nonlocal tokens_sent
            if closed.is_set():
                raise StreamClosed
            tokens_sent += event == "token"
            put(server_sent_event(event, data))

        def decode() -> None:
            try:
                loaded = self.store.get(request.get("model"))
                check_request(request, loaded)  # again: the default model may have been swapped since
                result = translate_stream(loaded, request, emit)
                encode_attention([result], request.get("attention_format", "json"))
                result["timings"]["total_ms"] = round((time.perf_counter() - started) * 1000, 3)
                emit("done", result)
            except StreamClosed:
                log.info("stream closed by its client after %d token event(s); decoding stopped", tokens_sent)
            except StepwiseError as exc:
                put(server_sent_event("error", {"error": str(exc)}))
            except Exception:  # noqa: BLE001 - the stream reports it; the log has the traceback
                log.exception("stream failed")
                put(server_sent_event("error", {"error": "translation failed; see the server log"}))
            finally:
                put(None)

        threading.Thread(target=decode, daemon=True, name="stream-decode").start()
        try:
            while (item := await events.get()) is not None:
                yield item
        finally:  # finished, or closed/cancelled because the reader left
            closed.set()

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return self.store.describe()

    @bentoml.api
    def reload(self) -> Any:
        try:
            return self.store.reload()
        except StepwiseError as exc:
            return exc


# -- the HTTP side ---------------------------------------------------------------------------------
async def _call_runner(method: Any, *args: Any) -> Any:
    """Call the runner, retrying a connection the runner closed while idle (keep-alive race).

    Translation is idempotent, so a request that never reached the runner is safe to resend.
    """
    import aiohttp

    for attempt in range(3):
        try:
            return await method(*args)
        except (aiohttp.ClientConnectionError, aiohttp.ClientOSError, aiohttp.ClientPayloadError,
                ConnectionError, RuntimeError) as exc:
            # aiohttp reports a connection closed while the body is read as RuntimeError
            if attempt == 2 or (isinstance(exc, RuntimeError) and "Connection closed" not in str(exc)):
                raise
            log.info("runner connection dropped (%s); retrying", type(exc).__name__)
    raise AssertionError("unreachable")


def server_sent_event(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its name and its data as one line of JSON."""
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


async def _relay(events: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """Pass the runner's events on; end with an ``error`` event if the runner's connection breaks.

    A task of its own reads the runner. When the client leaves, Starlette cancels this generator
    inside an anyio cancel scope, which cancels every later await in it too: closing the runner's
    connection from here was cut short, and the runner was left writing into a connection nobody
    read. The reader task is cancelled once, plainly, so its close of the runner's stream runs to
    the end; the runner then sees its client gone and the search stops.
    """
    chunks: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(maxsize=16)

    async def read() -> None:
        try:
            async for chunk in events:
                await chunks.put(chunk)
            await chunks.put(None)
        except Exception as exc:  # noqa: BLE001 - handed to the relay, which reports it in the stream
            await chunks.put(exc)
        finally:
            await events.aclose()

    reader = asyncio.create_task(read())
    try:
        while (item := await chunks.get()) is not None:
            if isinstance(item, Exception):
                log.warning("stream from the runner broke: %s", item)
                yield server_sent_event("error", {"error": f"the translation stream broke ({type(item).__name__})"})
                return
            yield item
    finally:
        reader.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([reader])


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


async def _model_info(_: Request) -> JSONResponse:
    """``GET /info/model``: the same answer as ``POST /model``, for browsers and curl."""
    service = bentoml.get_current_service()
    return JSONResponse(await service.runner.to_async.describe())


info_app = Starlette(routes=[Route("/model", _model_info, methods=["GET"])])


@bentoml.asgi_app(info_app, path="/info")
@bentoml.service(name="stepwise", traffic={"timeout": 300}, workers=1)
class Translator:
    """The HTTP entry point: the schemas, then the runner, then the status mapping."""

    runner = bentoml.depends(TranslationRunner)

    @bentoml.api(route="/translate", input_spec=TranslateRequest, output_spec=TranslationResult)
    async def translate(self, **request: Any) -> Response:
        """Translate one sentence; attention as ``[layer][head][query][key]`` for the kinds asked."""
        started = time.perf_counter()
        attention_format = request.pop("attention_format", "json")
        results = await _call_runner(self.runner.to_async.run, [request])
        return _respond(results, started, single=True, attention_format=attention_format)

    @bentoml.api(route="/translate_batch", input_spec=TranslateBatchRequest, output_spec=TranslationResults)
    async def translate_batch(self, **request: Any) -> Response:
        """Translate several sentences with the same options; one result per text."""
        started = time.perf_counter()
        texts = request.pop("texts")
        attention_format = request.pop("attention_format", "json")
        results = await _call_runner(self.runner.to_async.run, [{**request, "text": text} for text in texts])
        return _respond(results, started, single=False, attention_format=attention_format)

    @bentoml.api(route="/translate_stream", input_spec=TranslateRequest)
    async def translate_stream(self, **request: Any) -> EventStream:
        """Translate one sentence as server-sent events: ``token`` (and ``replace``) events, then ``done``.

        The body is ``/translate``'s; ``done`` carries ``/translate``'s answer. A request that
        fails the check against its model is a JSON 4xx before any event is sent.
        """
        problem = await _call_runner(self.runner.to_async.check, request)
        if problem is not None:
            return error_response(problem)  # type: ignore[return-value]
        events = _relay(self.runner.to_async.stream(request))
        return StreamingResponse(events, media_type="text/event-stream",  # type: ignore[return-value]
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @bentoml.api(route="/model")
    async def model(self) -> dict[str, Any]:
        """What is loaded: manifest, registry identity and state, execution provider, load time."""
        return await _call_runner(self.runner.to_async.describe)

    @bentoml.api(route="/reload")
    async def reload(self) -> Any:
        """Re-resolve ``production`` (or re-read STEPWISE_MODEL_DIR) and swap if it changed.

        With the registry unreachable: a 503, and the current model keeps serving.
        """
        outcome = await self.runner.to_async.reload()
        return error_response(outcome) if isinstance(outcome, StepwiseError) else outcome
