"""The attention explorer in a real headless browser (Debian's chromium via Playwright),
in front of a real `bentoml serve`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepwise.checkpoint import load_checkpoint
from stepwise.export import export_checkpoint
from stepwise.net import wait_until_ready

from conftest import ROOT, SAMPLE_PAIRS, BentoProcess, free_port, make_checkpoint

CHROMIUM = os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
playwright_api = pytest.importorskip("playwright.sync_api")

if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():  # .ci/run installs it; say so loudly if not
    pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium", pytrace=False)


class Explorer:
    """`python -m gradio_app` on a free port."""

    def __init__(self, api: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        self.process = subprocess.Popen([sys.executable, "-m", "gradio_app", "--api", api, "--port", str(self.port)],
                                        cwd=ROOT, env=env, stdout=open(log_path, "wb"),  # noqa: SIM115
                                        stderr=subprocess.STDOUT)
        wait_until_ready(self.url, timeout=90, process=self.process, log_file=log_path, name="the explorer")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoProcess]:
    folder = tmp_path_factory.mktemp("explorer")
    export_checkpoint(load_checkpoint(make_checkpoint(folder / "model.pt", seed=21)), folder / "export")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env.update(STEPWISE_MODEL_DIR=str(folder / "export"), STEPWISE_ORT_THREADS="1")
    server = BentoProcess(folder / "bentoml.log", env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def _choose(page: object, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator("ul[role='listbox'] li", has_text=option).first.click()


def _svg_title(page: object) -> str:
    return page.locator("#heatmap svg.attention-heatmap text").first.text_content()


def test_translate_and_explore_attention(service: BentoProcess, browser: object, tmp_path: Path) -> None:
    explorer = Explorer(service.url, tmp_path / "explorer.log")
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1600})
        page.goto(explorer.url)
        assert "not an explanation" in page.locator("#attention-note").text_content()
        sentence = SAMPLE_PAIRS[2][0]
        expected = service.post("/translate", {"text": sentence, "attention": "all"}).json()
        page.locator("#sentence textarea").fill(sentence)
        page.locator("#translate").click()
        page.wait_for_function("document.querySelector('#translation textarea').value.length > 0", timeout=60000)
        assert page.locator("#translation textarea").input_value() == expected["translation"]
        page.wait_for_selector("#heatmap svg.attention-heatmap")
        # cross-attention: target tokens down the side, source tokens across the top
        assert page.locator("#heatmap text.col-label").all_text_contents() == expected["source_tokens"]
        assert page.locator("#heatmap text.row-label").all_text_contents() == expected["target_tokens"]
        cells = page.locator("#heatmap rect.cell")
        assert cells.count() == len(expected["source_tokens"]) * len(expected["target_tokens"])
        assert "→" in cells.first.locator("title").text_content()  # the weight on hover
        assert "layer 1 · average of heads" in _svg_title(page)

        _choose(page, "layer", "0")
        _choose(page, "head", "2")
        page.wait_for_function("document.querySelector('#heatmap svg text').textContent.includes('layer 0 · head 2')")
        weight = float(page.locator("#heatmap rect.cell").first.get_attribute("data-weight"))
        assert abs(weight - expected["attention"]["cross"][0][2][0][0]) < 1e-3

        page.locator("#kind label", has_text="encoder").click()
        page.wait_for_function("document.querySelector('#heatmap svg text').textContent.includes('encoder')")
        assert page.locator("#heatmap text.row-label").all_text_contents() == expected["source_tokens"]
        page.locator("#kind label", has_text="decoder").click()
        page.wait_for_function("document.querySelector('#heatmap svg text').textContent.includes('decoder')")
        assert page.locator("#heatmap text.col-label").all_text_contents()[0] == "<s>"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer-heatmap.png"), full_page=True)

        # the grid: 2 layers x (4 heads + average); clicking one opens it in the heatmap tab
        page.locator("#kind label", has_text="cross").click()
        page.get_by_role("tab", name="All layers × heads").click()
        thumbs = page.locator("#grid button.thumbnail-item")
        thumbs.first.wait_for()
        assert thumbs.count() == 2 * 5
        thumbs.nth(6).click()  # layer 1, head 1
        page.wait_for_function("document.querySelector('#heatmap svg text') && "
                               "document.querySelector('#heatmap svg text').textContent.includes('layer 1 · head 1')")

        page.get_by_role("tab", name="Token lines").click()
        page.wait_for_selector("#lines svg.attention-lines")
        assert page.locator("#lines text.key-token").all_text_contents() == expected["source_tokens"]

        page.get_by_role("tab", name="Heatmap").click()
        page.locator("#export").click()
        page.wait_for_selector("#export-png a, #export-png .file-preview", timeout=30000)
        assert "Exported" in page.locator("#status").text_content()
        page.screenshot(path=str(ARTIFACTS / "explorer-export.png"), full_page=True)
    finally:
        explorer.stop()


def test_service_down_is_a_clear_message(browser: object, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    explorer = Explorer(closed, tmp_path / "explorer.log")
    try:
        page = browser.new_page()
        page.goto(explorer.url)
        page.locator("#translate").click()
        page.wait_for_selector("#status-error", timeout=30000)
        message = page.locator("#status-error").text_content()
        assert "not reachable" in message and closed in message
        assert "Traceback" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer-service-down.png"), full_page=True)
    finally:
        explorer.stop()
