"""The explorer's word alignments, paragraphs and long sentences, in headless Chromium against a
real `bentoml serve`: the session's shared tiny service (its positional table holds 1024 positions).
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from stepwise.explorer.draw import LONG, cell_colors, heatmap_png, heatmap_svg, lines_svg
from stepwise.explorer.views import TOP_K
from stepwise.serve.alignment import attention_source, parse_pharaoh, word_alignment, words
from stepwise.serve.client import TranslationClient

from support.models import PARAGRAPH, SAMPLE_PAIRS
from support.pages import (
    ARTIFACTS,
    alignment_matrix,
    check_alignment,
    check_cells,
    choose,
    labels,
    open_page,
    options,
    same_image,
    translate,
    wait_title,
    wait_translated,
)
from support.processes import BentoProcess, Explorer

# one long sentence (one full stop, so no split): 212 pieces of the tiny tokenizer
LONG_SENTENCE = " und ".join(source.rstrip(".!").replace(":", "")
                             for source, _ in SAMPLE_PAIRS * 2 + SAMPLE_PAIRS[:2]) + "."


@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service (its positional table holds the long sentence): only read from."""
    return tiny_service


@pytest.fixture(scope="module")
def explorer(tiny_explorer: Explorer) -> Explorer:
    """The session's shared explorer: each test opens sessions of its own."""
    return tiny_explorer


@pytest.mark.integration
def test_client_decodes_each_sentences_attention(service: BentoProcess) -> None:
    """A split paragraph's per-sentence attention comes out of the explorer's client as float32 arrays."""
    decoded = TranslationClient(service.url).translate(PARAGRAPH, split="sentences")
    plain = service.post("/translate", {"text": PARAGRAPH, "split": "sentences", "attention": "all"}).json()
    assert decoded["translation"] == plain["translation"] and decoded["attention"] == {}
    assert len(decoded["sentences"]) == len(plain["sentences"]) == 3
    for got, want in zip(decoded["sentences"], plain["sentences"], strict=True):
        assert got["source_tokens"] == want["source_tokens"]
        for kind, weights in want["attention"].items():
            assert isinstance(got["attention"][kind], np.ndarray)
            np.testing.assert_allclose(got["attention"][kind], np.array(weights), atol=1e-3)


@pytest.mark.browser
def test_word_alignment_is_the_services(service: BentoProcess, explorer: Explorer, browser: object) -> None:
    sentence = SAMPLE_PAIRS[4][0]
    request = {"text": sentence, "split": "sentences", "attention": "none"}
    soft = service.post("/translate", {**request, "alignment": "soft"}).json()["alignment"]
    hard = service.post("/translate", {**request, "alignment": "hard"}).json()["alignment"]
    full = service.post("/translate", {"text": sentence, "attention": "cross"}).json()
    # the word-level rule is stepwise.serve.alignment's: pieces merged into words, from the average of everything
    assert soft["source_words"] == words(full["source_tokens"])[0] == sentence.split()
    rule = word_alignment(attention_source(np.asarray(full["attention"]["cross"]), "average", "average"),
                          full["source_tokens"], full["target_tokens"])
    np.testing.assert_allclose(np.asarray(soft["soft"]), rule.soft, atol=1e-4)
    assert parse_pharaoh(hard["hard"]) == set(rule.hard())

    page = open_page(browser, explorer.url)
    translate(page, sentence)
    wait_translated(page)
    assert not page.locator("#sentence-picker").is_visible()  # one sentence: no picker
    page.get_by_role("tab", name="Word alignments").click()
    page.wait_for_selector("#alignment-matrix svg.attention-heatmap")
    assert "layers averaged · heads averaged" in alignment_matrix(page)["title"]
    check_alignment(page, soft, hard)
    assert options(page, "alignment-layer") == ["average", "1", "2"]
    assert options(page, "alignment-head") == ["average", "1", "2", "3", "4"]

    # layer 1, head 2: the service is asked for that head's alignment
    request.update(alignment_layer=0, alignment_head=1)
    soft = service.post("/translate", {**request, "alignment": "soft"}).json()["alignment"]
    hard = service.post("/translate", {**request, "alignment": "hard"}).json()["alignment"]
    choose(page, "alignment-layer", "1")
    choose(page, "alignment-head", "2")
    page.wait_for_function("document.querySelector('#alignment-matrix svg text').textContent"
                           ".includes('layer 1 · head 2')")
    check_alignment(page, soft, hard)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-word-alignment.png"), full_page=True)


