"""The plain clearml SDK against `stepwise clearml-server`, in separate processes.

Nothing here patches the SDK: each step is a fresh interpreter configured only by the usual
CLEARML_* environment variables, as a user's would be.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import requests

from support.processes import ClearMLServerProcess, free_port, run_python

WRITE_RUN = """
import os, shutil
from clearml import Task, OutputModel
task = Task.init(project_name="stepwise-test", task_name="run-1", output_uri=True,
                 auto_connect_frameworks=False, auto_resource_monitoring=False)
task.connect({"lr": 0.5, "layers": 2}, name="General")
logger = task.get_logger()
for step in range(10):
    logger.report_scalar("loss", "train", value=1.0 / (step + 1), iteration=step)
shutil.copy({weights!r}, "upload.bin")  # the SDK deletes what it uploads
model = OutputModel(task=task, name="transformer-test", framework="PyTorch", tags=["candidate"])
model.set_metadata("bleu", "12.5", "float")
model.update_weights(weights_filename="upload.bin", iteration=10)
logger.flush()
print("TASK", task.id)
print("MODEL", model.id)
task.close()
"""

READ_AND_PROMOTE = """
from clearml import Model
found = Model.query_models(project_name="stepwise-test", tags=["candidate"])
assert len(found) == 1, found
model = found[0]
data = open(model.get_local_copy(), "rb").read()
assert data == open({weights!r}, "rb").read(), "downloaded bytes differ"
assert model.get_metadata("bleu") == "12.5", model.get_all_metadata()
model.tags = ["production"]  # tag edit: candidate -> production
model.publish()
print("PROMOTED", model.id)
"""

CHECK_AFTER_RESTART = """
from clearml import Model, Task
production = Model.query_models(project_name="stepwise-test", tags=["production"])
assert [m.id for m in production] == [{model_id!r}], production
assert Model.query_models(project_name="stepwise-test", tags=["candidate"]) == []
model = Model({model_id!r})
assert model.published and model.tags == ["production"]
assert open(model.get_local_copy(), "rb").read() == open({weights!r}, "rb").read()
task = Task.get_task(task_id={task_id!r})
assert task.get_status() in ("completed", "closed", "published"), task.get_status()
scalars = task.get_reported_scalars()
assert scalars["loss"]["train"]["y"] == [1.0 / (s + 1) for s in range(10)], scalars
assert task.get_parameters()["General/lr"] == "0.5"
print("OK")
"""


def fill(template: str, **values: object) -> str:
    """Put ``repr(value)`` where the template says ``{name!r}``."""
    for name, value in values.items():
        template = template.replace("{" + name + "!r}", repr(value))
    return template


def _value(output: str, key: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith(key + " "))


@pytest.mark.integration
def test_sdk_flow_persists_across_restart(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 400)
    env = clearml_server.env
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    written = subprocess.run([sys.executable, "-c", fill(WRITE_RUN, weights=str(weights))], env=env,
                             cwd=run_dir, capture_output=True, text=True, timeout=180)
    assert written.returncode == 0, written.stderr
    task_id, model_id = _value(written.stdout, "TASK"), _value(written.stdout, "MODEL")
    promoted = run_python(fill(READ_AND_PROMOTE, weights=str(weights)), env)
    assert _value(promoted.stdout, "PROMOTED") == model_id

    clearml_server.restart()  # SQLite + file store: everything is still there
    result = run_python(fill(CHECK_AFTER_RESTART, weights=str(weights), model_id=model_id, task_id=task_id), env)
    assert result.stdout.strip().endswith("OK")
    _assert_trace_matches_sdk_schemas(clearml_server.trace)


def _assert_trace_matches_sdk_schemas(trace: Path) -> None:
    """Every answer the server gave validates against the SDK's schema for that endpoint."""
    seen = set()
    for line in trace.read_text().splitlines():
        entry = json.loads(line)
        endpoint, payload = entry["endpoint"], entry["response"]
        meta = payload["meta"]
        assert set(meta) >= {"id", "trx", "endpoint", "result_code", "result_subcode", "result_msg", "error_stack"}
        assert meta["result_code"] == entry["status"]
        if entry["status"] != 200 or endpoint == "debug.ping":
            continue
        service, action = endpoint.split(".")
        module = importlib.import_module(f"clearml.backend_api.services.v2_23.{service}")
        cls = getattr(module, "".join(part.title() for part in action.split("_")) + "Response")
        jsonschema.validate(payload["data"], cls._schema)
        seen.add(endpoint)
    # the flow really exercised the registry and tracking endpoints
    assert {"auth.login", "projects.create", "tasks.create", "tasks.started", "tasks.completed", "tasks.edit",
            "events.add_batch", "models.create", "models.get_all", "models.edit", "models.set_ready",
            "models.add_or_update_metadata", "tasks.add_or_update_model"} <= seen, sorted(seen)


