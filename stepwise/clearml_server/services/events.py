"""ClearML's ``events`` service: scalars, plots, debug images and console logs of a task.

Scalars also keep the task's ``last_metrics`` (last, min and max per metric and variant) and
``last_iteration`` up to date.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from stepwise.clearml_server.api import Api, ApiError, as_list, endpoint, is_finite_number, is_integer, validation_error
from stepwise.clearml_server.store import Document

SINGLE_VALUE_ITERATION = -(2**31)  # the iteration ``Logger.report_single_value`` reports at
EVENT_KINDS = {"training_stats_scalar", "training_stats_vector", "training_debug_image", "plot", "log"}


def check_event(event: dict[str, Any], where: str) -> None:
    """Refuse an event whose fields have the wrong type: ``task``, ``metric`` and ``variant`` are
    strings, ``iter`` an integer, a scalar's ``value`` a finite number (or null). Plot payloads
    (``plot_str``) are not read: the SDK sends NaN in them.

    Raises:
        ApiError: 400 naming the field (``events[i].field``).
    """
    if not isinstance(event["task"], str):
        raise validation_error(f"{where}.task", "a string")
    for field in ("metric", "variant"):
        if event.get(field) is not None and not isinstance(event[field], str):
            raise validation_error(f"{where}.{field}", "a string")
    if event.get("iter") is not None and not is_integer(event["iter"]):
        raise validation_error(f"{where}.iter", "an integer")
    if event.get("timestamp") is not None and not is_finite_number(event["timestamp"]):
        raise validation_error(f"{where}.timestamp", "a number")
    if event["type"] == "training_stats_scalar" and event.get("value") is not None \
            and not is_finite_number(event["value"]):
        raise validation_error(f"{where}.value", "a finite number or null")


def add_events(api: Api, events: list[Any]) -> dict[str, Any]:
    """Store events; keep each task's last metrics and iteration. Anything not an event of a
    known type for a task is counted in ``errors``; an event with a field of the wrong type
    refuses the whole request (400), and nothing of it is stored.

    Raises:
        ApiError: 400 naming the field of the first event with a wrong type.
    """
    for index, event in enumerate(events):
        if isinstance(event, dict) and event.get("type") in EVENT_KINDS and event.get("task"):
            check_event(event, f"events[{index}]")
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
    with api.store.transaction():
        api.store.add_events(rows)
        _update_last_metrics(api, last, extremes)
    return {"added": len(rows), "errors": errors, "errors_info": {}}


def _update_last_metrics(api: Api, last: dict[str, dict[str, Any]],
                         extremes: dict[tuple[Any, ...], tuple[Any, Any]]) -> None:
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


@endpoint("events.add_batch", body="lines")
def events_add_batch(api: Api, body: list[Any]) -> dict[str, Any]:
    """Events as JSON lines, one event a line (how the SDK reports)."""
    return add_events(api, body)


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
    kinds = as_list(body.get("event_type"))
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
    for task_id in as_list(body.get("tasks")) or []:
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
