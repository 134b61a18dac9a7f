"""ClearML's ``auth`` service: a session token for the access key and secret.

The HTTP front checks the credentials (HTTP Basic key:secret, or a token still valid) before
this endpoint runs, and signs the token (:meth:`stepwise.clearml_server.server.ClearMLServer.issue_token`).
"""

from __future__ import annotations

from typing import Any

from stepwise.clearml_server.api import Api, endpoint


@endpoint("auth.login", body="none", login=True)
def auth_login(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"token": api.issue_token()}
