"""The ClearML REST endpoints the SDK, ``clearml-data`` and ``clearml-agent`` call, over
:class:`~stepwise.clearml_server.store.Store`.

Each handler takes the request body (a dict) and returns the ``data`` part of the answer;
:class:`ApiError` becomes a ClearML-format error. Documents carry every field the SDK's
response schemas declare, with the declared types (a task without ``output: {}`` breaks
``OutputModel.update_weights``, for one). Task status changes follow the real server's state
machine (:data:`STATE_MACHINE`; ``force`` skips it), only ``created`` tasks are editable without
``force``, and published tasks are read-only. Agents (workers) live in memory, as the real
server keeps them in Redis.
"""

from __future__ import annotations

import base64
import copy
import json
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
HIDDEN = "hidden"
DEVELOPMENT = "development"
HIDEABLE = ("project", "task")
INVALID_ID_SUBCODE = {"task": 101, "model": 201, "project": 401, "queue": 701}

# The real server's task state machine: which status may follow which (``force`` skips the
# check). Published tasks are final and read-only.
STATE_MACHINE: dict[str, set[str]] = {
    "created": {"queued", "in_progress"},
    "queued": {"created", "in_progress", "stopped"},
    "in_progress": {"stopped", "failed", "created", "completed"},
    "stopped": {"closed", "created", "failed", "queued", "in_progress", "published", "publishing", "completed"},
    "closed": {"created", "failed", "published", "publishing", "stopped"},
    "failed": {"created", "stopped", "published", "queued"},
    "publishing": {"published"},
    "published": set(),
    "completed": {"published", "in_progress", "created"},
}
RUNNING = ("queued", "in_progress")


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
        self.workers: dict[str, dict[str, Any]] = {}  # agents, by worker id (in memory, like Redis)
        ensure_default_queue(self)

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
            raise ApiError(400, INVALID_ID_SUBCODE.get(kind, 10), f"Invalid {kind} id: {field}={doc_id}")
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
    elif kind in HIDEABLE and not body.get("search_hidden"):
        # as the real server: hidden entities (dataset and pipeline projects, their tasks) are
        # left out unless asked for by id or with search_hidden
        docs = [d for d in docs if HIDDEN not in (d.get("system_tags") or [])]
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
    """Keep only ``fields`` (dotted paths). As MongoDB projections do, an existing parent of a
    missing leaf comes back empty: ``runtime.version`` of a task without one gives ``runtime: {}``."""
    out: Document = {}
    for field in fields:
        value = _get_path(doc, field)
        if value is not None or field in doc:
            _set_path(out, field, copy.deepcopy(value))
            continue
        parts = field.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:depth])
            if isinstance(_get_path(doc, parent), dict):
                if _get_path(out, parent) is None:
                    _set_path(out, parent, {})
                break
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
    name = "/".join(part.strip() for part in name.split("/"))
    if any(not part for part in name.split("/")):
        raise ApiError(400, 407, f"Invalid project name: name={name}")
    with api.store.lock:
        project_id = _create_unique(api, "project", _new_project(name, body), subcode=801)
        _ensure_parents(api, name)
    return {"id": project_id}


def _ensure_parents(api: Api, name: str) -> None:
    """Create the missing parents of ``a/b/c`` (``a``, ``a/b``) as plain projects, as the real server does."""
    existing = {p["name"] for p in api.store.all("project")}
    parts = name.split("/")
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        if parent not in existing:
            api.store.put("project", _new_project(parent, {}))
            existing.add(parent)


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


def _require_editable(task: Document, body: dict[str, Any]) -> None:
    """The real server edits only ``created`` tasks; ``force`` also allows queued and running ones."""
    allowed = ("created", *RUNNING) if body.get("force") else ("created",)
    if task["status"] not in allowed:
        raise ApiError(400, 110, f"Invalid task status: expected=created, status={task['status']}")


