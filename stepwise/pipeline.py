"""``stepwise up``: the whole pipeline on local defaults, in one command.

1. a ClearML server: the configured one, or ``stepwise clearml-server`` started here;
2. a ``production`` model: if the registry has none, train a preset and promote it (the quick
   preset ``tiny`` on CPU, ``default`` when a CUDA GPU is there: see :func:`default_preset`);
3. its ONNX export: the one training registered beside it, downloaded (for a version registered
   before training exported, made here once and registered, then reused);
4. ``bentoml serve`` with that export, and the attention explorer in front of it.

A second run finds everything in place and only starts the services. Ctrl-C stops everything
this command started.

The registry look-ups, the promotion and any export are function calls in this process. Child
processes are kept where isolation is the point: the servers (they outlive each stage) and the
training run (``Task.init`` takes the process over for the whole run: its console, exit and
signal hooks, a resource monitor; and a long run's memory goes back when it ends).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from stepwise.errors import StepwiseError
from stepwise.net import wait_until_ready

log = logging.getLogger(__name__)

SERVICE = "stepwise.serve.service:Translator"  # importable from any directory: `stepwise up` runs from a wheel too


def default_preset(cuda: bool | None = None) -> str:
    """The preset ``stepwise up`` trains when nothing is in production.

    The quick preset (ten minutes on 2 CPU cores) on CPU; the default preset when a CUDA GPU
    can train it (its hour on CPU is minutes there).

    Args:
        cuda: whether a CUDA GPU is usable (default: ask torch).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "default" if cuda else "tiny"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Pipeline:
    """Starts what is missing, remembers what it started, stops it all at the end.

    When it starts the local ClearML server it points this process's environment (and so the
    SDK here and every child) at it.
    """

    def __init__(self, *, config: str | None, project: str, clearml_port: int, service_port: int,
                 explorer_port: int, train_minutes: float | None, state_dir: str = ".stepwise",
                 overrides: list[str] | None = None) -> None:
        self.state = Path(state_dir).resolve()
        self.config = config or default_preset()
        self.overrides = list(overrides or [])  # --set KEY=VALUE for the training run
        self.project = project
        self.clearml_port = clearml_port
        self.service_port = service_port
        self.explorer_port = explorer_port
        self.train_minutes = train_minutes
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.clearml_url = ""
        self.started = time.monotonic()

    def stage(self, number: int, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"\n[{number}/5 +{elapsed:5.0f}s] {text}", flush=True)

    def spawn(self, name: str, args: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a server in its own session (so that stopping it stops its workers), logging to ``log_file``."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            process = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=self.state, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, process))
        return process

    # -- stages ------------------------------------------------------------------------------------
    def clearml(self) -> None:
        self.stage(1, "ClearML server")
        from stepwise.clearml_server import sdk_environment
        from stepwise.registry import tracking

        if tracking.is_configured():
            self.clearml_url = tracking.check_server()
            print(f"using the configured server {self.clearml_url}")
            return
        self.clearml_url = url = f"http://127.0.0.1:{self.clearml_port}"
        os.environ.update(sdk_environment(url))  # the SDK in this process, and every child, use it
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
        wait_until_ready(f"{url}/debug.ping", timeout=60, process=process, log_file=log_file,
                         name="the ClearML server")
        print(f"started the local ClearML server on {url} (data in {self.state / 'clearml'})")

    def production(self) -> str:
        self.stage(2, "a production model in the registry")
        from stepwise.config import load_config
        from stepwise.registry import client as registry
        from stepwise.registry.promotion import promote

        preset = load_config(self.config, self.overrides)
        name = preset.name
        listed = registry.list_versions(name=name, tag=registry.PRODUCTION)
        if listed:
            print(f"production version of {name}: {listed[0].id} (BLEU {listed[0].bleu})")
            return listed[0].id
        budget = f"{self.train_minutes:g} minutes" if self.train_minutes else "the preset's time budget"
        print(f"no production version of {name}: training the preset {self.config} ({budget})", flush=True)
        args = [sys.executable, "-m", "stepwise", "train", "--config", self.config, "--project-name", self.project,
                "--task-name", name, "--output-dir", str(self.state / "runs" / f"{name}-{int(time.time())}")]
        if self.train_minutes:
            args += ["--set", f"train.max_minutes={self.train_minutes}"]
            if preset.train.warmup_minutes >= self.train_minutes:  # a shorter budget than the preset's warmup
                args += ["--set", f"train.warmup_minutes={self.train_minutes / 10:g}"]
        for assignment in self.overrides:
            args += ["--set", assignment]
        # a child process: the run's Task.init owns its process (see the module docstring)
        trained = subprocess.run(args)
        if trained.returncode != 0:
            raise StepwiseError(f"training failed (exit {trained.returncode})")
        newest = registry.list_versions(name=name)  # the checkpoints' versions (exports are name-onnx)
        if not newest:
            raise StepwiseError("training registered no model version")
        model_id = newest[0].id
        gate = promote(model_id, tag=registry.PRODUCTION)
        print(f"promoted {model_id} to {registry.PRODUCTION!r} (BLEU {gate.candidate_bleu:.2f} on "
              f"{gate.sentences} {gate.split} sentences)", flush=True)
        return model_id

    def export(self, model_id: str) -> Path:
        """The version's ONNX export in the state folder: the one registered beside it (training
        registers one at each save), copied there; exported here only when it has none."""
        self.stage(3, "ONNX export")
        out = self.state / "exports" / model_id
        from stepwise.decode.onnx_runtime import EXPORT_FORMAT, export_format
        from stepwise.registry import client as registry

        if export_format(out) == EXPORT_FORMAT:  # in place from an earlier run, in this exporter's format
            print(f"reusing {out}")
            return out
        registered = registry.find_export(model_id)
        if registered is not None:
            folder = registry.download_export(registered.id)
            if export_format(folder) == EXPORT_FORMAT:
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(folder, out)
                print(f"using the ONNX export {registered.id} registered with {model_id} (in {out})", flush=True)
                return out
            print(f"the export {registered.id} registered with {model_id} is in an older format: exporting again",
                  flush=True)
        else:
            print(f"{model_id} has no registered ONNX export (registered before training exported): exporting it",
                  flush=True)
        from stepwise.export import export_from_registry

        manifest = export_from_registry(out, model_id=model_id)
        print(f"exported {model_id} to {out} in {manifest['export_seconds']:.0f}s (registered as "
              f"{manifest.get('registered_id')})", flush=True)
        return out

    def serve(self, export_dir: Path) -> str:
        self.stage(4, "translation service (bentoml serve)")
        url = f"http://127.0.0.1:{self.service_port}"
        log_file = self.state / "logs" / "bentoml.log"
        process = self.spawn("bentoml serve", [sys.executable, "-m", "bentoml", "serve", SERVICE,
                                               "--host", "127.0.0.1", "--port", str(self.service_port)], log_file,
                             env={"STEPWISE_MODEL_DIR": str(export_dir.resolve())})
        wait_until_ready(f"{url}/readyz", timeout=600, process=process, log_file=log_file, name="bentoml serve")
        return url

    def explorer(self, service_url: str) -> str:
        self.stage(5, "attention explorer (Gradio)")
        url = f"http://127.0.0.1:{self.explorer_port}"
        log_file = self.state / "logs" / "explorer.log"
        process = self.spawn("explorer", [sys.executable, "-m", "stepwise.explorer", "--api", service_url, "--port",
                                          str(self.explorer_port)], log_file, env={"GRADIO_ANALYTICS_ENABLED": "False"})
        wait_until_ready(url, timeout=600, process=process, log_file=log_file, name="the explorer")
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
                  f"  attention explorer:  {explorer_url}\n  ClearML server:      {self.clearml_url}\n"
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
