"""The service's cache of model versions: bounded by count and by bytes (STEPWISE_MODEL_CACHE)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.errors import ConfigError
from stepwise.export import export_checkpoint
from stepwise.serve.store import ModelStore, export_bytes, model_cache_limits
from stepwise.train.checkpoint import load_checkpoint

from support.models import SAMPLE_PAIRS, make_checkpoint
from support.processes import ROOT, BentoProcess, ClearMLServerProcess


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny export: the default model, and (loaded again under other names) the cached versions."""
    folder = tmp_path_factory.mktemp("cache")
    export_checkpoint(load_checkpoint(make_checkpoint(folder / "model.pt", seed=20)), folder / "export",
                      sentences=[SAMPLE_PAIRS[0][0]])
    return folder / "export"


@pytest.mark.unit
@pytest.mark.parametrize(("value", "limits"), [
    (None, (3, 2 * 10**9)), ("", (3, 2 * 10**9)), ("5", (5, 2 * 10**9)), ("5,2GB", (5, 2 * 10**9)),
    (" 2 , 512MiB ", (2, 512 * 2**20)), ("0,100", (0, 100)), ("4,1.5kb", (4, 1500)),
])
def test_limits_are_parsed(value: str | None, limits: tuple[int, int]) -> None:
    assert model_cache_limits(value) == limits


@pytest.mark.unit
@pytest.mark.parametrize("value", ["five", "5,2XB", "-1", "5,", ",2GB", "5,2GB,1", "2.5"])
def test_bad_limits_are_a_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="^STEPWISE_MODEL_CACHE="):
        model_cache_limits(value)


@pytest.mark.integration
def test_count_limit_evicts_the_least_recently_used(export: Path) -> None:
    store = ModelStore(model_dir=str(export), cache_size=2)
    loaded = {name: store._from_dir(export) for name in ("a", "b", "c")}
    store.remember("a", loaded["a"])
    store.remember("b", loaded["b"])
    assert store.get("a") is loaded["a"]  # a hit: "a" is now the most recently used
    store.remember("c", loaded["c"])
    assert list(store._cache) == ["a", "c"]  # "b" went; the default is not counted
    described = store.describe()
    assert described["cache"]["versions"] == 2 and described["cache"]["max_versions"] == 2
    assert described["cache"]["bytes"] == 2 * export_bytes(export) > 0
    assert [m["bytes"] for m in described["cached"]] == [export_bytes(export)] * 2
    assert store.get(None) is store.default and store.default not in loaded.values()


@pytest.mark.integration
def test_byte_limit_evicts_and_the_default_stays(export: Path) -> None:
    size = export_bytes(export)
    assert size == sum(p.stat().st_size for p in export.iterdir() if ".onnx" in p.name)
    store = ModelStore(model_dir=str(export), cache_size=10, cache_bytes=int(size * 2.5))
    for name in ("a", "b", "c"):
        store.remember(name, store._from_dir(export))
    assert list(store._cache) == ["b", "c"]
    tight = ModelStore(model_dir=str(export), cache_size=10, cache_bytes=size // 2)
    tight.remember("a", tight._from_dir(export))
    tight.remember("b", tight._from_dir(export))
    assert list(tight._cache) == ["b"]  # the one just loaded stays, alone, even over the limit
    assert tight.get("default") is tight.default


@pytest.mark.integration
def test_bad_variable_is_one_line_at_start(export: Path) -> None:
    env = {**os.environ, "STEPWISE_MODEL_DIR": str(export), "STEPWISE_MODEL_CACHE": "5,2XB"}
    done = subprocess.run([sys.executable, "-m", "bentoml", "serve", "stepwise.serve.service:Translator", "--host",
                           "127.0.0.1",
                           "--port", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: STEPWISE_MODEL_CACHE='5,2XB': expected COUNT or COUNT,SIZE (e.g. \"5,2GB\"; "
        "units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


REGISTER = """
import sys
from clearml import Task, OutputModel
task = Task.init(project_name="stepwise-cache", task_name="register", auto_connect_frameworks=False,
                 auto_resource_monitoring=False, output_uri=True)
for path in sys.argv[1:]:
    model = OutputModel(task=task, name="transformer-test", framework="PyTorch", tags=["candidate"])
    model.update_weights(weights_filename=path, auto_delete_file=False, async_enable=False)
    print("MODEL", model.id)
task.close()
"""


@pytest.mark.integration
def test_service_evicts_by_count_and_reloads(export: Path, clearml_server: ClearMLServerProcess,
                                             tmp_path: Path) -> None:
    """Over HTTP with a real registry: three versions by id through a cache of two.

    Each version's export is put where the service looks for exports it made (``STEPWISE_EXPORT_CACHE``),
    a copy of the tiny export, so no exporter runs (the hot-swap test in test_service.py covers that).
    """
    env = {**clearml_server.env, "STEPWISE_ORT_THREADS": "1", "STEPWISE_EXPORT_CACHE": str(tmp_path / "exports"),
           "STEPWISE_MODEL_DIR": str(export), "STEPWISE_MODEL_CACHE": "2"}
    checkpoint = make_checkpoint(tmp_path / "model.pt", seed=30)
    out = subprocess.run([sys.executable, "-c", REGISTER, *[str(checkpoint)] * 3], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ids = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("MODEL")]
    assert len(set(ids)) == 3
    for model_id in ids:
        shutil.copytree(export, tmp_path / "exports" / model_id)
    server = BentoProcess(tmp_path / "bentoml.log", env)
    try:
        def ask(model_id: str) -> None:
            answer = server.post("/translate", {"text": SAMPLE_PAIRS[0][0], "model": model_id})
            assert answer.status_code == 200 and answer.json()["model"]["id"] == model_id, answer.text

        for model_id in ids:
            ask(model_id)
        described = server.post("/model", {}).json()
        assert [m["id"] for m in described["cached"]] == ids[1:]  # the first, least recently used, went
        assert described["cache"]["versions"] == 2 and described["cache"]["max_versions"] == 2
        assert described["cache"]["bytes"] == sum(m["bytes"] for m in described["cached"]) > 0
        ask(ids[0])  # a fourth request for it loads it again, and evicts the next least recently used
        assert [m["id"] for m in server.post("/model", {}).json()["cached"]] == [ids[2], ids[0]]
        log = server.log_path.read_text()
        assert log.count(f"model cache: loaded {ids[0]}") == 2 and f"model cache: evicted {ids[0]}" in log
        assert f"model cache: evicted {ids[1]}" in log
        assert server.post("/translate", {"text": SAMPLE_PAIRS[0][0]}).json()["model"]["name"] == "transformer-test"
    finally:
        server.stop()
