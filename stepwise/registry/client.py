"""The one registry client: ClearML's model registry as stepwise uses it.

Training registers each checkpoint as a version (an ``OutputModel`` of its task) tagged
``candidate``, and beside it the checkpoint's ONNX export as a version of ``<name>-onnx``
(framework ONNX, tags ``onnx`` and ``source:<checkpoint version id>``: :func:`register_export`,
:func:`find_export`); ``stepwise export`` registers the export of an older version the same way.
A user promotes a version by giving it the ``production`` tag (one per model name at a time);
the exporter and the service :func:`resolve` a tag to a version and download it, and the
service loads its export. Nothing else in stepwise calls ``Model.query_models``.

Metadata on every version: ``bleu``, ``loss``, ``step``, ``config_hash``, ``language_pair``
(and, after a gated promotion, the comparison that allowed it), and ``sha256``: the SHA-256 digest
of the registered file (of an export: :func:`export_digest` of its directory), recorded at
registration and checked by :func:`download` and :func:`download_export` before the file is used
(a mismatch raises :class:`~stepwise.errors.DigestMismatch`; a version without one, registered
before digests were recorded, is used with a logged warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.errors import DigestMismatch, ModelNotFound, RegistryUnavailable
from stepwise.registry import tracking

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
REGISTER_PING_S = 3.0
PRODUCTION = "production"
DIGEST_KEY = "sha256"  # the metadata entry holding the registered file's digest
# the gold-set alignment error rate and the cross-attention reading it was measured with (training
# records them on a checkpoint's version; its ONNX export's version repeats them)
ALIGNMENT_KEYS = ("aer", "alignment_reading", "alignment_layer", "alignment_head")
CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """The SHA-256 digest of one file, as hex."""
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def export_digest(export_dir: Path) -> str:
    """The SHA-256 digest of an export: its ``manifest.json`` and each file the manifest lists.

    Each file counts by its name and its own digest, in the manifest's order; a file the
    manifest lists but the directory lacks counts as empty, so the digest differs.
    """
    manifest_file = export_dir / "manifest.json"
    try:
        names = [str(name) for name in json.loads(manifest_file.read_text()).get("files", [])]
    except (OSError, ValueError, AttributeError):
        names = []
    sha = hashlib.sha256()
    for name in ["manifest.json", *names]:
        path = export_dir / name
        digest = file_digest(path) if path.is_file() else ""
        sha.update(f"{name}\0{digest}\n".encode())
    return sha.hexdigest()


def _check_digest(version: ModelVersion, actual: str) -> None:
    """Raise when ``actual`` differs from the digest recorded at registration; warn when none was.

    Raises:
        DigestMismatch: the downloaded file is not the one registered.
    """
    expected = version.metadata.get(DIGEST_KEY)
    if not expected:
        log.warning("version %s has no recorded file digest (registered before digests): used unchecked",
                    version.id)
        return
    if actual != expected:
        raise DigestMismatch(f"version {version.id}: file digest mismatch (expected {expected[:16]}…, "
                             f"got {actual[:16]}…): the registered file was changed")


class RegistrationInterrupted(RegistryUnavailable):
    """A registration that created its model but could not upload the weights (the server went away).

    Pass :attr:`model` back to :func:`register_checkpoint` to finish that same version.
    """

    def __init__(self, message: str, model: Any) -> None:
        super().__init__(message)
        self.model = model


@dataclass
class ModelVersion:
    """One registered model version, as listed by :func:`list_versions`."""

    id: str
    name: str
    project: str | None
    created: str
    tags: list[str]
    published: bool
    framework: str | None
    uri: str | None
    task: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def bleu(self) -> float | None:
        """Validation BLEU recorded at registration, if any."""
        try:
            return float(self.metadata["bleu"])
        except (KeyError, ValueError):
            return None

    @property
    def aer(self) -> float | None:
        """Gold-set alignment error rate recorded at registration, if any (lower is better)."""
        try:
            return float(self.metadata["aer"])
        except (KeyError, ValueError):
            return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``stepwise models list --json``)."""
        return {"id": self.id, "name": self.name, "project": self.project, "created": self.created,
                "tags": self.tags, "published": self.published, "framework": self.framework, "uri": self.uri,
                "task": self.task, "bleu": self.bleu, "aer": self.aer, "metadata": self.metadata}


