"""The ClearML REST endpoints the SDK calls, over :class:`~stepwise.clearml_server.store.Store`.

Each handler takes the request body (a dict) and returns the ``data`` part of the answer;
:class:`ApiError` becomes a ClearML-format error. Documents carry every field the SDK's
response schemas declare, with the declared types (a task without ``output: {}`` breaks
``OutputModel.update_weights``, for one).
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from stepwise.clearml_server.store import Document, Store

Handler = Callable[["Api", dict[str, Any]], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}

USER_ID = "stepwise-local-user"
COMPANY_ID = "stepwise-local"
ARCHIVED = "archived"


class ApiError(Exception):
    """An error answered in ClearML's format (HTTP status, subcode, message)."""

    def __init__(self, code: int, subcode: int, message: str) -> None:
        super().__init__(message)
        self.code, self.subcode, self.message = code, subcode, message


def endpoint(name: str) -> Callable[[Handler], Handler]:
    """Register a handler for ``service.action``."""

    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return register


def now() -> str:
    """ISO-8601 UTC timestamp, the format ClearML uses."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_id() -> str:
    """A ClearML-style 32-hex-digit id."""
    return uuid.uuid4().hex


class Api:
    """Dispatches ``service.action`` calls to the handlers below."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def call(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run one endpoint; raises ApiError for bad requests and unknown endpoints."""
        handler = HANDLERS.get(name)
        if handler is None:
            raise ApiError(400, 0, f"Invalid request path /{name}")
        if not isinstance(body, dict):
            raise ApiError(400, 0, "Request body must be a JSON object")
        return handler(self, body)

    # -- helpers shared by the handlers -------------------------------------------------------
    def require(self, kind: str, body: dict[str, Any], field: str) -> Document:
        doc_id = body.get(field)
        if not isinstance(doc_id, str) or not doc_id:
            raise ApiError(400, 12, f"Validation error: missing required field '{field}'")
        doc = self.store.get(kind, doc_id)
        if doc is None:
            raise ApiError(400, 101, f"Invalid {kind} id: {field}={doc_id}")
        return doc

    def edit(self, kind: str, doc_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Set top-level (or dotted) fields on a document; answer ``{updated, fields}``."""
        fields = {k: v for k, v in fields.items() if v is not None}

        def change(doc: Document) -> None:
            for key, value in fields.items():
                _set_path(doc, key, value)
            doc["last_update"] = now()
            if kind == "task":
                doc["last_change"] = doc["last_update"]

        updated = self.store.update(kind, doc_id, change)
        return {"updated": int(updated is not None), "fields": fields}


# -- documents ---------------------------------------------------------------------------------
def _set_path(doc: Document, path: str, value: Any) -> None:
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _get_path(doc: Document, path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _create_unique(api: Api, kind: str, doc: Document, *, subcode: int) -> str:
    """Store ``doc`` unless a document of that kind already has its name (ClearML refuses those)."""
    with api.store.lock:
        if any(other["name"] == doc["name"] for other in api.store.all(kind)):
            raise ApiError(400, subcode, f"{kind.title()} with the same name already exists: name={doc['name']}")
        api.store.put(kind, doc)
    return doc["id"]


def _new_project(name: str, body: dict[str, Any]) -> Document:
    stamp = now()
    return {
        "id": new_id(), "name": name, "basename": name.rsplit("/", 1)[-1],
        "description": body.get("description") or "", "user": USER_ID, "company": COMPANY_ID,
        "created": stamp, "last_update": stamp, "tags": body.get("tags") or [],
        "system_tags": body.get("system_tags") or [],
        "default_output_destination": body.get("default_output_destination"),
    }


def _new_task(body: dict[str, Any]) -> Document:
    stamp = now()
    task = {
        "id": new_id(), "name": body.get("name") or "", "user": USER_ID, "company": COMPANY_ID,
        "type": body.get("type") or "training", "status": "created", "comment": body.get("comment") or "",
        "created": stamp, "started": None, "completed": None, "active_duration": None, "last_update": stamp,
        "last_change": stamp, "last_changed_by": USER_ID, "status_changed": stamp, "status_message": "",
        "status_reason": "", "project": body.get("project"), "parent": body.get("parent"),
        "tags": body.get("tags") or [], "system_tags": body.get("system_tags") or [],
        "output": {"destination": None, "model": None, "result": None, "error": None},
        "execution": {"queue": None, "parameters": {}, "model_desc": {}, "model_labels": {}, "framework": None,
                      "artifacts": [], "docker_cmd": None},
        "script": {}, "hyperparams": {}, "configuration": {}, "container": {}, "runtime": {},
        "models": {"input": [], "output": []}, "last_iteration": 0, "last_metrics": {}, "last_worker": None,
    }
    for key in ("script", "hyperparams", "configuration", "container", "runtime", "models"):
        if isinstance(body.get(key), dict):
            task[key] = copy.deepcopy(body[key])
    if isinstance(body.get("execution"), dict):
        task["execution"].update(body["execution"])
        task["execution"]["artifacts"] = _artifact_list(task["execution"].get("artifacts"))
    if isinstance(body.get("output_dest"), str):
        task["output"]["destination"] = body["output_dest"]
    return task


def _artifact_list(artifacts: Any) -> list[Any]:
    if isinstance(artifacts, dict):
        return list(artifacts.values())
    return list(artifacts or [])


def _new_model(body: dict[str, Any]) -> Document:
    stamp = now()
    return {
        "id": new_id(), "name": body.get("name") or "", "user": USER_ID, "company": COMPANY_ID,
        "created": stamp, "last_update": stamp, "task": body.get("task"), "parent": body.get("parent"),
        "project": body.get("project"), "comment": body.get("comment") or "", "tags": body.get("tags") or [],
        "system_tags": body.get("system_tags") or [], "framework": body.get("framework"),
        "design": body.get("design") or {}, "labels": body.get("labels") or {}, "uri": body.get("uri"),
        "ready": bool(body.get("ready", False)), "ui_cache": body.get("ui_cache") or {},
        "metadata": _metadata_dict(body.get("metadata")), "last_iteration": body.get("iteration"),
    }


def _metadata_dict(items: Any) -> dict[str, Any]:
    if isinstance(items, dict):
        return items
    return {item["key"]: {"key": item["key"], "type": item.get("type"), "value": item.get("value")}
            for item in items or [] if isinstance(item, dict) and "key" in item}


# -- queries -----------------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def match_tags(have: list[str], wanted: list[str] | None) -> bool:
    """ClearML tag filter: plain tags are OR-ed (``__$and``/``__$all`` switch to AND),
    ``-tag`` excludes, ``__$not`` negates the next tag."""
    if not wanted:
        return True
    have_set = set(have or [])
    include: list[str] = []
    exclude: list[str] = []
    mode_all = False
    negate = False
    for tag in wanted:
        if tag in ("__$and", "__$all"):
            mode_all = True
        elif tag in ("__$or", "__$any"):
            mode_all = False
        elif tag == "__$not":
            negate = True
        elif tag.startswith("-") or negate:
            exclude.append(tag[1:] if tag.startswith("-") else tag)
            negate = False
        else:
            include.append(tag)
    if exclude and have_set & set(exclude):
        return False
    if not include:
        return True
    return all(t in have_set for t in include) if mode_all else any(t in have_set for t in include)


def query(api: Api, kind: str, body: dict[str, Any], equal_fields: tuple[str, ...] = ()) -> list[Document]:
    """Filter, order, page and project documents the way ``*.get_all`` does."""
    docs = api.store.all(kind)
    ids = _as_list(body.get("id"))
    if ids is not None:
        docs = [d for d in docs if d["id"] in ids]
    name = body.get("name")
    if isinstance(name, str) and name:
        try:
            pattern = re.compile(name)
        except re.error:
            raise ApiError(400, 12, f"Validation error: invalid regular expression in 'name': {name}") from None
        docs = [d for d in docs if pattern.search(d.get("name") or "")]
    for field in ("project", "parent", *equal_fields):
        values = _as_list(body.get(field))
        if values is not None:
            docs = [d for d in docs if d.get(field) in values]
    if isinstance(body.get("ready"), bool):
        docs = [d for d in docs if d.get("ready") is body["ready"]]
    for field in ("tags", "system_tags"):
        wanted = _as_list(body.get(field))
        if wanted:
            docs = [d for d in docs if match_tags(d.get(field, []), wanted)]
    for key in (body.get("order_by") and _as_list(body["order_by"]) or [])[::-1]:
        reverse = key.startswith("-")
        field = key.lstrip("-+")
        docs.sort(key=lambda d, f=field: (_get_path(d, f) is not None, _get_path(d, f) or ""), reverse=reverse)
    page, size = body.get("page"), body.get("page_size")
    if isinstance(page, int) and isinstance(size, int) and size > 0:
        docs = docs[page * size : (page + 1) * size]
    elif isinstance(size, int) and size > 0:
        docs = docs[:size]
    only = _as_list(body.get("only_fields"))
    if only:
        docs = [_project_fields(d, ["id", *only]) for d in docs]
    return docs


def _project_fields(doc: Document, fields: list[str]) -> Document:
    out: Document = {}
    for field in fields:
        value = _get_path(doc, field)
        if value is not None or field in doc:
            _set_path(out, field, copy.deepcopy(value))
    return out


# -- lookups: <kind>s.get_all, <kind>s.get_all_ex, <kind>s.get_by_id for every kind ------------
def _register_lookups(kind: str, equal_fields: tuple[str, ...] = ()) -> None:
    """``get_all`` answers ``{"<kind>s": [...]}`` filtered by :func:`query`; ``get_by_id`` takes
    ``{"<kind>": id}`` and answers ``{"<kind>": {...}}``."""
    plural = f"{kind}s"

    def get_all(api: Api, body: dict[str, Any]) -> dict[str, Any]:
        return {plural: query(api, kind, body, equal_fields)}

    def get_by_id(api: Api, body: dict[str, Any]) -> dict[str, Any]:
        return {kind: api.require(kind, body, kind)}

    HANDLERS[f"{plural}.get_all"] = HANDLERS[f"{plural}.get_all_ex"] = get_all
    HANDLERS[f"{plural}.get_by_id"] = get_by_id


_register_lookups("project")
_register_lookups("task", equal_fields=("status", "type", "user"))
_register_lookups("model", equal_fields=("task", "framework", "uri", "user"))
_register_lookups("queue")


# -- auth / debug --------------------------------------------------------------------------
@endpoint("debug.ping")
def debug_ping(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"msg": "stepwise local ClearML server"}


@endpoint("users.get_current_user")
def users_get_current_user(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"user": {"id": USER_ID, "name": "stepwise", "company": {"id": COMPANY_ID, "name": "stepwise"},
                     "role": "admin", "given_name": "stepwise", "family_name": "local"},
            "getting_started": {}, "settings": {}}


# -- projects ------------------------------------------------------------------------------
@endpoint("projects.create")
def projects_create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, 12, "Validation error: missing required field 'name'")
    return {"id": _create_unique(api, "project", _new_project(name, body), subcode=701)}


@endpoint("projects.update")
def projects_update(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    project = api.require("project", body, "project")
    fields = {k: body[k] for k in ("name", "description", "tags", "system_tags", "default_output_destination")
              if k in body}
    return api.edit("project", project["id"], fields)


# -- tasks ---------------------------------------------------------------------------------
TASK_FIELDS = ("name", "type", "comment", "project", "parent", "tags", "system_tags", "script", "hyperparams",
               "configuration", "container", "runtime", "models", "execution", "output", "status_message",
               "status_reason")


@endpoint("tasks.create")
def tasks_create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body.get("name"), str) or not body["name"]:
        raise ApiError(400, 12, "Validation error: missing required field 'name'")
    if body.get("project") and api.store.get("project", body["project"]) is None:
        raise ApiError(400, 101, f"Invalid project id: project={body['project']}")
    task = _new_task(body)
    api.store.put("task", task)
    return {"id": task["id"]}


@endpoint("tasks.edit")
@endpoint("tasks.update")
def tasks_edit(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    fields = {k: body[k] for k in TASK_FIELDS if k in body}
    if "execution" in fields:
        execution = dict(task.get("execution") or {})
        execution.update(fields["execution"] or {})
        execution["artifacts"] = _artifact_list(execution.get("artifacts"))
        fields["execution"] = execution
    if "output__error" in body:
        fields["output.error"] = body["output__error"]
    return api.edit("task", task["id"], fields)


def _status_change(api: Api, body: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    task = api.require("task", body, "task")
    stamp = now()
    fields: dict[str, Any] = {"status": status, "status_changed": stamp,
                              "status_reason": body.get("status_reason") or "",
                              "status_message": body.get("status_message") or ""}
    if status == "in_progress" and not task.get("started"):
        fields["started"] = stamp
    if status in ("completed", "stopped", "failed", "closed", "published"):
        fields["completed"] = task.get("completed") or stamp
    fields.update(extra)
    return api.edit("task", task["id"], fields)


@endpoint("tasks.started")
def tasks_started(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {**_status_change(api, body, "in_progress"), "started": 1}


@endpoint("tasks.stopped")
def tasks_stopped(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "stopped")


@endpoint("tasks.stop")
def tasks_stop(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "stopped")


@endpoint("tasks.failed")
def tasks_failed(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "failed")


@endpoint("tasks.completed")
def tasks_completed(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    published = bool(body.get("publish"))
    return {**_status_change(api, body, "published" if published else "completed"), "published": int(published)}


@endpoint("tasks.close")
def tasks_close(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "closed")


@endpoint("tasks.publish")
def tasks_publish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "published")


@endpoint("tasks.reset")
def tasks_reset(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "created", started=None, completed=None)


@endpoint("tasks.enqueue")
def tasks_enqueue(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    queue = _resolve_queue(api, body.get("queue"), body.get("queue_name"))
    execution = dict(task.get("execution") or {})
    execution["queue"] = queue["id"]

    def add_entry(doc: Document) -> None:
        doc["entries"] = [e for e in doc.get("entries", []) if e["task"] != task["id"]]
        doc["entries"].append({"task": task["id"], "added": now()})
        doc["last_update"] = now()

    api.store.update("queue", queue["id"], add_entry)
    result = _status_change(api, body, "queued", execution=execution)
    return {**result, "queued": 1, "queue_watched": False}


@endpoint("tasks.dequeue")
def tasks_dequeue(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    queue_id = (task.get("execution") or {}).get("queue")
    if queue_id:
        api.store.update("queue", queue_id, lambda d: d.update(
            entries=[e for e in d.get("entries", []) if e["task"] != task["id"]]))
    return {**_status_change(api, body, "created"), "dequeued": 1}


@endpoint("tasks.ping")
def tasks_ping(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    api.require("task", body, "task")
    return {}


@endpoint("tasks.set_requirements")
def tasks_set_requirements(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    return api.edit("task", task["id"], {"script.requirements": body.get("requirements") or {}})


@endpoint("tasks.add_or_update_model")
def tasks_add_or_update_model(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    kind = body.get("type")
    if kind not in ("input", "output"):
        raise ApiError(400, 12, "Validation error: field 'type' must be 'input' or 'output'")
    entry = {"name": body.get("name") or "", "model": body.get("model"), "updated": now()}

    def change(doc: Document) -> None:
        models = doc.setdefault("models", {"input": [], "output": []})
        models[kind] = [m for m in models.get(kind, []) if m.get("name") != entry["name"]] + [entry]
        if body.get("iteration") is not None and kind == "output":
            doc["last_iteration"] = max(doc.get("last_iteration") or 0, int(body["iteration"]))
        doc["last_update"] = now()

    api.store.update("task", task["id"], change)
    return {"updated": 1}


@endpoint("tasks.delete_models")
def tasks_delete_models(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    doomed = {(m.get("type"), m.get("name")) for m in body.get("models") or []}

    def change(doc: Document) -> None:
        for kind in ("input", "output"):
            doc["models"][kind] = [m for m in doc["models"].get(kind, []) if (kind, m.get("name")) not in doomed]

    api.store.update("task", task["id"], change)
    return {"updated": 1}


@endpoint("tasks.edit_hyper_params")
def tasks_edit_hyper_params(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    replace = body.get("replace_hyperparams") or "none"

    def change(doc: Document) -> None:
        params = {} if replace == "all" else doc.setdefault("hyperparams", {})
        items = body.get("hyperparams") or []
        if replace == "section":
            for item in items:
                params[item.get("section") or "General"] = {}
        for item in items:
            section = item.get("section") or "General"
            params.setdefault(section, {})[item["name"]] = {**item, "section": section}
        doc["hyperparams"] = params
        doc["last_update"] = now()

    api.store.update("task", task["id"], change)
    return {"updated": 1}


@endpoint("tasks.get_hyper_params")
def tasks_get_hyper_params(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    params = []
    for task_id in _as_list(body.get("tasks")) or []:
        task = api.store.get("task", task_id)
        if task is None:
            raise ApiError(400, 101, f"Invalid task id: task={task_id}")
        flat = [p for section in (task.get("hyperparams") or {}).values() for p in section.values()]
        params.append({"task": task_id, "hyperparams": flat})
    return {"params": params}


@endpoint("tasks.edit_configuration")
def tasks_edit_configuration(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")

    def change(doc: Document) -> None:
        config = {} if body.get("replace_configuration") else doc.setdefault("configuration", {})
        for item in body.get("configuration") or []:
            config[item["name"]] = item
        doc["configuration"] = config
        doc["last_update"] = now()

    api.store.update("task", task["id"], change)
    return {"updated": 1}


@endpoint("tasks.get_configurations")
def tasks_get_configurations(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    names = _as_list(body.get("names"))
    result = []
    for task_id in _as_list(body.get("tasks")) or []:
        task = api.store.get("task", task_id)
        if task is None:
            raise ApiError(400, 101, f"Invalid task id: task={task_id}")
        items = [c for n, c in (task.get("configuration") or {}).items() if names is None or n in names]
        result.append({"task": task_id, "configuration": items})
    return {"configurations": result}


@endpoint("tasks.get_configuration_names")
def tasks_get_configuration_names(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    result = []
    for task_id in _as_list(body.get("tasks")) or []:
        task = api.store.get("task", task_id) or {}
        result.append({"task": task_id, "names": sorted((task.get("configuration") or {}).keys())})
    return {"configurations": result}


@endpoint("tasks.add_or_update_artifacts")
def tasks_add_or_update_artifacts(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")

    def change(doc: Document) -> None:
        current = {a.get("key"): a for a in _artifact_list(doc["execution"].get("artifacts"))}
        for artifact in body.get("artifacts") or []:
            current[artifact.get("key")] = artifact
        doc["execution"]["artifacts"] = list(current.values())

    api.store.update("task", task["id"], change)
    return {"updated": 1}


# -- models --------------------------------------------------------------------------------
MODEL_FIELDS = ("name", "uri", "comment", "tags", "system_tags", "framework", "design", "labels", "project",
                "parent", "task", "ui_cache")


@endpoint("models.create")
def models_create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body.get("name"), str):
        raise ApiError(400, 12, "Validation error: missing required field 'name'")
    model = _new_model(body)
    api.store.put("model", model)
    return {"id": model["id"], "created": True}


@endpoint("models.update_for_task")
def models_update_for_task(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    override = body.get("override_model_id")
    if override:
        model = api.store.get("model", override)
        if model is None:
            raise ApiError(400, 101, f"Invalid model id: override_model_id={override}")
        fields = {k: body[k] for k in ("uri", "name", "comment", "tags", "system_tags") if k in body}
        result = api.edit("model", override, fields)
        return {"id": override, "created": False, **result}
    model = _new_model({**body, "task": task["id"], "project": task.get("project"),
                        "name": body.get("name") or task["name"]})
    api.store.put("model", model)
    return {"id": model["id"], "created": True, "updated": 0, "fields": {}}


@endpoint("models.edit")
@endpoint("models.update")
def models_edit(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    model = api.require("model", body, "model")
    fields = {k: body[k] for k in MODEL_FIELDS if k in body}
    if "ready" in body:
        fields["ready"] = bool(body["ready"])
    if "iteration" in body:
        fields["last_iteration"] = body["iteration"]
    return api.edit("model", model["id"], fields)


@endpoint("models.set_ready")
def models_set_ready(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    model = api.require("model", body, "model")
    result = api.edit("model", model["id"], {"ready": True})
    answer: dict[str, Any] = {"updated": result["updated"]}
    task = api.store.get("task", model.get("task") or "")
    if body.get("publish_task", True) and task is not None and task["status"] != "published":
        published = _status_change(api, {"task": task["id"]}, "published")
        answer["published_task"] = {"id": task["id"], "data": published}
    return answer


@endpoint("models.publish_many")
def models_publish_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    succeeded = []
    for model_id in body.get("ids") or []:
        if api.store.get("model", model_id) is not None:
            api.edit("model", model_id, {"ready": True})
            succeeded.append({"id": model_id, "updated": 1})
    return {"succeeded": succeeded, "failed": []}


@endpoint("models.add_or_update_metadata")
def models_add_or_update_metadata(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    model = api.require("model", body, "model")

    def change(doc: Document) -> None:
        current = {} if body.get("replace_metadata") else dict(doc.get("metadata") or {})
        current.update(_metadata_dict(body.get("metadata")))
        doc["metadata"] = current
        doc["last_update"] = now()

    api.store.update("model", model["id"], change)
    return {"updated": 1}


@endpoint("models.delete_metadata")
def models_delete_metadata(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    model = api.require("model", body, "model")
    keys = set(body.get("keys") or [])
    api.store.update("model", model["id"], lambda d: d.update(
        metadata={k: v for k, v in (d.get("metadata") or {}).items() if k not in keys}))
    return {"updated": 1}


@endpoint("models.delete")
def models_delete(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    model = api.require("model", body, "model")
    api.store.delete("model", model["id"])
    return {"deleted": True, "url": model.get("uri")}


# -- queues --------------------------------------------------------------------------------
def _new_queue(name: str, tags: list[str] | None = None) -> Document:
    stamp = now()
    return {"id": new_id(), "name": name, "display_name": name, "user": USER_ID, "company": COMPANY_ID,
            "created": stamp, "last_update": stamp, "tags": tags or [], "system_tags": [], "entries": [],
            "metadata": {}}


def _resolve_queue(api: Api, queue_id: Any, queue_name: Any) -> Document:
    if queue_id:
        queue = api.store.get("queue", queue_id)
        if queue is None:
            raise ApiError(400, 701, f"Invalid queue id: queue={queue_id}")
        return queue
    name = queue_name or "default"
    with api.store.lock:
        for queue in api.store.all("queue"):
            if queue["name"] == name:
                return queue
        queue = _new_queue(name, ["default"] if name == "default" else [])
        api.store.put("queue", queue)
        return queue


@endpoint("queues.create")
def queues_create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, 12, "Validation error: missing required field 'name'")
    return {"id": _create_unique(api, "queue", _new_queue(name, body.get("tags")), subcode=702)}


@endpoint("queues.get_default")
def queues_get_default(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = _resolve_queue(api, None, "default")
    return {"id": queue["id"], "name": queue["name"]}


# -- events --------------------------------------------------------------------------------
EVENT_KINDS = {"training_stats_scalar", "training_stats_vector", "training_debug_image", "plot", "log"}


def add_events(api: Api, events: list[Any]) -> dict[str, Any]:
    """``events.add_batch``: store events, keep each task's last metrics and iteration."""
    rows = []
    errors = 0
    last: dict[str, dict[str, Any]] = {}
    for event in events:
        if not isinstance(event, dict) or event.get("type") not in EVENT_KINDS or not event.get("task"):
            errors += 1
            continue
        rows.append((event["task"], event["type"], event))
        if event["type"] == "training_stats_scalar":
            last.setdefault(event["task"], {})[(event.get("metric"), event.get("variant"))] = event
    api.store.add_events(rows)
    for task_id, metrics in last.items():
        def change(doc: Document, metrics: dict = metrics) -> None:
            for (metric, variant), event in metrics.items():
                key_metric, key_variant = _metric_key(metric), _metric_key(variant)
                doc["last_metrics"].setdefault(key_metric, {})[key_variant] = {
                    "metric": metric, "variant": variant, "value": event.get("value"),
                    "iter": event.get("iter")}
                if isinstance(event.get("iter"), int):
                    doc["last_iteration"] = max(doc.get("last_iteration") or 0, event["iter"])

        api.store.update("task", task_id, change)
    return {"added": len(rows), "errors": errors, "errors_info": {}}


def _metric_key(name: Any) -> str:
    return uuid.uuid5(uuid.NAMESPACE_OID, str(name)).hex


@endpoint("events.add")
def events_add(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return add_events(api, [body])


@endpoint("events.scalar_metrics_iter_histogram")
def events_scalar_metrics_iter_histogram(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    result: dict[str, Any] = {}
    for event in api.store.events(task["id"], ["training_stats_scalar"]):
        series = result.setdefault(event.get("metric", ""), {}).setdefault(
            event.get("variant", ""), {"name": event.get("variant", ""), "x": [], "y": []})
        series["x"].append(event.get("iter"))
        series["y"].append(event.get("value"))
    return result


@endpoint("events.get_task_events")
def events_get_task_events(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    kinds = _as_list(body.get("event_type"))
    events = api.store.events(task["id"], kinds)
    return {"events": events, "returned": len(events), "total": len(events), "scroll_id": None}


@endpoint("events.get_task_log")
def events_get_task_log(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    events = api.store.events(task["id"], ["log"])
    return {"events": events, "returned": len(events), "total": len(events)}


@endpoint("events.get_task_plots")
def events_get_task_plots(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    plots = api.store.events(task["id"], ["plot"])
    return {"plots": plots, "returned": len(plots), "total": len(plots), "scroll_id": None}


@endpoint("events.debug_images")
def events_debug_images(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    tasks = [m.get("task") for m in body.get("metrics") or [] if isinstance(m, dict)]
    images = []
    for task_id in tasks:
        images.append({"task": task_id, "iterations": [{"iter": e.get("iter"), "events": [e]}
                                                        for e in api.store.events(task_id, ["training_debug_image"])]})
    return {"metrics": images, "scroll_id": None}
