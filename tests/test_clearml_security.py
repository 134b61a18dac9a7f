"""The local ClearML server under attack and faults: no open door, no silent loss (issue 21).

Each test is one row of the issue's table, against a real ``stepwise clearml-server`` in its own
process (and the real ``clearml`` SDK where the row involves it).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests

from stepwise.clearml_server import sdk_environment
from stepwise.net import wait_until_ready

from support.clearml_api import KEY, SECRET, call, login
from support.processes import ClearMLServerProcess, free_port, run_python

pytestmark = pytest.mark.integration



# -- row 2: acknowledged writes are committed, whatever came before ----------------------------------
def test_a_malformed_batch_is_refused_and_later_writes_are_committed(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
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
        refused = call(url, auth, "tasks.create", bad_body)
        assert refused.status_code == 400 and refused.json()["meta"]["result_subcode"] == 12, refused.text
    refused = call(url, auth, "models.create", {"name": "m", "uri": "file:///x", "project": 5})
    assert refused.status_code == 400, refused.text

    created = call(url, auth, "tasks.create", {"name": "after-the-bad-batch", "type": "training"})
    assert created.status_code == 200, created.text
    task_id = created.json()["data"]["id"]
    events = "\n".join(json.dumps({"type": "training_stats_scalar", "task": task_id, "metric": "loss",
                                   "variant": "train", "value": 1.0 / (i + 1), "iter": i}) for i in range(5))
    added = requests.post(f"{url}/v2.23/events.add_batch", data=events, headers=auth, timeout=10)
    assert added.status_code == 200 and added.json()["data"]["added"] == 5, added.text
    # nothing of the refused batches was stored
    assert call(url, auth, "events.get_task_events", {"task": task_id}).json()["data"]["total"] == 5

    # a second connection sees the acknowledged writes
    with sqlite3.connect(clearml_server.data / "clearml.sqlite") as other:
        assert other.execute("SELECT COUNT(*) FROM documents WHERE kind = 'task' AND id = ?",
                             (task_id,)).fetchone()[0] == 1
        assert other.execute("SELECT COUNT(*) FROM events WHERE task = ?", (task_id,)).fetchone()[0] == 5
        assert other.execute("SELECT COUNT(*) FROM events WHERE task = 't'").fetchone()[0] == 0
    clearml_server.restart()
    auth = login(url)
    found = call(url, auth, "tasks.get_by_id", {"task": task_id})
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
        # ... or the signed link a page shows (the pages are open on loopback), for that file only
        bearer = {"Authorization": f"Bearer {token}"}
        model = call(server.url, bearer, "models.create", {"name": "m", "uri": f"{server.url}/files/p/t/a.txt"})
        page = requests.get(f"{server.url}/projects/*/models/{model.json()['data']['id']}/general", timeout=10).text
        link = html.unescape(re.search(r'href="(/view-files/[^"]+)"', page).group(1))
        assert requests.get(f"{server.url}{link}", timeout=10).content == b"private"
        assert requests.get(f"{server.url}{link.replace('a.txt', 'b.txt')}", timeout=10).status_code == 401
    finally:
        server.stop()
    server = _Server(data, "--secret-key", "a-new-secret")
    try:
        server.wait_ready()
        old = requests.post(f"{server.url}/v2.23/tasks.get_all", json={},
                            headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert old.status_code == 401
        assert requests.get(f"{server.url}/auth.login", auth=(KEY, "a-new-secret"), timeout=10).status_code == 200
        assert KEY in server.output.read_text() and "a-new-secret" not in server.output.read_text()
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


# -- rows 4 and 7: memory and connections ---------------------------------------------------------
def _status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (``VmHWM`` in kB: the peak resident memory; ``Threads``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _raw(port: int, head: str, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send a request head (and part of a body) on a fresh socket; the answer's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        return sock.recv(4096)


def test_credentials_and_lengths_are_checked_before_the_body_is_read(clearml_server: ClearMLServerProcess) -> None:
    port = clearml_server.port
    head = f"POST /debug.ping HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {200 * 1024**2}\r\n"
    assert _raw(port, head, b"x" * 1024).startswith(b"HTTP/1.1 401")  # answered without the 200 MB
    token = login(clearml_server.url)["Authorization"]
    head = (f"POST /v2.23/tasks.get_all HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {token}\r\n"
            f"Content-Length: {200 * 1024**2}\r\n")
    assert _raw(port, head, b"{").startswith(b"HTTP/1.1 413")
    for length in ("-1", "abc", "1, 2"):
        head = (f"POST /v2.23/tasks.get_all HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {token}\r\n"
                f"Content-Length: {length}\r\n")
        assert _raw(port, head, b"{}").startswith(b"HTTP/1.1 400"), length


UPLOAD_AND_DOWNLOAD = """
import hashlib, sys
from clearml import StorageManager
url, local = sys.argv[1], sys.argv[2]
StorageManager.upload_file(local, f"{url}/files/big/blob.bin")
copy = StorageManager.get_local_copy(f"{url}/files/big/blob.bin", extract_archive=False)
print("DIGEST", hashlib.sha256(open(copy, "rb").read()).hexdigest())
"""


def test_uploads_and_downloads_stream_through_bounded_memory(clearml_server: ClearMLServerProcess,
                                                             tmp_path: Path) -> None:
    local = tmp_path / "blob.bin"
    with local.open("wb") as out:
        for i in range(96):
            out.write(hashlib.sha256(str(i).encode()).digest() * (1024**2 // 32))
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    pid = clearml_server.process.pid
    requests.get(f"{clearml_server.url}/", timeout=10)
    before = _status(pid, "VmHWM")
    result = subprocess.run([sys.executable, "-c", UPLOAD_AND_DOWNLOAD, clearml_server.url, str(local)],
                            env=clearml_server.env, capture_output=True, text=True, timeout=300)
    assert f"DIGEST {digest}" in result.stdout, result.stdout + result.stderr
    assert (clearml_server.data / "files/big/blob.bin").stat().st_size == 96 * 1024**2
    grown_mb = (_status(pid, "VmHWM") - before) / 1024
    assert grown_mb < 32, f"a 96 MiB upload and download raised the server's peak memory by {grown_mb:.0f} MB"


def test_idle_and_half_sent_connections_hold_no_thread_and_are_dropped(clearml_server: ClearMLServerProcess) -> None:
    port, pid = clearml_server.port, clearml_server.process.pid
    idle = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(100)]
    half = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(100)]
    try:
        for sock in half:
            sock.sendall(b"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert requests.get(f"{clearml_server.url}/", timeout=30).status_code == 200  # another client
        assert _status(pid, "Threads") < 16  # none of them holds a thread
        # an idle connection is closed by the server (a closed socket reads as b"")
        assert idle[0].recv(1) == b""
    finally:
        for sock in idle + half:
            sock.close()


# -- row 5: name patterns ------------------------------------------------------------------------------
def test_costly_name_patterns_are_refused_and_plain_ones_still_match(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
    assert call(url, auth, "projects.create", {"name": "a" * 40, "description": ""}).status_code == 200
    for pattern in ("(a+)+$", "(a|aa)*$", "(\\w+\\s?)*$", "(a)\\1", "a" * 300):
        answer = call(url, auth, "projects.get_all", {"name": pattern})
        assert answer.status_code == 400 and "'name'" in answer.json()["meta"]["result_msg"], pattern
    for pattern in ("a+$", "^a{40}$", "^" + "a" * 40 + "$", "a|b"):
        answer = call(url, auth, "projects.get_all", {"name": pattern})
        assert len(answer.json()["data"]["projects"]) == 1, pattern


# -- row 6: what pages are given ------------------------------------------------------------------------
def test_pages_survive_strings_nan_and_wrong_types(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
    task_id = call(url, auth, "tasks.create", {"name": "plots", "type": "training"}).json()["data"]["id"]
    figure = '{"data": [{"type": "heatmap", "z": [[NaN, 1], [Infinity, 0.5]]}], "layout": {}}'
    lines = [json.dumps({"type": "plot", "task": task_id, "metric": "confusion", "variant": "v", "iter": 3,
                         "plot_str": figure}),
             json.dumps({"type": "plot", "task": task_id, "metric": "xss", "variant": "v",
                         "iter": "<img src=x onerror=alert(1)>", "plot_str": "{}"}),
             json.dumps({"type": "training_stats_scalar", "task": task_id, "metric": "loss", "variant": "v",
                         "iter": float("nan"), "value": 1.0})]
    for line in lines[1:]:  # an iteration that is not an integer is refused
        answer = requests.post(f"{url}/v2.23/events.add_batch", data=line, headers=auth, timeout=10)
        assert answer.status_code == 400, answer.text
    assert requests.post(f"{url}/v2.23/events.add_batch", data=lines[0], headers=auth, timeout=10).json()[
        "data"]["added"] == 1
    assert call(url, auth, "models.create", {"name": "m", "uri": "x", "project": 5}).status_code == 400
    base = f"/projects/*/experiments/{task_id}"
    for path in ("/", "/projects", "/projects/*/models", f"{base}/info-output/metrics/plots",
                 f"{base}/info-output/metrics/scalar", f"/compare?ids={task_id}"):
        page = requests.get(f"{url}{path}", timeout=10)
        assert page.status_code == 200, (path, page.status_code)
        assert "onerror=alert" not in page.text
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
        assert "<script>" not in page.text  # no inline script: the CSP allows none
    plots = requests.get(f"{url}{base}/info-output/metrics/plots", timeout=10).text
    assert "NaN" not in plots and "Infinity" not in plots


def test_secrets_are_masked_in_values_not_in_the_page(tmp_path: Path) -> None:
    server = _Server(tmp_path / "data", "--access-key", "a", "--secret-key", '"')
    try:
        server.wait_ready()
        token = requests.get(f"{server.url}/auth.login", auth=("a", '"'), timeout=10).json()["data"]["token"]
        auth = {"Authorization": f"Bearer {token}"}
        call(server.url, auth, "tasks.create", {"name": 'say "a"', "type": "training"}).raise_for_status()
        page = requests.get(f"{server.url}/projects", timeout=10).text
        # the markup is intact (a text replace on the finished page turned every " and a into [hidden])
        assert "<head>" in page and "href='/projects'" in page and "charset='utf-8'" in page
        assert 'class="status' in page
        assert "s[hidden]y [hidden][hidden][hidden]" in page  # the stored value, masked
    finally:
        server.stop()


# -- rows 8 and 11: the file store's edges ------------------------------------------------------------
def test_cross_site_writes_dot_names_and_broken_uploads_leave_nothing(clearml_server: ClearMLServerProcess) -> None:
    url, data = clearml_server.url, clearml_server.data
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        answer = requests.post(f"{url}/files/", files={"/p/t/evil.txt": ("evil.txt", b"x")}, auth=(KEY, SECRET),
                               headers=headers, timeout=10)
        assert answer.status_code == 403, headers
        assert requests.delete(f"{url}/files/p/t/evil.txt", auth=(KEY, SECRET), headers=headers,
                               timeout=10).status_code == 403
    same = requests.post(f"{url}/files/", files={"/p/t/ok.txt": ("ok.txt", b"x")}, auth=(KEY, SECRET),
                         headers={"Origin": url, "Sec-Fetch-Site": "same-origin"}, timeout=10)
    assert same.status_code == 200
    for name in (".", "./", "a/./b", "/."):
        answer = requests.post(f"{url}/files/", files={name: ("x", b"x")}, auth=(KEY, SECRET), timeout=10)
        assert answer.status_code == 400, name
    # a client that stops half-way through an upload
    token = login(url)["Authorization"]
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"/p/t/half.bin\"; filename=\"half.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + b"y" * 200_000
    head = (f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(part) + 10_000}\r\n")
    with socket.create_connection(("127.0.0.1", clearml_server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + part)
    assert requests.get(f"{url}/", timeout=10).status_code == 200  # the server carries on
    deadline_checks = [p for p in data.rglob("*") if p.name.endswith(".part") or p.name == "half.bin"]
    for _ in range(50):
        if not deadline_checks:
            break
        time.sleep(0.2)
        deadline_checks = [p for p in data.rglob("*") if p.name.endswith(".part") or p.name == "half.bin"]
    assert deadline_checks == []
    assert not (data / "files/p/t/evil.txt").exists()


def _log_of(server: ClearMLServerProcess) -> Path:
    """The output file of the ``clearml_server`` fixture's process (see ``support.processes``)."""
    return server.data.parent / f"clearml-server-{server.port}.log"


