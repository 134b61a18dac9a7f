"""The explorer's views, each a small class that builds its components and answers their events.

* ``TranslationView``: the sentence, beam and model; Translate; the status line, translation and tokens.
  It reads the service's stream, so the target tokens and their cross-attention appear as they
  are decoded; once done, everything shows the final answer.
* ``Selection``: which attention kind, layer and head every attention view shows.
* ``HeatmapView``: one layer and head (or the head average) as a heatmap, and its PNG/HTML export.
* ``GridView``: every layer × head as thumbnails; clicking one opens it in the heatmap.
* ``LinesView``: token-to-token lines for one query token.
* ``CompareView``: two model versions on the same sentence, side by side.

Handlers return dicts keyed by component (Gradio updates those and leaves the rest alone).
A translation lives in each session's ``gr.State``; nothing one session draws or exports is
written where another session's files are: thumbnails are handed to Gradio as images in memory,
and exports go to a folder of the session's own, removed when the session ends.
"""

from __future__ import annotations

import html
import io
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from stepwise.explorer.draw import (
    AVERAGE,
    KINDS,
    axes,
    head_count,
    heatmap_png,
    heatmap_svg,
    layer_count,
    lines_svg,
    matrix,
    number,
    standalone_html,
    thumbnail_png,
    title,
)
from stepwise.serve.client import Decoding, ServiceError, TranslationClient

Result = dict[str, Any] | None  # one translation as the service returns it; None before the first
Update = dict[gr.components.Component | gr.Tabs, Any]  # what a handler changes, keyed by component

TOP_K = 8  # the lines view's default: the 8 strongest lines of a query token
LIVE_INTERVAL_S = 0.1  # while a translation streams, redraw its tokens and attention at most this often
EMPTY = "<p id='heatmap-empty'>Translate a sentence to see its attention.</p>"


def unchanged(*components: gr.components.Component) -> Update:
    """An update that leaves ``components`` (a handler's outputs) as they are.

    Gradio takes a non-empty dict as updates keyed by component but an empty one as a single value,
    which fails an event with several outputs (and sets a lone output to ``{}``): a handler with
    nothing to change returns this, never ``{}``.
    """
    return {component: gr.skip() for component in components}


def ok(message: str, elem_id: str = "status-ok") -> str:
    """A status line that reports success (each view's status line has an id of its own)."""
    return f"<div id='{elem_id}'>{html.escape(message)}</div>"


def error(message: str, elem_id: str = "status-error") -> str:
    """A status line that reports a failure, as a sentence."""
    return f"<div id='{elem_id}' style='color:#b00020;font-weight:bold'>⚠ {html.escape(message)}</div>"


def _index(value: int | str | None, count: int) -> int | None:
    """A menu's 0-based index if it is one of ``count``, else None."""
    return int(value) if value is not None and value != AVERAGE and 0 <= int(value) < count else None


def _drawn(result: dict[str, Any], kind: str, layer: int | None, head: int | str | None) -> tuple[int, int | str]:
    """The layer and head of ``kind`` to show: the chosen ones where ``kind`` has them.

    Otherwise the last layer and the head average (a choice made for another kind, or a menu a
    moment behind a new kind).
    """
    layer_i = _index(layer, layer_count(result, kind))
    head_i = _index(head, head_count(result, kind))
    return layer_count(result, kind) - 1 if layer_i is None else layer_i, AVERAGE if head_i is None else head_i


# -- the sentence and its translation ------------------------------------------------------------


