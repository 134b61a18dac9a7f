"""ClearML's ``queues`` service: named queues of task entries that agents pull from.

The ``default`` queue exists from the start, as on the real server.
"""

from __future__ import annotations

from typing import Any

from stepwise.clearml_server.api import (
    COMPANY_ID,
    USER_ID,
    Api,
    ApiError,
    create_unique,
    endpoint,
    new_id,
    now,
    register_lookups,
)
from stepwise.clearml_server.store import Document

register_lookups("queue")


def _new_queue(name: str, tags: list[str] | None = None) -> Document:
    stamp = now()
    return {"id": new_id(), "name": name, "display_name": name, "user": USER_ID, "company": COMPANY_ID,
            "created": stamp, "last_update": stamp, "tags": tags or [], "system_tags": [], "entries": [],
            "metadata": {}}


def resolve_queue(api: Api, queue_id: Any, queue_name: Any) -> Document:
    """The queue with this id, else the one with this name (``default`` when none), made if missing."""
    if queue_id:
        queue = api.store.get("queue", queue_id)
        if queue is None:
            raise ApiError(400, 701, f"Invalid queue id: queue={queue_id}")
        return queue
    name = queue_name or "default"
    with api.store.transaction():
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
    return {"id": create_unique(api, "queue", _new_queue(name, body.get("tags")), subcode=702)}


@endpoint("queues.get_default")
def queues_get_default(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    queue = resolve_queue(api, None, "default")
    return {"id": queue["id"], "name": queue["name"]}


def ensure_default_queue(api: Api) -> None:
    """The real server creates the ``default`` queue at start-up."""
    resolve_queue(api, None, "default")


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
    with api.store.transaction():
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
