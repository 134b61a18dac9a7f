"""The attention explorer in a real headless browser (Debian's chromium via Playwright), in front
of a real `bentoml serve`: the session's shared tiny service and explorer, and for a deeper encoder or
a service that is down, explorers of their own.

Every wait is for an element or a value on the page, never a sleep, with a long default
timeout for a loaded CI machine.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from stepwise.explorer.draw import AVERAGE, KINDS, heatmap_png, thumbnail_png
from stepwise.explorer.views import HeatmapView, Selection, TranslationView
from stepwise.serve.client import TranslationClient

from support.models import SAMPLE_PAIRS, export_tiny_model
from support.pages import (
    ARTIFACTS,
    cell_weights,
    choose,
    open_page,
    options,
    same_image,
    svg_title,
    translate,
    wait_title,
    wait_translated,
)
from support.processes import BentoProcess, Explorer, free_port, serve_export


@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


@pytest.fixture(scope="module")
def explorer(tiny_explorer: Explorer) -> Explorer:
    """The session's shared explorer: each test opens sessions of its own."""
    return tiny_explorer


@pytest.mark.browser
def test_translate_and_explore_attention(service: BentoProcess, explorer: Explorer, browser: object) -> None:
    page = open_page(browser, explorer.url)
    assert "not an explanation" in page.locator("#attention-note").text_content()
    sentence = SAMPLE_PAIRS[2][0]
    expected = service.post("/translate", {"text": sentence, "attention": "all"}).json()
    translate(page, sentence)
    wait_translated(page)
    assert page.locator("#translation textarea").input_value() == expected["translation"]
    # cross-attention: target tokens down the side, source tokens across the top
    assert page.locator("#heatmap text.col-label").all_text_contents() == expected["source_tokens"]
    assert page.locator("#heatmap text.row-label").all_text_contents() == expected["target_tokens"]
    cells = page.locator("#heatmap rect.cell")
    assert cells.count() == len(expected["source_tokens"]) * len(expected["target_tokens"])
    assert "→" in cells.first.locator("title").text_content()  # the weight on hover
    # layers and heads are numbered from 1 on the page (the JSON counts from 0): the last of 2 layers is "2"
    assert "layer 2 · average of heads" in svg_title(page)
    assert options(page, "layer") == ["1", "2"]
    assert options(page, "head") == [AVERAGE, "1", "2", "3", "4"]

    choose(page, "layer", "1")
    choose(page, "head", "3")
    wait_title(page, "layer 1 · head 3")
    weights = np.asarray(expected["attention"]["cross"][0][2]).ravel()
    assert np.allclose(cell_weights(page), weights, atol=1e-3)

    page.locator("#kind label", has_text="encoder").click()
    wait_title(page, "encoder")
    assert page.locator("#heatmap text.row-label").all_text_contents() == expected["source_tokens"]
    page.locator("#kind label", has_text="decoder").click()
    wait_title(page, "decoder")
    assert page.locator("#heatmap text.col-label").all_text_contents()[0] == "<s>"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-heatmap.png"), full_page=True)

    # the grid: 2 layers x (4 heads + average), captioned with the menus' numbers; a click opens one
    page.locator("#kind label", has_text="cross").click()
    wait_title(page, "cross")
    page.get_by_role("tab", name="All layers × heads").click()
    thumbs = page.locator("#grid button.thumbnail-item")
    thumbs.nth(9).wait_for()
    assert thumbs.count() == 2 * 5
    assert "layer 2 · head 2" in page.locator("#grid").inner_text().split("layer 1 · head 1")[1]
    thumbs.nth(6).click()  # the second layer's second head
    wait_title(page, "layer 2 · head 2")
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


@pytest.mark.browser
def test_two_sessions_see_their_own_thumbnails(service: BentoProcess, explorer: Explorer, browser: object) -> None:
    """Two people translating different sentences at the same time each see their own grid and export."""
    sentences = [SAMPLE_PAIRS[0][0], SAMPLE_PAIRS[3][0]]
    expected = [service.post("/translate", {"text": s, "attention": "all"}).json() for s in sentences]
    assert expected[0]["source_tokens"] != expected[1]["source_tokens"]
    pages = [open_page(browser, explorer.url) for _ in sentences]
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
            assert same_image(image, thumbnail_png(result, "cross", layer, head)), (source, layer, head)

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
        assert same_image(png, heatmap_png(weights, rows, cols, title=title))
    assert len(set(explorer.temp.glob("stepwise-explorer-*/session-*")) - folders) == 2  # a folder per session
    ARTIFACTS.mkdir(exist_ok=True)
    pages[1].screenshot(path=str(ARTIFACTS / "explorer-second-session.png"), full_page=True)


@pytest.mark.integration
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


@pytest.mark.integration
def test_the_beam_slider_goes_as_far_as_the_service_allows(service: BentoProcess) -> None:
    """The beam limit is the one ``/model`` reports (greedy only while the service is unreachable)."""
    with gr.Blocks():
        reachable = TranslationView.build(TranslationClient(service.url), "")
        unreachable = TranslationView.build(TranslationClient(f"http://127.0.0.1:{free_port()}"), "")
    assert reachable.beam.maximum == service.post("/model", {}).json()["max_beam_size"] > 1
    assert reachable.beam.interactive is not False and unreachable.beam.interactive is False
    assert reachable.refresh_limits()["maximum"] == reachable.beam.maximum


@pytest.mark.browser
def test_encoder_deeper_than_decoder(browser: object, tmp_path: Path) -> None:
    """A 4-encoder + 2-decoder-layer model: the encoder's layers 3 and 4 can be opened."""
    _, export = export_tiny_model(tmp_path, seed=21, n_encoder_layers=4, n_decoder_layers=2)
    server = serve_export(export, tmp_path / "bentoml.log")
    explorer = Explorer(server.url, tmp_path / "explorer.log")
    try:
        sentence = SAMPLE_PAIRS[4][0]
        expected = server.post("/translate", {"text": sentence, "attention": "all"}).json()
        assert [len(expected["attention"][kind]) for kind in ("encoder", "decoder", "cross")] == [4, 2, 2]
        page = open_page(browser, explorer.url)
        translate(page, sentence)
        wait_translated(page)
        assert options(page, "layer") == ["1", "2"]  # cross-attention: the decoder's layers

        page.locator("#kind label", has_text="encoder").click()
        wait_title(page, "encoder self-attention · layer 2 · average of heads")  # the chosen layer stays
        assert options(page, "layer") == ["1", "2", "3", "4"]
        for layer in (3, 4):
            choose(page, "layer", str(layer))
            choose(page, "head", "2")
            wait_title(page, f"encoder self-attention · layer {layer} · head 2")
            weights = np.asarray(expected["attention"]["encoder"][layer - 1][1]).ravel()
            assert np.allclose(cell_weights(page), weights, atol=1e-3)
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
            wait_title(page, f"{KINDS[kind]} · layer 2 · head 2")  # layer 4 is gone: the last layer is chosen
            assert options(page, "layer") == ["1", "2"]
            assert page.locator("#layer input").input_value() == "2"
    finally:
        explorer.stop()
        server.stop()


@pytest.mark.browser
def test_service_down_is_a_clear_message(browser: object, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    explorer = Explorer(closed, tmp_path / "explorer.log")
    try:
        page = open_page(browser, explorer.url)
        page.locator("#translate").click()
        page.wait_for_selector("#status-error")
        message = page.locator("#status-error").text_content()
        assert "not reachable" in message and closed in message
        assert "Traceback" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer-service-down.png"), full_page=True)
    finally:
        explorer.stop()