@dataclass
class TranslationView:
    """The sentence, beam size and model; Translate; the status line, the translation and its tokens."""

    client: TranslationClient
    result: gr.State
    text: gr.Textbox
    beam: gr.Slider
    model: gr.Textbox
    button: gr.Button
    status: gr.HTML
    translation: gr.Textbox
    tokens: gr.Markdown
    live: gr.HTML  # while decoding: the tokens so far and their cross-attention (empty once done)

    @classmethod
    def build(cls, client: TranslationClient, example: str) -> TranslationView:
        """Lay out the translation controls."""
        result = gr.State(None)
        with gr.Row():
            text = gr.Textbox(label="Sentence", value=example, lines=2, elem_id="sentence", scale=4)
            with gr.Column(scale=1):
                beam = gr.Slider(1, value=1, step=1, label="Beam size", elem_id="beam", **cls._beam_range(client))
                model = gr.Textbox(label="Model (tag or version id; empty = production)", value="",
                                   elem_id="model")
        button = gr.Button("Translate", variant="primary", elem_id="translate")
        status = gr.HTML(elem_id="status")
        live = gr.HTML(elem_id="live")
        translation = gr.Textbox(label="Translation", interactive=False, elem_id="translation")
        tokens = gr.Markdown(elem_id="tokens")
        return cls(client, result, text, beam, model, button, status, translation, tokens, live)

    @staticmethod
    def _beam_range(client: TranslationClient) -> dict[str, Any]:
        """The beam slider up to the limit the service reports in ``/model``; fixed at 1 (greedy search)
        while the service is unreachable or allows no wider beam (a slider needs two values)."""
        try:
            limit = client.max_beam_size()
        except ServiceError:
            limit = 1
        return {"maximum": max(limit, 2), "interactive": limit > 1}

    def refresh_limits(self) -> dict[str, Any]:
        """The beam slider's range from the service's ``/model`` (on each page load: it may have started since)."""
        return gr.update(**self._beam_range(self.client))

    def translate(self, text: str, beam: float, model: str) -> Iterator[Update]:
        """Stream a translation with every attention kind: live tokens and attention, then the result."""
        shown = 0.0
        try:
            if not text or not text.strip():
                raise ServiceError("Type a sentence to translate first.")
            for update in self.client.translate_stream(text, beam_size=int(beam), model=model.strip() or None,
                                                       split="sentences"):
                if isinstance(update, Decoding):
                    if time.monotonic() - shown >= LIVE_INTERVAL_S:  # Gradio sends every yield to the page
                        shown = time.monotonic()
                        yield {self.status: "<div id='status-live'>Translating…</div>", self.live: live_html(update)}
                    continue
                result = update
        except ServiceError as exc:
            yield {self.result: None, self.status: error(str(exc)), self.translation: "", self.tokens: "",
                   self.live: ""}
            return
        result["request"] = {"text": text, "beam_size": int(beam), "model": model.strip() or None}  # for re-asking
        info = result["model"]
        split = f" ({len(result['sentences'])} sentences)" if result.get("sentences") else ""
        yield {
            self.result: result,
            self.status: ok(f"Translated by {info.get('name')} ({info.get('id')}) in "
                            f"{result['timings'].get('total_ms', 0):.0f} ms{split}"),
            self.translation: result["translation"],
            self.tokens: (f"**Source tokens:** {' · '.join(result['source_tokens'])}  \n"
                          f"**Target tokens:** {' · '.join(result['target_tokens'])}"),
            self.live: "",
        }

    def wire(self) -> gr.events.Dependency:
        """Translate on the button or Enter; the returned event is for views to follow with ``.then``."""
        return gr.on([self.button.click, self.text.submit], self.translate, [self.text, self.beam, self.model],
                     [self.result, self.status, self.translation, self.tokens, self.live])


def live_html(decoding: Decoding) -> str:
    """A translation being decoded: its tokens so far, and the sentence's cross-attention rows so far
    (last layer, average of heads) as a heatmap that grows a row per token."""
    tokens = html.escape(" · ".join(decoding.tokens))
    if not decoding.cross or not decoding.sources:
        return f"<div id='live-tokens'>{tokens}</div>"
    sentence = decoding.sentence[-1]
    rows = [i for i, s in enumerate(decoding.sentence) if s == sentence]
    weights = np.stack([decoding.cross[i][-1].mean(axis=0) for i in rows])  # [tokens, source]
    svg = heatmap_svg(weights, [decoding.tokens[i] for i in rows], decoding.sources[sentence],
                      title=f"{title('cross', len(decoding.cross[-1]) - 1, AVERAGE)} · decoding")
    return f"<div id='live-tokens'>{tokens}</div>{svg}"


# -- which kind, layer and head ----------------------------------------------------------------------