@dataclass
class ResolvedModel:
    """A version and the local path of its downloaded weights."""

    version: ModelVersion
    path: Path


def _model_class() -> Any:
    tracking.check_server()
    from clearml import Model

    return Model


def _unavailable(doing: str, exc: Exception) -> RegistryUnavailable:
    """The error for an SDK call that failed: unreachable (re-checked now) or answering with errors."""
    try:
        host = tracking.check_server()
    except RegistryUnavailable as down:
        return down
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return RegistryUnavailable(f"ClearML server {host} failed while {doing}: {reason}")


def _version(model: Any) -> ModelVersion:
    data = model._get_model_data()  # one cached models.get_by_id answer
    if data is None:  # the SDK logs the failure and returns None
        raise _unavailable(f"reading model {model.id}", LookupError("no answer"))
    metadata = {key: str(item.get("value")) for key, item in (model.get_all_metadata() or {}).items()}
    created = data.created
    return ModelVersion(id=model.id, name=model.name, project=data.project,
                        created=created.isoformat() if hasattr(created, "isoformat") else str(created or ""),
                        tags=list(model.tags or []), published=bool(model.published), framework=model.framework,
                        uri=model.url, task=data.task, metadata=metadata)


def register_checkpoint(
    task: Any, path: str | Path, *, name: str, step: int, metadata: dict[str, Any], tags: list[str] | None = None,
    framework: str = "PyTorch", comment: str = "", model: Any = None,
) -> str:
    """Register a checkpoint file as a new version of ``name`` on ``task``; returns its id.

    The file is uploaded under a name unique to the step, so older versions keep their bytes.
    The server is pinged first: the SDK retries a model call against an unreachable server
    until it answers, so without the ping a server outage would stall the caller (training)
    for as long as it lasts.

    ``model``: the :attr:`RegistrationInterrupted.model` of an earlier attempt, finished rather
    than registered twice.

    Raises:
        tracking.ClearMLUnavailable: the server does not answer now (nothing was registered).
        RegistrationInterrupted: the version was created but its weights are not uploaded.
    """
    from clearml import OutputModel

    tracking.check_server(timeout=REGISTER_PING_S)
    path = Path(path)
    if model is None:
        model = OutputModel(task=task, name=name, framework=framework, tags=list(tags or [CANDIDATE]),
                            comment=comment)
        for key, value in metadata.items():
            model.set_metadata(key, str(value), type(value).__name__ if isinstance(value, (int, float)) else "str")
    model.set_metadata(DIGEST_KEY, file_digest(path), "str")
    try:
        model.update_weights(weights_filename=str(path), iteration=step, target_filename=path.name,
                             auto_delete_file=False, async_enable=False)
    except Exception as exc:  # noqa: BLE001 - the SDK raises whatever its HTTP stack raised
        raise RegistrationInterrupted(f"model {model.id} created, its weights not uploaded: {exc}", model) from None
    log.info("registered %s step %d as model %s (tags %s)", name, step, model.id, ", ".join(tags or [CANDIDATE]))
    return model.id


def list_versions(project: str | None = None, name: str | None = None, tag: str | None = None) -> list[ModelVersion]:
    """Registered versions, newest first, filtered by project, model name (exactly: ``name`` does
    not list ``name-onnx``, its exports) and tag.

    Raises:
        RegistryUnavailable: the ClearML server cannot be reached or fails.
    """
    model_cls = _model_class()
    try:
        models = model_cls.query_models(project_name=project, model_name=name, tags=[tag] if tag else None,
                                        max_results=1000)
    except ValueError:  # the SDK's answer when the project does not exist
        return []
    except Exception as exc:  # noqa: BLE001 - connection errors surface as several kinds
        raise _unavailable("listing models", exc) from None
    # the server matches the name as a pattern: keep the model of that very name
    return [_version(m) for m in models if name is None or m.name == name]


