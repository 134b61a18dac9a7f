"""ClearML's everyday workflow with the plain SDK against `stepwise clearml-server` (issue 11's
table): enqueue on a fresh server, clone, delete, archive, parameter and artifact deletion, last
metrics with min/max, debug-sample paging, console reports, single values, hidden projects and
the task state machine. Each step is a fresh interpreter; every answer is checked against the
SDK's own response schemas."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import jsonschema
import pytest
import requests

from support.processes import ClearMLServerProcess, run_python

pytestmark = pytest.mark.integration

WRITE = """
import numpy as np
from clearml import Task, OutputModel
task = Task.init(project_name="wf/sub", task_name="run", output_uri=True, auto_connect_frameworks=False,
                 auto_resource_monitoring=False)
task.connect({"lr": 0.1, "dropout": 0.5}, name="General")
logger = task.get_logger()
for step, value in enumerate([3.0, 1.0, 2.0]):
    logger.report_scalar("loss", "train", value, iteration=step)
logger.report_single_value("accuracy", 0.93)
for step in range(3):
    logger.report_image("sample", "grid", iteration=step, image=np.full((4, 4, 3), 40 * step, dtype=np.uint8))
for line in range(3):
    logger.report_text(f"console line {line}")
    logger.flush(wait=True)
task.upload_artifact("keep", {"a": 1}, wait_on_upload=True)
task.upload_artifact("drop", {"b": 2}, wait_on_upload=True)
open("w.bin", "wb").write(b"weights" * 100)
model = OutputModel(task=task, name="wf-model", framework="PyTorch")
model.update_weights(weights_filename="w.bin", iteration=3)
logger.flush(wait=True)
print("TASK", task.id)
print("MODEL", model.id)
task.mark_completed()
task.close()
"""

READ = """
import json
from clearml import Task
task = Task.get_task(task_id=TASK_ID)
samples = task.get_debug_samples("sample", "grid")
print(json.dumps({
    "last": task.get_last_scalar_metrics(),
    "samples": sorted(s["iter"] for s in samples),
    "latest_sample": len(task.get_debug_samples("sample", "grid", n_last_iterations=1)),
    "console": task.get_reported_console_output(number_of_reports=1),
    "console3": task.get_reported_console_output(number_of_reports=3),
    "single": task.get_reported_single_values(),
    "projects": sorted(p.name for p in Task.get_projects()),
}))
"""

EDIT = """
import json
from clearml import Model, Task
source = Task.get_task(task_id=TASK_ID)
out = {"delete_param_completed": source.delete_parameter("General/dropout")}
clone = Task.clone(source_task=source, name="run (clone)")
out["clone"] = {"status": clone.get_status(), "parent": clone.data.parent, "params": clone.get_parameters(),
                "last": clone.get_last_scalar_metrics(), "outputs": len(clone.get_models()["output"])}
out["delete_param_clone"] = clone.delete_parameter("General/dropout")
out["clone_params"] = Task.get_task(task_id=clone.id).get_parameters()
out["delete_artifacts"] = bool(source.delete_artifacts(["drop"]))
out["artifacts"] = sorted(Task.get_task(task_id=TASK_ID).artifacts)
Task.enqueue(clone, queue_name="default")  # a fresh server has the default queue
out["enqueued"] = Task.get_task(task_id=clone.id).get_status()
model = Model(MODEL_ID)
model.archive()
out["archived"] = Model(MODEL_ID).system_tags
out["query_archived"] = [m.id for m in Model.query_models(project_name="wf/sub", include_archived=False)]
model.unarchive()
out["unarchived"] = Model(MODEL_ID).system_tags
out["deleted"] = clone.delete().ok()  # the SDK returns the call result
out["left"] = sorted(t.id for t in Task.get_tasks(project_name="wf/sub"))
print(json.dumps(out))
"""


def _sdk(code: str, env: dict[str, str], **values: str) -> dict:
    for name, value in values.items():
        code = code.replace(name, repr(value))
    return json.loads(run_python(code, env).stdout.strip().splitlines()[-1])


def validate_trace(trace: Path) -> set[str]:
    """Every 200 answer validates against the SDK's response schema; returns the endpoints seen."""
    seen = set()
    for line in trace.read_text().splitlines():
        entry = json.loads(line)
        endpoint, payload = entry["endpoint"], entry["response"]
        assert payload["meta"]["result_code"] == entry["status"]
        if entry["status"] != 200 or endpoint == "debug.ping" or "." not in endpoint:
            continue
        service, action = endpoint.split(".")
        module = importlib.import_module(f"clearml.backend_api.services.v2_23.{service}")
        cls = getattr(module, "".join(part.title() for part in action.split("_")) + "Response")
        jsonschema.validate(payload["data"], _with_definitions(module, cls._schema))
        seen.add(endpoint)
    return seen


