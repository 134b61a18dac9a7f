"""Drawing attention: SVG heatmaps (with the weight on hover), token lines, PNG thumbnails.

Everything works on one translation as the service returns it: ``source_tokens``,
``target_tokens`` and ``attention[kind][layer][head][query][key]``. The JSON indexes layers and
heads from 0; everything a person reads (menus, titles, captions, file names) numbers them from 1
(``number``).
"""

from __future__ import annotations

import base64
import difflib
import html
import io
from typing import Any

import numpy as np

KINDS = {"cross": "cross-attention (target → source)", "encoder": "encoder self-attention",
         "decoder": "decoder self-attention"}
AVERAGE = "average"
LONG = 40  # a map with more rows or columns than this is drawn with smaller cells and scrolls
LONG_CELL = 16  # its cell size in pixels
IMAGE_CELLS = 64 * 64  # a map with more cells than this draws them as one image (SVG cells would take seconds)
MAX_VIEW = (1200, 900)  # the largest SVG (width, height) shown without a scroll container


def number(index: int) -> str:
    """How the page names a 0-based layer, head or token index: counted from 1, for people."""
    return str(index + 1)


def title(kind: str, layer: int, head: int | str) -> str:
    """The name of one view, e.g. ``cross-attention (target → source) · layer 2 · head 1``."""
    who = "average of heads" if head == AVERAGE else f"head {number(int(head))}"
    return f"{KINDS[kind]} · layer {number(layer)} · {who}"


def layer_count(result: dict[str, Any], kind: str) -> int:
    """How many layers one attention kind has (the encoder's and the decoder's may differ)."""
    return len(result["attention"][kind])


def head_count(result: dict[str, Any], kind: str) -> int:
    """How many heads each layer of one attention kind has."""
    return len(result["attention"][kind][0])


def axes(result: dict[str, Any], kind: str) -> tuple[list[str], list[str]]:
    """Row (query) and column (key) labels of one attention kind."""
    source, target = result["source_tokens"], result["target_tokens"]
    if kind == "encoder":
        return source, source
    if kind == "decoder":
        return target, ["<s>", *target[:-1]]  # the decoder's inputs are the outputs shifted right
    return target, source


def matrix(result: dict[str, Any], kind: str, layer: int, head: int | str) -> np.ndarray:
    """``[query, key]`` weights of one layer and head (or the head average)."""
    weights = np.asarray(result["attention"][kind][layer], dtype=np.float64)  # [H, Q, K]
    return weights.mean(axis=0) if head == AVERAGE else weights[int(head)]


def _color(weight: float) -> str:
    # white -> deep blue
    r = int(255 - weight * (255 - 8))
    g = int(255 - weight * (255 - 69))
    b = int(255 - weight * (255 - 148))
    return f"rgb({r},{g},{b})"


def scrolling(svg: str, width: float, height: float, *, name: str) -> str:
    """``svg`` as is when it fits the page, else inside a scroll container of class ``name``.

    A long sentence's map keeps cells big enough to read and label; the container scrolls both
    axes instead of shrinking everything (the weight and both tokens stay on hover).
    """
    if width <= MAX_VIEW[0] and height <= MAX_VIEW[1]:
        return svg
    return (f'<div class="{name}" style="overflow:auto;max-width:100%;max-height:{MAX_VIEW[1]}px;'
            f'border:1px solid #ddd">{svg}</div>')