@dataclass
class Selection:
    """The attention kind, layer and head that the heatmap, grid and lines show.

    The menus show layers and heads numbered from 1; their values are the JSON's 0-based indexes.
    Each kind offers its own layers: an encoder deeper than the decoder shows all of its own.
    """

    result: gr.State
    kind: gr.Radio
    layer: gr.Dropdown
    head: gr.Dropdown

    @classmethod
    def build(cls, result: gr.State) -> Selection:
        """Lay out the kind, layer and head menus."""
        with gr.Row():
            kind = gr.Radio(list(KINDS), value="cross", label="Attention", elem_id="kind")
            layer = gr.Dropdown([], label="Layer", elem_id="layer")
            head = gr.Dropdown([], label="Head", elem_id="head")
        return cls(result, kind, layer, head)

    @property
    def inputs(self) -> list[gr.components.Component]:
        """What a view of the current selection reads: the translation, kind, layer and head."""
        return [self.result, self.kind, self.layer, self.head]

    def fit(self, result: Result, kind: str, layer: int | None, head: int | str | None) -> Update:
        """The menus of ``kind``'s layers and heads, keeping the choice where it still exists.

        A layer that is gone becomes the last layer, a head that is gone the head average.
        """
        if not result:
            return unchanged(self.layer, self.head)
        layer, head = _drawn(result, kind, layer, head)
        heads = [(number(h), h) for h in range(head_count(result, kind))]
        return {self.layer: gr.update(choices=[(number(i), i) for i in range(layer_count(result, kind))], value=layer),
                self.head: gr.update(choices=[(AVERAGE, AVERAGE), *heads], value=head)}

    def reset(self, result: Result) -> Update:
        """After a translation: cross-attention, its last layer, the head average."""
        if not result:
            return unchanged(self.kind, self.layer, self.head)
        return {self.kind: "cross", **self.fit(result, "cross", None, AVERAGE)}

    def wire(self, translated: gr.events.Dependency) -> list[gr.events.Dependency]:
        """Reset the menus after a translation and fit them to a new kind.

        Returns the events after which the views redraw (besides a change of layer or head).
        """
        menus = [self.kind, self.layer, self.head]
        return [translated.then(self.reset, [self.result], menus),
                self.kind.change(self.fit, self.inputs, [self.layer, self.head])]


# -- the attention views -------------------------------------------------------------------------------


def remove_folder(folder: str | None) -> None:
    """Remove a session's export folder (Gradio calls this when the session's state is deleted)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class HeatmapView:
    """One layer and head (or their average) as an SVG heatmap with the weight on hover; PNG/HTML export."""

    selection: Selection
    status: gr.HTML
    exports: tempfile.TemporaryDirectory  # lives as long as the app; each session exports into a folder in it
    folder: gr.State  # this session's export folder (a path), created on its first export
    heat: gr.HTML
    button: gr.Button
    png: gr.File
    page: gr.File

    @classmethod
    def build(cls, selection: Selection, status: gr.HTML) -> HeatmapView:
        """Lay out the heatmap and the export row."""
        exports = tempfile.TemporaryDirectory(prefix="stepwise-explorer-")
        folder = gr.State(None, delete_callback=remove_folder)
        heat = gr.HTML(elem_id="heatmap")
        with gr.Row():
            button = gr.Button("Export PNG + HTML", elem_id="export")
            png = gr.File(label="PNG", elem_id="export-png")
            page = gr.File(label="HTML", elem_id="export-html")
        return cls(selection, status, exports, folder, heat, button, png, page)

    def draw(self, result: Result, kind: str, layer: int | None, head: int | str | None) -> str:
        """The heatmap of the selection."""
        if not result or layer is None or head is None:
            return EMPTY
        layer, head = _drawn(result, kind, layer, head)
        rows, cols = axes(result, kind)
        return heatmap_svg(matrix(result, kind, layer, head), rows, cols, title=title(kind, layer, head))

    def export(self, result: Result, kind: str, layer: int | None, head: int | str | None,
               folder: str | None) -> Update:
        """Write the selection as a PNG and a standalone HTML page into this session's folder."""
        if not result or layer is None or head is None:
            return {self.status: error("Nothing to export yet: translate a sentence first.")}
        if folder is None or not Path(folder).is_dir():
            folder = tempfile.mkdtemp(prefix="session-", dir=self.exports.name)
        rows, cols = axes(result, kind)
        weights = matrix(result, kind, int(layer), head)
        name = title(kind, int(layer), head)
        head_part = AVERAGE if head == AVERAGE else f"head{number(int(head))}"
        stem = f"attention-{kind}-layer{number(int(layer))}-{head_part}"
        png = Path(folder) / f"{stem}.png"
        png.write_bytes(heatmap_png(weights, rows, cols, title=name))
        page = Path(folder) / f"{stem}.html"
        page.write_text(standalone_html(result, heatmap_svg(weights, rows, cols, title=name), title=name),
                        encoding="utf-8")
        return {self.folder: folder, self.png: str(png), self.page: str(page),
                self.status: ok(f"Exported {png.name} and {page.name}")}

    def wire(self, redraw: list[gr.events.Dependency]) -> None:
        """Redraw when the translation or the selection changes; export on the button."""
        selection = self.selection
        for event in redraw:
            event.then(self.draw, selection.inputs, self.heat)
        for menu in (selection.layer, selection.head):
            menu.change(self.draw, selection.inputs, self.heat)
        self.button.click(self.export, [*selection.inputs, self.folder],
                          [self.folder, self.png, self.page, self.status])


