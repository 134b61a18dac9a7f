"""ClearML's ``workers`` service: the agents (``clearml-agent``) and what they run."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

from stepwise.clearml_server.api import COMPANY_ID, USER_ID, Api, ApiError, as_list, endpoint, match_tags, now

# Workers (agents) are kept in memory, as the real server keeps them in Redis: they re-register
# when the server restarts. A worker not heard from for its ``timeout`` is dropped. Requests run
# in threads of their own: every read and change of ``api.workers`` holds ``api.workers_lock``,
# and a worker enters the table complete, so expiry in one thread never meets a half-made or
# already-dropped worker in another.
WORKER_TIMEOUT_S = 600


def live_workers(api: Api) -> list[dict[str, Any]]:
    """The registered workers (copies), after dropping those not heard from within their ``timeout``."""
    stamp = datetime.now(timezone.utc).timestamp()
    with api.workers_lock:
        for worker_id, worker in list(api.workers.items()):
            if stamp - worker["seen"] > worker["timeout"]:
                del api.workers[worker_id]
        return [copy.deepcopy(worker) for worker in api.workers.values()]


def _worker_id(body: dict[str, Any]) -> str:
    worker = body.get("worker")
    if not isinstance(worker, str) or not worker:
        raise ApiError(400, 12, "Validation error: missing required field 'worker'")
    return worker


def _touch_worker(api: Api, body: dict[str, Any], *, register: bool) -> dict[str, Any]:
    """Register or update a worker from a request (the caller holds ``api.workers_lock``)."""
    worker_id = _worker_id(body)
    stamp = now()
    worker = api.workers.get(worker_id)
    if worker is None:
        if not register:
            raise ApiError(400, 1004, f"Worker is not registered: worker={worker_id}")
        worker = {"id": worker_id, "register_time": stamp, "queue_ids": [], "task": None, "queue": None,
                  "tags": [], "system_tags": [], "timeout": WORKER_TIMEOUT_S, "task_started": None}
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
    api.workers[worker_id] = worker
    return worker


@endpoint("workers.register")
def workers_register(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    with api.workers_lock:
        _touch_worker(api, body, register=True)
    return {}


@endpoint("workers.unregister")
def workers_unregister(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    worker_id = _worker_id(body)
    with api.workers_lock:
        api.workers.pop(worker_id, None)
    return {}


@endpoint("workers.status_report")
def workers_status_report(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    with api.workers_lock:
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
    workers = [w for w in live_workers(api) if match_tags(w["tags"], as_list(body.get("tags")))
               and match_tags(w["system_tags"], as_list(body.get("system_tags")))]
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
