"""Drawing attention: SVG heatmaps (with the weight on hover), token lines, PNG thumbnails.

Everything works on one translation as the service returns it: ``source_tokens``,
``target_tokens`` and ``attention[kind][layer][head][query][key]``. The JSON indexes layers and
heads from 0; everything a person reads (menus, titles, captions, file names) numbers them from 1
(``number``).
"""

from __future__ import annotations

import difflib
import html
import io
from typing import Any

import numpy as np

KINDS = {"cross": "cross-attention (target → source)", "encoder": "encoder self-attention",
         "decoder": "decoder self-attention"}
AVERAGE = "average"


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


def heatmap_svg(weights: np.ndarray, rows: list[str], cols: list[str], *, title: str, cell: int = 28) -> str:
    """An SVG heatmap: rows are queries, columns keys; hovering a cell shows both tokens and the weight."""
    left = 12 + 8 * max((len(r) for r in rows), default=1)
    top = 24 + 7 * max((len(c) for c in cols), default=1)
    width = max(left + cell * len(cols) + 10, 8 * len(title) + 10)
    height = top + cell * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="attention-heatmap" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
             f'<text x="4" y="14" font-weight="bold">{html.escape(title)}</text>']
    for j, label in enumerate(cols):
        x = left + j * cell + cell / 2
        parts.append(f'<text class="col-label" x="{x}" y="{top - 6}" transform="rotate(-60 {x} {top - 6})">'
                     f'{html.escape(label)}</text>')
    for i, label in enumerate(rows):
        y = top + i * cell + cell / 2 + 4
        parts.append(f'<text class="row-label" x="{left - 6}" y="{y}" text-anchor="end">{html.escape(label)}</text>')
        for j, col in enumerate(cols):
            w = float(weights[i, j])
            parts.append(f'<rect class="cell" x="{left + j * cell}" y="{top + i * cell}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="{_color(w)}" data-weight="{w:.4f}"><title>'
                         f'{html.escape(label)} → {html.escape(col)}: {w:.3f}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def lines_svg(weights: np.ndarray, rows: list[str], cols: list[str], selected: int | None) -> str:
    """Token-to-token lines: queries on the left, keys on the right, line opacity = weight.

    With ``selected`` set only that query's lines are drawn (and its row is highlighted).
    """
    step, width = 24, 520
    height = 30 + step * max(len(rows), len(cols))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="attention-lines" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="13">']
    for i in range(len(rows)):
        if selected is not None and i != selected:
            continue
        for j in range(len(cols)):
            w = float(weights[i, j])
            if w < 0.02:
                continue
            parts.append(f'<line x1="150" y1="{24 + i * step}" x2="370" y2="{24 + j * step}" stroke="rgb(8,69,148)" '
                         f'stroke-width="{1 + 6 * w:.2f}" stroke-opacity="{w:.3f}"><title>{html.escape(rows[i])} → '
                         f'{html.escape(cols[j])}: {w:.3f}</title></line>')
    for i, label in enumerate(rows):
        weight = "bold" if i == selected else "normal"
        parts.append(f'<text class="query-token" x="140" y="{28 + i * step}" text-anchor="end" '
                     f'font-weight="{weight}">{html.escape(label)}</text>')
    for j, label in enumerate(cols):
        parts.append(f'<text class="key-token" x="380" y="{28 + j * step}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap_png(weights: np.ndarray, rows: list[str], cols: list[str], *, title: str, size: float = 6.0) -> bytes:
    """The same heatmap as a PNG (matplotlib), for export and thumbnails.

    Drawn on a ``Figure`` of its own rather than through ``pyplot``'s global state, so sessions
    can draw at the same time.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(2.0, size * len(cols) / 12 + 1.5), max(2.0, size * len(rows) / 12 + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_title(title, fontsize=9)
    if size >= 4:
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
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