# -- row 11: workers expire safely while requests race ------------------------------------------------
def test_worker_expiry_racing_in_many_threads_answers_no_5xx(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
    for i in range(40):  # workers that expire (timeout 1 s) while the threads below race
        call(url, auth, "workers.register", {"worker": f"old-{i}", "timeout": 1}).raise_for_status()
    time.sleep(1.5)
    statuses: list[int] = []
    lock = threading.Lock()

    def race(thread: int) -> None:
        session = requests.Session()
        for i in range(15):
            for name, body in (("workers.register", {"worker": f"new-{thread}-{i}", "timeout": 1}),
                               ("workers.get_all", {"last_seen": 0}),
                               ("workers.status_report", {"worker": f"old-{(thread + i) % 40}", "timeout": 1}),
                               ("workers.get_all", {})):
                answer = session.post(f"{url}/v2.23/{name}", json=body, headers=auth, timeout=30)
                with lock:
                    statuses.append(answer.status_code)

    threads = [threading.Thread(target=race, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    log = _log_of(clearml_server).read_text(errors="replace")
    assert "Traceback" not in log and "KeyError" not in log, log[-3000:]


# -- row 11: a server error answers a generic message; the details go to the log only --------------------
def test_internal_errors_answer_a_generic_500_without_paths_or_exception_text(
        clearml_server: ClearMLServerProcess) -> None:
    url, data = clearml_server.url, clearml_server.data
    auth = login(url)
    task_id = call(url, auth, "tasks.create", {"name": "broken", "type": "training"}).json()["data"]["id"]
    # the server's own folders broken under it: the upload folder gone, the events table dropped
    (data / "incoming").rmdir()
    with sqlite3.connect(data / "clearml.sqlite") as other:
        other.execute("DROP TABLE events")
    answers = [
        requests.post(f"{url}/files/", files={"/p/t/a.bin": ("a.bin", b"x")}, auth=(KEY, SECRET), timeout=10),
        requests.post(f"{url}/v2.23/events.add_batch", headers=auth, timeout=10,
                      data=json.dumps({"type": "log", "task": task_id, "msg": "hello"})),
        call(url, auth, "events.get_task_events", {"task": task_id}),
        requests.get(f"{url}/projects/*/experiments/{task_id}/output/log", timeout=10),
    ]
    for answer in answers:
        assert answer.status_code == 500, (answer.request.url, answer.status_code, answer.text)
        assert answer.json()["meta"]["result_msg"] == "Internal server error"
        for detail in (str(data), str(data.parent), "Errno", "No such file", "no such table", "OperationalError",
                       "Traceback", "sqlite", ".part", "incoming"):
            assert detail not in answer.text, (detail, answer.text)
    assert call(url, auth, "debug.ping", {}).status_code == 200  # the server carries on
    log = _log_of(clearml_server).read_text(errors="replace")
    assert "no such table: events" in log and "No such file or directory" in log  # the details are logged


# -- row 11: remote images are not loaded in the reader's browser; every page carries the headers ----------
def test_remote_images_are_not_loaded_and_every_page_type_has_the_security_headers(
        clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
    task_id = call(url, auth, "tasks.create", {"name": "images", "type": "training"}).json()["data"]["id"]
    requests.post(f"{url}/files/", files={"/p/images.x/local.png": ("local.png", b"\x89PNG fake")},
                  auth=(KEY, SECRET), timeout=10).raise_for_status()
    remote = ("https://evil.example/track.png", "//evil.example/protocol-relative.png")
    figure = {"data": [{"type": "scatter", "x": [1], "y": [1]}],
              "layout": {"images": [{"source": "https://evil.example/layout.png"},
                                    {"source": "//evil.example/layout2.png"},
                                    {"source": "data:image/png;base64,iVBORw0KGgo="}]}}
    lines = [json.dumps({"type": "training_debug_image", "task": task_id, "metric": "m", "variant": f"v{i}",
                         "iter": 1, "url": address}) for i, address in enumerate(remote)]
    lines.append(json.dumps({"type": "training_debug_image", "task": task_id, "metric": "m", "variant": "local",
                             "iter": 1, "url": f"{url}/files/p/images.x/local.png"}))
    lines.append(json.dumps({"type": "plot", "task": task_id, "metric": "p", "variant": "v", "iter": 1,
                             "plot_str": json.dumps(figure)}))
    added = requests.post(f"{url}/v2.23/events.add_batch", data="\n".join(lines), headers=auth, timeout=10)
    assert added.status_code == 200, added.text
    model_id = call(url, auth, "models.create", {"name": "m", "uri": f"{url}/files/p/images.x/local.png",
                                                  "task": task_id}).json()["data"]["id"]

    base = f"/projects/*/experiments/{task_id}"
    images = requests.get(f"{url}{base}/info-output/debugImages", timeout=10).text
    sources = re.findall(r"""src=['"]([^'"]*)['"]""", images)
    assert len(sources) == 1 and sources[0].startswith("/view-files/p/images.x/local.png?"), sources
    assert requests.get(url + html.unescape(sources[0]), timeout=10).content == b"\x89PNG fake"
    assert images.count("remote-image") == len(remote)  # named as text, not loaded
    plots = requests.get(f"{url}{base}/info-output/metrics/plots", timeout=10).text
    block = re.search(r'<script type="application/json" id="figures">(.*?)</script>', plots, re.S).group(1)
    layout_images = [image["source"] for fig in json.loads(block).values() for image in fig["layout"]["images"]]
    assert layout_images == ["data:image/png;base64,iVBORw0KGgo="]

    pages = ["/", "/projects", "/projects/*", "/projects/*/models", f"/projects/*/models/{model_id}/general",
             f"/compare?ids={task_id}", f"/compare?ids={task_id}&ids={task_id}", "/projects/nothing-here",
             "/static/plotly.min.js", "/static/figures.js", "/view-files/p/images.x/local.png",
             *(f"{base}/{tab}" for tab in ("output/log", "info-output/metrics/scalar", "info-output/metrics/plots",
                                           "info-output/debugImages", "hyper-params/hyper-param", "execution",
                                           "artifacts/output-model", "info-output/general"))]
    for path in pages:
        answer = requests.get(f"{url}{path}", auth=(KEY, SECRET), timeout=30)
        assert answer.status_code in (200, 404), (path, answer.status_code)
        policy = answer.headers.get("Content-Security-Policy", "")
        for directive in ("default-src 'self'", "script-src 'self'", "img-src 'self' data: blob:",
                          "connect-src 'self'", "frame-ancestors 'none'"):
            assert directive in policy, (path, directive)
        assert answer.headers["X-Frame-Options"] == "DENY" and answer.headers["X-Content-Type-Options"] == "nosniff"
        if answer.headers["Content-Type"].startswith("text/html"):
            assert "<script>" not in answer.text and "onsubmit=" not in answer.text, path  # no inline script
    download = requests.get(f"{url}/files/p/images.x/local.png", auth=(KEY, SECRET), timeout=10)
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in download.headers["Content-Security-Policy"]


# -- row 10: the data folder is private on loopback too ---------------------------------------------------
def test_the_data_folder_and_its_files_are_private_on_loopback(clearml_server: ClearMLServerProcess) -> None:
    url, data = clearml_server.url, clearml_server.data
    auth = login(url)
    call(url, auth, "tasks.create", {"name": "private", "type": "training"}).raise_for_status()
    requests.post(f"{url}/files/", files={"/p/t/w.bin": ("w.bin", b"weights")}, auth=(KEY, SECRET),
                  timeout=10).raise_for_status()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"clearml.sqlite", "token.key", "server.lock", "w.bin"} <= names, names
    for path in files:  # the database and its journal, keys, lock, uploads, the --trace file
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path.name, oct(path.stat().st_mode))
    printed = _log_of(clearml_server).read_text()
    assert KEY in printed and SECRET not in printed  # the start-up lines name the key, never the secret
