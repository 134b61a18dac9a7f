"""The stepwise translation service: ``bentoml serve`` from the repository root.

One BentoML service, ``Translator`` (port 3000 by default): it validates flat JSON bodies
against the schemas below and answers ``POST /translate``, ``POST /translate_batch``,
``POST /translate_stream``, ``POST /score``, ``POST /model`` (also ``GET /info/model``) and ``POST /reload``,
plus BentoML's ``/readyz``, ``/livez`` and ``/metrics``. It owns the models
(``stepwise.serve.store.ModelStore``) and decodes in the same process: every translation request
joins one queue (``stepwise.serve.batching.BatchQueue``), whose thread decodes the requests that
arrived while the last batch decoded as the next batch (adaptive batching, continuous form;
``STEPWISE_ADAPTIVE_BATCHING=0`` decodes them one at a time, only to measure it). A request's
options (``stepwise.serve.options``: the schema, the limits, the check against the model) become
one ``TranslateOptions`` here, which travels with the request to the search
(``stepwise.serve.translation``), the stream events (``stepwise.serve.streams``) and the shaping
of the answer (``stepwise.serve.responses``). An earlier design decoded in a second BentoML service
behind the first: that hop (HTTP, pickling, the batching dispatcher) cost ~3 ms a request, a
fifth of a sentence's decoding time (``bench/results/serve-cpu.md``).

``POST /translate_stream`` takes ``/translate``'s body and answers server-sent events
(``text/event-stream``) as the search decodes: ``event: start`` (the sentences and their source
tokens), ``event: token`` per target token (with its cross-attention row when asked),
``event: replace`` when a beam's best hypothesis changes its mind (``stepwise.serve.streams``
defines them), then one ``event: done`` whose data is what ``/translate`` answers for the same
request (only the ``timings`` differ), or ``event: error`` with ``{"error": message}`` if decoding
fails midway. A request that fails its checks is a normal JSON 4xx before any event. A stream
decodes in the same batches as every other request; when its client disconnects, its next event
finds nobody reading, it gets no more, and a search that only it (or only streams whose readers
left) was waiting for stops at that step.

``POST /score`` takes a source and a given ``translation`` with ``/translate``'s answer options
(not the search's ``beam_size``/``max_length``) and teacher-forces the translation through the
export's scorer graph: the answer is shaped as ``/translate``'s, plus ``log_probs`` per target
token, with ``score`` their sum. It joins the same queue as the translations.

Which model: ``STEPWISE_MODEL_DIR`` (an export directory from ``stepwise export``) or, when it is
unset, the registry's ``production`` version resolved through ClearML at start-up (its ONNX
export is pulled, or made by running the exporter). ``POST /reload`` (or a periodic check every
``STEPWISE_RELOAD_INTERVAL`` seconds) swaps in a new ``production`` version without dropping
in-flight requests. ONNX Runtime runs on CUDA when ``onnxruntime-gpu`` sees a GPU, else on CPU;
threads come from ``STEPWISE_ORT_THREADS`` (default: all cores). No torch is imported here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from functools import partial
from typing import Annotated, Any, Literal

import anyio
import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field, RootModel, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from stepwise.errors import DeviceUnavailable, InvalidRequest, ModelNotFound, RegistryUnavailable, StepwiseError
from stepwise.serve.batching import BatchQueue
from stepwise.serve.options import (
    DECODE_BATCH,
    MAX_BATCH_TEXTS,
    MAX_TEXT_CHARS,
    AnswerOptionsSchema,
    OptionsSchema,
    TranslateOptions,
    check_request,
)
from stepwise.serve.responses import as_error, finish, json_bytes
from stepwise.serve.store import ModelStore, model_cache_limits
from stepwise.serve.streams import ServerSentEvents
from stepwise.serve.translation import Job, serve_batch

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
# the schema's "not empty or whitespace": a character str.isspace refuses, the same in every regex
# dialect (ECMA's and Rust's \s leave out U+001C-U+001F, which Python counts as space); the
# validators below check it too
NOT_BLANK = r"[^\s\u001c-\u001f]"
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NOT_BLANK)]


def _not_blank(text: str, where: str = "") -> str:
    if not text.strip():
        raise ValueError(f"{where}must not be empty or whitespace")
    return text


class TranslateRequest(OptionsSchema, bentoml.IODescriptor):
    """``POST /translate``."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NOT_BLANK,
                      description="the sentence to translate")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _not_blank(value)