@pytest.mark.browser
def test_paragraph_shows_one_sentence_at_a_time(service: BentoProcess, explorer: Explorer, browser: object) -> None:
    expected = service.post("/translate", {"text": PARAGRAPH, "split": "sentences", "attention": "all"}).json()
    aligned = service.post("/translate", {"text": PARAGRAPH, "split": "sentences", "attention": "none",
                                          "alignment": "soft"}).json()
    sentences = expected["sentences"]
    assert len(sentences) == 3

    page = open_page(browser, explorer.url)
    translate(page, PARAGRAPH)
    wait_translated(page)
    assert page.locator("#translation textarea").input_value() == expected["translation"]  # joined
    assert options(page, "sentence-picker") == [f"{i + 1}: {s['source']}" for i, s in enumerate(sentences)]
    # the first sentence is shown first
    assert labels(page, "#heatmap text.col-label") == sentences[0]["source_tokens"]

    choose(page, "sentence-picker", f"2: {sentences[1]['source']}")
    page.wait_for_function("([n]) => document.querySelectorAll('#heatmap text.col-label').length === n && "
                           "document.querySelectorAll('#heatmap text.row-label').length === "
                           f"{len(sentences[1]['target_tokens'])}", arg=[len(sentences[1]["source_tokens"])])
    wait_title(page, "layer 2 · average of heads")
    assert labels(page, "#heatmap text.col-label") == sentences[1]["source_tokens"]
    assert labels(page, "#heatmap text.row-label") == sentences[1]["target_tokens"]
    check_cells(page, np.asarray(sentences[1]["attention"]["cross"][1]).mean(axis=0))
    choose(page, "head", "3")  # the menus work on the picked sentence
    wait_title(page, "layer 2 · head 3")
    check_cells(page, np.asarray(sentences[1]["attention"]["cross"][1][2]))

    # every view follows the picked sentence: lines, grid, word alignments
    page.get_by_role("tab", name="Token lines").click()
    page.wait_for_selector("#lines svg.attention-lines")
    assert labels(page, "#lines text.key-token") == sentences[1]["source_tokens"]
    page.get_by_role("tab", name="Word alignments").click()
    page.wait_for_selector("#alignment-matrix svg.attention-heatmap")
    assert labels(page, "#alignment-matrix text.col-label") == aligned["sentences"][1]["alignment"]["source_words"]
    assert labels(page, "#alignment-matrix text.row-label") == aligned["sentences"][1]["alignment"]["target_words"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-paragraph.png"), full_page=True)


@pytest.mark.browser
def test_long_sentence_scrolls_prunes_and_exports(service: BentoProcess, explorer: Explorer,
                                                  browser: object) -> None:
    expected = service.post("/translate", {"text": LONG_SENTENCE, "split": "sentences", "attention": "all"}).json()
    assert "sentences" not in expected  # one sentence
    n = len(expected["source_tokens"])
    assert 180 <= n <= 256, n

    page = open_page(browser, explorer.url)
    translate(page, LONG_SENTENCE)
    wait_translated(page)
    page.locator("#kind label", has_text="encoder").click()
    wait_title(page, "encoder self-attention · layer 2")
    # readable: 16-pixel cells in a container that scrolls both ways, every token labelled; the cells
    # are one image of a pixel per weight (its colours the weights'), each row naming its strongest keys on hover
    scroll = page.evaluate("""() => { const d = document.querySelector('#heatmap div.heatmap-scroll');
        if (!d) return null; const s = getComputedStyle(d); const image = d.querySelector('svg image.cells');
        return {overflow: s.overflow, tall: d.scrollHeight > d.clientHeight, wide: d.scrollWidth > d.clientWidth,
                image: image.getAttribute('href'), width: +image.getAttribute('width'),
                hover: [...d.querySelectorAll('rect.row-hover title')].map(t => t.textContent)}; }""")
    assert scroll is not None and scroll["overflow"] == "auto" and scroll["tall"] and scroll["wide"], scroll
    assert scroll["width"] == 16 * n
    weights = np.asarray(expected["attention"]["encoder"][1]).mean(axis=0)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(scroll["image"].split(",", 1)[1]))), dtype=np.int16)
    assert pixels.shape == (n, n, 3) and int(np.abs(pixels - cell_colors(weights)).max()) <= 2
    tokens = expected["source_tokens"]
    assert len(scroll["hover"]) == n
    strongest = tokens[int(np.argmax(weights[5]))]
    assert scroll["hover"][5].startswith(f"{tokens[5]} → strongest: {strongest} ")
    assert labels(page, "#heatmap text.col-label") == tokens
    # scrolled to the far corner, the token labels stay at the container's top and left edges
    stuck = page.locator("#heatmap div.heatmap-scroll").evaluate("""d => {
        d.scrollTo(d.scrollWidth, d.scrollHeight); const box = d.getBoundingClientRect();
        const cols = d.querySelector('text.col-label').ownerSVGElement.getBoundingClientRect();
        const rows = d.querySelector('text.row-label').ownerSVGElement.getBoundingClientRect();
        const r = {scrolled: d.scrollTop > 0 && d.scrollLeft > 0, top: cols.top - box.top, left: rows.left - box.left};
        d.scrollTo(d.scrollWidth / 3, d.scrollHeight / 3); return r; }""")
    assert stuck["scrolled"] and abs(stuck["top"]) <= 2 and abs(stuck["left"]) <= 2, stuck
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-long-sentence.png"), full_page=True)

    # the lines view draws at most k lines per query token
    page.get_by_role("tab", name="Token lines").click()
    page.wait_for_selector("#lines svg.attention-lines line", state="attached")
    queries = page.locator("#lines line").evaluate_all("ls => ls.map(l => l.getAttribute('data-query'))")
    assert len(queries) == TOP_K and set(queries) == {"0"}

    # export of the long map: a PNG of the same picture and a page with every cell
    page.get_by_role("tab", name="Heatmap").click()
    page.locator("#export").click()
    page.wait_for_function("document.querySelector('#status').textContent.includes('Exported')")
    assert "attention-encoder-layer2-average.png" in page.locator("#status").text_content()
    png = page.request.get(page.locator("#export-png a").first.get_attribute("href")).body()
    assert same_image(png, heatmap_png(weights, tokens, tokens, title="encoder self-attention · layer 2 · "
                                                                       "average of heads"))
    page_html = page.request.get(page.locator("#export-html a").first.get_attribute("href")).text()
    assert page_html.count('class="row-hover"') == n and "heatmap-scroll" in page_html
    assert scroll["image"] in page_html  # the same cells


