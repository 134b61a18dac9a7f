"""The models the BentoML service holds: loaded ONNX exports, the default one and a cache of others.

``ModelStore`` keeps the default model (``STEPWISE_MODEL_DIR``, or the registry's
``production`` version) plus others asked for by tag or id in an LRU cache bounded by count and
by bytes (``STEPWISE_MODEL_CACHE``, :func:`model_cache_limits`), and swaps the default
atomically on :meth:`ModelStore.reload` when the ``production`` tag has moved. In-flight work
keeps the translator it started with, so nothing is dropped during a swap. When the registry
cannot be reached (at a reload, a periodic check or a lookup), the store keeps what it has and
remembers since when the registry has been unreachable; :meth:`ModelStore.describe` says so.
Translating with a loaded model is :mod:`stepwise.serve.translation`'s.

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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.decode.onnx_runtime import EXPORT_FORMAT, OnnxTranslator, export_format
from stepwise.errors import ConfigError, ExportError, ModelNotFound, RegistryUnavailable, StepwiseError
from stepwise.registry import tracking
from stepwise.serve import alignment
from stepwise.serve.options import limits
from stepwise.serve.sentences import DEFAULT_LANGUAGE

log = logging.getLogger(__name__)

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

    def alignment_reading(self) -> alignment.Reading:
        """Which cross-attention aligns words by default: what the version's metadata (in the export's
        manifest, ``source_model.metadata``) records training measured best, else the fallback."""
        metadata = self.translator.manifest.get("source_model", {}).get("metadata")
        return alignment.default_reading(metadata, self.translator.n_layers, self.translator.n_heads)

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
        """``/model``: the default model's manifest, provider and load time, the registry's state, cached
        ones, its default alignment reading (``alignment``: layer, head, the gold-set AER measured
        with it, and whether it comes from the version's metadata or is the fallback), and every
        request limit (``limits``; ``max_beam_size`` is the default model's own)."""
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
            "alignment": default.alignment_reading().to_dict(),
            "limits": limits(),
            "cached": [{**m.identity(), "bytes": m.size_bytes, "loaded_at": _utc(m.loaded_at)}
                       for m in self._cache.values()],
            "cache": {"versions": len(self._cache), "bytes": self.cached_bytes(), "max_versions": self.cache_size,
                      "max_bytes": self.cache_bytes, "default_bytes": default.size_bytes},
        }