@endpoint("tasks.edit")
@endpoint("tasks.update")
def tasks_edit(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    if not body.get("force") and task["status"] != "created":
        raise ApiError(400, 110, f"Invalid task status: expected=created, status={task['status']}")
    fields = {k: body[k] for k in TASK_FIELDS if k in body}
    if "execution" in fields:
        execution = dict(task.get("execution") or {})
        execution.update(fields["execution"] or {})
        execution["artifacts"] = _artifact_list(execution.get("artifacts"))
        fields["execution"] = execution
    if "output__error" in body:
        fields["output.error"] = body["output__error"]
    if "output_dest" in body:  # how the SDK sets ``output_uri``
        fields["output.destination"] = body["output_dest"] or None
    if fields.get("project") and fields["project"] != task.get("project") and \
            api.store.get("project", fields["project"]) is None:
        raise ApiError(400, 101, f"Invalid project id: project={fields['project']}")
    return api.edit("task", task["id"], fields)


def _status_change(api: Api, body: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    """Move a task to ``status`` if the state machine allows it (or ``force``)."""
    task = api.require("task", body, "task")
    current = task["status"]
    if status != current and status not in STATE_MACHINE.get(current, set()) and not body.get("force"):
        raise ApiError(400, 110, f"Invalid status change: current_status={current}, new_status={status}")
    stamp = now()
    fields: dict[str, Any] = {"status": status, "status_changed": stamp,
                              "status_reason": body.get("status_reason") or "",
                              "status_message": body.get("status_message") or ""}
    if status == "in_progress" and not (current == "in_progress" and task.get("started")):
        fields["started"] = stamp
    if status in ("completed", "stopped", "failed"):
        fields["completed"] = stamp
    fields.update(extra)
    cleared = [key for key, value in fields.items() if value is None]

    def clear(doc: Document) -> None:
        for key in cleared:
            _set_path(doc, key, None)
        if status == "queued":  # an enqueued task is no longer a local development run
            doc["system_tags"] = [t for t in doc.get("system_tags") or [] if t != DEVELOPMENT]

    with api.store.lock:
        result = api.edit("task", task["id"], fields)
        api.store.update("task", task["id"], clear)
    return result


@endpoint("tasks.started")
def tasks_started(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {**_status_change(api, body, "in_progress", completed=None), "started": 1}


@endpoint("tasks.stopped")
def tasks_stopped(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "stopped")


@endpoint("tasks.stop")
def tasks_stop(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """A development (local) run, or ``force``, stops at once; an agent's run is asked to stop
    (``status_message: stopping``) and the agent aborts it and reports ``stopped``."""
    task = api.require("task", body, "task")
    if task["status"] == "queued":
        _dequeue(api, task)
        return _status_change(api, {**body, "force": True}, "stopped")
    if DEVELOPMENT in (task.get("system_tags") or []) or body.get("force") or task["status"] != "in_progress":
        return _status_change(api, body, "stopped")
    return api.edit("task", task["id"], {"status_message": "stopping",
                                         "status_reason": body.get("status_reason") or "stopped by user"})


@endpoint("tasks.failed")
def tasks_failed(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "failed")


@endpoint("tasks.completed")
def tasks_completed(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    result = _status_change(api, body, "completed")
    published = bool(body.get("publish"))
    if published:
        result = _status_change(api, body, "published")
    return {**result, "published": int(published)}


@endpoint("tasks.close")
def tasks_close(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _status_change(api, body, "closed")


@endpoint("tasks.publish")
def tasks_publish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    if task["status"] == "published":
        raise ApiError(400, 113, f"Task published (invalid task status): task={task['id']}")
    return _status_change(api, body, "published")


@endpoint("tasks.reset")
def tasks_reset(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Back to ``created``: dequeued, events and results cleared (published tasks need ``force``)."""
    task = api.require("task", body, "task")
    if task["status"] == "published" and not body.get("force"):
        raise ApiError(400, 113, f"Task published (invalid task status): task={task['id']}")
    dequeued = _dequeue(api, task)
    api.store.delete_events(task["id"])
    result = _status_change(api, {**body, "force": True}, "created", started=None, completed=None,
                            last_metrics={}, last_iteration=0, **{"execution.queue": None,
                                                                 "models.output": [], "output.result": None})
    return {**result, "dequeued": {"removed": int(dequeued)} if dequeued else {}, "deleted_models": 0,
            "urls": {}}


@endpoint("tasks.enqueue")
def tasks_enqueue(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    current = task["status"]
    if current not in ("created", "stopped", "failed") and not body.get("force"):
        raise ApiError(400, 110, f"Invalid status change: current_status={current}, new_status=queued")
    queue = _resolve_queue(api, body.get("queue"), body.get("queue_name"))
    execution = dict(task.get("execution") or {})
    execution["queue"] = queue["id"]

    def add_entry(doc: Document) -> None:
        doc["entries"] = [e for e in doc.get("entries", []) if e["task"] != task["id"]]
        doc["entries"].append({"task": task["id"], "added": now()})
        doc["last_update"] = now()

    with api.store.lock:
        result = _status_change(api, {**body, "force": True}, "queued", execution=execution,
                                enqueue_status=current)
        api.store.update("queue", queue["id"], add_entry)
    return {**result, "queued": 1, "queue_watched": any(queue["id"] in w.get("queue_ids", [])
                                                         for w in _live_workers(api))}


def _dequeue(api: Api, task: Document) -> bool:
    """Remove a task from every queue; True when it was in one."""
    removed = False
    with api.store.lock:
        for queue in api.store.all("queue"):
            if any(e["task"] == task["id"] for e in queue.get("entries", [])):
                api.store.update("queue", queue["id"], lambda d: d.update(
                    entries=[e for e in d.get("entries", []) if e["task"] != task["id"]], last_update=now()))
                removed = True
    return removed


@endpoint("tasks.dequeue")
def tasks_dequeue(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Take a task out of its queue; a queued or running task goes back to the status it had
    before ``enqueue`` (or ``new_status``), anything else is left alone (``updated: 0``)."""
    task_id = body.get("task")
    task = api.store.get("task", task_id) if isinstance(task_id, str) else None
    if task is None:
        api.require("task", body, "task")
    dequeued = _dequeue(api, task)
    if task["status"] not in RUNNING:
        return {"dequeued": int(dequeued), "updated": 0, "fields": {}}
    new_status = body.get("new_status") or task.get("enqueue_status") or "created"
    if new_status not in STATE_MACHINE:
        raise ApiError(400, 12, f"Validation error: Invalid task status: {new_status}")
    result = _status_change(api, {**body, "force": True}, new_status, enqueue_status=None)
    return {**result, "dequeued": int(dequeued)}


@endpoint("tasks.clone")
def tasks_clone(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """A new ``created`` task with the source's script, parameters, configuration and input
    models; no results, output models, events, runtime or queue (as the real server)."""
    source = api.require("task", body, "task")
    project = body.get("new_task_project") or None
    answer: dict[str, Any] = {}
    if not project and body.get("new_project_name"):
        name = body["new_project_name"]
        with api.store.lock:
            found = [p for p in api.store.all("project") if p["name"] == name]
            project = found[0]["id"] if found else projects_create(api, {"name": name})["id"]
        answer["new_project"] = {"id": project, "name": name}
    if project and api.store.get("project", project) is None:
        raise ApiError(400, 101, f"Invalid project id: new_task_project={project}")
    execution = copy.deepcopy(source.get("execution") or {})
    execution.update(body.get("execution_overrides") or {})
    execution["queue"] = None
    execution["artifacts"] = [a for a in _artifact_list(execution.get("artifacts"))
                              if a.get("mode", "output") != "output"]
    parent = source.get("parent") or source["id"]
    clone = _new_task({
        "name": body.get("new_task_name") or source["name"], "type": source.get("type"),
        "comment": body.get("new_task_comment") or source.get("comment"),
        "project": project or source.get("project"), "parent": body.get("new_task_parent") or parent,
        "tags": body.get("new_task_tags") or source.get("tags"),
        "system_tags": body.get("new_task_system_tags") or [
            t for t in source.get("system_tags") or [] if t not in (DEVELOPMENT, ARCHIVED)],
        "script": source.get("script"), "container": body.get("new_task_container") or source.get("container"),
        "hyperparams": body.get("new_task_hyperparams") or source.get("hyperparams"),
        "configuration": body.get("new_task_configuration") or source.get("configuration"),
        "models": {"input": body.get("new_task_input_models") or (source.get("models") or {}).get("input", []),
                   "output": []},
        "execution": execution,
    })
    clone["output"]["destination"] = (source.get("output") or {}).get("destination")
    api.store.put("task", clone)
    return {"id": clone["id"], **answer}


@endpoint("tasks.delete")
def tasks_delete(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Delete a task, its events and (``delete_output_models``, default true) the output models
    no other task uses; children are re-parented. Needs ``force`` unless created or archived."""
    task = api.require("task", body, "task")
    if task["status"] != "created" and ARCHIVED not in (task.get("system_tags") or []) and not body.get("force"):
        raise ApiError(400, 123, f"Task cannot be deleted: due to status, use force=True: task={task['id']}, "
                                 f"expected=created, current={task['status']}")
    urls: dict[str, list[str]] = {"model_urls": [], "event_urls": [], "artifact_urls": []}
    with api.store.lock:
        _dequeue(api, task)
        deleted_events = api.store.delete_events(task["id"])
        updated_children = 0
        for child in api.store.all("task"):
            if child.get("parent") == task["id"]:
                api.store.update("task", child["id"], lambda d: d.update(parent=None))
                updated_children += 1
        updated_models = 0
        output_ids = {m.get("model") for m in (task.get("models") or {}).get("output", [])}
        for model in api.store.all("model"):
            if model.get("task") != task["id"] and model["id"] not in output_ids:
                continue
            if body.get("delete_output_models", True) and not model.get("ready"):
                api.store.delete("model", model["id"])
                if model.get("uri"):
                    urls["model_urls"].append(model["uri"])
            else:
                api.store.update("model", model["id"], lambda d: d.update(task=None))
                updated_models += 1
        urls["artifact_urls"] = [a["uri"] for a in _artifact_list((task.get("execution") or {}).get("artifacts"))
                                 if a.get("uri")]
        api.store.delete("task", task["id"])
    answer: dict[str, Any] = {"deleted": True, "updated_children": updated_children, "updated_models": updated_models,
                              "events": {"deleted": deleted_events}}
    if body.get("return_file_urls"):
        answer["urls"] = urls
    return answer


def _archive(api: Api, kind: str, ids: list[str], archive: bool) -> dict[str, Any]:
    succeeded, failed = [], []
    for doc_id in ids or []:
        if api.store.get(kind, doc_id) is None:
            failed.append({"id": doc_id, "error": {"codes": [400, 201 if kind == "model" else 101],
                                                   "msg": f"Invalid {kind} id", "data": {"id": doc_id}}})
            continue

        def change(doc: Document) -> None:
            tags = [t for t in doc.get("system_tags") or [] if t != ARCHIVED]
            doc["system_tags"] = [*tags, ARCHIVED] if archive else tags
            doc["last_update"] = now()

        api.store.update(kind, doc_id, change)
        succeeded.append({"id": doc_id, ("archived" if archive else "unarchived"): True})
    return {"succeeded": succeeded, "failed": failed}


@endpoint("tasks.archive_many")
def tasks_archive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    for task_id in body.get("ids") or []:
        task = api.store.get("task", task_id)
        if task is not None and task["status"] in RUNNING:
            _dequeue(api, task)
            _status_change(api, {"task": task_id, "force": True}, "stopped")
    return _archive(api, "task", body.get("ids") or [], True)


@endpoint("tasks.unarchive_many")
def tasks_unarchive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _archive(api, "task", body.get("ids") or [], False)


@endpoint("tasks.archive")
def tasks_archive(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    ids = _as_list(body.get("tasks")) or []
    return {"archived": len(tasks_archive_many(api, {"ids": ids})["succeeded"])}


@endpoint("tasks.delete_configuration")
def tasks_delete_configuration(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    _require_editable(task, body)
    names = set(_as_list(body.get("configuration")) or [])
    deleted = sorted(names & set(task.get("configuration") or {}))
    api.store.update("task", task["id"], lambda d: d.update(
        configuration={k: v for k, v in (d.get("configuration") or {}).items() if k not in names}, last_change=now()))
    return {"deleted": int(bool(deleted))}


@endpoint("tasks.get_types")
def tasks_get_types(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    projects = _as_list(body.get("projects"))
    return {"types": sorted({t.get("type") for t in api.store.all("task")
                             if t.get("type") and (projects is None or t.get("project") in projects)})}


def _batch(single: Handler, field: str, shape: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> Handler:
    """``*_many``: the single-entity endpoint for each of ``ids``, answered as ClearML's batch
    result (``succeeded`` with each answer, ``failed`` with each error)."""

    def run(api: Api, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids:
            raise ApiError(400, 17, "Batch request contains no items: ids")
        rest = {k: v for k, v in body.items() if k != "ids"}
        succeeded, failed = [], []
        for doc_id in ids:
            try:
                succeeded.append({"id": doc_id, **shape(single(api, {**rest, field: doc_id}))})
            except ApiError as exc:
                failed.append({"id": doc_id, "error": {"codes": [exc.code, exc.subcode], "msg": exc.message,
                                                       "data": {field: doc_id}}})
        return {"succeeded": succeeded, "failed": failed}

    return run


@endpoint("models.archive_many")
def models_archive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _archive(api, "model", body.get("ids") or [], True)


@endpoint("models.unarchive_many")
def models_unarchive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _archive(api, "model", body.get("ids") or [], False)


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


def _properties_only(items: list[dict[str, Any]]) -> bool:
    """Parameters of the ``properties`` section may change in any status (as the real server)."""
    return bool(items) and all(item.get("section") == "properties" for item in items)


@endpoint("tasks.edit_hyper_params")
def tasks_edit_hyper_params(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    if not _properties_only(body.get("hyperparams") or []):
        _require_editable(task, body)
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


@endpoint("tasks.delete_hyper_params")
def tasks_delete_hyper_params(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Remove parameters (``{section, name}``) or whole sections (``{section}``)."""
    task = api.require("task", body, "task")
    items = [i for i in body.get("hyperparams") or [] if isinstance(i, dict) and i.get("section")]
    if not _properties_only(items):
        _require_editable(task, body)
    whole = {i["section"] for i in items if not i.get("name")}
    if any(i.get("name") and i["section"] in whole for i in items):
        raise ApiError(400, 15, "Conflicting fields: cannot delete section field if the whole section was "
                                "scheduled for deletion")
    deleted = []

    def change(doc: Document) -> None:
        params = doc.setdefault("hyperparams", {})
        for item in items:
            section = params.get(item["section"])
            if section is None:
                continue
            if not item.get("name"):
                del params[item["section"]]
                deleted.append(item["section"])
            elif item["name"] in section:
                del section[item["name"]]
                deleted.append(item["name"])
        doc["last_change"] = now()

    api.store.update("task", task["id"], change)
    return {"deleted": int(bool(deleted))}


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
    _require_editable(task, body)

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


@endpoint("tasks.delete_artifacts")
def tasks_delete_artifacts(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Remove artifacts by ``{key, mode}`` (mode defaults to ``output``); any status, as the real server."""
    task = api.require("task", body, "task")
    doomed = {(a.get("key"), a.get("mode") or "output") for a in body.get("artifacts") or [] if isinstance(a, dict)}
    removed = []

    def change(doc: Document) -> None:
        keep = []
        for artifact in _artifact_list(doc["execution"].get("artifacts")):
            if (artifact.get("key"), artifact.get("mode") or "output") in doomed:
                removed.append(artifact.get("key"))
            else:
                keep.append(artifact)
        doc["execution"]["artifacts"] = keep
        doc["last_change"] = now()

    api.store.update("task", task["id"], change)
    return {"deleted": int(bool(removed))}


@endpoint("tasks.edit_runtime")
def tasks_edit_runtime(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")

    def change(doc: Document) -> None:
        doc["runtime"] = {**(doc.get("runtime") or {}), **(body.get("runtime") or {})}

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
        published = _status_change(api, {"task": task["id"], "force": bool(body.get("force_publish_task"))},
                                   "published")
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


def ensure_default_queue(api: Api) -> None:
    """The real server creates the ``default`` queue at start-up."""
    _resolve_queue(api, None, "default")


@endpoint("queues.update")
def queues_update(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = api.require("queue", body, "queue")
    fields = {k: body[k] for k in ("name", "tags", "system_tags", "display_name") if k in body}
    return api.edit("queue", queue["id"], fields)


@endpoint("queues.delete")
def queues_delete(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = api.require("queue", body, "queue")
    if queue.get("entries") and not body.get("force"):
        raise ApiError(400, 702, f"Queue is not empty: queue={queue['id']}")
    api.store.delete("queue", queue["id"])
    return {"deleted": 1}


@endpoint("queues.get_next_task")
def queues_get_next_task(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Pop the queue's first entry (an agent takes it); ``{}`` when the queue is empty."""
    queue = api.require("queue", body, "queue")
    with api.store.lock:
        queue = api.store.get("queue", queue["id"]) or queue
        for entry in queue.get("entries", []):
            task = api.store.get("task", entry["task"])
            api.store.update("queue", queue["id"], lambda d, taken=entry["task"]: d.update(
                entries=[e for e in d.get("entries", []) if e["task"] != taken], last_update=now()))
            if task is None or task["status"] != "queued":
                continue  # deleted or dequeued meanwhile: skip, as the real server does
            answer: dict[str, Any] = {"entry": entry}
            if body.get("get_task_info"):
                answer["task_info"] = {"company": COMPANY_ID, "user": task.get("user") or USER_ID}
            return answer
    return {}


@endpoint("queues.remove_task")
def queues_remove_task(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = api.require("queue", body, "queue")
    task_id = body.get("task")
    if not any(e["task"] == task_id for e in queue.get("entries", [])):
        raise ApiError(400, 703, f"Invalid queue id or task not in queue: queue={queue['id']}, task={task_id}")
    api.store.update("queue", queue["id"], lambda d: d.update(
        entries=[e for e in d.get("entries", []) if e["task"] != task_id], last_update=now()))
    return {"removed": 1}


@endpoint("queues.add_task")
def queues_add_task(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = api.require("queue", body, "queue")
    task = api.require("task", body, "task")
    api.store.update("queue", queue["id"], lambda d: d.update(
        entries=[*[e for e in d.get("entries", []) if e["task"] != task["id"]], {"task": task["id"], "added": now()}],
        last_update=now()))
    return {"added": 1}


@endpoint("queues.peek_task")
def queues_peek_task(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = api.require("queue", body, "queue")
    entries = queue.get("entries", [])
    return {"task": entries[0]["task"] if entries else None}


@endpoint("queues.get_num_entries")
def queues_get_num_entries(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"num": len(api.require("queue", body, "queue").get("entries", []))}


# -- workers -------------------------------------------------------------------------------
# Workers (agents) are kept in memory, as the real server keeps them in Redis: they re-register
# when the server restarts. A worker not heard from for its ``timeout`` is dropped.
WORKER_TIMEOUT_S = 600


def _live_workers(api: Api) -> list[dict[str, Any]]:
    stamp = datetime.now(timezone.utc).timestamp()
    for worker_id, worker in list(api.workers.items()):
        if stamp - worker["seen"] > worker["timeout"]:
            del api.workers[worker_id]
    return list(api.workers.values())


def _worker_id(body: dict[str, Any]) -> str:
    worker = body.get("worker")
    if not isinstance(worker, str) or not worker:
        raise ApiError(400, 12, "Validation error: missing required field 'worker'")
    return worker


def _touch_worker(api: Api, body: dict[str, Any], *, register: bool) -> dict[str, Any]:
    worker_id = _worker_id(body)
    stamp = now()
    worker = api.workers.get(worker_id)
    if worker is None:
        if not register:
            raise ApiError(400, 1004, f"Worker is not registered: worker={worker_id}")
        worker = api.workers[worker_id] = {"id": worker_id, "register_time": stamp, "queue_ids": [], "task": None,
                                       "queue": None, "tags": [], "system_tags": [],
                                       "timeout": WORKER_TIMEOUT_S, "task_started": None}
    if isinstance(body.get("timeout"), int) and body["timeout"] > 0:
        worker["timeout"] = body["timeout"]
    if isinstance(body.get("queues"), list):
        worker["queue_ids"] = [q for q in body["queues"] if isinstance(q, str)]
    for key in ("tags", "system_tags"):
        if isinstance(body.get(key), list):
            worker[key] = body[key]
    if not register:
        task = body.get("task") or None
        if task != worker["task"]:
            worker["task_started"] = stamp if task else None
        worker["task"], worker["queue"] = task, body.get("queue") or None
        worker["last_report_time"] = stamp
        if isinstance(body.get("machine_stats"), dict):
            worker["machine_stats"] = body["machine_stats"]
        if task:
            api.store.update("task", task, lambda d: d.update(last_worker=worker_id, last_update=now()))
    worker["last_activity_time"] = stamp
    worker["seen"] = datetime.now(timezone.utc).timestamp()
    return worker


@endpoint("workers.register")
def workers_register(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    _touch_worker(api, body, register=True)
    return {}


@endpoint("workers.unregister")
def workers_unregister(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    api.workers.pop(_worker_id(body), None)
    return {}


@endpoint("workers.status_report")
def workers_status_report(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    _touch_worker(api, body, register=True)  # as the real server: a report re-registers a lost worker
    _touch_worker(api, body, register=False)
    return {}


def _worker_view(api: Api, worker: dict[str, Any]) -> dict[str, Any]:
    queues = {q["id"]: q for q in api.store.all("queue")}

    def queue_entry(queue_id: str) -> dict[str, Any]:
        queue = queues.get(queue_id) or {}
        entries = queue.get("entries", [])
        nxt = api.store.get("task", entries[0]["task"]) if entries else None
        return {"id": queue_id, "name": queue.get("name"), "num_tasks": len(entries),
                "next_task": {"id": nxt["id"], "name": nxt["name"]} if nxt else None}

    task = api.store.get("task", worker["task"]) if worker.get("task") else None
    view: dict[str, Any] = {
        "id": worker["id"], "key": f"worker_{COMPANY_ID}_{worker['id']}", "ip": "127.0.0.1",
        "user": {"id": USER_ID, "name": "stepwise"}, "company": {"id": COMPANY_ID, "name": "stepwise"},
        "register_time": worker["register_time"], "last_activity_time": worker["last_activity_time"],
        "last_report_time": worker.get("last_report_time"), "tags": worker["tags"],
        "system_tags": worker["system_tags"], "queues": [queue_entry(q) for q in worker["queue_ids"]],
        "queue": queue_entry(worker["queue"]) if worker.get("queue") else None, "task": None, "project": None,
    }
    if task is not None:
        started = datetime.fromisoformat(worker["task_started"]) if worker.get("task_started") else None
        running = int((datetime.now(timezone.utc) - started).total_seconds()) if started else 0
        view["task"] = {"id": task["id"], "name": task["name"], "running_time": running,
                        "last_iteration": task.get("last_iteration")}
        project = api.store.get("project", task.get("project") or "")
        view["project"] = {"id": project["id"], "name": project["name"]} if project else None
    return view


@endpoint("workers.get_all")
def workers_get_all(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    workers = [w for w in _live_workers(api) if match_tags(w["tags"], _as_list(body.get("tags")))
               and match_tags(w["system_tags"], _as_list(body.get("system_tags")))]
    last_seen = body.get("last_seen", 3600)
    if isinstance(last_seen, int) and last_seen > 0:
        cutoff = datetime.now(timezone.utc).timestamp() - last_seen
        workers = [w for w in workers if w["seen"] >= cutoff]
    return {"workers": [_worker_view(api, w) for w in workers]}


@endpoint("workers.get_runtime_properties")
def workers_get_runtime_properties(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    _worker_id(body)
    return {"runtime_properties": []}


@endpoint("workers.set_runtime_properties")
def workers_set_runtime_properties(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    _worker_id(body)
    return {}


# -- events --------------------------------------------------------------------------------
SINGLE_VALUE_ITERATION = -(2**31)  # the iteration ``Logger.report_single_value`` reports at
EVENT_KINDS = {"training_stats_scalar", "training_stats_vector", "training_debug_image", "plot", "log"}


def add_events(api: Api, events: list[Any]) -> dict[str, Any]:
    """``events.add_batch``: store events, keep each task's last metrics and iteration."""
    rows = []
    errors = 0
    last: dict[str, dict[str, Any]] = {}
    extremes: dict[tuple[Any, ...], tuple[Any, Any]] = {}  # (task, metric, variant) -> (min, max) of the batch
    for event in events:
        if not isinstance(event, dict) or event.get("type") not in EVENT_KINDS or not event.get("task"):
            errors += 1
            continue
        rows.append((event["task"], event["type"], event))
        if event["type"] == "training_stats_scalar":
            key = (event.get("metric"), event.get("variant"))
            last.setdefault(event["task"], {})[key] = event
            value, iteration = event.get("value"), event.get("iter")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                low, high = extremes.get((event["task"], *key), (None, None))
                if low is None or value < low[0]:
                    low = (value, iteration)
                if high is None or value > high[0]:
                    high = (value, iteration)
                extremes[(event["task"], *key)] = (low, high)
            else:
                extremes.setdefault((event["task"], *key), (None, None))
    api.store.add_events(rows)
    for task_id, metrics in last.items():
        def change(doc: Document, metrics: dict = metrics, task_id: str = task_id) -> None:
            for (metric, variant), event in metrics.items():
                key_metric, key_variant = _metric_key(metric), _metric_key(variant)
                variants = doc["last_metrics"].setdefault(key_metric, {})
                variants[key_variant] = _last_metric(variants.get(key_variant), metric, variant,
                                                     extremes[(task_id, metric, variant)], event)
                if isinstance(event.get("iter"), int):
                    doc["last_iteration"] = max(doc.get("last_iteration") or 0, event["iter"])

        api.store.update("task", task_id, change)
    return {"added": len(rows), "errors": errors, "errors_info": {}}


def _last_metric(previous: dict[str, Any] | None, metric: Any, variant: Any,
                 extremes: tuple[Any, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A ``last_metrics`` entry: the last value and the min/max so far with their iterations."""
    entry = {**(previous or {}), "metric": metric, "variant": variant, "value": event.get("value"),
             "iter": event.get("iter")}
    low, high = extremes
    if low is not None and (entry.get("min_value") is None or low[0] < entry["min_value"]):
        entry["min_value"], entry["min_value_iteration"] = low
    if high is not None and (entry.get("max_value") is None or high[0] > entry["max_value"]):
        entry["max_value"], entry["max_value_iteration"] = high
    entry.setdefault("first_value", event.get("value"))
    entry.setdefault("first_value_iteration", event.get("iter"))
    return entry


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
    """Console reports, ``batch_size`` at a time: the latest first when ``navigate_earlier``
    (the default), or from the first; ``order`` sets the order of the returned batch."""
    task = api.require("task", body, "task")
    events = sorted(api.store.events(task["id"], ["log"]), key=lambda e: e.get("timestamp") or 0)
    earlier = body.get("navigate_earlier", True)
    start = body.get("from_timestamp")
    if isinstance(start, (int, float)):
        events = [e for e in events if (e.get("timestamp") or 0) < start] if earlier else \
            [e for e in events if (e.get("timestamp") or 0) > start]
    total = len(events)
    size = body.get("batch_size")
    size = size if isinstance(size, int) and size > 0 else 500
    batch = events[-size:] if earlier else events[:size]
    descending = body.get("order") == "desc" if body.get("order") else earlier
    if descending:
        batch = batch[::-1]
    return {"events": batch, "returned": len(batch), "total": total}


@endpoint("events.get_task_single_value_metrics")
def events_get_task_single_value_metrics(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """The scalars reported with ``report_single_value`` (iteration -2**31), the latest per name."""
    result = []
    for task_id in _as_list(body.get("tasks")) or []:
        task = api.store.get("task", task_id)
        if task is None:
            raise ApiError(400, 101, f"Invalid task id: task={task_id}")
        values: dict[tuple[Any, Any], dict[str, Any]] = {}
        for event in api.store.events(task_id, ["training_stats_scalar"]):
            if event.get("iter") == SINGLE_VALUE_ITERATION:
                values[(event.get("metric"), event.get("variant"))] = {
                    "metric": event.get("metric"), "variant": event.get("variant"), "value": event.get("value"),
                    "timestamp": event.get("timestamp")}
        result.append({"task": task_id, "values": list(values.values())})
    return {"tasks": result}


@endpoint("events.delete_for_task")
def events_delete_for_task(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    if task["status"] == "published" and not body.get("allow_locked"):
        raise ApiError(400, 113, f"Task published (invalid task status): task={task['id']}")
    return {"deleted": api.store.delete_events(task["id"])}


@endpoint("events.get_task_plots")
def events_get_task_plots(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    plots = api.store.events(task["id"], ["plot"])
    return {"plots": plots, "returned": len(plots), "total": len(plots), "scroll_id": None}


@endpoint("events.debug_images")
def events_debug_images(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Debug samples per task, newest iteration first, ``iters`` iterations per call; the
    ``scroll_id`` continues where the last call stopped (then an empty page)."""
    scroll = _decode_scroll(body.get("scroll_id"))
    iters = body.get("iters")
    iters = iters if isinstance(iters, int) and iters > 0 else 1
    answer, new_scroll = [], {}
    for request in body.get("metrics") or []:
        if not isinstance(request, dict) or not request.get("task"):
            continue
        task_id, metric = request["task"], request.get("metric")
        variants = set(request.get("variants") or [])
        events = [e for e in api.store.events(task_id, ["training_debug_image"])
                  if (metric is None or e.get("metric") == metric) and (not variants or e.get("variant") in variants)]
        by_iter: dict[Any, dict[tuple[Any, Any], dict[str, Any]]] = {}
        for event in events:  # the last report of a (metric, variant) at an iteration replaces earlier ones
            by_iter.setdefault(event.get("iter"), {})[(event.get("metric"), event.get("variant"))] = event
        key = f"{task_id}/{metric}"
        before = scroll.get(key)
        ordered = sorted((i for i in by_iter if before is None or (i or 0) < before), key=lambda i: i or 0,
                         reverse=True)[:iters]
        if ordered:
            new_scroll[key] = ordered[-1] or 0
        elif before is not None:
            new_scroll[key] = before
        answer.append({"task": task_id, "iterations": [
            {"iter": i, "events": list(by_iter[i].values())} for i in ordered]})
    return {"metrics": answer, "scroll_id": _encode_scroll(new_scroll)}


def _encode_scroll(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode()


def _decode_scroll(scroll_id: Any) -> dict[str, Any]:
    if not scroll_id:
        return {}
    try:
        state = json.loads(base64.urlsafe_b64decode(str(scroll_id).encode()))
    except (ValueError, TypeError):
        raise ApiError(400, 1104, f"Invalid scroll id: scroll_id={scroll_id}") from None
    if not isinstance(state, dict):
        raise ApiError(400, 1104, f"Invalid scroll id: scroll_id={scroll_id}")
    return state


HANDLERS["tasks.delete_many"] = _batch(tasks_delete, "task")
HANDLERS["tasks.enqueue_many"] = _batch(tasks_enqueue, "task", lambda r: {**r, "queued": bool(r.get("queued"))})
HANDLERS["tasks.dequeue_many"] = _batch(tasks_dequeue, "task", lambda r: {**r, "dequeued": bool(r.get("dequeued"))})
HANDLERS["tasks.stop_many"] = _batch(tasks_stop, "task")
HANDLERS["tasks.reset_many"] = _batch(tasks_reset, "task")
HANDLERS["tasks.publish_many"] = _batch(tasks_publish, "task")
HANDLERS["models.delete_many"] = _batch(models_delete, "model")