def get_version(model_id: str) -> ModelVersion:
    """One version by id.

    Raises:
        ModelNotFound: the registry has no model with this id.
        RegistryUnavailable: the ClearML server cannot be reached or fails, so it cannot tell.
    """
    model_cls = _model_class()
    from clearml.backend_api.session.client import APIClient

    try:
        found = APIClient().models.get_all(id=[model_id], only_fields=["id"])
    except Exception as exc:  # noqa: BLE001 - connection errors surface as several kinds
        raise _unavailable(f"looking up model {model_id}", exc) from None
    if not found:
        raise ModelNotFound(f"no registered model with id {model_id!r}")
    return _version(model_cls(model_id=model_id))


def set_tag(model_id: str, tag: str = PRODUCTION, *, exclusive: bool = True) -> list[str]:
    """Add ``tag`` to a version; with ``exclusive``, remove it from every other version of that name.

    Returns the ids the tag was taken from.
    """
    model_cls = _model_class()
    version = get_version(model_id)
    taken = []
    if exclusive:
        for other in model_cls.query_models(model_name=version.name, tags=[tag], max_results=1000):
            if other.id != model_id and other.project == version.project:
                other.tags = [t for t in other.tags if t != tag]
                taken.append(other.id)
    model = model_cls(model_id=model_id)
    if tag not in model.tags:
        model.tags = [*model.tags, tag]
    return taken


def remove_tag(model_id: str, tag: str = PRODUCTION) -> bool:
    """Remove ``tag`` from a version; False when it did not carry it."""
    model_cls = _model_class()
    get_version(model_id)
    model = model_cls(model_id=model_id)
    if tag not in model.tags:
        return False
    model.tags = [t for t in model.tags if t != tag]
    return True


def publish(model_id: str) -> None:
    """Publish (freeze) a version."""
    get_version(model_id)
    _model_class()(model_id=model_id).publish()


def set_metadata(model_id: str, values: dict[str, Any]) -> None:
    """Add or update metadata entries of a version."""
    model = _model_class()(model_id=model_id)
    for key, value in values.items():
        model.set_metadata(key, str(value), "str")


def _local_copy(model_id: str, what: str, *, extract: bool) -> Path:
    """The SDK's local copy of a version's file (``extract``: an export's package, unpacked)."""
    try:
        path = _model_class()(model_id=model_id).get_local_copy(extract_archive=extract, raise_on_error=True)
    except Exception as exc:  # noqa: BLE001 - the SDK's download errors come in several kinds
        raise _unavailable(f"downloading the {what} of model {model_id}", exc) from None
    if not path:
        raise RegistryUnavailable(f"model {model_id}: its {what} could not be downloaded")
    return Path(path)


def download(model_id: str) -> Path:
    """Download a version's weights (cached by the SDK), checked against its digest; returns the local path.

    Raises:
        DigestMismatch: the file differs from the one registered.
    """
    version = get_version(model_id)
    path = _local_copy(model_id, "weights", extract=False)
    _check_digest(version, file_digest(path))
    return path


def resolve(project: str | None, name: str | None, tag: str | None = None) -> ResolvedModel:
    """The newest version of ``name`` carrying ``tag`` (or the newest version), downloaded.

    Raises:
        ModelNotFound: when nothing matches.
    """
    versions = list_versions(project=project, name=name, tag=tag)
    if not versions:
        what = f"model {name!r}" if name else "any model"
        where = f" in project {project!r}" if project else ""
        with_tag = f" tagged {tag!r}" if tag else ""
        raise ModelNotFound(f"no registered version of {what}{where}{with_tag}")
    version = versions[0]
    return ResolvedModel(version=version, path=download(version.id))


ONNX_TAG = "onnx"


def export_tag(source_id: str) -> str:
    """The tag that links an ONNX export to the version it was compiled from."""
    return f"source:{source_id}"


