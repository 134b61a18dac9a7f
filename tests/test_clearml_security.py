"""The local ClearML server under attack and faults: no open door, no silent loss (issue 21).

Each test is one row of the issue's table, against a real ``stepwise clearml-server`` in its own
process (and the real ``clearml`` SDK where the row involves it).
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import requests

from stepwise.clearml_server import sdk_environment
from stepwise.net import wait_until_ready

from conftest import ClearMLServerProcess, free_port, run_python

pytestmark = pytest.mark.integration

KEY, SECRET = "stepwise-local-key", "stepwise-local-secret"  # the documented local pair


def _token(url: str) -> dict[str, str]:
    answer = requests.get(f"{url}/auth.login", auth=(KEY, SECRET), timeout=10)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['data']['token']}"}


def _call(url: str, auth: dict[str, str], name: str, body: object) -> requests.Response:
    return requests.post(f"{url}/v2.23/{name}", json=body, headers=auth, timeout=10)


# -- row 2: acknowledged writes are committed, whatever came before ----------------------------------
def test_a_malformed_batch_is_refused_and_later_writes_are_committed(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = _token(url)
    for bad in ({"type": "training_stats_scalar", "task": {"$ne": 1}, "metric": "m", "variant": "v", "value": 1,
                 "iter": 0},
                {"type": "log", "task": 10**40, "msg": "x"},
                {"type": "training_stats_scalar", "task": "t", "metric": "m", "variant": "v", "value": 1,
                 "iter": "3"}):
        lines = "\n".join([json.dumps({"type": "log", "task": "t", "msg": "ok"}), json.dumps(bad)])
        answer = requests.post(f"{url}/v2.23/events.add_batch", data=lines, headers=auth, timeout=10)
        assert answer.status_code == 400, answer.text
        meta = answer.json()["meta"]
        assert meta["result_code"] == 400 and "events[1]." in meta["result_msg"], meta
    for bad_body in ({"name": 5, "type": "training"}, {"name": "x", "type": "training", "project": {"a": 1}}):
        refused = _call(url, auth, "tasks.create", bad_body)
        assert refused.status_code == 400 and refused.json()["meta"]["result_subcode"] == 12, refused.text
    refused = _call(url, auth, "models.create", {"name": "m", "uri": "file:///x", "project": 5})
    assert refused.status_code == 400, refused.text

    created = _call(url, auth, "tasks.create", {"name": "after-the-bad-batch", "type": "training"})
    assert created.status_code == 200, created.text
    task_id = created.json()["data"]["id"]
    events = "\n".join(json.dumps({"type": "training_stats_scalar", "task": task_id, "metric": "loss",
                                   "variant": "train", "value": 1.0 / (i + 1), "iter": i}) for i in range(5))
    added = requests.post(f"{url}/v2.23/events.add_batch", data=events, headers=auth, timeout=10)
    assert added.status_code == 200 and added.json()["data"]["added"] == 5, added.text
    # nothing of the refused batches was stored
    assert _call(url, auth, "events.get_task_events", {"task": task_id}).json()["data"]["total"] == 5

    # a second connection sees the acknowledged writes
    with sqlite3.connect(clearml_server.data / "clearml.sqlite") as other:
        assert other.execute("SELECT COUNT(*) FROM documents WHERE kind = 'task' AND id = ?",
                             (task_id,)).fetchone()[0] == 1
        assert other.execute("SELECT COUNT(*) FROM events WHERE task = ?", (task_id,)).fetchone()[0] == 5
        assert other.execute("SELECT COUNT(*) FROM events WHERE task = 't'").fetchone()[0] == 0
    clearml_server.restart()
    auth = _token(url)
    found = _call(url, auth, "tasks.get_by_id", {"task": task_id})
    assert found.status_code == 200 and found.json()["data"]["task"]["name"] == "after-the-bad-batch"
    assert found.json()["data"]["task"]["last_iteration"] == 4


# -- rows 1, 9, 10: credentials ------------------------------------------------------------------
def _plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_", "STEPWISE_CLEARML_"))}
    env.update(extra)
    return env


class _Server:
    """``stepwise clearml-server`` with given flags, its output in a file."""

    def __init__(self, data: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.data = data
        self.output = data.parent / f"server-{self.port}.out"
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stepwise", "clearml-server", "--port", str(self.port), "--data", str(data),
                 *flags], stdout=out, stderr=subprocess.STDOUT, env=env or _plain_env())
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        wait_until_ready(f"{self.url}/debug.ping", timeout=30, process=self.process, log_file=self.output,
                         name="stepwise clearml-server", interval=0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def test_a_network_bind_refuses_the_default_pair_with_one_line(tmp_path: Path) -> None:
    for flags, env in ((["--secret-key", SECRET], None),
                       ([], _plain_env(STEPWISE_CLEARML_SECRET_KEY=SECRET))):
        server = _Server(tmp_path / "data", "--host", "0.0.0.0", *flags, env=env)
        assert server.process.wait(timeout=60) != 0
        lines = server.output.read_text().strip().splitlines()
        assert len(lines) == 1 and "--secret-key" in lines[0] and "Traceback" not in lines[0], lines


def test_a_network_bind_generates_a_private_pair_and_never_prints_the_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = _Server(data, "--host", "0.0.0.0")
    try:
        server.wait_ready()
        stored = json.loads((data / "credentials.json").read_text())
        assert stat.S_IMODE((data / "credentials.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "clearml.sqlite").stat().st_mode) == 0o600
        printed = server.output.read_text()
        assert stored["access_key"] in printed and stored["secret_key"] not in printed and SECRET not in printed
        assert requests.get(f"{server.url}/auth.login", auth=(KEY, SECRET), timeout=10).status_code == 401
        env = _plain_env(**sdk_environment(server.url, stored["access_key"], stored["secret_key"]),
                         CLEARML_CACHE_DIR=str(tmp_path / "cache"))
        run_python("from clearml import Task\nprint(len(Task.get_tasks(project_name='nothing-yet')))", env)
    finally:
        server.stop()


def test_tokens_follow_the_secret_and_cannot_renew_themselves(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = _Server(data, "--trace", str(tmp_path / "trace.jsonl"))
    try:
        server.wait_ready()
        login = requests.get(f"{server.url}/auth.login", auth=(KEY, SECRET), timeout=10)
        token = login.json()["data"]["token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] <= 24 * 3600
        assert token not in (tmp_path / "trace.jsonl").read_text()
        renewed = requests.get(f"{server.url}/auth.login", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert renewed.status_code == 200
        assert jwt.decode(renewed.json()["data"]["token"], options={"verify_signature": False})["exp"] <= claims["exp"]
        for header in ("Basic " + base64.b64encode("clé:sécret".encode()).decode(), "Basic ###", "Basic"):
            answer = requests.get(f"{server.url}/auth.login", headers={"Authorization": header}, timeout=10)
            assert answer.status_code == 401, (header, answer.status_code)
        # the file view answers to the same credentials as /files, on loopback too
        requests.post(f"{server.url}/files/", files={"/p/t/a.txt": ("a.txt", b"private")},
                      headers={"Authorization": f"Bearer {token}"}, timeout=10).raise_for_status()
        assert requests.get(f"{server.url}/view-files/p/t/a.txt", timeout=10).status_code == 401
        assert requests.get(f"{server.url}/view-files/p/t/a.txt", auth=(KEY, SECRET), timeout=10).content == b"private"
    finally:
        server.stop()
    server = _Server(data, "--secret-key", "a-new-secret")
    try:
        server.wait_ready()
        old = requests.post(f"{server.url}/v2.23/tasks.get_all", json={},
                            headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert old.status_code == 401
        assert requests.get(f"{server.url}/auth.login", auth=(KEY, "a-new-secret"), timeout=10).status_code == 200
    finally:
        server.stop()


# -- row 3: DNS rebinding --------------------------------------------------------------------------
def test_unknown_host_names_are_misdirected(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    for host in ("attacker.example", "attacker.example:8008", "localhost.attacker.example"):
        for path in ("/", "/projects", "/debug.ping", "/auth.login"):
            answer = requests.get(f"{url}{path}", headers={"Host": host}, auth=(KEY, SECRET), timeout=10)
            assert answer.status_code == 421, (host, path, answer.status_code)
    for host in (f"127.0.0.1:{clearml_server.port}", f"localhost:{clearml_server.port}", "[::1]:8008"):
        assert requests.get(f"{url}/", headers={"Host": host}, timeout=10).status_code == 200, host


def test_named_hosts_are_allowed_when_configured(tmp_path: Path) -> None:
    server = _Server(tmp_path / "data", "--allow-host", "gpu-box.lan")
    try:
        server.wait_ready()
        assert requests.get(f"{server.url}/", headers={"Host": "gpu-box.lan:8008"}, timeout=10).status_code == 200
        assert requests.get(f"{server.url}/", headers={"Host": "other.lan"}, timeout=10).status_code == 421
    finally:
        server.stop()


# -- row 11: one server per data folder ----------------------------------------------------------------
def test_a_second_server_on_the_same_data_exits_with_one_line(clearml_server: ClearMLServerProcess) -> None:
    second = _Server(clearml_server.data)
    assert second.process.wait(timeout=60) != 0
    lines = second.output.read_text().strip().splitlines()
    assert len(lines) == 1 and "another stepwise clearml-server" in lines[0], lines
    assert requests.get(f"{clearml_server.url}/", timeout=10).status_code == 200  # the first one still answers
