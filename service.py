"""The stepwise translation service: ``bentoml serve`` from the repository root.

Two BentoML services in one ``bentoml serve``:

* ``Translator`` (the entry point, port 3000 by default) validates flat JSON bodies and
  answers ``POST /translate``, ``POST /translate_batch``, ``POST /model`` (also
  ``GET /info/model``) and ``POST /reload``, plus BentoML's ``/readyz``, ``/livez`` and
  ``/metrics``. Bad input is a 400 whose body names the field (pydantic's ``loc``).
* ``TranslationRunner`` owns the ONNX Runtime sessions. Its ``run`` method is batchable, so
  BentoML's adaptive batching merges concurrent requests into one decoding batch.

Which model: ``STEPWISE_MODEL_DIR`` (an export directory from ``stepwise export``) or, when it is
unset, the registry's ``production`` version resolved through ClearML at start-up (its ONNX
export is pulled, or made by running the exporter). ``POST /reload`` (or a periodic check every
``STEPWISE_RELOAD_INTERVAL`` seconds) swaps in a new ``production`` version without dropping
in-flight requests. ONNX Runtime runs on CUDA when ``onnxruntime-gpu`` sees a GPU, else on CPU;
threads come from ``STEPWISE_ORT_THREADS`` (default: all cores). No torch is imported here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Literal

import bentoml
from pydantic import ConfigDict, Field, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stepwise.serving import ModelNotFound, ModelStore, json_bytes, select_attention

MAX_TEXT_CHARS = int(os.environ.get("STEPWISE_MAX_TEXT_CHARS", "2000"))
MAX_BATCH_TEXTS = int(os.environ.get("STEPWISE_MAX_BATCH_TEXTS", "64"))
RELOAD_INTERVAL = float(os.environ.get("STEPWISE_RELOAD_INTERVAL", "0"))
ADAPTIVE_BATCHING = os.environ.get("STEPWISE_ADAPTIVE_BATCHING", "1") != "0"  # off only to measure it

log = logging.getLogger("stepwise.service")
logging.getLogger("stepwise").setLevel(logging.INFO)  # BentoML's handlers print it into the server log


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or whitespace")
    return text


class _Options(bentoml.IODescriptor):
    """Options shared by both translation endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    beam_size: int = Field(default=1, ge=1, le=8, description="1 = greedy search")
    max_length: int | None = Field(default=None, ge=1, le=1024, description="most target tokens")
    attention: Literal["none", "cross", "all"] = Field(default="cross", description="attention kinds to return")
    layers: list[int] | None = Field(default=None, description="only these layers (0-based)")
    heads: list[int] | None = Field(default=None, description="only these heads (0-based)")
    model: str | None = Field(default=None, description="a registry tag or version id (default: production)")

    @field_validator("layers", "heads")
    @classmethod
    def _indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(i < 0 for i in value)):
            raise ValueError("must be a non-empty list of indices >= 0")
        return value


class TranslateRequest(_Options):
    """``POST /translate``."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the sentence to translate")

    _text = field_validator("text")(classmethod(lambda cls, v: _not_blank(v)))


class TranslateBatchRequest(_Options):
    """``POST /translate_batch``."""

    texts: list[str] = Field(min_length=1, max_length=MAX_BATCH_TEXTS, description="sentences to translate")

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"item {i} must not be empty or whitespace")
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"item {i} is longer than {MAX_TEXT_CHARS} characters")
        return value


# runner_connection: BentoML's client to this service replaces its connection pool every 100
# requests (and 5 minutes) by default, closing it under requests still in flight: under load that
# dropped answers every few seconds and, rarely, left one waiting until the traffic timeout.
@bentoml.service(name="stepwise-runner", workers=1, traffic={"timeout": 300},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9})
class TranslationRunner:
    """Holds the ONNX models; ``run`` is where adaptive batching happens."""

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
            except Exception as exc:  # noqa: BLE001 - keep serving the current model
                log.warning("periodic reload failed: %s", exc)

    @bentoml.api(batchable=ADAPTIVE_BATCHING, max_batch_size=64, max_latency_ms=30000)
    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Translate a batch of jobs; jobs that share model and search settings decode together."""
        log.info("translating a batch of %d request(s)", len(jobs))
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            key = (job.get("model"), job["beam_size"], job.get("max_length"), job["attention"] != "none")
            groups[key].append(i)
        for (spec, beam, max_length, need_attention), members in groups.items():
            try:
                loaded = self.store.get(spec)
            except ModelNotFound as exc:
                for i in members:
                    results[i] = {"error": str(exc), "field": "model", "status": 404}
                continue
            translator = loaded.translator
            valid = []
            for i in members:
                problem = _check_indices(jobs[i], translator.n_layers, translator.n_heads)
                if problem:
                    results[i] = {"error": problem[1], "field": problem[0], "status": 400}
                else:
                    valid.append(i)
            if not valid:
                continue
            limit = translator.max_positions - 1
            outputs = translator.translate([jobs[i]["text"] for i in valid], beam_size=beam,
                                           max_length=min(max_length, limit) if max_length else None,
                                           return_attention=need_attention, batch_size=64)
            for i, out in zip(valid, outputs, strict=True):
                job = jobs[i]
                results[i] = {
                    "translation": out.translation, "source_tokens": out.source_tokens,
                    "target_tokens": out.target_tokens,
                    "attention": select_attention(out.attention, job["attention"], job.get("layers"),
                                                  job.get("heads")),
                    "model": loaded.identity(), "score": out.score,
                    "timings": {**out.timings, "requests_in_batch": len(jobs)},
                }
        return results  # type: ignore[return-value]

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return self.store.describe()

    @bentoml.api
    def reload(self) -> dict[str, Any]:
        return self.store.reload()