@pytest.mark.unit
def test_schema_check_catches_a_wrong_field_type() -> None:
    """The validation above is not vacuous: a task without a dict `output` is rejected."""
    from clearml.backend_api.services.v2_23.tasks import GetByIdResponse

    bad = {"task": {"id": "x", "output": "not-an-object"}}
    try:
        jsonschema.validate(bad, GetByIdResponse._schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted a string `output`")


def _login(url: str, key: str, secret: str) -> requests.Response:
    return requests.get(f"{url}/auth.login", auth=(key, secret), timeout=10)


@pytest.mark.integration
def test_bad_credentials_paths_and_endpoints(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    url = clearml_server.url
    refused = _login(url, "stepwise-local-key", "wrong")
    assert refused.status_code == 401 and refused.json()["meta"]["result_code"] == 401
    assert requests.get(f"{url}/v2.23/projects.get_all", timeout=10).status_code == 401
    forged = requests.get(f"{url}/v2.23/projects.get_all", headers={"Authorization": "Bearer abc.def.ghi"},
                          timeout=10)
    assert forged.status_code == 401
    token = _login(url, "stepwise-local-key", "stepwise-local-secret").json()["data"]["token"]
    auth = {"Authorization": f"Bearer {token}"}

    # unknown endpoint: a ClearML-format error, and the server keeps answering
    unknown = requests.post(f"{url}/v2.23/nothing.here", json={}, headers=auth, timeout=10)
    assert unknown.status_code == 400
    assert "Invalid request path" in unknown.json()["meta"]["result_msg"]
    malformed = requests.post(f"{url}/v2.23/tasks.get_all", data=b"{not json", headers=auth, timeout=10)
    assert malformed.status_code == 400 and "Invalid JSON" in malformed.json()["meta"]["result_msg"]
    missing = requests.post(f"{url}/v2.23/tasks.get_by_id", json={"task": "nope"}, headers=auth, timeout=10)
    assert missing.status_code == 400 and missing.json()["meta"]["result_subcode"] == 101
    assert requests.post(f"{url}/v2.23/projects.get_all", json={}, headers=auth, timeout=10).status_code == 200

    # uploads cannot leave the file store
    files_dir = clearml_server.data / "files"
    for name in ("../escape.txt", "/a/../../escape.txt", "//etc/escape.txt", "a/./../../escape.txt", ""):
        answer = requests.post(f"{url}/files/", files={name: (name, b"x")}, headers=auth, timeout=10)
        assert answer.status_code == 400, (name, answer.status_code)
    assert not list(clearml_server.data.parent.rglob("escape.txt"))
    assert requests.get(f"{url}/files/../clearml.sqlite", headers=auth, timeout=10).status_code in (400, 404)
    ok = requests.post(f"{url}/files/", files={"/proj/task.1/models/w.bin": ("w.bin", b"weights")}, headers=auth,
                       timeout=10)
    assert ok.status_code == 200 and (files_dir / "proj/task.1/models/w.bin").read_bytes() == b"weights"
    assert requests.get(f"{url}/files/proj/task.1/models/w.bin", timeout=10).status_code == 401
    assert requests.get(f"{url}/files/proj/task.1/models/w.bin", headers=auth, timeout=10).content == b"weights"


CONCURRENT_WRITER = """
import shutil, sys
from clearml import Task, OutputModel
name = sys.argv[1]
task = Task.init(project_name="stepwise-concurrent", task_name=name, output_uri=True,
                 auto_connect_frameworks=False, auto_resource_monitoring=False)
logger = task.get_logger()
for i in range(3):
    for step in range(50):
        logger.report_scalar("loss", "train", value=float(step), iteration=i * 50 + step)
    open("w.bin", "wb").write(name.encode() * (i + 1))
    model = OutputModel(task=task, name=name, framework="PyTorch", tags=["candidate"])
    model.update_weights(weights_filename="w.bin", iteration=i)
logger.flush()
task.close()
"""

COUNT = """
from clearml import Model, Task
models = Model.query_models(project_name="stepwise-concurrent", tags=["candidate"])
assert len(models) == 6, len(models)
for name in ("writer-a", "writer-b"):
    task = Task.get_tasks(project_name="stepwise-concurrent", task_name=name)[0]
    points = task.get_reported_scalars()["loss"]["train"]["x"]
    assert sorted(points) == list(range(150)), (name, len(points))
print("OK")
"""


@pytest.mark.integration
def test_concurrent_writers_lose_nothing(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    procs = []
    for name in ("writer-a", "writer-b"):
        cwd = tmp_path / name
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, name], env=clearml_server.env,
                                      cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    assert run_python(COUNT, clearml_server.env).stdout.strip() == "OK"
    # and the server is still healthy under a burst of parallel API calls
    token = _login(clearml_server.url, "stepwise-local-key", "stepwise-local-secret").json()["data"]["token"]
    statuses: list[int] = []

    def hammer() -> None:
        for _ in range(20):
            statuses.append(requests.post(f"{clearml_server.url}/v2.23/models.get_all", json={},
                                          headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 80


@pytest.mark.integration
def test_unreachable_server_fails_fast_with_clear_message(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = ClearMLServerProcess(data=tmp_path / "unused", port=int(closed.rsplit(":", 1)[1])).env
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "stepwise", "clearml-status"], env=env, capture_output=True,
                            text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and closed in lines[0], result.stderr
    assert elapsed < 30
    # the SDK itself, in a stepwise process, gives up within seconds instead of retrying for hours
    start = time.monotonic()
    sdk = subprocess.run([sys.executable, "-c", "import stepwise.registry.tracking\nfrom clearml import Model\n"
                          "Model.query_models(project_name='x')"], env=env, capture_output=True, text=True, timeout=60)
    assert sdk.returncode != 0 and time.monotonic() - start < 30


@pytest.mark.integration
def test_status_command_against_running_server(clearml_server: ClearMLServerProcess) -> None:
    result = subprocess.run([sys.executable, "-m", "stepwise", "clearml-status", "--project", "none-yet"],
                            env=clearml_server.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"ClearML server {clearml_server.url}: api 2.23" in result.stdout
    env = {**clearml_server.env, "CLEARML_API_SECRET_KEY": "wrong"}
    refused = subprocess.run([sys.executable, "-m", "stepwise", "clearml-status"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "refused the login" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


ODD_NAME_RUN = """
import shutil
from clearml import Model, OutputModel, Task
task = Task.init(project_name="stepwise test: odd names", task_name="bench: model cache #2 (50%)", output_uri=True,
                 auto_connect_frameworks=False, auto_resource_monitoring=False)
shutil.copy({weights!r}, "upload.bin")  # the SDK deletes what it uploads
model = OutputModel(task=task, name="odd", framework="PyTorch")
model.update_weights(weights_filename="upload.bin", iteration=1)
task.close()
copy = Model(model.id).get_local_copy()
assert copy and open(copy, "rb").read() == open({weights!r}, "rb").read(), (model.url, copy)
print("URL", model.url.replace(" ", "+"))
"""


@pytest.mark.integration
def test_uploads_under_task_names_with_spaces_and_colons_download_again(clearml_server: ClearMLServerProcess,
                                                                          tmp_path: Path) -> None:
    """Project and task names with spaces, colons, '#' and '%' end up percent-encoded in the upload's
    path and again in the model's URL; the file server must store and serve the same file under both
    (decoding an upload's path before storing it breaks this)."""
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 64)
    done = subprocess.run([sys.executable, "-c", fill(ODD_NAME_RUN, weights=str(weights))], env=clearml_server.env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model cache" in _value(done.stdout, "URL").replace("+", " ").replace("%20", " ")
