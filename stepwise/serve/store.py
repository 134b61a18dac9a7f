"""What the BentoML service holds and does: loaded ONNX exports, and translation with them.

``ModelStore`` keeps the default model (``STEPWISE_MODEL_DIR``, or the registry's
``production`` version) plus others asked for by tag or id in an LRU cache bounded by count and
by bytes (``STEPWISE_MODEL_CACHE``, :func:`model_cache_limits`), and swaps the default
atomically on :meth:`ModelStore.reload` when the ``production`` tag has moved. In-flight work
keeps the translator it started with, so nothing is dropped during a swap. When the registry
cannot be reached (at a reload, a periodic check or a lookup), the store keeps what it has and
remembers since when the registry has been unreachable; :meth:`ModelStore.describe` says so.

:func:`serve_batch` is what the service's decoding thread runs for each batch of requests
(:mod:`stepwise.serve.batching` forms the batches): each request is checked against the model that
will run it (:func:`check_request`), then :func:`translate` turns the requests into JSON-ready
results; on request it splits a paragraph into sentences (:mod:`stepwise.serve.sentences`) and adds
word alignments (:mod:`stepwise.serve.alignment`). A streamed request decodes in the same batch as the
others and is told each target token (and its cross-attention row) as the search finds it. The
request limits are defined here, once.

This module imports no torch, and the service never exports: a version is served from the ONNX
export registered beside it (training registers one at each save; ``stepwise export --model-id``
makes one for an older version), and a version without one is a 404 on the ``model`` field.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stepwise.decode.onnx_runtime import (
    EXPORT_FORMAT,
    TOP_K,
    OnnxTranslator,
    Translation,
    export_format,
    head_mask_from_pairs,
)
from stepwise.decode.search import Progress
from stepwise.errors import ConfigError, ExportError, InvalidRequest, ModelNotFound, RegistryUnavailable, StepwiseError
from stepwise.registry import tracking
from stepwise.serve import alignment, attention_codec
from stepwise.serve.sentences import DEFAULT_LANGUAGE, split_sentences

log = logging.getLogger(__name__)

# -- request limits (the service's schemas and the check against the model use these) ----------
MAX_TEXT_CHARS = int(os.environ.get("STEPWISE_MAX_TEXT_CHARS", "2000"))  # characters per sentence
MAX_BATCH_TEXTS = int(os.environ.get("STEPWISE_MAX_BATCH_TEXTS", "64"))  # sentences per /translate_batch
MAX_OUTPUT_TOKENS = 1024  # most target tokens a request may ask for (the model's positions cut it further)
MAX_BEAM_SIZE = TOP_K  # the exporter's top-K: the widest beam a decoder graph supports
DECODE_BATCH = 64  # sentences decoded together (and most requests the service's queue merges into one batch)
ATTENTION_KINDS = {"none": (), "cross": ("cross",), "all": ("encoder", "decoder", "cross")}
ATTENTION_FORMATS = attention_codec.FORMATS  # how a response carries attention ("json": nested lists)

MODEL_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_CACHE_DEFAULT = "3,2GB"  # versions besides the default model, and their ONNX files' bytes
_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def model_cache_limits(value: str | None) -> tuple[int, int]:
    """``STEPWISE_MODEL_CACHE`` as (most versions, most bytes): ``"5"``, ``"5,2GB"``, ``"3,512MiB"``.

    The count comes first; the optional size is a number with an optional unit (B, KB, MB, GB,
    TB decimal; KiB, MiB, GiB, TiB binary). A missing size keeps the default's. Bytes are the sizes
    of a version's ONNX files on disk (``*.onnx*`` in its export directory), not measured memory.

    Raises:
        ConfigError: the value is not of that form (the message names the variable).
    """
    default_count, default_bytes = 3, 2 * 10**9
    if value is None or not value.strip():
        return default_count, default_bytes
    match = re.fullmatch(r"\s*(\d+)\s*(?:,\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*)?", value)
    unit = (match.group(3) or "").upper() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise ConfigError(f"STEPWISE_MODEL_CACHE={value!r}: expected COUNT or COUNT,SIZE (e.g. \"5,2GB\"; "
                          "units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    count = int(match.group(1))
    size = int(float(match.group(2)) * _BYTE_UNITS[unit]) if match.group(2) else default_bytes
    return count, size


def export_bytes(export_dir: Path) -> int:
    """The sizes of an export's ONNX files (graphs and any external weights), what the cache counts."""
    return sum(path.stat().st_size for path in export_dir.glob("*.onnx*") if path.is_file())


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class LoadedModel:
    """A translator plus who it is in the registry."""

    translator: OnnxTranslator
    id: str
    name: str
    tags: list[str]
    export_dir: Path
    loaded_at: float
    size_bytes: int = 0  # its ONNX files on disk (export_bytes)

    def identity(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "tags": self.tags}

    def layer_counts(self) -> dict[str, int]:
        """Layers per attention kind: the encoder may be deeper or shallower than the decoder."""
        model = self.translator.manifest.get("config", {}).get("model", {})
        decoder = self.translator.n_layers
        return {"encoder": int(model.get("n_encoder_layers", decoder)), "decoder": decoder, "cross": decoder}

    def source_language(self) -> str:
        """The source side of the export's language pair (``de`` of ``de-en``): the splitter's rules."""
        pair = self.translator.manifest.get("config", {}).get("data", {}).get("language_pair") or ""
        return pair.split("-")[0] or DEFAULT_LANGUAGE