def _check_indices(job: dict[str, Any], layers: int, heads: int) -> tuple[str, str] | None:
    for field, count in (("layers", layers), ("heads", heads)):
        bad = [i for i in job.get(field) or [] if i >= count]
        if bad:
            return field, f"{field}: index {bad[0]} out of range (the model has {count})"
    return None


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


def _error_response(results: list[dict[str, Any]]) -> JSONResponse | None:
    """The first failed job as a 4xx in the same shape as BentoML's validation errors."""
    for result in results:
        if "error" in result:
            message = result["error"]
            if not message.startswith(result["field"]):
                message = f"{result['field']}: {message}"
            return JSONResponse({"error": message, "detail": [{"loc": [result["field"]], "msg": message}]},
                                status_code=result["status"])
    return None


async def _model_info(_: Request) -> JSONResponse:
    """``GET /info/model``: the same answer as ``POST /model``, for browsers and curl."""
    service = bentoml.get_current_service()
    return JSONResponse(await service.runner.to_async.describe())


info_app = Starlette(routes=[Route("/model", _model_info, methods=["GET"])])


@bentoml.asgi_app(info_app, path="/info")
@bentoml.service(name="stepwise", traffic={"timeout": 300}, workers=1)
class Translator:
    """The HTTP entry point: validation, then the runner."""

    runner = bentoml.depends(TranslationRunner)

    @bentoml.api(route="/translate", input_spec=TranslateRequest)
    async def translate(self, **request: Any) -> dict[str, Any]:
        """Translate one sentence; attention as ``[layer][head][query][key]`` for the kinds asked."""
        started = time.perf_counter()
        (result,) = await _call_runner(self.runner.to_async.run, [request])
        if (error := _error_response([result])) is not None:
            return error  # type: ignore[return-value]
        result["timings"]["total_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return Response(json_bytes(result), media_type="application/json")  # type: ignore[return-value]

    @bentoml.api(route="/translate_batch", input_spec=TranslateBatchRequest)
    async def translate_batch(self, **request: Any) -> list[dict[str, Any]]:
        """Translate several sentences with the same options; one result per text."""
        started = time.perf_counter()
        texts = request.pop("texts")
        results = await _call_runner(self.runner.to_async.run, [{**request, "text": text} for text in texts])
        if (error := _error_response(results)) is not None:
            return error  # type: ignore[return-value]
        total = round((time.perf_counter() - started) * 1000, 3)
        for result in results:
            result["timings"]["total_ms"] = total
        return Response(json_bytes(results), media_type="application/json")  # type: ignore[return-value]

    @bentoml.api(route="/model")
    async def model(self) -> dict[str, Any]:
        """What is loaded: manifest, registry identity, execution provider, load time."""
        return await _call_runner(self.runner.to_async.describe)

    @bentoml.api(route="/reload")
    async def reload(self) -> dict[str, Any]:
        """Re-resolve ``production`` (or re-read STEPWISE_MODEL_DIR) and swap if it changed."""
        return await self.runner.to_async.reload()
