"""Shared fixtures: small models built from the real config type, and a real local ClearML server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch

from stepwise.clearml_server import sdk_environment
from stepwise.config import ModelConfig
from stepwise.model import Transformer
from stepwise.net import ServerNotReady, wait_until_ready


def make_model(seed: int = 0, **overrides: object) -> Transformer:
    """A small, dropout-free transformer in eval mode."""
    settings = dict(vocab_size=64, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
                    dropout=0.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings)).eval()


def padded_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, max(lengths)]`` (no special ids) with a padding mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return ids.masked_fill(mask, 0), mask


# -- a real local ClearML server in a subprocess ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        log_file = self.data.parent / f"clearml-server-{self.port}.log"
        with log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stepwise", "clearml-server", "--port", str(self.port), "--data",
                 str(self.data), "--trace", str(self.trace)], stdout=log, stderr=subprocess.STDOUT)
        wait_until_ready(f"{self.url}/debug.ping", timeout=30, process=self.process, log_file=log_file,
                         name="stepwise clearml-server", interval=0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def clearml_server(tmp_path: Path) -> Iterator[ClearMLServerProcess]:
    server = ClearMLServerProcess(data=tmp_path / "clearml-data")
    server.start()
    yield server
    server.stop()


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


# -- checkpoints of small untrained models ------------------------------------------------------
SAMPLE_PAIRS = [
    ("Im Anfang war das Wort.", "In the beginning was the Word."),
    ("Und Gott sprach: Es werde Licht!", "God said, Let there be light."),
    ("Der Herr ist mein Hirte.", "The Lord is my shepherd."),
    ("Selig sind die Friedfertigen.", "Blessed are the peacemakers."),
    ("Und es ward Abend und es ward Morgen.", "There was evening and there was morning."),
    ("Liebet eure Feinde.", "Love your enemies."),
]


def make_checkpoint(path: Path, seed: int = 0, name: str = "transformer-test", **overrides: object) -> Path:
    """Write a checkpoint of a small untrained model with a real (tiny) SentencePiece tokenizer.

    ``overrides`` replace fields of the model config, e.g. ``n_encoder_layers=4``.
    """
    from stepwise.config import Config
    from stepwise.tokenizer import Tokenizer
    from stepwise.train.checkpoint import Checkpoint, save_checkpoint

    tokenizer = Tokenizer.train([s for pair in SAMPLE_PAIRS for s in pair] * 4, vocab_size=120)
    config = Config.from_dict({"name": name, "model": {
        "vocab_size": tokenizer.vocab_size, "d_model": 32, "n_heads": 4, "n_encoder_layers": 2,
        "n_decoder_layers": 2, "d_ff": 64, "dropout": 0.0, "max_positions": 64, **overrides}})
    torch.manual_seed(seed)
    model = Transformer(config.model).eval()
    with torch.no_grad():  # a sharper output distribution: no near-ties between tokens
        model.output_projection.weight.mul_(3.0)
    return save_checkpoint(path, Checkpoint(config=config, model_state=model.state_dict(),
                                            tokenizer_model=tokenizer.model_proto, step=0))


# -- a real `bentoml serve` of service.py --------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


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
        return requests.post(f"{self.url}{path}", json=body, timeout=120, **kwargs)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()



def export_tiny_model(folder: Path, *, seed: int = 5, **overrides: object) -> tuple[Path, Path]:
    """A tiny untrained checkpoint (:func:`make_checkpoint`) and its ONNX export, both in ``folder``."""
    from stepwise.export import export_checkpoint
    from stepwise.train.checkpoint import load_checkpoint

    checkpoint = make_checkpoint(folder / "model.pt", seed=seed, **overrides)
    export_checkpoint(load_checkpoint(checkpoint), folder / "export")
    return checkpoint, folder / "export"


def serve_export(export_dir: Path, log_path: Path) -> BentoProcess:
    """A real `bentoml serve` of one export directory, with no ClearML server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env.update(STEPWISE_MODEL_DIR=str(export_dir), STEPWISE_ORT_THREADS="1")
    return BentoProcess(log_path, env)

# -- Debian's Chromium through Playwright (Playwright's own browser download fails here) ----------
CHROMIUM = os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium for the browser tests; `make test` installs Debian's package."""
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()
