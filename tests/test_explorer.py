"""The attention explorer in a real headless browser (Debian's chromium via Playwright),
in front of a real `bentoml serve`.

Every wait is for an element or a value on the page, never a sleep, with a long default
timeout for a loaded CI machine.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from stepwise.explorer.draw import AVERAGE, KINDS, heatmap_png, thumbnail_png
from stepwise.explorer.views import HeatmapView, Selection, TranslationView
from stepwise.export import export_checkpoint
from stepwise.net import wait_until_ready
from stepwise.serve.client import TranslationClient
from stepwise.train.checkpoint import load_checkpoint

from conftest import ROOT, SAMPLE_PAIRS, BentoProcess, free_port, make_checkpoint

ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 120_000  # for any one element to appear, on a machine busy with other tests


class Explorer:
    """`python -m stepwise.explorer` on a free port.

    Sessions may run their events at the same time (``GRADIO_DEFAULT_CONCURRENCY_LIMIT``), as in
    an explorer that several people use at once.
    """

    def __init__(self, api: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp = log_path.parent / "tmp"  # its TMPDIR, where it keeps each session's exports
        self.temp.mkdir()
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_DEFAULT_CONCURRENCY_LIMIT": "4",
               "TMPDIR": str(self.temp)}
        self.process = subprocess.Popen([sys.executable, "-m", "stepwise.explorer", "--api", api, "--port",
                                         str(self.port)],
                                        cwd=ROOT, env=env, stdout=open(log_path, "wb"),  # noqa: SIM115
                                        stderr=subprocess.STDOUT)
        wait_until_ready(self.url, timeout=90, process=self.process, log_file=log_path, name="the explorer")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def _serve(folder: Path, **model: object) -> BentoProcess:
    """`bentoml serve` of a freshly exported small model (``model`` overrides its config)."""
    export_checkpoint(load_checkpoint(make_checkpoint(folder / "model.pt", seed=21, **model)), folder / "export")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML_")}
    env.update(STEPWISE_MODEL_DIR=str(folder / "export"), STEPWISE_ORT_THREADS="1")
    return BentoProcess(folder / "bentoml.log", env)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoProcess]:
    server = _serve(tmp_path_factory.mktemp("explorer"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def explorer(service: BentoProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explorer]:
    app = Explorer(service.url, tmp_path_factory.mktemp("explorer-log") / "explorer.log")
    yield app
    app.stop()
    assert not list(app.temp.glob("stepwise-explorer-*")), "the explorer left its export folders behind"


def _open(browser: object, url: str) -> object:
    """A page of its own browser context: a session of its own."""
    page = browser.new_context(viewport={"width": 1300, "height": 1600}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def _open_menu(page: object, elem_id: str) -> None:
    """Open a dropdown (it opens on focus: leave whatever has it first)."""
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.locator(f"#{elem_id} input").click()


def _options(page: object, elem_id: str) -> list[str]:
    """The labels a dropdown offers."""
    _open_menu(page, elem_id)
    options = page.locator(f"#{elem_id} ul[role='listbox'] li[role='option']")
    options.first.wait_for()
    labels = options.evaluate_all("items => items.map(i => i.getAttribute('aria-label'))")
    page.keyboard.press("Escape")
    page.locator(f"#{elem_id} ul[role='listbox']").wait_for(state="detached")
    return labels


def _choose(page: object, elem_id: str, option: str) -> None:
    _open_menu(page, elem_id)
    page.locator(f"#{elem_id} ul[role='listbox'] li[role='option'][aria-label='{option}']").click()
    page.wait_for_function(f"document.querySelector('#{elem_id} input').value === {option!r}")


def _wait_title(page: object, text: str) -> None:
    """Wait until the heatmap's title contains ``text``."""
    page.wait_for_function("([t]) => { const e = document.querySelector('#heatmap svg text'); "
                           "return e !== null && e.textContent.includes(t); }", arg=[text])


def _svg_title(page: object) -> str:
    return page.locator("#heatmap svg.attention-heatmap text").first.text_content()


def _translate(page: object, sentence: str) -> None:
    page.locator("#sentence textarea").fill(sentence)
    page.locator("#translate").click()


