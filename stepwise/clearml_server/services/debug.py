"""ClearML's ``debug`` service: a liveness check."""

from __future__ import annotations

from typing import Any

from stepwise.clearml_server.api import Api, endpoint


@endpoint("debug.ping")
def debug_ping(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"msg": "stepwise local ClearML server"}
