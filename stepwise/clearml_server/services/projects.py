"""ClearML's ``projects`` service: named projects, ``a/b/c`` nesting with the parents created."""

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

register_lookups("project")


def _new_project(name: str, body: dict[str, Any]) -> Document:
    stamp = now()
    return {
        "id": new_id(), "name": name, "basename": name.rsplit("/", 1)[-1],
        "description": body.get("description") or "", "user": USER_ID, "company": COMPANY_ID,
        "created": stamp, "last_update": stamp, "tags": body.get("tags") or [],
        "system_tags": body.get("system_tags") or [],
        "default_output_destination": body.get("default_output_destination"),
    }


@endpoint("projects.create")
def projects_create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, 12, "Validation error: missing required field 'name'")
    name = "/".join(part.strip() for part in name.split("/"))
    if any(not part for part in name.split("/")):
        raise ApiError(400, 407, f"Invalid project name: name={name}")
    with api.store.transaction():
        project_id = create_unique(api, "project", _new_project(name, body), subcode=801)
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
