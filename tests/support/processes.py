"""The processes the integration tests start: the local ClearML server, `bentoml serve`, the explorer,
and plain-SDK scripts in interpreters of their own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import requests

from stepwise.clearml_server import sdk_environment
from stepwise.net import ServerNotReady, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- a real local ClearML server in a subprocess ----------------------------------------------
@dataclass
class ClearMLServerProcess:
    """``stepwise clearml-server`` running on a free port, restartable on the same data."""

    data: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def trace(self) -> Path:
        return self.data / "trace.jsonl"

    @property
    def env(self) -> dict[str, str]:
        """The environment a plain SDK process needs, and nothing else ClearML-specific."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
        env.update(sdk_environment(self.url), CLEARML_CACHE_DIR=str(self.data.parent / "clearml-cache"))
        return env

    def start(self) -> None:
        """Start the server and wait until it answers."""
        log_file = self.data.parent / f"clearml-server-{self.port}.log"
        with log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stepwise", "clearml-server", "--port", str(self.port), "--data",
                 str(self.data), "--trace", str(self.trace)], stdout=log, stderr=subprocess.STDOUT)
        wait_until_ready(f"{self.url}/debug.ping", timeout=30, process=self.process, log_file=log_file,
                         name="stepwise clearml-server", interval=0.1)

    def stop(self) -> None:
        """Stop the server (its data stays)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        """Stop and start again, on the same port and data."""
        self.stop()
        self.start()


def run_python(code: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a separate SDK process); fail with its output."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


REGISTER_FILES = """
import json, sys
from clearml import Task, OutputModel
project, tags, paths = json.loads(sys.argv[1])
task = Task.init(project_name=project, task_name="register", auto_connect_frameworks=False,
                 auto_resource_monitoring=False, output_uri=True)
for path in paths:
    model = OutputModel(task=task, name="transformer-test", framework="PyTorch", tags=tags)
    model.update_weights(weights_filename=path, auto_delete_file=False, async_enable=False)
    print("MODEL", model.id)
task.close()
"""


def register_files(env: dict[str, str], paths: list[Path], *, project: str, tags: tuple[str, ...] = ("candidate",),
                   cwd: Path | None = None) -> list[str]:
    """Register files as versions of ``transformer-test`` with the plain SDK, in a process of its own; their ids."""
    result = subprocess.run([sys.executable, "-c", REGISTER_FILES, json.dumps([project, list(tags),
                                                                                [str(p) for p in paths]])],
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("MODEL")]



REGISTER_EXPORTS = """
import json, sys
from stepwise.export import export_from_registry
for model_id, out in json.loads(sys.argv[1]):
    print("EXPORT", model_id, export_from_registry(out, model_id=model_id)["registered_id"])
"""


def register_exports(env: dict[str, str], model_ids: list[str], folder: Path) -> list[str]:
    """Export registered versions to ONNX and register each export beside its version (what training does
    at each save), in a process of its own; the exports' ids. The service serves only versions with one."""
    jobs = [[model_id, str(folder / f"export-{model_id}")] for model_id in model_ids]
    result = subprocess.run([sys.executable, "-c", REGISTER_EXPORTS, json.dumps(jobs)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return [line.split()[2] for line in result.stdout.splitlines() if line.startswith("EXPORT")]

# -- a real `bentoml serve` of service.py --------------------------------------------------------
class BentoProcess:
    """`bentoml serve stepwise.serve.service:Translator` on a free port, its log in a file."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "stepwise.serve.service:Translator", "--host",
                 "127.0.0.1", "--port",
                 str(self.port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(f"{self.url}/readyz", timeout=120, process=self.process, log_file=log_path,
                             name="bentoml serve")
        except ServerNotReady:
            self.stop()
            raise

    def post(self, path: str, body: object, **kwargs: object) -> requests.Response:
        """POST ``body`` as JSON to ``path``."""
        return requests.post(f"{self.url}{path}", json=body, timeout=120, **kwargs)

    def log_mark(self) -> int:
        """Where the log ends now: :meth:`log_since` this mark reads only what was logged after it."""
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        """The log written after ``mark`` (from :meth:`log_mark`): one test's part of a shared service's log."""
        with self.log_path.open("rb") as log:
            log.seek(mark)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        """Terminate the service (kill it if it does not end within 20 s)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def serve_export(export_dir: Path, log_path: Path) -> BentoProcess:
    """A real `bentoml serve` of one export directory, with no ClearML server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env.update(STEPWISE_MODEL_DIR=str(export_dir), STEPWISE_ORT_THREADS="1")
    return BentoProcess(log_path, env)


# -- the attention explorer ------------------------------------------------------------------------
class Explorer:
    """`python -m stepwise.explorer` on a free port.

    Sessions may run their events at the same time (``GRADIO_DEFAULT_CONCURRENCY_LIMIT``), as in
    an explorer that several people use at once.
    """

    def __init__(self, api: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp = log_path.parent / "tmp"  # its TMPDIR, where it keeps each session's exports
        self.temp.mkdir()
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_DEFAULT_CONCURRENCY_LIMIT": "4",
               "TMPDIR": str(self.temp)}
        self.process = subprocess.Popen([sys.executable, "-m", "stepwise.explorer", "--api", api, "--port",
                                         str(self.port)],
                                        cwd=ROOT, env=env, stdout=open(log_path, "wb"),  # noqa: SIM115
                                        stderr=subprocess.STDOUT)
        wait_until_ready(self.url, timeout=90, process=self.process, log_file=log_path, name="the explorer")

    def stop(self) -> None:
        """Terminate the explorer and wait for it."""
        self.process.terminate()
        self.process.wait(timeout=20)