def heatmap_svg(weights: np.ndarray, rows: list[str], cols: list[str], *, title: str, cell: int = 28,
                marked: set[tuple[int, int]] | None = None) -> str:
    """An SVG heatmap: rows are queries, columns keys; hovering a cell shows both tokens and the weight.

    Maps with more than ``LONG`` rows or columns get smaller cells (``LONG_CELL``), and more than
    ``IMAGE_CELLS`` cells are drawn as one image (:func:`_cell_image`); a map too big for the
    page scrolls, its token labels kept in view (:func:`_scrolling_heatmap`). Cells in
    ``marked`` (``(row, column)`` pairs, e.g. hard word links) are outlined and get the class
    ``linked``.
    """
    if max(len(rows), len(cols)) > LONG:
        cell = min(cell, LONG_CELL)
    marked = marked or set()
    left = 12 + 8 * max((len(r) for r in rows), default=1)
    top = 24 + 7 * max((len(c) for c in cols), default=1)
    width = max(left + cell * len(cols) + 10, 8 * len(title) + 10)
    height = top + cell * len(rows) + 10
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" ' \
          'font-family="monospace" font-size="12"{extra}>'
    heading = f'<text x="4" y="14" font-weight="bold">{html.escape(title)}</text>'
    col_labels = [f'<text class="col-label" x="{x}" y="{top - 6}" transform="rotate(-60 {x} {top - 6})">'
                  f'{html.escape(label)}</text>' for label, x in ((c, j * cell + cell / 2) for j, c in enumerate(cols))]
    row_labels = [f'<text class="row-label" x="{left - 6}" y="{i * cell + cell / 2 + 4}" text-anchor="end">'
                  f'{html.escape(label)}</text>' for i, label in enumerate(rows)]
    many = len(rows) * len(cols) > IMAGE_CELLS
    cells = (_cell_image if many else _cell_rects)(weights, rows, cols, cell, marked)
    if width <= MAX_VIEW[0] and height <= MAX_VIEW[1]:
        return "".join([svg.format(w=width, h=height, extra=' class="attention-heatmap"'), heading,
                        f'<g transform="translate({left} 0)">', *col_labels, "</g>",
                        f'<g transform="translate(0 {top})">', *row_labels, "</g>",
                        f'<g transform="translate({left} {top})">', *cells, "</g></svg>"])
    return _scrolling_heatmap(svg, heading, col_labels, row_labels, cells, left=left, top=top,
                              width=cell * len(cols) + 10, height=cell * len(rows) + 10, title_width=8 * len(title))


def _cell_rects(weights: np.ndarray, rows: list[str], cols: list[str], cell: int,
                marked: set[tuple[int, int]]) -> list[str]:
    """One ``rect.cell`` a weight, its tokens and weight on hover (``data-weight`` holds it too)."""
    cells = []
    for i, label in enumerate(rows):
        for j, col in enumerate(cols):
            w = float(weights[i, j])
            link = ' linked" stroke="#d95f02" stroke-width="2' if (i, j) in marked else ""
            cells.append(f'<rect class="cell{link}" x="{j * cell}" y="{i * cell}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="{_color(w)}" data-weight="{w:.4f}"><title>'
                         f'{html.escape(label)} → {html.escape(col)}: {w:.3f}</title></rect>')
    return cells


def cell_colors(weights: np.ndarray) -> np.ndarray:
    """``[rows, cols, 3]`` uint8: each weight's colour, exactly as :func:`_color` writes it."""
    w = np.asarray(weights, dtype=np.float64)[..., None]
    return (255 - w * (255 - np.array([8, 69, 148], dtype=np.float64))).astype(np.uint8)


