"""What issue 21 found already safe in the local ClearML server, kept so.

Each against a real ``stepwise clearml-server`` in its own process: SQL is parameterised (names
with quotes round-trip, ids do not inject); markup put in through the real SDK in every place a
page shows is escaped, and Plotly JSON stays inside its script block; path-traversal downloads
and upload names are refused; expired, unsigned, wrong-key and expiry-less tokens are refused;
a server killed (SIGKILL) while events are written loses none it acknowledged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import http.client
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests

from support.clearml_api import KEY, SECRET, call, login
from support.processes import ClearMLServerProcess

pytestmark = pytest.mark.integration



# -- SQL is parameterised ------------------------------------------------------------------------------
def test_names_with_quotes_round_trip_and_ids_do_not_inject(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
    names = ["x'); DROP TABLE documents; --", "' OR '1'='1", 'say "hi" -- /* */ ;', "100% _all_ \\'"]
    ids = []
    for name in names:
        created = call(url, auth, "tasks.create", {"name": name, "type": "training", "comment": name})
        assert created.status_code == 200, created.text
        ids.append(created.json()["data"]["id"])
    for task_id, name in zip(ids, names):
        task = call(url, auth, "tasks.get_by_id", {"task": task_id}).json()["data"]["task"]
        assert task["name"] == name and task["comment"] == name
        found = call(url, auth, "tasks.get_all", {"name": f"^{re.escape(name)}$"}).json()["data"]["tasks"]
        assert [t["id"] for t in found] == [task_id]
    for injected in ("' OR '1'='1", f"{ids[0]}' OR 1=1 --", "%", "*"):
        answer = call(url, auth, "tasks.get_by_id", {"task": injected})
        assert answer.status_code == 400 and answer.json()["meta"]["result_subcode"] == 101, injected
        assert call(url, auth, "tasks.get_all", {"id": [injected]}).json()["data"]["tasks"] == []
    assert len(call(url, auth, "tasks.get_all", {}).json()["data"]["tasks"]) == len(names)


# -- markup put in through the real SDK is escaped on every page ----------------------------------------
def _text(tag: str) -> str:
    """Markup for a text field: a script, an attribute break-out, a script-block break-out."""
    return (f"<script>alert('{tag}')</script>\"><img src=x onerror=alert('{tag}')>"
            f"</script><script>alert('{tag}')</script>")


def _name(tag: str) -> str:
    """Markup for a name that becomes part of an upload path (no slash, no double quote)."""
    return f"<img src=x onerror=alert('{tag}')>"


MARKUP_SDK = """
import json, sys
import numpy as np
from clearml import OutputModel, Task
text, name, weights = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
task = Task.init(project_name=name["project"], task_name="markup", auto_connect_frameworks=False,
                 auto_resource_monitoring=False, output_uri=True, reuse_last_task_id=False)
task.add_tags([text["task tag"]])
task.set_comment(text["comment"])
task.connect({"payload": text["hyperparameter"], name["hyperparameter name"]: 1}, name="config")
task.set_configuration_object("notes", config_text=text["configuration"])
logger = task.get_logger()
logger.report_scalar(text["scalar"], text["scalar"], value=1.0, iteration=1)
logger.report_plotly(text["plot"], text["plot"], iteration=1,
                     figure={"data": [{"type": "scatter", "x": [1], "y": [1], "name": text["plot"]}],
                             "layout": {"title": text["plot"]}})
logger.report_image(name["debug image"], name["debug image"], iteration=1, image=np.zeros((4, 4, 3), np.uint8))
logger.report_text(text["console"])
task.upload_artifact(name["artifact"], artifact_object={"k": 1}, wait_on_upload=True)
model = OutputModel(task=task, name=text["model"], framework="PyTorch", tags=[text["model tag"]],
                    comment=text["model comment"])