class ModelStore:
    """The default model and an LRU cache of others; see the module docstring."""

    def __init__(self, *, model_dir: str | None = None, project: str | None = None, name: str | None = None,
                 cache_size: int | None = None, cache_bytes: int | None = None, export_root: str | None = None,
                 device: str = "auto") -> None:
        self.model_dir = model_dir if model_dir is not None else os.environ.get("STEPWISE_MODEL_DIR") or None
        self.project = project or os.environ.get("STEPWISE_PROJECT") or None
        self.name = name or os.environ.get("STEPWISE_MODEL_NAME") or None
        env_size, env_bytes = model_cache_limits(os.environ.get("STEPWISE_MODEL_CACHE"))
        self.cache_size = env_size if cache_size is None else cache_size  # versions besides the default
        self.cache_bytes = env_bytes if cache_bytes is None else cache_bytes  # their ONNX files' bytes
        self.device = device
        self.export_root = Path(export_root or os.environ.get("STEPWISE_EXPORT_CACHE") or
                                Path.home() / ".cache" / "stepwise" / "exports")
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self.registry_down_since: float | None = None  # when a registry call first failed (None: it answers)
        self.registry_error: str | None = None
        self.registry_checked_at: float | None = None
        self.default = self._load_default()

    # -- loading -----------------------------------------------------------------------------------
    def _from_dir(self, export_dir: Path, identity: dict[str, Any] | None = None) -> LoadedModel:
        """Load an export directory; a missing one is ModelNotFound, an unusable one ExportError."""
        if not export_dir.is_dir():
            raise ModelNotFound(f"export {export_dir}: no such directory")
        try:
            translator = OnnxTranslator(export_dir, device=self.device)
        except StepwiseError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT, SentencePiece and json each have their own kinds
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            message = f"export {export_dir}: cannot be loaded ({reason}); run `stepwise export` again"
            raise ExportError(message) from None
        source = translator.manifest.get("source_model", {})
        identity = identity or {"id": source.get("id") or export_dir.name, "name": translator.manifest.get("name"),
                                "tags": source.get("tags", [])}
        return LoadedModel(translator, identity["id"], identity["name"], list(identity["tags"]), export_dir,
                           time.time(), export_bytes(export_dir))

    def _load_default(self) -> LoadedModel:
        if self.model_dir:
            return self._from_dir(Path(self.model_dir))
        return self._from_registry("production")

    def _registry(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a ``stepwise.registry.client`` function, remembering whether the registry answered."""
        try:
            result = call(*args, **kwargs)
        except RegistryUnavailable as exc:
            if self.registry_down_since is None:
                self.registry_down_since = time.time()
                log.warning("registry unreachable, serving %s meanwhile: %s", self.default_id(), exc)
            self.registry_error = str(exc)
            raise
        if self.registry_down_since is not None:
            log.info("registry reachable again")
        self.registry_down_since, self.registry_error, self.registry_checked_at = None, None, time.time()
        return result

    def default_id(self) -> str | None:
        default = getattr(self, "default", None)
        return default.id if default is not None else None

    def _from_registry(self, spec: str) -> LoadedModel:
        """Load the registered ONNX export of the version named by a tag or an id.

        An export in the local export folder (``STEPWISE_EXPORT_CACHE/<version id>``, e.g. one
        ``stepwise export --model-id ID --out`` wrote there) serves too.

        Raises:
            ModelNotFound: no such version, or it has no export in the current format (the
                message says how to make one).
        """
        from stepwise.registry import client as registry

        if MODEL_ID.match(spec):
            version = self._registry(registry.get_version, spec)
        else:
            versions = self._registry(registry.list_versions, project=self.project, name=self.name, tag=spec)
            versions = [v for v in versions if registry.ONNX_TAG not in v.tags]
            if not versions:
                raise ModelNotFound(f"no registered version is tagged {spec!r}")
            version = versions[0]
        export = self._registry(registry.find_export, version.id)
        export_dir = self._registry(registry.download_export, export.id) if export is not None else None
        if export_dir is None or export_format(export_dir) != EXPORT_FORMAT:  # none, or an older exporter's
            export_dir = self.export_root / version.id
            if export_format(export_dir) != EXPORT_FORMAT:
                what = "no ONNX export" if export is None else f"no ONNX export in format {EXPORT_FORMAT}"
                raise ModelNotFound(f"version {version.id} has {what}: run `stepwise export --model-id {version.id}`",
                                    field="model")
        return self._from_dir(export_dir, {"id": version.id, "name": version.name, "tags": version.tags})

    # -- lookup ------------------------------------------------------------------------------------
    def get(self, spec: str | None) -> LoadedModel:
        """The default model for None/``production``/its id; otherwise a cached or newly loaded one.

        Raises:
            ModelNotFound: no such tag or id (``field`` is ``model``).
            RegistryUnavailable: the registry cannot be asked (``field`` is ``model``).
        """
        default = self.default
        if spec in (None, "", "default", "production", default.id):
            return default
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            if self.model_dir and not tracking.is_configured():
                raise ModelNotFound(f"model {spec!r}: only the model in STEPWISE_MODEL_DIR is available "
                                    "(no ClearML server configured)")
            loaded = self._from_registry(spec)
        except (ModelNotFound, RegistryUnavailable) as exc:
            exc.field = "model"
            raise
        self.remember(spec, loaded)
        return loaded

    def remember(self, spec: str, loaded: LoadedModel) -> None:
        """Cache a version just loaded; evict the least recently used beyond the count or bytes.

        The one just loaded stays even when it alone is over the byte limit (it is being used);
        the default model is not in this cache and is never evicted.
        """
        with self._lock:
            self._cache[spec] = loaded
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size or (len(self._cache) > 1
                                                         and self.cached_bytes() > self.cache_bytes):
                evicted, model = self._cache.popitem(last=False)  # a count of 0 keeps nothing besides the default
                log.info("model cache: evicted %s (%s, %d bytes)", evicted, model.id, model.size_bytes)
            log.info("model cache: loaded %s (%s, %d bytes); %d version(s), %d bytes cached", spec, loaded.id,
                     loaded.size_bytes, len(self._cache), self.cached_bytes())

    def cached_bytes(self) -> int:
        """The ONNX bytes of the cached versions (the default model not counted)."""
        return sum(model.size_bytes for model in self._cache.values())

    def reload(self) -> dict[str, Any]:
        """Re-resolve the default; swap it in if it changed. Returns what happened.

        Raises:
            RegistryUnavailable: the registry cannot be asked; the current model stays.
        """
        before = self.default
        if self.model_dir:
            fresh = self._from_dir(Path(self.model_dir))
            changed = fresh.translator.manifest != before.translator.manifest
        else:
            from stepwise.registry import client as registry

            versions = [v for v in self._registry(registry.list_versions, project=self.project, name=self.name,
                                                  tag="production") if registry.ONNX_TAG not in v.tags]
            if not versions:
                return {"changed": False, "model": before.identity(), "reason": "nothing is tagged production"}
            changed = versions[0].id != before.id
            fresh = self._from_registry(versions[0].id) if changed else before
        if changed:
            self.default = fresh  # one reference assignment: requests already running keep the old one
            log.info("default model swapped: %s -> %s", before.id, fresh.id)
        return {"changed": changed, "previous": before.identity(), "model": self.default.identity()}

    def describe(self) -> dict[str, Any]:
        """``/model``: the default model's manifest, provider and load time, the registry's state, cached ones."""
        default = self.default
        if self.model_dir:
            registry_state: dict[str, Any] = {"status": "not used (STEPWISE_MODEL_DIR)"}
        elif self.registry_down_since is not None:
            registry_state = {"status": "unreachable", "since": _utc(self.registry_down_since),
                              "error": self.registry_error,
                              "note": f"still serving {default.id}, loaded {_utc(default.loaded_at)}"}
        else:
            registry_state = {"status": "reachable",
                              "checked_at": _utc(self.registry_checked_at) if self.registry_checked_at else None}
        return {
            "model": default.identity(),
            "provider": default.translator.provider,
            "loaded_at": _utc(default.loaded_at),
            "export_dir": str(default.export_dir),
            "source": "STEPWISE_MODEL_DIR" if self.model_dir else "registry:production",
            "registry": registry_state,
            "manifest": default.translator.manifest,
            "layers": default.translator.n_layers, "heads": default.translator.n_heads,
            "encoder_layers": default.layer_counts()["encoder"], "max_beam_size": default.translator.top_k,
            "cached": [{**m.identity(), "bytes": m.size_bytes, "loaded_at": _utc(m.loaded_at)}
                       for m in self._cache.values()],
            "cache": {"versions": len(self._cache), "bytes": self.cached_bytes(), "max_versions": self.cache_size,
                      "max_bytes": self.cache_bytes, "default_bytes": default.size_bytes},
        }


# -- translation ----------------------------------------------------------------------------------
def check_request(request: dict[str, Any], loaded: LoadedModel) -> None:
    """The request's options against the model that will run it (the schema checked the rest).

    Raises:
        InvalidRequest: a beam wider than the export's top-K, or a layer or head the model lacks
            (``layers``, ``heads``, or a ``mask_heads`` pair).
    """
    translator = loaded.translator
    if request["beam_size"] > translator.top_k:
        raise InvalidRequest(f"{request['beam_size']} is wider than this model's export supports "
                             f"({translator.top_k})", field="beam_size")
    counts = loaded.layer_counts()
    for index in request.get("layers") or []:
        for kind in ATTENTION_KINDS[request["attention"]]:
            if index >= counts[kind]:
                raise InvalidRequest(f"index {index} out of range ({kind} attention has {counts[kind]} layers)",
                                     field="layers")
    bad_heads = [i for i in request.get("heads") or [] if i >= translator.n_heads]
    if bad_heads:
        raise InvalidRequest(f"index {bad_heads[0]} out of range (the model has {translator.n_heads} heads)",
                             field="heads")
    for kind, pairs in (request.get("mask_heads") or {}).items():
        for layer, head in pairs:
            if layer >= counts[kind] or head >= translator.n_heads:
                raise InvalidRequest(f"{kind} [{layer}, {head}] out of range ({kind} attention has {counts[kind]} "
                                     f"layers of {translator.n_heads} heads)", field="mask_heads")
    _check_alignment(request, counts["cross"], translator.n_heads)


def _check_alignment(request: dict[str, Any], layers: int, heads: int) -> None:
    """``alignment_layer``/``alignment_head``: in range, and only with an alignment asked for."""
    for field, count, what in (("alignment_layer", layers, "cross-attention layers"),
                               ("alignment_head", heads, "heads")):
        value = request.get(field)
        if value is None:
            continue
        if request.get("alignment", "none") == "none":
            raise InvalidRequest('only with alignment "soft" or "hard"', field=field)
        if value != alignment.AVERAGE and value >= count:
            raise InvalidRequest(f"index {value} out of range (the model has {count} {what})", field=field)


def mask_key(request: dict[str, Any]) -> tuple | None:
    """The heads a request switches off, as a hashable key (None: none off, the plain model)."""
    pairs = request.get("mask_heads") or {}
    key = tuple(sorted((kind, tuple(sorted({(int(layer), int(head)) for layer, head in listed})))
                       for kind, listed in pairs.items() if listed))
    return key or None


def serve_batch(store: ModelStore, jobs: Sequence[Job]) -> list[dict[str, Any] | StepwiseError | None]:
    """What the service's decoding thread runs for each batch (:class:`stepwise.serve.batching.BatchQueue`).

    Each job is checked against the model that will run it (:func:`check_request`), then the jobs
    are translated per model (:func:`translate`). One result per job, in order: its answer, the
    ``stepwise.errors`` exception it failed with (the others still decode), or None for a stream
    whose reader left. ``timings.requests_in_batch`` counts the jobs of the batch.
    """
    log.info("translating a batch of %d request(s)", len(jobs))
    results: list[dict[str, Any] | StepwiseError | None] = [None] * len(jobs)
    by_model: dict[str, tuple[LoadedModel, list[int]]] = {}
    for i, job in enumerate(jobs):
        try:
            loaded = store.get(job.request.get("model"))
            check_request(job.request, loaded)
        except StepwiseError as exc:
            results[i] = exc
            continue
        by_model.setdefault(loaded.id, (loaded, []))[1].append(i)
    for loaded, members in by_model.values():
        answers = translate(loaded, [jobs[i].request for i in members], [jobs[i].emit for i in members])
        for i, answer in zip(members, answers, strict=True):
            if answer is not None:
                answer["timings"]["requests_in_batch"] = len(jobs)
            results[i] = answer
    return results


@dataclass
class Job:
    """One request for the decoding thread; ``emit`` set for a stream (see :func:`translate`)."""

    request: dict[str, Any]
    emit: Emit | None = None


def translate(loaded: LoadedModel, requests: list[dict[str, Any]],
              emits: Sequence[Emit | None] | None = None) -> list[dict[str, Any] | None]:
    """Translate checked requests with one model; those that share search settings decode together.

    With ``split: "sentences"`` a request's text is cut into sentences first; all the sentences
    of a group go to the translator in one call (one batch up to ``DECODE_BATCH``). A text that
    is one sentence is translated as it came, so its answer is the unsplit one.
    The head mask is part of the settings: requests switching off different heads (``mask_heads``)
    run as separate batches, each graph run with its own ``[L, H]`` masks.

    A request with an ``emit`` (``emits[i]``, a stream) decodes in the same batch as the others
    and is told its tokens as the search finds them, ``emit(event, data)``:

    * ``start``: ``{"sentences": [{"source": text, "source_tokens": [...]}, ...]}``, before the
      first step: what will be translated (one sentence, or a split paragraph's), so a reader
      can label the attention rows that follow.
    * ``token``: ``{"index": i, "token": piece, "id": id, "sentence": j, "cross_attention": row}``,
      the target token at position ``i`` of the answer's ``target_tokens``; ``sentence`` is the
      sentence of a split paragraph it belongs to (0 otherwise); ``cross_attention`` (only when
      ``attention`` is ``cross`` or ``all``) is that position's row ``[layer][head][source]``
      over the sentence's own source tokens, the ``layers``/``heads`` asked for, in
      ``attention_format`` (nested lists, or a compact object of :mod:`stepwise.serve.attention_codec`).
    * ``replace``: ``{"from": i}``, beam search only: the best hypothesis so far (the one the
      search would return if it stopped now) has parted from what was sent at position ``i``;
      the reader drops its tokens from ``i`` on, and ``token`` events from ``i`` follow. Greedy
      search never replaces.

    A split paragraph's sentences are streamed in order, a sentence once the ones before it are
    finished. The answer (what the caller sends as the stream's last event) is the one
    ``/translate`` gives for the same request. When an ``emit`` raises :class:`StreamClosed` (its
    reader left), that stream gets no more events and its answer is None; when every request of
    a search has left, the search stops at that step.
    """
    emits = list(emits) if emits is not None else [None] * len(requests)
    results: list[dict[str, Any] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        settings = (request["beam_size"], request.get("max_length"), _needs_attention(request), mask_key(request))
        groups[settings].append(i)
    translator = loaded.translator
    for (beam_size, max_length, need_attention, masked), members in groups.items():
        head_mask = _head_mask(loaded, masked)
        texts = {i: _sentences(loaded, requests[i]) for i in members}
        flat = [(i, text) for i in members for text in texts[i]]
        follow = _Streams(loaded, requests, texts, emits, members)
        try:
            outputs = translator.translate([text for _, text in flat], beam_size=beam_size, max_length=max_length,
                                           return_attention=need_attention, batch_size=DECODE_BATCH,
                                           head_mask=head_mask, on_step=follow if follow.followers else None)
        except StreamClosed:  # every request of this search was a stream whose reader left
            continue
        by_request: dict[int, list[Translation]] = defaultdict(list)
        for (i, _), out in zip(flat, outputs, strict=True):
            by_request[i].append(out)
        for i in members:
            if i not in follow.left:
                results[i] = _result(loaded, requests[i], texts[i], by_request[i])
    return results


def _needs_attention(request: dict[str, Any]) -> bool:
    """Whether the search must record attention: some is returned, or an alignment is made of it."""
    return request["attention"] != "none" or request.get("alignment", "none") != "none"


def _head_mask(loaded: LoadedModel, masked: tuple | None) -> dict[str, np.ndarray] | None:
    """A :func:`mask_key` as the translator's ``[L, H]`` masks (None: no head switched off)."""
    if masked is None:
        return None
    translator = loaded.translator
    return head_mask_from_pairs({kind: [list(pair) for pair in pairs] for kind, pairs in masked},
                                translator.layers, translator.n_heads)


class StreamClosed(Exception):  # noqa: N818 - control flow, not an error: the stream's reader left
    """Raised by a stream's ``emit`` when nobody reads the stream any more."""


Emit = Callable[[str, dict[str, Any]], None]


class _Streams:
    """The ``on_step`` of one search: hands each stream of it its own sentences' progress.

    ``texts`` are each member's sentences; the search numbers the flattened list of them, member
    by member. Sends every stream its ``start`` event when built.
    """

    def __init__(self, loaded: LoadedModel, requests: list[dict[str, Any]], texts: dict[int, list[str]],
                 emits: list[Emit | None], members: list[int]) -> None:
        self.followers: dict[int, tuple[range, _Follower]] = {}
        self.left: set[int] = set()
        self._chunk: list[int] | None = None  # the search batch the mapping below is for
        self._batches: dict[int, dict[int, int]] = {}  # per member: its sentence -> number in progress
        self.all_streams = all(emits[i] is not None for i in members)
        translator = loaded.translator
        start = 0
        for i in members:
            count, emit = len(texts[i]), emits[i]
            if emit is not None:
                try:
                    emit("start", {"sentences": [{"source": text, "source_tokens": translator.tokenizer.pieces(
                        translator.encode_text(text))} for text in texts[i]]})
                    self.followers[i] = (range(start, start + count), _Follower(loaded, requests[i], count, emit))
                except StreamClosed:
                    self._leave(i, 0)
            start += count

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


class _Follower:
    """Turns each step's :class:`stepwise.decode.search.Progress` into ``token``/``replace`` events (see above)."""

    def __init__(self, loaded: LoadedModel, request: dict[str, Any], sentences: int, emit: Emit) -> None:
        self.pieces = loaded.translator.tokenizer.pieces
        self.request, self.emit, self.sentences = request, emit, sentences
        self.with_rows = request["attention"] in ("cross", "all")
        self.fmt = request.get("attention_format", "json")
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
                row = select_attention({"cross": rows[:, :, n]}, "cross", self.request.get("layers"),
                                       self.request.get("heads"))["cross"]
                data["cross_attention"] = row if self.fmt == "json" else attention_codec.encode(row, self.fmt)
            self.emit("token", data)
            sent.append(token_id)
            self.tokens_sent += 1


def _result(loaded: LoadedModel, request: dict[str, Any], texts: list[str], outs: list[Translation]) -> dict[str, Any]:
    """One request's answer from its translated sentences (one, or a split paragraph's)."""
    if len(outs) == 1:
        return {**_sentence_result(loaded, request, outs[0]), "model": loaded.identity(),
                "score": outs[0].score, "timings": dict(outs[0].timings)}
    sentences = [{"source": text, **_sentence_result(loaded, request, out), "score": out.score}
                 for text, out in zip(texts, outs, strict=True)]
    return {
        "translation": " ".join(out.translation for out in outs),
        "source_tokens": [t for out in outs for t in out.source_tokens],
        "target_tokens": [t for out in outs for t in out.target_tokens],
        "attention": {},  # per sentence: attention crosses no sentence boundary
        "model": loaded.identity(), "score": sum(out.score for out in outs),
        "timings": {"decode_ms": max(out.timings["decode_ms"] for out in outs),
                    "batch_size": max(out.timings["batch_size"] for out in outs)},
        "sentences": sentences,
    }


def _sentences(loaded: LoadedModel, request: dict[str, Any]) -> list[str]:
    """The texts to translate for one request: its sentences, or the text itself."""
    if request.get("split", "none") == "none":
        return [request["text"]]
    sentences = split_sentences(request["text"], loaded.source_language())
    return sentences if len(sentences) > 1 else [request["text"]]


def _sentence_result(loaded: LoadedModel, request: dict[str, Any], out: Translation) -> dict[str, Any]:
    """One translated sentence: text, tokens, the attention asked for, and its word alignment if asked."""
    result: dict[str, Any] = {
        "translation": out.translation, "source_tokens": out.source_tokens, "target_tokens": out.target_tokens,
        "attention": select_attention(out.attention, request["attention"], request.get("layers"),
                                      request.get("heads")),
    }
    if request.get("alignment", "none") != "none":
        result["alignment"] = word_alignment(loaded, request, out)
    return result


def word_alignment(loaded: LoadedModel, request: dict[str, Any], out: Translation) -> dict[str, Any]:
    """``alignment``: the words of both sides, which layer/head aligned, and ``soft`` or ``hard``.

    ``soft`` is ``[target word][source word]`` with rows summing to 1 (EOS dropped, rows
    renormalised; see :mod:`stepwise.serve.alignment`); ``hard`` is a Pharaoh line ``"i-j ..."``.
    """
    layer = request.get("alignment_layer")
    layer = alignment.DEFAULT_LAYER if layer is None else layer
    head = request.get("alignment_head")
    head = alignment.DEFAULT_HEAD if head is None else head
    eos = loaded.translator.tokenizer.pieces([loaded.translator.tokenizer.eos_id])[0]
    assert out.attention is not None  # decoded with attention whenever an alignment is asked for
    words = alignment.word_alignment(alignment.attention_source(out.attention["cross"], layer, head),
                                     out.source_tokens, out.target_tokens, eos=eos)
    result: dict[str, Any] = {"source_words": words.source_words, "target_words": words.target_words,
                              "layer": layer, "head": head}
    if request["alignment"] == "soft":
        result["soft"] = np.round(words.soft, 5).astype(np.float32)
    else:
        result["hard"] = words.pharaoh()
    return result


def select_attention(
    attention: dict[str, np.ndarray] | None, kinds: str, layers: list[int] | None, heads: list[int] | None,
) -> dict[str, np.ndarray]:
    """Pick the kinds asked for (``none``, ``cross``, ``all``) and optional layer/head subsets.

    The indices were checked by :func:`check_request`. Returned as float32 arrays
    ``[layer][head][query][key]`` rounded to 5 decimals (shorter JSON); they stay arrays until the
    response is written and become nested JSON lists once, in :func:`json_bytes` (or a compact
    object, :func:`encode_attention`).
    """
    if attention is None:
        return {}
    result = {}
    for kind in ATTENTION_KINDS[kinds]:
        weights = attention[kind]
        if layers is not None:
            weights = weights[layers]
        if heads is not None:
            weights = weights[:, heads]
        result[kind] = np.round(weights, 5).astype(np.float32)
    return result


def encode_attention(results: list[dict[str, Any]], fmt: str) -> None:
    """The response encoding's attention step: each result's arrays in ``fmt`` (``json`` keeps them).

    ``float16`` and ``uint10`` replace each kind's array with a compact base64 object
    (:mod:`stepwise.serve.attention_codec`); :func:`json_bytes` then writes the rest as before.
    """
    if fmt == "json":
        return
    for result in results:
        for part in (result, *result.get("sentences", ())):  # a split paragraph carries attention per sentence
            part["attention"] = attention_codec.encode_all(part["attention"], fmt)


def json_bytes(value: Any) -> bytes:
    """JSON for a response, numpy arrays as nested lists (orjson: ~10x faster than ``json``)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
