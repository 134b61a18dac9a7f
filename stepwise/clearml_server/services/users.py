"""ClearML's ``users`` service: the one local user."""

from __future__ import annotations

from typing import Any

from stepwise.clearml_server.api import COMPANY_ID, USER_ID, Api, endpoint


@endpoint("users.get_current_user")
def users_get_current_user(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"user": {"id": USER_ID, "name": "stepwise", "company": {"id": COMPANY_ID, "name": "stepwise"},
                     "role": "admin", "given_name": "stepwise", "family_name": "local"},
            "getting_started": {}, "settings": {}}
