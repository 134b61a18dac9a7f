"""A local ClearML server: the REST API subset the ``clearml`` SDK uses, plus a file server.

The real ClearML server needs MongoDB, Elasticsearch and Redis; this one keeps everything in
one SQLite file and a folder of uploads, so that the unchanged SDK (configured only through
``CLEARML_API_HOST``, ``CLEARML_WEB_HOST``, ``CLEARML_FILES_HOST`` and the key/secret
variables) can track experiments and hold a model registry on a laptop or in CI. Pointing the
same variables at a real server changes nothing else.

Run it with ``stepwise clearml-server [--host 127.0.0.1] [--port 8008] [--data DIR]``;
``--list-endpoints`` prints the implemented endpoints (``docs/clearml-server.md`` describes them).

The modules: ``server.py`` (the HTTP front: credentials, ClearML's envelope, routing),
``api.py`` (the one endpoint registry and dispatcher), ``services/`` (one module per ClearML
service: ``tasks``, ``models``, ``projects``, ``queues``, ``workers``, ``events``, ``auth``,
``users``, ``debug``), ``fileserver.py`` (``/files``), ``web.py`` (the results pages) and
``store.py`` (SQLite). Nothing here imports the ML code.
"""

from stepwise.clearml_server.server import ClearMLServer, local_credentials, sdk_environment, serve

__all__ = ["ClearMLServer", "local_credentials", "sdk_environment", "serve"]
