"""The service and its registry: an unknown model is a 404, a registry it cannot reach a 503.

A real ``bentoml serve`` resolves ``production`` through a real embedded ClearML server; the
server process is then stopped and started again on the same data. Meanwhile the service keeps
translating with the model it has, says in ``/model`` since when the registry is unreachable
(found by its periodic check), answers ``/reload`` with a 503, and reloads again once the
server is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from support.models import SAMPLE_PAIRS, make_checkpoint
from support.processes import BentoProcess, ClearMLServerProcess, register_exports, register_files

pytestmark = pytest.mark.integration

UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _field_error(answer: requests.Response, status: int, *words: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert "Traceback" not in answer.text and body["detail"][0]["loc"] == ["model"], body
    for word in words:
        assert word in body["error"], body
    return body["error"]


def test_registry_outage_keeps_serving_and_unknown_is_not_unavailable(clearml_server: ClearMLServerProcess,
                                                                       tmp_path: Path) -> None:
    env = {**clearml_server.env, "STEPWISE_ORT_THREADS": "1", "STEPWISE_EXPORT_CACHE": str(tmp_path / "exports"),
           "STEPWISE_RELOAD_INTERVAL": "1"}
    checkpoint = make_checkpoint(tmp_path / "a.pt", seed=21)
    (model_id,) = register_files(env, [checkpoint], project="stepwise-outage", tags=("production",), cwd=tmp_path)
    register_exports(env, [model_id], tmp_path)  # as training registers it beside the checkpoint
    # a version registered without its export (before training exported): the service does not export it
    (unexported,) = register_files(env, [make_checkpoint(tmp_path / "b.pt", seed=22)], project="stepwise-outage",
                                   cwd=tmp_path)
    text = SAMPLE_PAIRS[0][0]

    server = BentoProcess(tmp_path / "bentoml.log", env)  # resolves production through the registry
    try:
        assert server.post("/translate", {"text": text}).json()["model"]["id"] == model_id
        assert server.post("/model", {}).json()["registry"]["status"] == "reachable"
        # registry up: an unknown id or tag is a 404 on the model field
        _field_error(server.post("/translate", {"text": text, "model": UNKNOWN_ID}), 404, UNKNOWN_ID)
        _field_error(server.post("/translate", {"text": text, "model": "no-such-tag"}), 404, "no-such-tag")
        # a version without an ONNX export: a 404 on the model field that says how to make one
        _field_error(server.post("/translate", {"text": text, "model": unexported}), 404,
                     f"version {unexported} has no ONNX export", f"stepwise export --model-id {unexported}")

        clearml_server.stop()
        # the periodic check notices; the service says so and keeps its model
        _wait_for(lambda: server.post("/model", {}).json()["registry"]["status"] == "unreachable",
                  "/model to report the registry unreachable")
        described = server.post("/model", {}).json()
        assert described["model"]["id"] == model_id and described["registry"]["since"].endswith("Z")
        assert clearml_server.url in described["registry"]["error"]
        for _ in range(3):
            answer = server.post("/translate", {"text": text})
            assert answer.status_code == 200 and answer.json()["model"]["id"] == model_id, answer.text
        # a model it would have to ask the registry about: 503 with a sentence, not a 404
        error = _field_error(server.post("/translate", {"text": text, "model": UNKNOWN_ID}), 503, "unreachable")
        assert "no registered model" not in error
        reload = server.post("/reload", {})
        assert reload.status_code == 503 and clearml_server.url in reload.json()["error"], reload.text
        assert server.post("/translate", {"text": text}).json()["model"]["id"] == model_id

        clearml_server.start()  # the same data, the same port
        reloaded = server.post("/reload", {})
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["changed"] is False and reloaded.json()["model"]["id"] == model_id
        assert server.post("/model", {}).json()["registry"]["status"] == "reachable"
        _field_error(server.post("/translate", {"text": text, "model": UNKNOWN_ID}), 404, UNKNOWN_ID)
    finally:
        server.stop()