def _cell_image(weights: np.ndarray, rows: list[str], cols: list[str], cell: int,
                marked: set[tuple[int, int]], strongest: int = 5) -> list[str]:
    """A long map's cells as one image (a pixel a weight, scaled up unsmoothed) and a hover strip a row.

    Tens of thousands of SVG cells take the browser seconds to lay out; one PNG takes nothing.
    Hovering a row names its query token and its ``strongest`` keys with their weights; marked
    cells are outlined as in the short map.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(cell_colors(weights), mode="RGB").save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    parts = [f'<image class="cells" width="{cell * len(cols)}" height="{cell * len(rows)}" preserveAspectRatio="none" '
             f'style="image-rendering:pixelated" href="data:image/png;base64,{data}"/>']
    for i, label in enumerate(rows):
        top = np.argsort(-weights[i], kind="stable")[:strongest]
        keys = ", ".join(f"{html.escape(cols[int(j)])} {float(weights[i, j]):.3f}" for j in top)
        parts.append(f'<rect class="row-hover" x="0" y="{i * cell}" width="{cell * len(cols)}" height="{cell}" '
                     f'fill="transparent"><title>{html.escape(label)} → strongest: {keys}</title></rect>')
    for i, j in sorted(marked):
        parts.append(f'<rect class="linked" x="{j * cell}" y="{i * cell}" width="{cell - 1}" height="{cell - 1}" '
                     f'fill="none" stroke="#d95f02" stroke-width="2"/>')
    return parts


def _scrolling_heatmap(svg: str, heading: str, col_labels: list[str], row_labels: list[str], cells: list[str], *,
                       left: int, top: int, width: int, height: int, title_width: int) -> str:
    """A big heatmap in a container that scrolls both ways; the token labels stick to its edges.

    Four SVGs in a CSS grid: the title (class ``attention-heatmap``) above, the column labels
    (sticky at the top), the row labels (sticky at the left) and the cells.
    """
    sticky = "position:sticky;background:#fff;"
    return "".join([
        svg.format(w=max(title_width, 200), h=20, extra=' class="attention-heatmap"'), heading, "</svg>",
        f'<div class="heatmap-scroll" style="overflow:auto;max-width:100%;max-height:{MAX_VIEW[1]}px;'
        f'border:1px solid #ddd"><div style="display:grid;width:max-content;grid-template-columns:{left}px {width}px;'
        f'grid-template-rows:{top}px {height}px">',
        f'<div style="{sticky}left:0;top:0;z-index:3"></div>',
        f'<div style="{sticky}top:0;z-index:2">', svg.format(w=width, h=top, extra=""), *col_labels, "</svg></div>",
        f'<div style="{sticky}left:0;z-index:2">', svg.format(w=left, h=height, extra=""), *row_labels,
        "</svg></div>",
        "<div>", svg.format(w=width, h=height, extra=""), *cells, "</svg></div></div></div>"])


def lines_svg(weights: np.ndarray, rows: list[str], cols: list[str], selected: int | None,
              top_k: int | None = None) -> str:
    """Token-to-token lines: queries on the left, keys on the right, line opacity = weight.

    With ``selected`` set only that query's lines are drawn (and its row is highlighted). With
    ``top_k`` set each query draws its ``top_k`` heaviest lines, however light (over 200 keys
    even a clear preference may be under 0.02), and no more: a long sentence stays readable.
    Without it every line of weight 0.02 or more is drawn.
    """
    step, width = 24, 520
    height = 30 + step * max(len(rows), len(cols))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="attention-lines" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="13">']
    for i in range(len(rows)):
        if selected is not None and i != selected:
            continue
        keys = np.argsort(-weights[i], kind="stable")[:top_k] if top_k else range(len(cols))
        for j in sorted(int(k) for k in keys):
            w = float(weights[i, j])
            if w < 0.02 and not top_k:
                continue
            parts.append(f'<line data-query="{i}" x1="150" y1="{24 + i * step}" x2="370" y2="{24 + j * step}" '
                         f'stroke="rgb(8,69,148)" stroke-width="{1 + 6 * w:.2f}" stroke-opacity="{w:.3f}"><title>'
                         f'{html.escape(rows[i])} → {html.escape(cols[j])}: {w:.3f}</title></line>')
    for i, label in enumerate(rows):
        weight = "bold" if i == selected else "normal"
        parts.append(f'<text class="query-token" x="140" y="{28 + i * step}" text-anchor="end" '
                     f'font-weight="{weight}">{html.escape(label)}</text>')
    for j, label in enumerate(cols):
        parts.append(f'<text class="key-token" x="380" y="{28 + j * step}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return scrolling("".join(parts), width, height, name="lines-scroll")


def links_svg(soft: np.ndarray, target_words: list[str], source_words: list[str],
              links: list[tuple[int, int]]) -> str:
    """Word alignment as lines: target words on the left, source words on the right.

    One line per hard link ``(i, j)`` (source word ``i``, target word ``j``), its opacity the
    soft weight of that pair; each line carries ``data-source`` and ``data-target`` (0-based).
    """
    step, width = 24, 560
    height = 30 + step * max(len(target_words), len(source_words), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="alignment-lines" width="{width}" '
             f'height="{height}" font-family="monospace" font-size="13">']
    for i, j in links:
        w = float(soft[j, i]) if soft.size else 1.0
        parts.append(f'<line class="link" data-source="{i}" data-target="{j}" x1="170" y1="{24 + j * step}" '
                     f'x2="390" y2="{24 + i * step}" stroke="#d95f02" stroke-width="{1.5 + 4 * w:.2f}" '
                     f'stroke-opacity="{0.3 + 0.7 * w:.3f}"><title>{html.escape(target_words[j])} → '
                     f'{html.escape(source_words[i])}: {w:.3f}</title></line>')
    for j, word in enumerate(target_words):
        parts.append(f'<text class="target-word" x="160" y="{28 + j * step}" text-anchor="end">'
                     f'{html.escape(word)}</text>')
    for i, word in enumerate(source_words):
        parts.append(f'<text class="source-word" x="400" y="{28 + i * step}">{html.escape(word)}</text>')
    parts.append("</svg>")
    return scrolling("".join(parts), width, height, name="lines-scroll")


def heatmap_png(weights: np.ndarray, rows: list[str], cols: list[str], *, title: str, size: float = 6.0) -> bytes:
    """The same heatmap as a PNG (matplotlib), for export and thumbnails.

    Drawn on a ``Figure`` of its own rather than through ``pyplot``'s global state, so sessions
    can draw at the same time.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def side(count: int) -> float:  # inches: half an inch a token at size 6, at most 3 x size for a long one
        return max(2.0, min(size * count / 12, 3 * size) + 1.5)

    fig = Figure(figsize=(side(len(cols)), side(len(rows))))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    if size >= 4:
        font = 8 if max(len(rows), len(cols)) <= LONG else 5  # a long sentence: every token still labelled
        ax.set_xticks(range(len(cols)), cols, rotation=60 if font == 8 else 90,
                      ha="right" if font == 8 else "center", fontsize=font)
        ax.set_yticks(range(len(rows)), rows, fontsize=font)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if max(len(rows), len(cols)) <= LONG:
        fig.tight_layout()
    else:  # tight_layout measures every label (a second for 400 of them): fixed margins for the labels instead
        margin = 0.09 * max((len(t) for t in [*rows, *cols]), default=1) + 0.3
        fig.subplots_adjust(left=margin / fig.get_figwidth(), bottom=margin / fig.get_figheight(),
                            right=0.99, top=1 - 0.4 / fig.get_figheight())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def thumbnail_png(result: dict[str, Any], kind: str, layer: int, head: int | str) -> bytes:
    """A small PNG of one layer and head (or their average), titled e.g. ``L2 H1`` or ``L2 avg``."""
    rows, cols = axes(result, kind)
    short = "avg" if head == AVERAGE else f"H{number(int(head))}"
    return heatmap_png(matrix(result, kind, layer, head), rows, cols, title=f"L{number(layer)} {short}", size=2.5)


