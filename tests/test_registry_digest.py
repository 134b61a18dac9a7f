"""A registered version's file is checked against the SHA-256 digest recorded at registration.

``register_checkpoint`` and ``register_export`` record it in the version's metadata; ``download``
and ``download_export`` check it before the file is used. Here a real local ClearML server stores
the files; the test changes a stored file in the server's data folder (what anyone with write
access to the file store could do) and the next download is one line naming the version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stepwise.registry.client import export_digest, file_digest

from support.models import make_checkpoint
from support.processes import ClearMLServerProcess

REGISTER = """
import json, sys
from pathlib import Path
from clearml import Task
from stepwise.registry import client as registry
checkpoint, export_dir = sys.argv[1:3]
task = Task.init(project_name="stepwise-digest", task_name="register", auto_connect_frameworks=False,
                 auto_resource_monitoring=False, output_uri=True)
print("MODEL", registry.register_checkpoint(task, checkpoint, name="transformer-test", step=1, metadata={}))
if export_dir:
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    print("EXPORT", registry.register_export(Path(export_dir), manifest, task=task))
task.close()
"""

DOWNLOAD = """
import sys
from stepwise.errors import StepwiseError
from stepwise.registry import client as registry
kind, model_id = sys.argv[1:3]
try:
    print("PATH", (registry.download if kind == "file" else registry.download_export)(model_id))
except StepwiseError as exc:
    print("ERROR", type(exc).__name__, exc)
"""


def _python(env: dict[str, str], script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _found(output: str, key: str) -> str:
    return next(line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(key + " "))


def _stored(server: ClearMLServerProcess, name: str) -> Path:
    (path,) = [p for p in (server.data / "files").rglob(name) if p.is_file()]
    return path


@pytest.mark.unit
def test_export_digest_covers_the_manifest_and_its_files(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"files": ["a.onnx", "b.model"]}))
    (tmp_path / "a.onnx").write_bytes(b"graph")
    (tmp_path / "b.model").write_bytes(b"tokenizer")
    before = export_digest(tmp_path)
    (tmp_path / "unlisted.txt").write_text("a cache file beside the export")
    assert export_digest(tmp_path) == before
    (tmp_path / "b.model").write_bytes(b"tokenizeR")
    assert export_digest(tmp_path) != before
    (tmp_path / "b.model").unlink()
    assert export_digest(tmp_path) != before
    assert len(file_digest(tmp_path / "a.onnx")) == 64


@pytest.mark.integration
def test_a_changed_stored_file_is_refused_naming_the_version(
        clearml_server: ClearMLServerProcess, tiny_export: tuple[Path, Path], tmp_path: Path) -> None:
    env = clearml_server.env
    checkpoint = make_checkpoint(tmp_path / "step-0000001.pt")
    export_dir = tmp_path / "export"
    shutil.copytree(tiny_export[1], export_dir)
    output = _python(env, REGISTER, str(checkpoint), str(export_dir), cwd=tmp_path)
    model_id, export_id = _found(output, "MODEL"), _found(output, "EXPORT")

    # untouched: both download and pass their check
    assert Path(_found(_python(env, DOWNLOAD, "file", model_id, cwd=tmp_path), "PATH")).is_file()
    assert Path(_found(_python(env, DOWNLOAD, "export", export_id, cwd=tmp_path), "PATH")).is_dir()
    shutil.rmtree(tmp_path / "clearml-cache", ignore_errors=True)  # the next downloads fetch the stored files

    # the stored checkpoint changed: one line naming the version, from the client and from the CLI
    stored = _stored(clearml_server, checkpoint.name)
    stored.write_bytes(stored.read_bytes() + b"\0")
    line = _found(_python(env, DOWNLOAD, "file", model_id, cwd=tmp_path), "ERROR")
    assert line.startswith("DigestMismatch ") and f"version {model_id}: file digest mismatch" in line, line
    for args in (["evaluate", model_id], ["export", "--model-id", model_id, "--out", str(tmp_path / "out")]):
        done = subprocess.run([sys.executable, "-m", "stepwise", *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode != 0
        errors = [entry for entry in done.stderr.splitlines() if entry.startswith("stepwise: error: ")]
        assert "Traceback" not in done.stderr, done.stderr
        assert len(errors) == 1 and f"version {model_id}: file digest mismatch" in errors[0], done.stderr
        assert "the registered file was changed" in errors[0]

    # the stored export package changed (one file of it rewritten, the zip still valid)
    package = next(p for p in (clearml_server.data / "files").rglob("*.zip") if p.is_file())
    with zipfile.ZipFile(package) as old:
        entries = {info.filename: old.read(info) for info in old.infolist()}
    name = next(n for n in entries if n.endswith(".onnx"))
    entries[name] += b"\0"
    with zipfile.ZipFile(package, "w") as new:
        for entry, data in entries.items():
            new.writestr(entry, data)
    line = _found(_python(env, DOWNLOAD, "export", export_id, cwd=tmp_path), "ERROR")
    assert line.startswith("DigestMismatch ") and f"version {export_id}: file digest mismatch" in line, line
