"""Reading and driving the explorer's page in headless Chromium (Playwright).

Every wait is for an element or a value on the page, never a sleep, with a long default timeout
for a loaded CI machine.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from stepwise.explorer.draw import cell_colors
from stepwise.serve.alignment import parse_pharaoh

from support.processes import ROOT

ARTIFACTS = ROOT / "test-artifacts"  # screenshots, for a person to look at
TIMEOUT_MS = 120_000  # for any one element to appear, on a machine busy with other tests


def open_page(browser: object, url: str) -> object:
    """A page of its own browser context (a session of its own) at ``url``."""
    page = browser.new_context(viewport={"width": 1300, "height": 1600}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def open_menu(page: object, elem_id: str) -> None:
    """Open a dropdown (it opens on focus: leave whatever has it first)."""
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.locator(f"#{elem_id} input").click()


def options(page: object, elem_id: str) -> list[str]:
    """The labels a dropdown offers."""
    open_menu(page, elem_id)
    items = page.locator(f"#{elem_id} ul[role='listbox'] li[role='option']")
    items.first.wait_for()
    labels = items.evaluate_all("items => items.map(i => i.getAttribute('aria-label'))")
    page.keyboard.press("Escape")
    page.locator(f"#{elem_id} ul[role='listbox']").wait_for(state="detached")
    return labels


def choose(page: object, elem_id: str, option: str) -> None:
    """Pick ``option`` in a dropdown and wait until it shows."""
    open_menu(page, elem_id)
    page.locator(f"#{elem_id} ul[role='listbox'] li[role='option'][aria-label='{option}']").click()
    page.wait_for_function(f"document.querySelector('#{elem_id} input').value === {option!r}")


def wait_title(page: object, text: str) -> None:
    """Wait until the heatmap's title contains ``text``."""
    page.wait_for_function("([t]) => { const e = document.querySelector('#heatmap svg text'); "
                           "return e !== null && e.textContent.includes(t); }", arg=[text])


def svg_title(page: object) -> str:
    """The heatmap's title."""
    return page.locator("#heatmap svg.attention-heatmap text").first.text_content()


def translate(page: object, sentence: str) -> None:
    """Type ``sentence`` and press Translate."""
    page.locator("#sentence textarea").fill(sentence)
    page.locator("#translate").click()


def wait_translated(page: object) -> None:
    """Wait for a translation and its heatmap."""
    page.wait_for_function("document.querySelector('#translation textarea').value.length > 0")
    page.wait_for_selector("#heatmap svg.attention-heatmap")


def pixels(png: bytes) -> np.ndarray:
    """An image's RGBA pixels as signed integers (differences do not wrap)."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.int16)


def same_image(shown: bytes, expected: bytes) -> bool:
    """The same picture (Gradio re-encodes thumbnails; a weight 1e-6 apart may move a colour one step)."""
    a, b = pixels(shown), pixels(expected)
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 3


def cell_weights(page: object) -> list[float]:
    """The weights of the heatmap's cells, row by row."""
    return [float(w) for w in page.locator("#heatmap rect.cell").evaluate_all(
        "cells => cells.map(c => c.getAttribute('data-weight'))")]


def labels(page: object, selector: str) -> list[str]:
    """The texts of every element ``selector`` matches."""
    return page.locator(selector).all_text_contents()


def check_cells(page: object, weights: np.ndarray) -> None:
    """The heatmap shows ``weights``: as hoverable cells, or (past 64 × 64) as one image of their colours."""
    cells = cell_weights(page)
    if cells:
        assert np.allclose(cells, weights.ravel(), atol=1e-3)
        return
    href = page.locator("#heatmap image.cells").get_attribute("href")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))), dtype=np.int16)
    assert shown.shape == (*weights.shape, 3) and int(np.abs(shown - cell_colors(weights)).max()) <= 2


def alignment_matrix(page: object) -> dict:
    """What the word alignment tab shows: axis words, cell weights, outlined cells, link lines."""
    return page.evaluate("""() => {
        const m = document.querySelector('#alignment-matrix svg');
        const texts = (root, sel) => [...root.querySelectorAll(sel)].map(e => e.textContent);
        const cells = [...m.querySelectorAll('rect.cell')];
        const cols = m.querySelectorAll('text.col-label').length;
        return {rows: texts(m, 'text.row-label'), cols: texts(m, 'text.col-label'),
                weights: cells.map(c => parseFloat(c.getAttribute('data-weight'))),
                linked: cells.map((c, k) => c.classList.contains('linked') ? [k % cols, Math.floor(k / cols)] : null)
                             .filter(x => x !== null),
                lines: [...document.querySelectorAll('#alignment-lines line.link')]
                           .map(l => [+l.getAttribute('data-source'), +l.getAttribute('data-target')]),
                title: m.querySelector('text').textContent};
    }""")


def check_alignment(page: object, soft: dict, hard: dict) -> None:
    """The page's matrix is the service's ``soft``; its outlined cells and lines are ``hard``'s pairs."""
    # the matrix is drawn again when a menu changes: read it once it is whole, with this many words
    page.wait_for_function("([rows, cols]) => { const m = document.querySelector('#alignment-matrix svg'); "
                           "return m !== null && m.querySelector('text') !== null && "
                           "m.querySelectorAll('text.row-label').length === rows && "
                           "m.querySelectorAll('text.col-label').length === cols; }",
                           arg=[len(soft["target_words"]), len(soft["source_words"])])
    shown = alignment_matrix(page)
    assert shown["rows"] == soft["target_words"] and shown["cols"] == soft["source_words"]
    np.testing.assert_allclose(shown["weights"], np.asarray(soft["soft"]).ravel(), atol=1e-4)
    pairs = parse_pharaoh(hard["hard"])
    assert len(pairs) == len(soft["target_words"])  # one link per target word
    assert {tuple(p) for p in shown["linked"]} == pairs
    assert {tuple(p) for p in shown["lines"]} == pairs and len(shown["lines"]) == len(pairs)
