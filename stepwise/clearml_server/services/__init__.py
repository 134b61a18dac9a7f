"""The ClearML services the local server implements, one module per service.

The layout follows clearml-server's ``apiserver/services/``: ``auth``, ``debug``, ``events``,
``models``, ``projects``, ``queues``, ``tasks``, ``users`` and ``workers``. Importing this
package registers every endpoint (:func:`stepwise.clearml_server.api.endpoint`);
:func:`implemented_endpoints` lists them and ``stepwise clearml-server --list-endpoints`` prints
them.
"""

from __future__ import annotations

from collections.abc import Callable

from stepwise.clearml_server.api import ENDPOINTS, Api
from stepwise.clearml_server.services import auth, debug, events, models, projects, queues, tasks, users, workers
from stepwise.clearml_server.store import Store

SERVICES = (auth, debug, events, models, projects, queues, tasks, users, workers)


def implemented_endpoints() -> list[str]:
    """Every implemented ``service.action``, sorted (so grouped by service)."""
    return sorted(ENDPOINTS)


def create_api(store: Store, issue_token: Callable[[], str]) -> Api:
    """The API over ``store`` with every service registered, and the ``default`` queue in place.

    Args:
        store: the server's documents and events.
        issue_token: makes a session token for ``auth.login``.
    """
    api = Api(store, issue_token)
    queues.ensure_default_queue(api)
    return api