def _wait_translated(page: object) -> None:
    page.wait_for_function("document.querySelector('#translation textarea').value.length > 0")
    page.wait_for_selector("#heatmap svg.attention-heatmap")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.int16)


def _same_image(shown: bytes, expected: bytes) -> bool:
    """The same picture (Gradio re-encodes thumbnails; a weight 1e-6 apart may move a colour one step)."""
    a, b = _pixels(shown), _pixels(expected)
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 3


def _cell_weights(page: object) -> list[float]:
    return [float(w) for w in page.locator("#heatmap rect.cell").evaluate_all(
        "cells => cells.map(c => c.getAttribute('data-weight'))")]


def test_translate_and_explore_attention(service: BentoProcess, explorer: Explorer, browser: object) -> None:
    page = _open(browser, explorer.url)
    assert "not an explanation" in page.locator("#attention-note").text_content()
    sentence = SAMPLE_PAIRS[2][0]
    expected = service.post("/translate", {"text": sentence, "attention": "all"}).json()
    _translate(page, sentence)
    _wait_translated(page)
    assert page.locator("#translation textarea").input_value() == expected["translation"]
    # cross-attention: target tokens down the side, source tokens across the top
    assert page.locator("#heatmap text.col-label").all_text_contents() == expected["source_tokens"]
    assert page.locator("#heatmap text.row-label").all_text_contents() == expected["target_tokens"]
    cells = page.locator("#heatmap rect.cell")
    assert cells.count() == len(expected["source_tokens"]) * len(expected["target_tokens"])
    assert "→" in cells.first.locator("title").text_content()  # the weight on hover
    # layers and heads are numbered from 1 on the page (the JSON counts from 0): the last of 2 layers is "2"
    assert "layer 2 · average of heads" in _svg_title(page)
    assert _options(page, "layer") == ["1", "2"]
    assert _options(page, "head") == [AVERAGE, "1", "2", "3", "4"]

    _choose(page, "layer", "1")
    _choose(page, "head", "3")
    _wait_title(page, "layer 1 · head 3")
    weights = np.asarray(expected["attention"]["cross"][0][2]).ravel()
    assert np.allclose(_cell_weights(page), weights, atol=1e-3)

    page.locator("#kind label", has_text="encoder").click()
    _wait_title(page, "encoder")
    assert page.locator("#heatmap text.row-label").all_text_contents() == expected["source_tokens"]
    page.locator("#kind label", has_text="decoder").click()
    _wait_title(page, "decoder")
    assert page.locator("#heatmap text.col-label").all_text_contents()[0] == "<s>"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-heatmap.png"), full_page=True)

    # the grid: 2 layers x (4 heads + average), captioned with the menus' numbers; a click opens one
    page.locator("#kind label", has_text="cross").click()
    _wait_title(page, "cross")
    page.get_by_role("tab", name="All layers × heads").click()
    thumbs = page.locator("#grid button.thumbnail-item")
    thumbs.nth(9).wait_for()
    assert thumbs.count() == 2 * 5
    assert "layer 2 · head 2" in page.locator("#grid").inner_text().split("layer 1 · head 1")[1]
    thumbs.nth(6).click()  # the second layer's second head
    _wait_title(page, "layer 2 · head 2")
    assert page.locator("#layer input").input_value() == "2" and page.locator("#head input").input_value() == "2"

    page.get_by_role("tab", name="Token lines").click()
    page.wait_for_selector("#lines svg.attention-lines")
    assert page.locator("#lines text.key-token").all_text_contents() == expected["source_tokens"]

    page.get_by_role("tab", name="Heatmap").click()
    page.locator("#export").click()
    page.wait_for_selector("#export-png a, #export-png .file-preview")
    status = page.locator("#status").text_content()
    assert "Exported attention-cross-layer2-head2.png and attention-cross-layer2-head2.html" in status
    page.screenshot(path=str(ARTIFACTS / "explorer-export.png"), full_page=True)

    # compare versions: the loaded model (empty = the default) against one the service does not have
    page.get_by_role("tab", name="Compare versions").click()
    page.locator("#model-a textarea").fill("")
    page.locator("#model-b textarea").fill("no-such-version")
    page.locator("#compare-button").click()
    page.wait_for_function("document.querySelector('#translation-b textarea').value.includes('unavailable')")
    assert page.locator("#translation-a textarea").input_value() == expected["translation"]
    assert page.locator("#heatmap-a text.col-label").all_text_contents() == expected["source_tokens"]
    assert "no-such-version" in page.locator("#status-error").text_content()
    assert "Traceback" not in page.content()


