"""``stepwise up``: the whole pipeline on local defaults, in one command.

1. a ClearML server: the configured one, or ``stepwise clearml-server`` started here;
2. a ``production`` model: if the registry has none, train the quick preset and promote it;
3. its ONNX export (made once, then reused);
4. ``bentoml serve`` with that export, and the attention explorer in front of it.

A second run finds everything in place and only starts the services. Ctrl-C stops everything
this command started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from stepwise.errors import StepwiseError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]  # where service.py and gradio_app/ live


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Pipeline:
    """Starts what is missing, remembers what it started, stops it all at the end."""

    def __init__(self, *, config: str, project: str, clearml_port: int, service_port: int, explorer_port: int,
                 train_minutes: float | None, state_dir: str = ".stepwise") -> None:
        self.state = Path(state_dir).resolve()
        self.config = config
        self.project = project
        self.clearml_port = clearml_port
        self.service_port = service_port
        self.explorer_port = explorer_port
        self.train_minutes = train_minutes
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ)
        self.started = time.monotonic()

    def stage(self, number: int, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"\n[{number}/5 +{elapsed:5.0f}s] {text}", flush=True)

    def run_step(self, args: list[str]) -> subprocess.CompletedProcess:
        """A stepwise command in a child process, output shown as it goes."""
        result = subprocess.run([sys.executable, "-m", *args], env=self.env)
        if result.returncode != 0:
            raise StepwiseError(f"`{' '.join(args)}` failed (exit {result.returncode})")
        return result

    def capture(self, args: list[str]) -> str:
        result = subprocess.run([sys.executable, "-m", *args], env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise StepwiseError((result.stderr.strip().splitlines() or [f"{args} failed"])[-1])
        return result.stdout

    def spawn(self, name: str, args: list[str], log_file: Path) -> subprocess.Popen:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(args, env=self.env, cwd=REPO_ROOT, stdout=open(log_file, "ab"),  # noqa: SIM115
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, process))
        return process

    @staticmethod
    def wait_http(url: str, process: subprocess.Popen, what: str, log_file: Path, timeout: float = 600) -> None:
        """Poll ``url`` until it answers; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise StepwiseError(f"{what} exited (see {log_file}):\n{tail}")
            try:
                if requests.get(url, timeout=5).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise StepwiseError(f"{what} did not come up within {timeout:.0f}s (see {log_file})")

    # -- stages ------------------------------------------------------------------------------------
    def clearml(self) -> None:
        self.stage(1, "ClearML server")
        from stepwise import tracking

        if tracking.is_configured():
            print(f"using the configured server {tracking.check_server()}")
            return
        url = f"http://127.0.0.1:{self.clearml_port}"
        self.env.update(CLEARML_API_HOST=url, CLEARML_WEB_HOST=url, CLEARML_FILES_HOST=f"{url}/files",
                        CLEARML_API_ACCESS_KEY="stepwise-local-key", CLEARML_API_SECRET_KEY="stepwise-local-secret")
        try:
            requests.get(f"{url}/debug.ping", timeout=2)
            print(f"a local ClearML server already answers on {url}; using it")
            return
        except requests.RequestException:
            pass
        log_file = self.state / "logs" / "clearml-server.log"
        process = self.spawn("ClearML server", [sys.executable, "-m", "stepwise", "clearml-server", "--port",
                                                str(self.clearml_port), "--data", str(self.state / "clearml")],
                             log_file)
        self.wait_http(f"{url}/debug.ping", process, "the ClearML server", log_file, timeout=60)
        print(f"started the local ClearML server on {url} (data in {self.state / 'clearml'})")

    def production(self) -> str:
        self.stage(2, "a production model in the registry")
        import json

        from stepwise.config import load_config

        name = load_config(self.config).name
        listed = json.loads(self.capture(["stepwise", "models", "list", "--name", name, "--tag", "production",
                                          "--json"]))
        if listed:
            print(f"production version of {name}: {listed[0]['id']} (BLEU {listed[0]['bleu']})")
            return listed[0]["id"]
        print(f"no production version of {name}: training the quick preset {self.config} "
              f"(about {self.train_minutes or 'the preset'}'s minutes)")
        args = ["train", "--config", self.config, "--project-name", self.project, "--task-name",
                f"{name}-quick", "--output-dir", str(self.state / "runs" / f"{name}-{int(time.time())}")]
        if self.train_minutes:
            args += ["--set", f"train.max_minutes={self.train_minutes}"]
        self.run_step(args)
        newest = json.loads(self.capture(["stepwise", "models", "list", "--name", name, "--json"]))
        if not newest:
            raise StepwiseError("training registered no model version")
        model_id = newest[0]["id"]
        self.run_step(["stepwise", "promote", model_id])
        return model_id

    def export(self, model_id: str) -> Path:
        self.stage(3, "ONNX export")
        out = self.state / "exports" / model_id
        from stepwise.onnx_decoding import EXPORT_FORMAT, export_format

        if export_format(out) == EXPORT_FORMAT:  # made by this version of the exporter
            print(f"reusing {out}")
            return out
        self.run_step(["stepwise", "export", "--model-id", model_id, "--out", str(out)])
        return out

    def serve(self, export_dir: Path) -> str:
        self.stage(4, "translation service (bentoml serve)")
        url = f"http://127.0.0.1:{self.service_port}"
        self.env["STEPWISE_MODEL_DIR"] = str(export_dir.resolve())
        log_file = self.state / "logs" / "bentoml.log"
        process = self.spawn("bentoml serve", [sys.executable, "-m", "bentoml", "serve", "service:Translator",
                                               "--host", "127.0.0.1", "--port", str(self.service_port)], log_file)
        self.wait_http(f"{url}/readyz", process, "bentoml serve", log_file)
        return url

    def explorer(self, service_url: str) -> str:
        self.stage(5, "attention explorer (Gradio)")
        url = f"http://127.0.0.1:{self.explorer_port}"
        log_file = self.state / "logs" / "explorer.log"
        env_port = {"GRADIO_ANALYTICS_ENABLED": "False"}
        self.env.update(env_port)
        process = self.spawn("explorer", [sys.executable, "-m", "gradio_app", "--api", service_url, "--port",
                                          str(self.explorer_port)], log_file)
        self.wait_http(url, process, "the explorer", log_file)
        return url

    def stop(self) -> None:
        for name, process in reversed(self.children):
            if process.poll() is None:
                print(f"stopping {name}", flush=True)
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.children):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def run(self, *, wait: bool = True) -> int:
        # Ctrl-C (and a plain `kill`) stop everything started here, even when this process was
        # started in the background with SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.clearml()
            model_id = self.production()
            export_dir = self.export(model_id)
            service_url = self.serve(export_dir)
            explorer_url = self.explorer(service_url)
            took = time.monotonic() - self.started
            print(f"\nready in {took:.0f}s\n  translation service: {service_url}  (POST /translate)\n"
                  f"  attention explorer:  {explorer_url}\n  ClearML server:      {self.env['CLEARML_API_HOST']}\n"
                  "Ctrl-C stops everything started here.", flush=True)
            while wait:
                for name, process in self.children:
                    if process.poll() is not None:
                        raise StepwiseError(f"{name} exited unexpectedly (logs in {self.state / 'logs'})")
                time.sleep(1)
            return 0
        except KeyboardInterrupt:
            print("\ninterrupted", flush=True)
            return 130
        finally:
            self.stop()
