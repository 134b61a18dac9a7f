"""ClearML's ``models`` service: the model registry (weights URI, tags, metadata, published)."""

from __future__ import annotations

from typing import Any

from stepwise.clearml_server.api import (
    COMPANY_ID,
    USER_ID,
    Api,
    ApiError,
    endpoint,
    new_id,
    now,
    register_batch,
    register_lookups,
    set_archived,
)
from stepwise.clearml_server.services import tasks
from stepwise.clearml_server.store import Document

register_lookups("model", equal_fields=("task", "framework", "uri", "user"))

MODEL_FIELDS = ("name", "uri", "comment", "tags", "system_tags", "framework", "design", "labels", "project",
                "parent", "task", "ui_cache")


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
        published = tasks.status_change(api, {"task": task["id"], "force": bool(body.get("force_publish_task"))},
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


@endpoint("models.archive_many")
def models_archive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return set_archived(api, "model", body.get("ids") or [], True)


@endpoint("models.unarchive_many")
def models_unarchive_many(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return set_archived(api, "model", body.get("ids") or [], False)


register_batch("models.delete_many", models_delete, "model")