def _thumbnail_sources(page: object) -> list[str]:
    return page.locator("#grid button.thumbnail-item img").evaluate_all("images => images.map(i => i.src)")


def test_two_sessions_see_their_own_thumbnails(service: BentoProcess, explorer: Explorer, browser: object) -> None:
    """Two people translating different sentences at the same time each see their own grid and export."""
    sentences = [SAMPLE_PAIRS[0][0], SAMPLE_PAIRS[3][0]]
    expected = [service.post("/translate", {"text": s, "attention": "all"}).json() for s in sentences]
    assert expected[0]["source_tokens"] != expected[1]["source_tokens"]
    pages = [_open(browser, explorer.url) for _ in sentences]
    for page, sentence in zip(pages, sentences, strict=True):
        page.get_by_role("tab", name="All layers × heads").click()
        page.locator("#sentence textarea").fill(sentence)
    for page in pages:  # both at once: their events overlap
        page.locator("#translate").click()
    shown = []
    for page, result in zip(pages, expected, strict=True):
        page.wait_for_function("document.querySelector('#translation textarea').value.length > 0")
        assert page.locator("#translation textarea").input_value() == result["translation"]
        thumbs = page.locator("#grid button.thumbnail-item img")
        thumbs.nth(9).wait_for()
        shown.append(_thumbnail_sources(page))
    assert not set(shown[0]) & set(shown[1])
    for page, sources, result in zip(pages, shown, expected, strict=True):
        order = [(layer, head) for layer in range(2) for head in [*range(4), AVERAGE]]
        assert len(sources) == len(order)
        for source, (layer, head) in zip(sources, order, strict=True):
            image = page.request.get(source).body()
            assert _same_image(image, thumbnail_png(result, "cross", layer, head)), (source, layer, head)

    # exports: the same view exported by both sessions at once, each file its own translation's
    folders = set(explorer.temp.glob("stepwise-explorer-*/session-*"))
    for page in pages:
        page.get_by_role("tab", name="Heatmap").click()
        page.locator("#export").click()
    for page, result in zip(pages, expected, strict=True):
        link = page.locator("#export-png a").first
        link.wait_for()
        png = page.request.get(link.get_attribute("href")).body()
        rows, cols = result["target_tokens"], result["source_tokens"]
        weights = np.asarray(result["attention"]["cross"][1]).mean(axis=0)
        title = "cross-attention (target → source) · layer 2 · average of heads"
        assert _same_image(png, heatmap_png(weights, rows, cols, title=title))
    assert len(set(explorer.temp.glob("stepwise-explorer-*/session-*")) - folders) == 2  # a folder per session
    ARTIFACTS.mkdir(exist_ok=True)
    pages[1].screenshot(path=str(ARTIFACTS / "explorer-second-session.png"), full_page=True)


def test_sessions_export_into_folders_of_their_own(service: BentoProcess) -> None:
    """The same view exported by two sessions: two files, the first not overwritten by the second."""
    with gr.Blocks():
        translation = TranslationView.build(TranslationClient(service.url), "")
        heatmap = HeatmapView.build(Selection.build(translation.result), translation.status)
    results = [service.post("/translate", {"text": pair[0], "attention": "all"}).json() for pair in SAMPLE_PAIRS[:2]]
    first, second = (heatmap.export(result, "cross", 1, AVERAGE, None) for result in results)
    assert first[heatmap.folder] != second[heatmap.folder] and first[heatmap.png] != second[heatmap.png]
    weights = np.asarray(results[0]["attention"]["cross"][1]).mean(axis=0)
    title = "cross-attention (target → source) · layer 2 · average of heads"
    png = heatmap_png(weights, results[0]["target_tokens"], results[0]["source_tokens"], title=title)
    assert Path(first[heatmap.png]).read_bytes() == png
    again = heatmap.export(results[0], "cross", 0, 2, first[heatmap.folder])  # the session's folder is kept
    assert Path(again[heatmap.png]).parent == Path(first[heatmap.folder])
    assert Path(again[heatmap.png]).name == "attention-cross-layer1-head3.png"
    heatmap.folder.delete_callback(first[heatmap.folder])  # Gradio's call when the session's state is deleted
    assert not Path(first[heatmap.folder]).exists() and Path(second[heatmap.png]).exists()