model.update_weights(weights_filename=weights, auto_delete_file=False, async_enable=False)
model.set_metadata(text["metadata"], text["metadata"])
logger.flush()
task.flush(wait_for_uploads=True)
task.set_name(text["task"])
task.close()
print("TASK", task.id, "MODEL", model.id, "PROJECT", task.project)
"""

TEXT_PLACES = ("task", "task tag", "comment", "hyperparameter", "configuration", "scalar", "plot", "console",
               "model", "model tag", "model comment", "metadata")
NAME_PLACES = ("project", "hyperparameter name", "debug image", "artifact")
PAGE_SCRIPTS = {'<script type="application/json" id="figures">', '<script src="/static/plotly.min.js">',
                '<script src="/static/figures.js">'}


def test_markup_from_the_real_sdk_is_escaped_on_every_page(clearml_server: ClearMLServerProcess,
                                                          tmp_path: Path) -> None:
    url = clearml_server.url
    text = {place: _text(f"{i}") for i, place in enumerate(TEXT_PLACES)}
    name = {place: _name(f"n{i}") for i, place in enumerate(NAME_PLACES)}
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    result = subprocess.run([sys.executable, "-c", MARKUP_SDK, json.dumps(text), json.dumps(name), str(weights)],
                            env=clearml_server.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    found = re.search(r"^TASK (\w+) MODEL (\w+) PROJECT (\w+)$", result.stdout, re.M)
    assert result.returncode == 0 and found, result.stdout + result.stderr
    task_id, model_id, project_id = found.groups()
    base = f"/projects/{project_id}/experiments/{task_id}"
    paths = ["/", "/projects", f"/projects/{project_id}", "/projects/*/models",
             f"/projects/*/models/{model_id}/general", f"/compare?ids={task_id}",
             *(f"{base}/{tab}" for tab in ("info-output/general", "info-output/metrics/scalar",
                                           "info-output/metrics/plots", "info-output/debugImages",
                                           "hyper-params/hyper-param", "execution", "artifacts/output-model",
                                           "output/log"))]
    shown, figures = "", ""
    for path in paths:
        page = requests.get(f"{url}{path}", timeout=30)
        assert page.status_code == 200, (path, page.status_code)
        # no markup of the payloads survives; the only scripts are the page's own
        for raw in ("<script>alert", "<img src=x", "</script><script>"):
            assert raw not in page.text, (path, raw)
        assert set(re.findall(r"<script[^>]*>", page.text)) <= PAGE_SCRIPTS, path
        shown += html.unescape(page.text)
        # the figures' JSON stays inside its script block and reads back as the strings given
        for block in re.findall(r'<script type="application/json" id="figures">(.*?)</script>', page.text, re.S):
            figures += json.dumps(json.loads(block))
    for place, value in {**text, **name}.items():
        assert value in shown, place  # it reached a page, as text
    for place in ("scalar", "plot"):
        assert json.dumps(text[place])[1:-1] in figures, place


# -- the file store's paths ------------------------------------------------------------------------------
DOWNLOADS = ["/files/../token.key", "/files/%2e%2e/token.key", "/files/%2E%2E%2Ftoken.key", "/files/..%2ftoken.key",
             "/files/a/../../token.key", "/files/..%5ctoken.key", "/files//etc/passwd", "/files/%2fetc/passwd",
             "/files/token.key%00.png", "/files/./../token.key", "/files/link/token.key", "/files/C:/token.key",
             "/view-files/../token.key", "/view-files/%2e%2e/token.key", "/view-files/link/token.key",
             "/view-files/..%5ctoken.key"]
UPLOADS = ["../escape.txt", "/a/../../escape.txt", "//etc/escape.txt", "a/./../../escape.txt", "", ".", "./",
           "a/./b", "/.", "a\\..\\..\\escape.txt", "x\x00y", "C:/escape.txt", "/link/escape.txt", "a//b", "/.."]


def _listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (symbolic links listed, not followed)."""
    return sorted(os.path.relpath(os.path.join(top, entry), folder)
                  for top, dirs, files in os.walk(folder) for entry in dirs + files)