class TranslateBatchRequest(OptionsSchema, bentoml.IODescriptor):
    """``POST /translate_batch``."""

    texts: list[Text] = Field(min_length=1, max_length=MAX_BATCH_TEXTS, description="sentences to translate")

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            _not_blank(text, f"item {i} ")
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"item {i} is longer than {MAX_TEXT_CHARS} characters")
        return value


class ScoreRequest(AnswerOptionsSchema, bentoml.IODescriptor):
    """``POST /score``: a source and a given translation of it, teacher-forced."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NOT_BLANK, description="the source sentence")
    translation: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NOT_BLANK,
                             description="the translation to score (a reference, a post-edit, another system's)")

    @field_validator("text", "translation")
    @classmethod
    def _texts(cls, value: str) -> str:
        return _not_blank(value)


class ContributionsResult(BaseModel):
    """``contributions`` (when asked for): ALTI+ source and target contributions to each prediction."""

    source_share: list[float] = Field(description="per target token: the share of its prediction that came "
                                                  "from the source rather than the target prefix, in [0, 1]")
    source: list[float] = Field(description="per source token: its contribution, averaged over the target tokens")


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
    contributions: ContributionsResult | None = None
    log_probs: list[float] | None = None
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
    contributions: ContributionsResult | None = Field(default=None, description="only when asked for")
    sentences: list[SentenceResult] | None = Field(
        default=None, description='with split "sentences" and more than one sentence: each one, in order')


class ScoreResult(TranslationResult):
    """``/score``: the given translation teacher-forced, shaped as ``/translate`` shapes its own output."""

    log_probs: list[float] = Field(description="per target token (EOS last): its log-probability given the "
                                               "source and the tokens before it")
    score: float = Field(description="the sum of log_probs")


class TranslationResults(RootModel[list[TranslationResult]]):
    """``/translate_batch``: one result per text, in order."""


# ``/translate_stream``'s answer as its schema shows it (the method answers the Response itself)
EventStream = Annotated[str, ContentType("text/event-stream")]


# -- the HTTP side ---------------------------------------------------------------------------------
API_ROUTES = frozenset({"/translate", "/translate_batch", "/translate_stream", "/score", "/model", "/reload"})
JSON_TYPES = frozenset({"application/json"})


class JSONBodyOnly:
    """ASGI middleware: a POST to an API route whose body is not JSON is a 415 or 400 naming ``body``.

    BentoML would parse a ``multipart/form-data`` body (and fail with a 500 when its boundary is
    missing) or hand a malformed JSON body to its decoder; here such a request (or JSON that is
    not an object, which pydantic would refuse without naming a field) is answered before it
    gets there. A body without a ``Content-Type`` is read as JSON (as BentoML reads it); an
    empty body (``/model``, ``/reload``) and every valid JSON request pass unchanged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Check the body of a POST to an API route, then pass it on (replayed) or answer the error."""
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in API_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        content_type = headers.get("content-type")
        media_type = content_type.split(";", 1)[0].strip().lower() if content_type is not None else None
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = self._problem(media_type, body)
        if problem is not None:
            status, text = problem
            log.info("refused a %s body to %s: %s", media_type or "typeless", scope["path"], text)
            await JSONResponse({"error": f"body: {text}", "detail": [{"loc": ["body"], "msg": text}]},
                               status_code=status)(scope, receive, send)
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _problem(media_type: str | None, body: bytes) -> tuple[int, str] | None:
        """``(status, message)`` for a body the API does not take, or None."""
        if media_type is not None and media_type not in JSON_TYPES:
            return 415, f"Content-Type {media_type!r} is not supported: send the body as application/json"
        if body.strip():
            try:
                value = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                return 400, f"not valid JSON ({exc})"
            if not isinstance(value, dict):
                return 400, f"must be a JSON object of the request's fields, not {type(value).__name__}"
        return None


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


def _respond(results: list[Any], options: TranslateOptions, started: float, *, single: bool) -> Response:
    """The first failed request's error, or the answers made ready (:func:`finish`) as JSON."""
    for result in results:
        if isinstance(result, StepwiseError):
            return error_response(result)
    finish(results, options, started)
    return Response(json_bytes(results[0] if single else results), media_type="application/json")