def register_export(export_dir: Path, manifest: dict[str, Any], *, task: Any = None, model: Any = None) -> str:
    """Register an export directory as its own model (framework ONNX), linked to its source version.

    The files are uploaded as one package; metadata names the source version and the parity
    figures (and repeats the source version's gold-set AER and alignment reading, ``ALIGNMENT_KEYS``,
    when ``source_model.metadata`` has them), and the tag ``source:<id>`` lets :func:`find_export` find it.

    Args:
        export_dir: what :func:`stepwise.export.export_checkpoint` wrote.
        manifest: its manifest (``source_model.id`` is the version it was compiled from).
        task: the task to register it on: training passes its own, so the pair comes from one
            run. Without one, a task of its own (``export <name>``) is created for it with
            ``Task.create``, never ``Task.init``: that works in any process, also one that
            inherits another process's ClearML task context (where ``Task.init`` hands back a
            stub, not a Task).
        model: the :attr:`RegistrationInterrupted.model` of an earlier attempt, finished rather
            than registered twice.

    Raises:
        RegistryUnavailable: the server does not answer (nothing was registered).
        RegistrationInterrupted: the export's version was created but its files are not uploaded.
    """
    from clearml import OutputModel, Task

    tracking.check_server(timeout=REGISTER_PING_S)
    source = manifest.get("source_model", {})
    source_id = source.get("id") or "local"
    own_task = None
    if model is None:
        if task is None:
            project = _project_name(source.get("project")) or "stepwise"
            name = source.get("name", manifest["name"])
            own_task = task = Task.create(project_name=project, task_name=f"export {name}",
                                          task_type=Task.TaskTypes.custom, add_task_init_call=False,
                                          detect_repository=False)
            task.output_uri = True  # the files server
            task.mark_started(force=True)
            task.set_parameters({"export/source_model_id": source.get("id", ""), "export/opset": manifest["opset"]})
        model = OutputModel(task=task, name=f"{manifest['name']}-onnx", framework="ONNX",
                            tags=[ONNX_TAG, export_tag(source_id)],
                            comment=f"ONNX export of {source_id} (step {manifest.get('step')})")
        parity = manifest.get("parity", {})
        for key, value in {"source_model_id": source.get("id", ""), "opset": manifest["opset"],
                           "step": manifest.get("step", ""), "format": manifest.get("format", ""),
                           "language_pair": manifest["language_pair"], "config_hash": manifest["config_hash"],
                           "parity_sentences": parity.get("sentences", ""),
                           "parity_tokens_greedy": parity.get("tokens_equal_beam1", ""),
                           "parity_tokens_beam4": parity.get("tokens_equal_beam4", ""),
                           "parity_max_log_prob_diff": parity.get("max_abs_log_prob_diff", ""),
                           "parity_max_attention_diff": parity.get("max_abs_attention_diff", "")}.items():
            model.set_metadata(key, str(value), "str")
        measured = source.get("metadata", {})  # the source version's alignment figures, when training measured them
        for key in ALIGNMENT_KEYS:
            if key in measured:
                model.set_metadata(key, str(measured[key]), "str")
    model.set_metadata(DIGEST_KEY, export_digest(Path(export_dir)), "str")
    try:
        # a package name of its own: one task registers the exports of all its saves
        model.update_weights_package(weights_path=str(export_dir), target_filename=f"onnx-{source_id}.zip",
                                     iteration=manifest.get("step"), auto_delete_file=False, async_enable=False)
    except Exception as exc:  # noqa: BLE001 - the SDK raises whatever its HTTP stack raised
        raise RegistrationInterrupted(f"model {model.id} created, its export not uploaded: {exc}", model) from None
    finally:
        if own_task is not None:
            own_task.mark_completed(force=True)
    log.info("registered the ONNX export of %s as model %s", source_id, model.id)
    return model.id


def _project_name(project_id: str | None) -> str | None:
    if not project_id:
        return None
    from clearml.backend_api.session.client import APIClient

    try:
        return APIClient().projects.get_by_id(project=project_id).name
    except Exception:  # noqa: BLE001
        return None


def find_export(source_id: str) -> ModelVersion | None:
    """The newest registered ONNX export of a version, if any."""
    versions = [v for v in list_versions(tag=export_tag(source_id)) if ONNX_TAG in v.tags]
    return versions[0] if versions else None


def download_export(model_id: str) -> Path:
    """Download and unpack an ONNX export package, checked against its digest; returns the export directory.

    Raises:
        DigestMismatch: the unpacked files differ from the ones registered.
    """
    version = get_version(model_id)
    path = _local_copy(model_id, "export", extract=True)
    _check_digest(version, export_digest(path))
    return path
