"""How `stepwise clearml-server` uses its TCP connections: one request each, then closed.

ClearML's own servers answer every request with ``Connection: close`` (werkzeug's server, which
runs ``apiserver`` and ``fileserver``, since 2.1.2; gunicorn's sync workers too), and the SDK
depends on it without saying so: ``Task.init`` forks the background reporter after its HTTP
session has talked to the server, so a keep-alive connection left in that session's pool becomes
one socket in two processes. When both send on it, either can read the other's answer and the
other then waits for an answer that never comes (the SDK's read timeout is 300 s): the
intermittent hang of ``test_everyday_workflow_rows``'s first SDK process.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests

from support.processes import ClearMLServerProcess, run_python

pytestmark = pytest.mark.integration


def _token(server: ClearMLServerProcess) -> str:
    return requests.get(f"{server.url}/auth.login", auth=("stepwise-local-key", "stepwise-local-secret"),
                        timeout=10).json()["data"]["token"]


def _exchange(server: ClearMLServerProcess, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``timeout`` passes)."""
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            raise AssertionError(f"the connection stayed open after {received!r}") from None
    return received


def _request(method: str, path: str, token: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_one_answer_per_connection_then_closed(clearml_server: ClearMLServerProcess) -> None:
    """Two requests written on one socket (what two processes sharing it do) get one answer, then EOF."""
    token = _token(clearml_server)
    first = _request("POST", "/v2.23/projects.get_all", token, b'{"name": "^first$"}')
    second = _request("POST", "/v2.23/projects.get_all", token, b'{"name": "^second$"}')
    received = _exchange(clearml_server, first + second)
    assert received.count(b"HTTP/1.1 ") == 1, received
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close" in head
    assert json.loads(body)["meta"]["endpoint"]["name"] == "projects.get_all"


def test_unread_body_is_drained_before_closing(clearml_server: ClearMLServerProcess) -> None:
    """An answer that needs no body (an unknown path) still reads it: one clean answer, no reset,
    no second 'request' parsed out of the body."""
    body = b"x" * (256 * 1024)
    received = _exchange(clearml_server, _request("POST", "/no/such/path", _token(clearml_server), body))
    assert received.count(b"HTTP/1.1 ") == 1, received[:300]
    assert received.startswith(b"HTTP/1.1 400") and b"Invalid request path" in received


def test_every_answer_closes_the_connection(clearml_server: ClearMLServerProcess) -> None:
    """API, file server, results pages and refusals all say ``Connection: close``."""
    token = _token(clearml_server)
    auth = {"Authorization": f"Bearer {token}"}
    answers = [
        requests.post(f"{clearml_server.url}/v2.23/debug.ping", headers=auth, timeout=10),
        requests.post(f"{clearml_server.url}/v2.23/tasks.get_by_id", json={"task": "nope"}, headers=auth, timeout=10),
        requests.post(f"{clearml_server.url}/v2.23/tasks.get_all", json={}, timeout=10),  # no token
        requests.post(f"{clearml_server.url}/files/", files={"p/a.txt": ("a.txt", b"a")}, headers=auth, timeout=10),
        requests.get(f"{clearml_server.url}/files/p/a.txt", headers=auth, timeout=10),
        requests.get(f"{clearml_server.url}/", timeout=10),
    ]
    assert [a.status_code for a in answers] == [200, 400, 401, 200, 200, 200]
    assert all(a.headers.get("Connection") == "close" for a in answers), [dict(a.headers) for a in answers]


FORKED_SESSION = """
import json, os, sys
import requests
url, token = sys.argv[1], sys.argv[2]
failures = []
for round in range(5):
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + token
    session.post(url + "/v2.23/debug.ping", timeout=5)  # leaves the session's pool as Task.init does
    pid = os.fork()  # as the SDK forks its background reporter
    me = "child" if pid == 0 else "parent"
    outcome = "ok"
    try:
        for i in range(3):
            name = f"{me}-{round}-{i}"
            made = session.post(url + "/v2.23/projects.create", json={"name": name}, timeout=5).json()["data"]
            got = session.post(url + "/v2.23/projects.get_by_id", json={"project": made["id"]}, timeout=5).json()
            if got["data"]["project"]["name"] != name:
                outcome = "another process's answer"
    except Exception as exc:
        outcome = type(exc).__name__
    if pid == 0:
        os._exit(0 if outcome == "ok" else 1)
    child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    failures += [f"round {round} parent: {outcome}"] if outcome != "ok" else []
    failures += [f"round {round} child failed"] if child else []
print(json.dumps(failures))
"""


def test_session_shared_by_a_forked_process_gets_its_own_answers(clearml_server: ClearMLServerProcess) -> None:
    """The SDK's pattern: a requests session used, then forked, then used by both processes at once."""
    result = run_python(FORKED_SESSION.replace("sys.argv[1], sys.argv[2]",
                                               f"{clearml_server.url!r}, {_token(clearml_server)!r}"),
                        clearml_server.env, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_a_body_over_the_limit_is_a_413(clearml_server: ClearMLServerProcess) -> None:
    """A Content-Length over the server's limit is refused before any of the body is read."""
    token = _token(clearml_server)
    head = (f"POST /v2.23/tasks.get_all HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {3 * 1024**3}\r\n\r\n").encode()
    received = _exchange(clearml_server, head + b"{}")
    assert received.startswith(b"HTTP/1.1 413"), received[:200]
    assert json.loads(received.partition(b"\r\n\r\n")[2])["meta"]["result_msg"] == "Request body too large"
