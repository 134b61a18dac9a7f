"""The local ClearML server's parts in-process: what a real process cannot show reliably.

The order of the file server's writes (an upload is fsynced before it is renamed into place, and
the rename is made durable), and worker expiry raced by many threads at once (issue 21, row 11).
"""

from __future__ import annotations

import io
import itertools
import os
import stat
import sys
import threading
from datetime import datetime, tzinfo
from pathlib import Path

import pytest

from stepwise.clearml_server import fileserver
from stepwise.clearml_server.services import create_api, workers
from stepwise.clearml_server.store import Store

pytestmark = pytest.mark.unit


def _form(boundary: str, files: dict[str, bytes]) -> bytes:
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n"
              "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
             for name, data in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_an_upload_is_fsynced_before_it_is_renamed_and_the_rename_is_made_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, incoming = tmp_path / "files", tmp_path / "incoming"
    root.mkdir()
    incoming.mkdir()
    calls: list[tuple[str, int, bool]] = []  # (call, inode, is a folder)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    def replace(source: object, target: object) -> None:
        calls.append(("replace", os.stat(source).st_ino, False))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    body = _form("b0undary", {"/p/t/a.bin": b"a" * 200_000, "/p/u/b.bin": b"b" * 10})
    saved = fileserver.store_upload(root, incoming, "multipart/form-data; boundary=b0undary", io.BytesIO(body).read,
                                    len(body))
    assert saved == {"p/t/a.bin": 200_000, "p/u/b.bin": 10}
    for name in ("p/t/a.bin", "p/u/b.bin"):
        target = root / name
        inode = target.stat().st_ino
        renamed = calls.index(("replace", inode, False))
        assert ("fsync", inode, False) in calls[:renamed], calls  # its data on disk before it is in place
        folder = ("fsync", target.parent.stat().st_ino, True)
        assert folder in calls[renamed + 1:], calls  # and the rename itself
    assert list(incoming.iterdir()) == []


class _FastClock(datetime):
    """A clock that moves on 2 s at each reading: every worker (timeout 1 s) is stale at every look."""

    readings = itertools.count()

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        return datetime.fromtimestamp(1e9 + 2 * next(cls.readings), tz)


def test_worker_expiry_raced_by_many_threads_raises_nothing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "datetime", _FastClock)
    api = create_api(Store(tmp_path / "clearml.sqlite"), lambda: "token")
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the races show up

    def race(thread: int) -> None:
        try:
            for i in range(150):
                worker = f"w-{thread}-{i % 7}"
                api.call("workers.register", {"worker": worker, "timeout": 1})
                api.call("workers.status_report", {"worker": worker, "timeout": 1})
                for entry in api.call("workers.get_all", {"last_seen": 0})["workers"]:
                    assert entry["last_activity_time"] and entry["id"]
                if i % 10 == 0:
                    api.call("workers.unregister", {"worker": worker})
        except Exception as exc:  # noqa: BLE001 - any error (a KeyError, an ApiError) is the failure
            errors.append(exc)

    try:
        for i in range(30):  # stale at the first look: they expire in every thread at once
            api.call("workers.register", {"worker": f"old-{i}", "timeout": 1})
        threads = [threading.Thread(target=race, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        api.store.close()
    assert errors == []
    assert not any(worker.startswith("old-") for worker in api.workers)