async def _outcomes(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Each queued request's answer, or the ``stepwise.errors`` exception it failed with (``as_error``)."""
    return [as_error(outcome) for outcome in await asyncio.gather(*futures, return_exceptions=True)]


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

    def _check(self, options: TranslateOptions) -> StepwiseError | None:
        """A stream's check against its model before the first event (None: it may start)."""
        try:
            check_request(options, self.store.get(options.model))
        except StepwiseError as exc:
            return exc
        return None

    @bentoml.api(route="/translate", input_spec=TranslateRequest, output_spec=TranslationResult)
    async def translate(self, text: str, **options: Any) -> Response:
        """Translate one sentence; attention as ``[layer][head][query][key]`` for the kinds asked."""
        started = time.perf_counter()
        job = Job(text, TranslateOptions.from_schema(options))
        results = await _outcomes([self.queue.submit(job)])
        return _respond(results, job.options, started, single=True)

    @bentoml.api(route="/translate_batch", input_spec=TranslateBatchRequest, output_spec=TranslationResults)
    async def translate_batch(self, texts: list[str], **options: Any) -> Response:
        """Translate several sentences with the same options; one result per text."""
        started = time.perf_counter()
        shared = TranslateOptions.from_schema(options)
        results = await _outcomes([self.queue.submit(Job(text, shared)) for text in texts])
        return _respond(results, shared, started, single=False)

    @bentoml.api(route="/translate_stream", input_spec=TranslateRequest)
    async def translate_stream(self, text: str, **options: Any) -> EventStream:
        """Translate one sentence as server-sent events: ``token`` (and ``replace``) events, then ``done``.

        The body is ``/translate``'s; ``done`` carries ``/translate``'s answer. A request that
        fails the check against its model is a JSON 4xx before any event is sent.
        """
        started = time.perf_counter()
        job_options = TranslateOptions.from_schema(options)
        problem = await anyio.to_thread.run_sync(self._check, job_options)
        if problem is not None:
            return error_response(problem)  # type: ignore[return-value]
        stream = ServerSentEvents(job_options, started)
        self.queue.submit(Job(text, job_options, stream.emit)).add_done_callback(stream.finish)
        return StreamingResponse(stream.relay(), media_type="text/event-stream",  # type: ignore[return-value]
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @bentoml.api(route="/score", input_spec=ScoreRequest, output_spec=ScoreResult)
    async def score(self, text: str, translation: str, **options: Any) -> Response:
        """Teacher-force a given translation: its tokens' log-probabilities, total, attention and the rest."""
        started = time.perf_counter()
        job = Job(text, TranslateOptions.from_schema({**options, "beam_size": 1, "max_length": None}),
                  translation=translation)
        results = await _outcomes([self.queue.submit(job)])
        return _respond(results, job.options, started, single=True)

    @bentoml.api(route="/model")
    async def model(self) -> dict[str, Any]:
        """What is loaded: manifest, registry identity and state, execution provider, load time, limits."""
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


Translator.add_asgi_middleware(JSONBodyOnly)
