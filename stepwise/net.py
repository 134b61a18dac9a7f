"""Waiting for a server that another process is starting: the one place that polls a URL.

``stepwise up`` starts the ClearML server, ``bentoml serve`` and the explorer this way, and the
tests start theirs with it too.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import requests

from stepwise.errors import StepwiseError

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 3000


class ServerNotReady(StepwiseError):
    """A server did not answer in time, or its process exited first."""


def wait_until_ready(url: str, *, timeout: float, process: subprocess.Popen | None = None,
                     log_file: Path | None = None, name: str | None = None, interval: float = 0.2) -> None:
    """Poll ``url`` until it answers with a status below 500.

    A connection refused (nothing listening yet) and a 5xx answer (BentoML's ``/readyz`` says
    503 while the model loads) both mean "not yet".

    Args:
        url: what to GET.
        timeout: seconds to wait at most.
        process: the process that serves ``url``; if it exits first, waiting stops at once.
        log_file: where that process writes; its tail goes into the error.
        name: what the server is, for the error (default: ``url``).
        interval: seconds between tries.

    Raises:
        ServerNotReady: naming the server, the URL, the timeout or exit status, and the log's tail.
    """
    what = name or url
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReady(f"{what} exited with status {process.returncode} before {url} answered"
                                 f"{_tail(log_file)}")
        try:
            status = requests.get(url, timeout=min(5.0, max(timeout, 0.1))).status_code
            if status < 500:
                return
            log.debug("%s answered %d: not ready yet", url, status)
        except requests.RequestException:
            pass
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"{what} did not answer on {url} within {timeout:g}s{_tail(log_file)}")
        time.sleep(interval)


def _tail(log_file: Path | None) -> str:
    if log_file is None or not log_file.exists():
        return ""
    return f" (log {log_file}):\n{log_file.read_text(errors='replace')[-LOG_TAIL_CHARS:]}"