@pytest.mark.unit
def test_lines_keep_the_strongest_k_per_query() -> None:
    """Every query's lines are its k heaviest keys (ties broken by position), however light."""
    rng = np.random.default_rng(3)
    weights = rng.dirichlet(np.full(2 * LONG, 0.3), size=2 * LONG)
    tokens = [f"t{i}" for i in range(2 * LONG)]
    svg = lines_svg(weights, tokens, tokens, None, top_k=3)
    drawn: dict[int, set[int]] = {}
    for query, y2 in re.findall(r'data-query="(\d+)" x1="150" y1="\d+" x2="370" y2="(\d+)"', svg):
        drawn.setdefault(int(query), set()).add((int(y2) - 24) // 24)
    for i in range(2 * LONG):
        strongest = {int(j) for j in np.argsort(-weights[i], kind="stable")[:3]}
        assert drawn.get(i, set()) == strongest, i
    assert 'class="lines-scroll"' in svg  # 80 rows do not fit: the view scrolls
    small = lines_svg(weights[:5, :5], tokens[:5], tokens[:5], None)
    assert "lines-scroll" not in small and small.count("<line") == int((weights[:5, :5] >= 0.02).sum())


@pytest.mark.unit
def test_png_of_a_long_map_has_a_bounded_size() -> None:
    """A 200-token map's PNG is at most 3 x 6 + 1.5 inches a side (it was 101 inches: 10,000 pixels)."""
    weights = np.full((200, 200), 1.0 / 200)
    tokens = [f"t{i}" for i in range(200)]
    image = Image.open(io.BytesIO(heatmap_png(weights, tokens, tokens, title="t")))
    assert 1000 <= image.size[0] <= 1950 and 1000 <= image.size[1] <= 1950, image.size


@pytest.mark.unit
def test_long_map_cells_are_one_image_and_short_ones_rects() -> None:
    """Past the page's size the cells become one image (a pixel a weight) with linked cells still outlined."""
    rng = np.random.default_rng(4)
    weights = rng.dirichlet(np.full(100, 0.2), size=100)
    tokens = [f"t{i}" for i in range(100)]
    long_map = heatmap_svg(weights, tokens, tokens, title="t", marked={(0, 3), (7, 7)})
    assert long_map.count("<image") == 1 and '<rect class="cell' not in long_map
    assert long_map.count('class="linked"') == 2 and long_map.count('class="row-hover"') == 100
    data = re.search(r'href="data:image/png;base64,([^"]+)"', long_map).group(1)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert np.array_equal(pixels, cell_colors(weights))
    short = heatmap_svg(weights[:5, :5], tokens[:5], tokens[:5], title="t", marked={(1, 2)})
    assert short.count('class="cell') == 25 and short.count("linked") == 1 and "<image" not in short
