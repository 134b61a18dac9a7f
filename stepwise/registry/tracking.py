"""Connecting the ``clearml`` SDK: one place for configuration and reachability.

Importing this module points the SDK at stepwise's config defaults (quick retries, see
``clearml_config/default/api.conf``) unless ``CLEARML_CONFIG_PATH`` is already set. Every
stepwise entry point that talks to ClearML calls :func:`check_server` first, so an
unreachable server is a one-line error within seconds instead of an SDK retry loop.

The server is whatever the usual variables (or ``~/clearml.conf`` from ``clearml-init``) name:
``CLEARML_API_HOST``, ``CLEARML_WEB_HOST``, ``CLEARML_FILES_HOST``, ``CLEARML_API_ACCESS_KEY``,
``CLEARML_API_SECRET_KEY``. Locally that is ``stepwise clearml-server``; elsewhere, a real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests

from stepwise.errors import RegistryUnavailable

CONFIG_DIR = Path(__file__).resolve().parents[1] / "clearml_config"  # stepwise/clearml_config
os.environ.setdefault("CLEARML_CONFIG_PATH", str(CONFIG_DIR))


class ClearMLUnavailable(RegistryUnavailable):
    """The configured ClearML server cannot be reached or refuses our credentials."""


def is_configured() -> bool:
    """Whether a ClearML server is configured at all (the variables, or ``~/clearml.conf``)."""
    return bool(os.environ.get("CLEARML_API_HOST")) or Path.home().joinpath("clearml.conf").exists()


def api_host() -> str:
    """The API server the SDK will use (environment first, then ``~/clearml.conf``)."""
    host = os.environ.get("CLEARML_API_HOST")
    if not host:
        from clearml.backend_api import Session

        host = Session.get_api_server_host()
    return (host or "").rstrip("/")


def check_server(timeout: float = 5.0) -> str:
    """Make sure the ClearML API server answers; returns its URL.

    Raises:
        ClearMLUnavailable: with a message saying which host and how to fix it.
    """
    host = api_host()
    hint = "start one with `stepwise clearml-server` or point CLEARML_API_HOST at a running server"
    if not host:
        raise ClearMLUnavailable(f"no ClearML server configured: {hint}")
    try:
        requests.get(f"{host}/debug.ping", timeout=timeout)
    except requests.RequestException as exc:
        reason = type(exc).__name__.replace("Error", " error").strip().lower()
        raise ClearMLUnavailable(f"ClearML server {host} is unreachable ({reason}): {hint}") from None
    return host
