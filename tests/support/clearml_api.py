"""Calls to a running ClearML server's API as a client without the SDK would make them."""

from __future__ import annotations

import requests

KEY, SECRET = "stepwise-local-key", "stepwise-local-secret"  # the documented local pair


def login(url: str) -> dict[str, str]:
    """A Bearer header from ``auth.login`` with the documented local pair."""
    answer = requests.get(f"{url}/auth.login", auth=(KEY, SECRET), timeout=10)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['data']['token']}"}


def call(url: str, auth: dict[str, str], name: str, body: object, timeout: float = 30) -> requests.Response:
    """POST ``body`` to the API endpoint ``name`` (e.g. ``tasks.create``)."""
    return requests.post(f"{url}/v2.23/{name}", json=body, headers=auth, timeout=timeout)