def test_the_beam_slider_goes_as_far_as_the_service_allows(service: BentoProcess) -> None:
    """The beam limit is the one ``/model`` reports (greedy only while the service is unreachable)."""
    with gr.Blocks():
        reachable = TranslationView.build(TranslationClient(service.url), "")
        unreachable = TranslationView.build(TranslationClient(f"http://127.0.0.1:{free_port()}"), "")
    assert reachable.beam.maximum == service.post("/model", {}).json()["max_beam_size"] > 1
    assert reachable.beam.interactive is not False and unreachable.beam.interactive is False
    assert reachable.refresh_limits()["maximum"] == reachable.beam.maximum


def test_encoder_deeper_than_decoder(browser: object, tmp_path: Path) -> None:
    """A 4-encoder + 2-decoder-layer model: the encoder's layers 3 and 4 can be opened."""
    server = _serve(tmp_path, n_encoder_layers=4, n_decoder_layers=2)
    explorer = Explorer(server.url, tmp_path / "explorer.log")
    try:
        sentence = SAMPLE_PAIRS[4][0]
        expected = server.post("/translate", {"text": sentence, "attention": "all"}).json()
        assert [len(expected["attention"][kind]) for kind in ("encoder", "decoder", "cross")] == [4, 2, 2]
        page = _open(browser, explorer.url)
        _translate(page, sentence)
        _wait_translated(page)
        assert _options(page, "layer") == ["1", "2"]  # cross-attention: the decoder's layers

        page.locator("#kind label", has_text="encoder").click()
        _wait_title(page, "encoder self-attention · layer 2 · average of heads")  # the chosen layer stays
        assert _options(page, "layer") == ["1", "2", "3", "4"]
        for layer in (3, 4):
            _choose(page, "layer", str(layer))
            _choose(page, "head", "2")
            _wait_title(page, f"encoder self-attention · layer {layer} · head 2")
            weights = np.asarray(expected["attention"]["encoder"][layer - 1][1]).ravel()
            assert np.allclose(_cell_weights(page), weights, atol=1e-3)
        page.get_by_role("tab", name="Token lines").click()
        page.wait_for_selector("#lines svg.attention-lines")
        assert page.locator("#lines text.key-token").all_text_contents() == expected["source_tokens"]
        page.get_by_role("tab", name="All layers × heads").click()
        page.locator("#grid button.thumbnail-item").nth(4 * 5 - 1).wait_for()
        assert page.locator("#grid button.thumbnail-item").count() == 4 * 5
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer-deep-encoder.png"), full_page=True)

        for kind in ("decoder", "cross"):
            page.get_by_role("tab", name="Heatmap").click()
            page.locator("#kind label", has_text=kind).click()
            _wait_title(page, f"{KINDS[kind]} · layer 2 · head 2")  # layer 4 is gone: the last layer is chosen
            assert _options(page, "layer") == ["1", "2"]
            assert page.locator("#layer input").input_value() == "2"
    finally:
        explorer.stop()
        server.stop()


def test_service_down_is_a_clear_message(browser: object, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    explorer = Explorer(closed, tmp_path / "explorer.log")
    try:
        page = _open(browser, explorer.url)
        page.locator("#translate").click()
        page.wait_for_selector("#status-error")
        message = page.locator("#status-error").text_content()
        assert "not reachable" in message and closed in message
        assert "Traceback" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer-service-down.png"), full_page=True)
    finally:
        explorer.stop()