@dataclass
class GridView:
    """Every layer × head of the selected kind as thumbnails (the last in a row is their average)."""

    selection: Selection
    tabs: gr.Tabs
    gallery: gr.Gallery

    @classmethod
    def build(cls, selection: Selection, tabs: gr.Tabs) -> GridView:
        """Lay out the grid (inside its tab)."""
        gr.Markdown("Each thumbnail is one layer and head (the last in a row is their average). "
                    "Click one to open it.")
        gallery = gr.Gallery(columns=5, height="auto", elem_id="grid", allow_preview=False, format="png")
        return cls(selection, tabs, gallery)

    def draw(self, result: Result, kind: str) -> list[tuple[Image.Image, str]]:
        """One thumbnail per layer and head, then the layer's head average, as images in memory."""
        if not result:
            return []
        items = []
        for layer in range(layer_count(result, kind)):
            for head in [*range(head_count(result, kind)), AVERAGE]:
                caption = f"layer {number(layer)} · {'average' if head == AVERAGE else f'head {number(head)}'}"
                items.append((Image.open(io.BytesIO(thumbnail_png(result, kind, layer, head))), caption))
        return items

    def open(self, result: Result, kind: str, event: gr.SelectData) -> Update:
        """Open the clicked thumbnail's layer and head in the heatmap tab."""
        if not result:
            return unchanged(self.selection.layer, self.selection.head, self.tabs)
        heads = head_count(result, kind)
        layer, position = divmod(event.index, heads + 1)
        return {self.selection.layer: layer, self.selection.head: AVERAGE if position == heads else position,
                self.tabs: gr.Tabs(selected="heatmap")}

    def wire(self, redraw: list[gr.events.Dependency]) -> None:
        """Redraw on a new translation or kind; open a head on click."""
        selection = self.selection
        for event in redraw:
            event.then(self.draw, [selection.result, selection.kind], self.gallery)
        self.gallery.select(self.open, [selection.result, selection.kind],
                            [selection.layer, selection.head, self.tabs])


