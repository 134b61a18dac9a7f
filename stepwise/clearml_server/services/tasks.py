"""ClearML's ``tasks`` service: experiments, their status, parameters, configuration,
artifacts and models, and the queue they run from.

Status changes follow the real server's state machine (:data:`STATE_MACHINE`; ``force`` skips
it), only ``created`` tasks are editable without ``force``, and published tasks are read-only.
"""

from __future__ import annotations

import copy
from typing import Any

from stepwise.clearml_server.api import (
    ARCHIVED,
    COMPANY_ID,
    DEVELOPMENT,
    USER_ID,
    Api,
    ApiError,
    as_list,
    endpoint,
    new_id,
    now,
    register_batch,
    register_lookups,
    set_archived,
    set_path,
)
from stepwise.clearml_server.services import projects, queues, workers
from stepwise.clearml_server.store import Document

register_lookups("task", equal_fields=("status", "type", "user"))

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


def status_change(api: Api, body: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
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
            set_path(doc, key, None)
        if status == "queued":  # an enqueued task is no longer a local development run
            doc["system_tags"] = [t for t in doc.get("system_tags") or [] if t != DEVELOPMENT]

    with api.store.transaction():
        result = api.edit("task", task["id"], fields)
        api.store.update("task", task["id"], clear)
    return result


@endpoint("tasks.started")
def tasks_started(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {**status_change(api, body, "in_progress", completed=None), "started": 1}


@endpoint("tasks.stopped")
def tasks_stopped(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return status_change(api, body, "stopped")


@endpoint("tasks.stop")
def tasks_stop(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """A development (local) run, or ``force``, stops at once; an agent's run is asked to stop
    (``status_message: stopping``) and the agent aborts it and reports ``stopped``."""
    task = api.require("task", body, "task")
    if task["status"] == "queued":
        _dequeue(api, task)
        return status_change(api, {**body, "force": True}, "stopped")
    if DEVELOPMENT in (task.get("system_tags") or []) or body.get("force") or task["status"] != "in_progress":
        return status_change(api, body, "stopped")
    return api.edit("task", task["id"], {"status_message": "stopping",
                                         "status_reason": body.get("status_reason") or "stopped by user"})


@endpoint("tasks.failed")
def tasks_failed(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return status_change(api, body, "failed")


@endpoint("tasks.completed")
def tasks_completed(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    result = status_change(api, body, "completed")
    published = bool(body.get("publish"))
    if published:
        result = status_change(api, body, "published")
    return {**result, "published": int(published)}


@endpoint("tasks.close")
def tasks_close(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return status_change(api, body, "closed")


@endpoint("tasks.publish")
def tasks_publish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    if task["status"] == "published":
        raise ApiError(400, 113, f"Task published (invalid task status): task={task['id']}")
    return status_change(api, body, "published")


@endpoint("tasks.reset")
def tasks_reset(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Back to ``created``: dequeued, events and results cleared (published tasks need ``force``)."""
    task = api.require("task", body, "task")
    if task["status"] == "published" and not body.get("force"):
        raise ApiError(400, 113, f"Task published (invalid task status): task={task['id']}")
    dequeued = _dequeue(api, task)
    api.store.delete_events(task["id"])
    result = status_change(api, {**body, "force": True}, "created", started=None, completed=None,
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
    queue = queues.resolve_queue(api, body.get("queue"), body.get("queue_name"))
    execution = dict(task.get("execution") or {})
    execution["queue"] = queue["id"]

    def add_entry(doc: Document) -> None:
        doc["entries"] = [e for e in doc.get("entries", []) if e["task"] != task["id"]]
        doc["entries"].append({"task": task["id"], "added": now()})
        doc["last_update"] = now()

    with api.store.transaction():
        result = status_change(api, {**body, "force": True}, "queued", execution=execution,
                                enqueue_status=current)
        api.store.update("queue", queue["id"], add_entry)
    return {**result, "queued": 1, "queue_watched": any(queue["id"] in w.get("queue_ids", [])
                                                         for w in workers.live_workers(api))}


def _dequeue(api: Api, task: Document) -> bool:
    """Remove a task from every queue; True when it was in one."""
    removed = False
    with api.store.transaction():
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
    result = status_change(api, {**body, "force": True}, new_status, enqueue_status=None)
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
        with api.store.transaction():
            found = [p for p in api.store.all("project") if p["name"] == name]
            project = found[0]["id"] if found else projects.projects_create(api, {"name": name})["id"]
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
    with api.store.transaction():
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


@endpoint("tasks.archive_many")
def tasks_archive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    for task_id in body.get("ids") or []:
        task = api.store.get("task", task_id)
        if task is not None and task["status"] in RUNNING:
            _dequeue(api, task)
            status_change(api, {"task": task_id, "force": True}, "stopped")
    return set_archived(api, "task", body.get("ids") or [], True)


@endpoint("tasks.unarchive_many")
def tasks_unarchive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return set_archived(api, "task", body.get("ids") or [], False)


@endpoint("tasks.archive")
def tasks_archive(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    ids = as_list(body.get("tasks")) or []
    return {"archived": len(tasks_archive_many(api, {"ids": ids})["succeeded"])}


@endpoint("tasks.delete_configuration")
def tasks_delete_configuration(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    task = api.require("task", body, "task")
    _require_editable(task, body)
    names = set(as_list(body.get("configuration")) or [])
    deleted = sorted(names & set(task.get("configuration") or {}))
    api.store.update("task", task["id"], lambda d: d.update(
        configuration={k: v for k, v in (d.get("configuration") or {}).items() if k not in names}, last_change=now()))
    return {"deleted": int(bool(deleted))}


@endpoint("tasks.get_types")
def tasks_get_types(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    projects = as_list(body.get("projects"))
    return {"types": sorted({t.get("type") for t in api.store.all("task")
                             if t.get("type") and (projects is None or t.get("project") in projects)})}


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
    for task_id in as_list(body.get("tasks")) or []:
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
    names = as_list(body.get("names"))
    result = []
    for task_id in as_list(body.get("tasks")) or []:
        task = api.store.get("task", task_id)
        if task is None:
            raise ApiError(400, 101, f"Invalid task id: task={task_id}")
        items = [c for n, c in (task.get("configuration") or {}).items() if names is None or n in names]
        result.append({"task": task_id, "configuration": items})
    return {"configurations": result}


@endpoint("tasks.get_configuration_names")
def tasks_get_configuration_names(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    result = []
    for task_id in as_list(body.get("tasks")) or []:
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


register_batch("tasks.delete_many", tasks_delete, "task")
register_batch("tasks.enqueue_many", tasks_enqueue, "task", lambda r: {**r, "queued": bool(r.get("queued"))})
register_batch("tasks.dequeue_many", tasks_dequeue, "task",
               lambda r: {**r, "dequeued": bool(r.get("dequeued"))})
register_batch("tasks.stop_many", tasks_stop, "task")
register_batch("tasks.reset_many", tasks_reset, "task")
register_batch("tasks.publish_many", tasks_publish, "task")
