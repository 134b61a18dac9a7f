"""What the BentoML service holds: loaded ONNX exports, resolved from a folder or the registry.

``ModelStore`` keeps the default model (``STEPWISE_MODEL_DIR``, or the registry's
``production`` version) plus a few others asked for by tag or id (LRU), and swaps the default
atomically on :meth:`ModelStore.reload` when the ``production`` tag has moved. In-flight work
keeps the translator it started with, so nothing is dropped during a swap.

This module imports no torch: when a version has no ONNX export yet, the exporter runs in a
subprocess (``python -m stepwise export``), which needs torch installed.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stepwise import tracking
from stepwise.onnx_decoding import EXPORT_FORMAT, OnnxTranslator, export_format

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class LoadedModel:
    """A translator plus who it is in the registry."""

    translator: OnnxTranslator
    id: str
    name: str
    tags: list[str]
    export_dir: Path
    loaded_at: float

    def identity(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "tags": self.tags}


class ModelNotFound(LookupError):
    """A requested model (tag or id) is not in the registry or has no usable export."""


class ModelStore:
    """The default model and an LRU cache of others; see the module docstring."""

    def __init__(self, *, model_dir: str | None = None, project: str | None = None, name: str | None = None,
                 cache_size: int = 3, export_root: str | None = None, device: str = "auto") -> None:
        self.model_dir = model_dir if model_dir is not None else os.environ.get("STEPWISE_MODEL_DIR") or None
        self.project = project or os.environ.get("STEPWISE_PROJECT") or None
        self.name = name or os.environ.get("STEPWISE_MODEL_NAME") or None
        self.cache_size = cache_size
        self.device = device
        self.export_root = Path(export_root or os.environ.get("STEPWISE_EXPORT_CACHE") or
                                Path.home() / ".cache" / "stepwise" / "exports")
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self.default = self._load_default()

    # -- loading -----------------------------------------------------------------------------------
    def _from_dir(self, export_dir: Path, identity: dict[str, Any] | None = None) -> LoadedModel:
        translator = OnnxTranslator(export_dir, device=self.device)
        source = translator.manifest.get("source_model", {})
        identity = identity or {"id": source.get("id") or export_dir.name, "name": translator.manifest.get("name"),
                                "tags": source.get("tags", [])}
        return LoadedModel(translator, identity["id"], identity["name"], list(identity["tags"]), export_dir,
                           time.time())

    def _load_default(self) -> LoadedModel:
        if self.model_dir:
            return self._from_dir(Path(self.model_dir))
        return self._from_registry("production")

    def _from_registry(self, spec: str) -> LoadedModel:
        """Load the export of the version named by a tag or an id, exporting it if needed."""
        from stepwise import registry

        try:
            if MODEL_ID.match(spec):
                version = registry.get_version(spec)
            else:
                versions = registry.list_versions(project=self.project, name=self.name, tag=spec)
                versions = [v for v in versions if registry.ONNX_TAG not in v.tags]
                if not versions:
                    raise ModelNotFound(f"no registered version is tagged {spec!r}")
                version = versions[0]
        except registry.RegistryError as exc:
            raise ModelNotFound(str(exc)) from None
        export = registry.find_export(version.id)
        export_dir = registry.download_export(export.id) if export is not None else None
        if export_dir is None or export_format(export_dir) != EXPORT_FORMAT:  # none yet, or an older exporter's
            export_dir = self.export_root / version.id
            if export_format(export_dir) != EXPORT_FORMAT:
                self._run_exporter(version.id, export_dir)
        return self._from_dir(export_dir, {"id": version.id, "name": version.name, "tags": version.tags})

    @staticmethod
    def _run_exporter(model_id: str, export_dir: Path) -> None:
        log.info("version %s has no ONNX export: running the exporter", model_id)
        result = subprocess.run([sys.executable, "-m", "stepwise", "export", "--model-id", model_id, "--out",
                                 str(export_dir)], capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            log.warning("exporter output:\n%s", result.stderr[-4000:])
            last = (result.stderr.strip().splitlines() or ["exporter failed"])[-1]
            raise ModelNotFound(f"could not export version {model_id}: {last}")

    # -- lookup ------------------------------------------------------------------------------------
    def get(self, spec: str | None) -> LoadedModel:
        """The default model for None/``production``/its id; otherwise a cached or newly loaded one."""
        default = self.default
        if spec in (None, "", "default", "production", default.id):
            return default
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        if self.model_dir and not tracking.is_configured():
            raise ModelNotFound(f"model {spec!r}: only the model in STEPWISE_MODEL_DIR is available "
                                "(no ClearML server configured)")
        loaded = self._from_registry(spec)
        with self._lock:
            self._cache[spec] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded

    def reload(self) -> dict[str, Any]:
        """Re-resolve the default; swap it in if it changed. Returns what happened."""
        before = self.default
        if self.model_dir:
            fresh = self._from_dir(Path(self.model_dir))
            changed = fresh.translator.manifest != before.translator.manifest
        else:
            from stepwise import registry

            versions = [v for v in registry.list_versions(project=self.project, name=self.name, tag="production")
                        if registry.ONNX_TAG not in v.tags]
            if not versions:
                return {"changed": False, "model": before.identity(), "reason": "nothing is tagged production"}
            changed = versions[0].id != before.id
            fresh = self._from_registry(versions[0].id) if changed else before
        if changed:
            self.default = fresh  # one reference assignment: requests already running keep the old one
            log.info("default model swapped: %s -> %s", before.id, fresh.id)
        return {"changed": changed, "previous": before.identity(), "model": self.default.identity()}

    def describe(self) -> dict[str, Any]:
        """``/model``: the default model's manifest, provider and load time, plus cached ones."""
        default = self.default
        return {
            "model": default.identity(),
            "provider": default.translator.provider,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(default.loaded_at)),
            "export_dir": str(default.export_dir),
            "source": "STEPWISE_MODEL_DIR" if self.model_dir else "registry:production",
            "manifest": default.translator.manifest,
            "layers": default.translator.n_layers, "heads": default.translator.n_heads,
            "cached": [m.identity() for m in self._cache.values()],
        }


def select_attention(
    attention: dict[str, np.ndarray] | None, kinds: str, layers: list[int] | None, heads: list[int] | None,
) -> dict[str, np.ndarray]:
    """Pick the kinds asked for (``none``, ``cross``, ``all``) and optional layer/head subsets.

    Returned as float32 arrays ``[layer][head][query][key]`` rounded to 5 decimals: they cross
    from the runner to the entry service as arrays (BentoML pickles between services) and become
    nested JSON lists once, in :func:`json_bytes`.
    """
    if kinds == "none" or attention is None:
        return {}
    wanted = ("cross",) if kinds == "cross" else ("encoder", "decoder", "cross")
    result = {}
    for kind in wanted:
        weights = attention[kind]
        if layers is not None:
            weights = weights[[i for i in layers if i < weights.shape[0]]]
        if heads is not None:
            weights = weights[:, heads]
        result[kind] = np.round(weights, 5).astype(np.float32)
    return result


def json_bytes(value: Any) -> bytes:
    """JSON for a response, numpy arrays as nested lists (orjson: ~10x faster than ``json``)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