@dataclass
class LinesView:
    """Token-to-token lines of the selection: queries on the left, keys on the right."""

    selection: Selection
    token: gr.Dropdown
    lines: gr.HTML
    top_k: gr.Slider  # at most this many lines per query token: a long sentence stays readable

    @classmethod
    def build(cls, selection: Selection) -> LinesView:
        """Lay out the query-token menu and the lines (inside their tab)."""
        with gr.Row():
            token = gr.Dropdown([], label="Query token", elem_id="target-token")
            top_k = gr.Slider(1, 20, value=TOP_K, step=1, label="Strongest lines per query token", elem_id="top-k")
        lines = gr.HTML(elem_id="lines")
        return cls(selection, token, lines, top_k)

    def fit(self, result: Result, kind: str, token: int | None) -> Update:
        """The menu of ``kind``'s query tokens (target tokens, or source tokens for the encoder)."""
        if not result:
            return unchanged(self.token)
        rows, _ = axes(result, kind)
        kept = _index(token, len(rows))
        return {self.token: gr.update(choices=[(f"{number(i)}: {t}", i) for i, t in enumerate(rows)],
                                      value=kept if kept is not None else (0 if rows else None))}

    def draw(self, result: Result, kind: str, layer: int | None, head: int | str | None, token: int | None,
             top_k: float = TOP_K) -> str:
        """The strongest ``top_k`` lines of one query token (of every token before one is chosen)."""
        if not result or layer is None or head is None:
            return ""
        layer, head = _drawn(result, kind, layer, head)
        rows, cols = axes(result, kind)
        return lines_svg(matrix(result, kind, layer, head), rows, cols, _index(token, len(rows)), top_k=int(top_k))

    def wire(self, redraw: list[gr.events.Dependency]) -> None:
        """Refit the token menu on a new translation or kind; redraw on any change."""
        selection = self.selection
        inputs = [*selection.inputs, self.token, self.top_k]
        for event in redraw:
            event.then(self.fit, [selection.result, selection.kind, self.token], self.token).then(
                self.draw, inputs, self.lines)
        for menu in (selection.layer, selection.head, self.token, self.top_k):
            menu.change(self.draw, inputs, self.lines)


@dataclass
class CompareView:
    """Two model versions translating the same sentence: their translations and last-layer cross-attention."""

    client: TranslationClient
    translation: TranslationView
    model_a: gr.Textbox
    model_b: gr.Textbox
    button: gr.Button
    out_a: gr.Textbox
    heat_a: gr.HTML
    out_b: gr.Textbox
    heat_b: gr.HTML

    @classmethod
    def build(cls, client: TranslationClient, translation: TranslationView) -> CompareView:
        """Lay out the two versions (inside their tab)."""
        with gr.Row():
            model_a = gr.Textbox(label="Version A", value="production", elem_id="model-a")
            model_b = gr.Textbox(label="Version B", value="candidate", elem_id="model-b")
        button = gr.Button("Compare", elem_id="compare-button")
        with gr.Row():
            with gr.Column():
                out_a = gr.Textbox(label="Translation A", interactive=False, elem_id="translation-a")
                heat_a = gr.HTML(elem_id="heatmap-a")
            with gr.Column():
                out_b = gr.Textbox(label="Translation B", interactive=False, elem_id="translation-b")
                heat_b = gr.HTML(elem_id="heatmap-b")
        return cls(client, translation, model_a, model_b, button, out_a, heat_a, out_b, heat_b)

    def compare(self, text: str, beam: float, model_a: str, model_b: str) -> Update:
        """Translate with both versions; a version that fails says why in the status line."""
        update: Update = {}
        messages = []
        for spec, out, heat in ((model_a, self.out_a, self.heat_a), (model_b, self.out_b, self.heat_b)):
            name = spec.strip() or "production"
            try:
                result = self.client.translate(text, beam_size=int(beam), model=spec.strip() or None,
                                               attention="cross")
            except ServiceError as exc:
                messages.append(f"{name}: {exc}")
                update.update({out: f"({name} unavailable)", heat: ""})
                continue
            rows, cols = axes(result, "cross")
            last = layer_count(result, "cross") - 1
            update.update({out: result["translation"],
                           heat: heatmap_svg(matrix(result, "cross", last, AVERAGE), rows, cols,
                                             title=f"{result['model'].get('id')} · last layer, average of heads")})
        update[self.translation.status] = (error(" ".join(messages)) if messages
                                           else ok("Compared both versions on the same sentence."))
        return update

    def wire(self) -> None:
        """Compare on the button."""
        self.button.click(self.compare, [self.translation.text, self.translation.beam, self.model_a, self.model_b],
                          [self.out_a, self.heat_a, self.out_b, self.heat_b, self.translation.status])