def test_path_traversal_downloads_and_upload_names_are_refused(clearml_server: ClearMLServerProcess) -> None:
    url, data = clearml_server.url, clearml_server.data
    (data / "files" / "link").symlink_to(data, target_is_directory=True)  # a link out of the store
    secret = (data / "token.key").read_bytes().strip()
    basic = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
    for path in DOWNLOADS:
        connection = http.client.HTTPConnection("127.0.0.1", clearml_server.port, timeout=10)
        connection.request("GET", path, headers={"Authorization": basic})  # the path as written
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        assert answer.status in (400, 404) and secret not in body, (path, answer.status)
    before = _listing(data)
    for name in UPLOADS:
        answer = requests.post(f"{url}/files/", files={name: ("f", b"x")}, auth=(KEY, SECRET), timeout=10)
        assert answer.status_code == 400, (name, answer.status_code)
    assert _listing(data) == before and "escape.txt" not in str(_listing(data.parent))
    stored = requests.post(f"{url}/files/", files={"/p/t/ok.txt": ("f", b"ok")}, auth=(KEY, SECRET), timeout=10)
    assert stored.status_code == 200
    assert requests.get(f"{url}/files/p/t/ok.txt", auth=(KEY, SECRET), timeout=10).content == b"ok"


# -- tokens ----------------------------------------------------------------------------------------------
def test_expired_unsigned_wrong_key_and_expiry_less_tokens_are_refused(clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    # the server's signing key: derived from token.key and the key pair (see ClearMLServer)
    seed = (clearml_server.data / "token.key").read_text().strip().encode()
    key = hmac.new(seed, f"{KEY}:{SECRET}".encode(), hashlib.sha256).hexdigest()
    now = int(time.time())
    claims = {"api_version": "2.23", "identity": {"user": "u", "company": "c", "role": "admin"}}
    tokens = {
        "valid": jwt.encode({**claims, "iat": now, "exp": now + 600}, key, algorithm="HS256"),
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, key, algorithm="HS256"),
        "wrong key": jwt.encode({**claims, "iat": now, "exp": now + 600}, "another-key-of-thirty-two-bytes!",
                                algorithm="HS256"),
        "no expiry": jwt.encode({**claims, "iat": now}, key, algorithm="HS256"),
        "unsigned": jwt.encode({**claims, "iat": now, "exp": now + 600}, None, algorithm="none"),
        "unsigned, alg stripped": jwt.encode({**claims, "iat": now, "exp": now + 600}, key,
                                             algorithm="HS256").rsplit(".", 1)[0] + ".",
    }
    for kind, token in tokens.items():
        bearer = {"Authorization": f"Bearer {token}"}
        answers = [call(url, bearer, "tasks.get_all", {}).status_code,
                   requests.get(f"{url}/auth.login", headers=bearer, timeout=10).status_code,
                   requests.get(f"{url}/files/nothing", headers=bearer, timeout=10).status_code]
        assert answers == ([200, 200, 404] if kind == "valid" else [401, 401, 401]), (kind, answers)


# -- kill -9 while events are written --------------------------------------------------------------------
def test_a_server_killed_while_events_are_written_loses_none_it_acknowledged(
        clearml_server: ClearMLServerProcess) -> None:
    url = clearml_server.url
    auth = login(url)
    task_id = call(url, auth, "tasks.create", {"name": "killed", "type": "training"}).json()["data"]["id"]
    acknowledged: list[int] = []

    def write() -> None:
        session = requests.Session()
        for batch in range(10_000):
            lines = "\n".join(json.dumps({"type": "training_stats_scalar", "task": task_id, "metric": "loss",
                                          "variant": "train", "value": 1.0, "iter": batch * 50 + i})
                              for i in range(50))
            try:
                answer = session.post(f"{url}/v2.23/events.add_batch", data=lines, headers=auth, timeout=10)
            except requests.RequestException:
                return
            if answer.status_code != 200 or answer.json()["data"]["added"] != 50:
                return
            acknowledged.append(batch)

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 20 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    clearml_server.process.kill()  # SIGKILL, mid-stream
    clearml_server.process.wait(timeout=10)
    writer.join(timeout=30)
    assert len(acknowledged) >= 20
    clearml_server.process = None
    clearml_server.start()
    with sqlite3.connect(clearml_server.data / "clearml.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {json.loads(body)["iter"] for (body,) in db.execute("SELECT body FROM events WHERE task = ?",
                                                                    (task_id,))}
    expected = {batch * 50 + i for batch in acknowledged for i in range(50)}
    assert expected <= stored, f"{len(expected - stored)} acknowledged events lost"
    total = call(url, login(url), "events.get_task_events", {"task": task_id}).json()["data"]["total"]
    assert total == len(stored)