# The SDK's events.DebugImagesResponse refers to a definition its module lacks; this is the real
# server's (apiserver/schema/services/_events_common.conf).
DEBUG_IMAGES_TASK_METRICS = {"type": "object", "properties": {
    "task": {"type": "string"},
    "iterations": {"type": "array", "items": {"type": "object", "properties": {
        "iter": {"type": "integer"}, "events": {"type": "array", "items": {"type": "object"}}}}}}}


def _with_definitions(module: object, schema: dict) -> dict:
    if "debug_images_response_task_metrics" in json.dumps(schema) and "definitions" not in schema:
        return {**schema, "definitions": {"debug_images_response_task_metrics": DEBUG_IMAGES_TASK_METRICS}}
    return schema


def test_everyday_workflow_rows(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    written = run_python(WRITE.replace("w.bin", str(tmp_path / "w.bin")), env).stdout
    task_id = written.split("TASK ", 1)[1].split()[0]
    model_id = written.split("MODEL ", 1)[1].split()[0]

    read = _sdk(READ, env, TASK_ID=task_id)
    assert read["last"]["loss"]["train"] == {"last": 2.0, "min": 1.0, "max": 3.0}
    assert read["samples"] == [0, 1, 2]  # one per iteration, not 100 copies
    assert read["latest_sample"] == 1
    # the last report only (the SDK's own prints come last), then the last three, oldest first
    assert len(read["console"]) == 1 and len(read["console3"]) == 3 and read["console3"][-1] == read["console"][0]
    assert any("console line 2" in report for report in read["console3"])
    assert read["single"] == {"accuracy": 0.93}
    assert read["projects"] == ["wf", "wf/sub"]  # the parent of a/b exists

    edit = _sdk(EDIT, env, TASK_ID=task_id, MODEL_ID=model_id)
    assert edit["delete_param_completed"] is False  # a completed task is read-only, as on ClearML
    assert edit["clone"]["status"] == "created" and edit["clone"]["parent"] == task_id
    assert edit["clone"]["params"]["General/lr"] == "0.1" and edit["clone"]["last"] == {}
    assert edit["clone"]["outputs"] == 0
    assert edit["delete_param_clone"] is True and "General/dropout" not in edit["clone_params"]
    assert "General/lr" in edit["clone_params"]
    assert edit["delete_artifacts"] is True and edit["artifacts"] == ["keep"]
    assert edit["enqueued"] == "queued"
    assert "archived" in edit["archived"] and edit["query_archived"] == []
    assert "archived" not in edit["unarchived"]
    assert edit["deleted"] is True and edit["left"] == [task_id]

    seen = validate_trace(clearml_server.trace)
    assert {"tasks.clone", "tasks.delete", "tasks.delete_hyper_params", "tasks.delete_artifacts",
            "models.archive_many", "models.unarchive_many", "events.debug_images", "events.get_task_log",
            "events.get_task_single_value_metrics", "tasks.enqueue"} <= seen, sorted(seen)


def _client(server: ClearMLServerProcess) -> tuple[str, dict[str, str]]:
    token = requests.get(f"{server.url}/auth.login", auth=("stepwise-local-key", "stepwise-local-secret"),
                         timeout=10).json()["data"]["token"]
    return f"{server.url}/v2.23", {"Authorization": f"Bearer {token}"}


def test_task_state_machine_and_published_tasks_are_read_only(clearml_server: ClearMLServerProcess) -> None:
    base, auth = _client(clearml_server)

    def call(endpoint: str, **body: object) -> requests.Response:
        return requests.post(f"{base}/{endpoint}", json=body, headers=auth, timeout=10)

    queues = call("queues.get_all", name="^default$").json()["data"]["queues"]
    assert [q["name"] for q in queues] == ["default"]  # created at start-up
    task = call("tasks.create", name="sm", type="training").json()["data"]["id"]
    refused = call("tasks.completed", task=task)  # created -> completed is not a transition
    assert refused.status_code == 400 and refused.json()["meta"]["result_subcode"] == 110
    assert call("tasks.completed", task=task, force=True).status_code == 200  # force skips the check
    assert call("tasks.reset", task=task).status_code == 200
    assert call("tasks.started", task=task).status_code == 200
    assert call("tasks.edit", task=task, comment="x").json()["meta"]["result_subcode"] == 110  # not created
    assert call("tasks.edit", task=task, comment="x", force=True).status_code == 200
    assert call("tasks.completed", task=task).status_code == 200
    assert call("tasks.publish", task=task).status_code == 200
    for endpoint, body in (("tasks.started", {}), ("tasks.reset", {}), ("tasks.enqueue", {"queue_name": "default"}),
                       ("tasks.edit_hyper_params", {"hyperparams": [{"section": "General", "name": "a", "value": "1"}],
                                                    "force": True}),
                       ("tasks.edit", {"comment": "y"}), ("tasks.delete", {})):
        answer = call(endpoint, task=task, **body)
        assert answer.status_code == 400, (endpoint, answer.text)
    got = call("tasks.get_by_id", task=task).json()["data"]["task"]
    assert got["status"] == "published" and got["comment"] == "x" and not got["hyperparams"]
    # an agent's dequeue of a task it already took is harmless; unknown endpoints answer in ClearML's format
    assert call("tasks.dequeue", task=task).json()["data"]["updated"] == 0
    unknown = call("tasks.move", ids=[task], project="x")
    assert unknown.status_code == 400 and unknown.json()["meta"]["result_msg"].startswith("Invalid request path")
    validate_trace(clearml_server.trace)


def test_batch_endpoints(clearml_server: ClearMLServerProcess) -> None:
    base, auth = _client(clearml_server)

    def call(endpoint: str, **body: object) -> dict:
        answer = requests.post(f"{base}/{endpoint}", json=body, headers=auth, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    ids = [call("tasks.create", name=f"t{i}", type="training",
                configuration={"c": {"name": "c", "value": "1"}})["id"] for i in range(3)]
    enqueued = call("tasks.enqueue_many", ids=ids, queue_name="default")
    assert [s["id"] for s in enqueued["succeeded"]] == ids and all(s["queued"] for s in enqueued["succeeded"])
    queue = call("queues.get_all", name="^default$")["queues"][0]
    assert [e["task"] for e in queue["entries"]] == ids
    dequeued = call("tasks.dequeue_many", ids=ids[:2])
    assert len(dequeued["succeeded"]) == 2
    assert [t["status"] for t in call("tasks.get_all", id=ids, order_by=["name"])["tasks"]] == \
        ["created", "created", "queued"]
    assert call("tasks.delete_configuration", task=ids[0], configuration=["c"])["deleted"] == 1
    assert call("tasks.get_by_id", task=ids[0])["task"]["configuration"] == {}
    assert call("tasks.get_types")["types"] == ["training"]
    assert call("tasks.archive", tasks=[ids[2]])["archived"] == 1  # a queued task is stopped and dequeued
    archived = call("tasks.get_by_id", task=ids[2])["task"]
    assert "archived" in archived["system_tags"] and archived["status"] == "stopped"
    deleted = call("tasks.delete_many", ids=[*ids, "no-such-task"])
    assert sorted(s["id"] for s in deleted["succeeded"]) == sorted(ids)
    assert [f["id"] for f in deleted["failed"]] == ["no-such-task"]
    assert deleted["failed"][0]["error"]["codes"] == [400, 101]
    assert call("tasks.get_all", id=ids)["tasks"] == []
    seen = validate_trace(clearml_server.trace)
    assert {"tasks.enqueue_many", "tasks.dequeue_many", "tasks.delete_many", "tasks.archive"} <= seen
