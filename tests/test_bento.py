"""The Bento's dependencies: one list, and it is enough to start the service.

``bentofile.yaml`` installs ``requirements-serve.txt``, which repeats the ``serve`` extra of
``pyproject.toml``. The second test does what a container build does: ``bentoml build``, a clean
virtualenv with exactly the requirements file inside the built Bento, then ``bentoml serve``
from the Bento's own ``src`` directory with a tiny export, and a translation over HTTP.
It needs PyPI (or a pip cache holding the pinned wheels).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import requests
import tomllib

from stepwise.decode.onnx_runtime import OnnxTranslator
from stepwise.export import export_checkpoint
from stepwise.train.checkpoint import load_checkpoint

from support.models import SAMPLE_PAIRS, make_checkpoint
from support.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.unit
def test_bento_requirements_are_the_serve_extra() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert _requirements(ROOT / "requirements-serve.txt") == extra
    assert all("==" in requirement for requirement in extra)  # pinned: a Bento installs the same thing twice
    assert "requirements_txt: \"./requirements-serve.txt\"" in (ROOT / "bentofile.yaml").read_text()


@pytest.mark.integration
def test_built_bento_starts_in_a_clean_virtualenv(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "PYTHON"))}
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT,
                           env={**env, "BENTOML_HOME": str(tmp_path / "bentoml")}, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = tmp_path / "bentoml" / "bentos" / "stepwise" / tag.split(":")[1]
    requirements = bento / "env" / "python" / "requirements.txt"
    assert {r.split("==")[0] for r in _requirements(ROOT / "requirements-serve.txt")} <= \
        {r.split("==")[0] for r in _requirements(requirements)}

    # exactly what the Bento installs, into a virtualenv that sees nothing else
    target = tmp_path / "venv"
    venv.create(target, with_pip=True, clear=True)
    python = target / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                "-r", str(requirements)], env=env, capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr  # the serve path needs none
    # `import service` works there, and takes the code from the Bento (not from this checkout)
    imported = subprocess.run([str(python), "-c", "import service, stepwise; print(stepwise.__file__)"],
                              cwd=bento / "src", env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert Path(imported.stdout.strip()).is_relative_to(bento / "src"), imported.stdout

    folder = tmp_path / "model"
    export_checkpoint(load_checkpoint(make_checkpoint(folder / "model.pt", seed=7)), folder / "export")
    text = SAMPLE_PAIRS[2][0]
    (expected,) = OnnxTranslator(folder / "export").translate([text])

    port = free_port()
    log = tmp_path / "bento.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(python), "-m", "bentoml", "serve", "service:Translator", "--host", "127.0.0.1", "--port", str(port)],
            cwd=bento / "src", env={**env, "STEPWISE_MODEL_DIR": str(folder / "export"), "STEPWISE_ORT_THREADS": "1"},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        answer = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/translate", json={"text": text}, timeout=30)
                if answer.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, log.read_text()[-3000:]
        body = answer.json()
        assert body["translation"] == expected.translation and body["target_tokens"] == expected.target_tokens
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