def standalone_html(result: dict[str, Any], svg: str, *, title: str) -> str:
    """A self-contained page: the translation, the tokens and the current view."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><p><b>Translation:</b> {html.escape(result['translation'])}</p>"
            f"<p><b>Source tokens:</b> {html.escape(' '.join(result['source_tokens']))}<br>"
            f"<b>Target tokens:</b> {html.escape(' '.join(result['target_tokens']))}</p>{svg}"
            f"<p><i>Model {html.escape(str(result['model'].get('name')))} "
            f"({html.escape(str(result['model'].get('id')))}). Attention weights show where the model looked, "
            "not why it translated as it did.</i></p>"
            "</body></html>")


def token_diff(before: list[str], after: list[str]) -> list[tuple[str, str]]:
    """A token diff of two target sequences: ``(op, token)`` with op ``same``, ``added`` or ``removed``.

    ``difflib.SequenceMatcher`` (longest matching blocks, no junk heuristic): a replaced span is
    its old tokens removed, then its new ones added.
    """
    ops: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ops += [("same", t) for t in after[j1:j2]]
            continue
        ops += [("removed", t) for t in before[i1:i2]]
        ops += [("added", t) for t in after[j1:j2]]
    return ops


def token_diff_html(before: list[str], after: list[str]) -> str:
    """The diff as tokens: added ones highlighted (``mark``), removed ones struck through (``del``)."""
    tags = {"same": "span", "added": "mark", "removed": "del"}
    cells = [f"<{tags[op]} class='token-{op}'>{html.escape(token)}</{tags[op]}>" for op, token in
             token_diff(before, after)]
    changed = sum(op == "added" for op, _ in token_diff(before, after))
    return (f"<p class='token-diff-summary'>{changed} of {len(after)} target tokens differ from the translation "
            f"with every head on.</p><p class='token-diff' style='line-height:2'>{' '.join(cells)}</p>")
