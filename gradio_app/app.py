"""The explorer's page: translate, then look at encoder, decoder and cross-attention.

Views: one layer/head heatmap (weight on hover), a grid of every layer × head (click one to
open it), the head average per layer, token-to-token lines, and two model versions side by
side. The current view exports as PNG and as a standalone HTML file. Every failure (service
down, bad input) is shown as a sentence in the status line, never a traceback.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from gradio_app.client import ServiceError, TranslationClient
from gradio_app.views import AVERAGE, KINDS, axes, heatmap_png, heatmap_svg, lines_svg, matrix, standalone_html

log = logging.getLogger(__name__)

NOTE = ("**A word of caution:** attention weights show where each layer and head looked while producing a "
        "token. They are not an explanation of why the model translated as it did.")
EXAMPLES = ["Und Gott sprach: Es werde Licht!", "Der Herr ist mein Hirte, mir wird nichts mangeln.",
            "Selig sind die Friedfertigen, denn sie werden Söhne Gottes heißen."]
EXPORT_DIR = Path(tempfile.gettempdir()) / "stepwise-explorer"


def _ok(message: str) -> str:
    return f"<div id='status-ok'>{message}</div>"


def _error(message: str) -> str:
    return f"<div id='status-error' style='color:#b00020;font-weight:bold'>⚠ {message}</div>"


def _dims(result: dict[str, Any], kind: str) -> tuple[int, int]:
    layers = result["attention"][kind]
    return len(layers), len(layers[0])


def _title(kind: str, layer: int, head: str) -> str:
    who = "average of heads" if head == AVERAGE else f"head {head}"
    return f"{KINDS[kind]} · layer {layer} · {who}"


def build_app(client: TranslationClient) -> gr.Blocks:
    """The Gradio Blocks of the explorer, talking to ``client``."""

    def translate(text: str, beam: float, model: str) -> tuple:
        try:
            if not text or not text.strip():
                raise ServiceError("Type a sentence to translate first.")
            result = client.translate(text, beam_size=int(beam), model=model.strip() or None)
        except ServiceError as exc:
            return (None, _error(str(exc)), "", "", gr.update(), gr.update(), gr.update(), gr.update())
        layers, heads = _dims(result, "cross")
        tokens = (f"**Source tokens:** {' · '.join(result['source_tokens'])}  \n"
                  f"**Target tokens:** {' · '.join(result['target_tokens'])}")
        model_info = result["model"]
        status = _ok(f"Translated by {model_info.get('name')} ({model_info.get('id')}) in "
                     f"{result['timings'].get('total_ms', 0):.0f} ms")
        layer_choices = [str(i) for i in range(layers)]
        head_choices = [AVERAGE, *[str(h) for h in range(heads)]]
        token_choices = [f"{i}: {t}" for i, t in enumerate(result["target_tokens"])]
        return (result, status, result["translation"], tokens,
                gr.update(choices=layer_choices, value=layer_choices[-1]),
                gr.update(choices=head_choices, value=AVERAGE),
                gr.update(choices=token_choices, value=token_choices[0] if token_choices else None),
                gr.update(value="cross"))

    def heatmap(result: dict | None, kind: str, layer: str | None, head: str | None) -> str:
        if not result or layer is None or head is None:
            return "<p id='heatmap-empty'>Translate a sentence to see its attention.</p>"
        layers, heads = _dims(result, kind)
        layer_i = min(int(layer), layers - 1)
        head_v = head if head == AVERAGE or int(head) < heads else AVERAGE
        rows, cols = axes(result, kind)
        return heatmap_svg(matrix(result, kind, layer_i, head_v), rows, cols, title=_title(kind, layer_i, head_v))

    def grid(result: dict | None, kind: str) -> list:
        if not result:
            return []
        layers, heads = _dims(result, kind)
        rows, cols = axes(result, kind)
        items = []
        EXPORT_DIR.mkdir(parents=True, exist_ok=True)
        for layer in range(layers):
            for head in [*range(heads), AVERAGE]:
                path = EXPORT_DIR / f"thumb-{kind}-{layer}-{head}.png"
                path.write_bytes(heatmap_png(matrix(result, kind, layer, head), rows, cols,
                                             title=f"L{layer} {'avg' if head == AVERAGE else f'H{head}'}", size=2.5))
                items.append((str(path), f"layer {layer} · {'average' if head == AVERAGE else f'head {head}'}"))
        return items

    def open_from_grid(result: dict | None, evt: gr.SelectData) -> tuple:
        if not result:
            return gr.update(), gr.update(), gr.update()
        _, heads = _dims(result, "cross")
        per_layer = heads + 1
        layer, position = divmod(evt.index, per_layer)
        head = AVERAGE if position == heads else str(position)
        return gr.update(value=str(layer)), gr.update(value=head), gr.Tabs(selected="heatmap")

    def token_lines(result: dict | None, layer: str | None, head: str | None, token: str | None) -> str:
        if not result or layer is None or head is None:
            return ""
        rows, cols = axes(result, "cross")
        selected = int(token.split(":")[0]) if token else None
        return lines_svg(matrix(result, "cross", int(layer), head), rows, cols, selected)

    def export(result: dict | None, kind: str, layer: str | None, head: str | None) -> tuple:
        if not result or layer is None or head is None:
            return None, None, _error("Nothing to export yet: translate a sentence first.")
        rows, cols = axes(result, kind)
        weights = matrix(result, kind, int(layer), head)
        title = _title(kind, int(layer), head)
        EXPORT_DIR.mkdir(parents=True, exist_ok=True)
        stem = f"attention-{kind}-layer{layer}-{head}"
        png = EXPORT_DIR / f"{stem}.png"
        png.write_bytes(heatmap_png(weights, rows, cols, title=title))
        page = EXPORT_DIR / f"{stem}.html"
        page.write_text(standalone_html(result, heatmap_svg(weights, rows, cols, title=title), title=title),
                        encoding="utf-8")
        return str(png), str(page), _ok(f"Exported {png.name} and {page.name}")

    def compare(text: str, beam: float, model_a: str, model_b: str) -> tuple:
        outputs = []
        messages = []
        for spec in (model_a, model_b):
            try:
                result = client.translate(text, beam_size=int(beam), model=spec.strip() or None, attention="cross")
            except ServiceError as exc:
                messages.append(f"{spec or 'production'}: {exc}")
                outputs += [f"({spec or 'production'} unavailable)", ""]
                continue
            rows, cols = axes(result, "cross")
            layers = len(result["attention"]["cross"])
            svg = heatmap_svg(matrix(result, "cross", layers - 1, AVERAGE), rows, cols,
                              title=f"{result['model'].get('id')} · last layer, average of heads")
            outputs += [result["translation"], svg]
        status = _error(" ".join(messages)) if messages else _ok("Compared both versions on the same sentence.")
        return (*outputs, status)

    with gr.Blocks(title="stepwise attention explorer") as demo:
        state = gr.State(None)
        gr.Markdown("# stepwise attention explorer")
        gr.Markdown(NOTE, elem_id="attention-note")
        with gr.Row():
            text = gr.Textbox(label="Sentence", value=EXAMPLES[0], lines=2, elem_id="sentence", scale=4)
            with gr.Column(scale=1):
                beam = gr.Slider(1, 8, value=1, step=1, label="Beam size", elem_id="beam")
                model = gr.Textbox(label="Model (tag or version id; empty = production)", value="",
                                   elem_id="model")
        translate_btn = gr.Button("Translate", variant="primary", elem_id="translate")
        status = gr.HTML(elem_id="status")
        translation = gr.Textbox(label="Translation", interactive=False, elem_id="translation")
        tokens = gr.Markdown(elem_id="tokens")
        with gr.Row():
            kind = gr.Radio(list(KINDS), value="cross", label="Attention", elem_id="kind")
            layer = gr.Dropdown([], label="Layer", elem_id="layer")
            head = gr.Dropdown([], label="Head", elem_id="head")
        with gr.Tabs(selected="heatmap") as tabs:
            with gr.Tab("Heatmap", id="heatmap"):
                heat = gr.HTML(elem_id="heatmap")
                with gr.Row():
                    export_btn = gr.Button("Export PNG + HTML", elem_id="export")
                    png_file = gr.File(label="PNG", elem_id="export-png")
                    html_file = gr.File(label="HTML", elem_id="export-html")
            with gr.Tab("All layers × heads", id="grid"):
                gr.Markdown("Each thumbnail is one layer and head (the last in a row is their average). "
                            "Click one to open it.")
                gallery = gr.Gallery(columns=5, height="auto", elem_id="grid", allow_preview=False)
            with gr.Tab("Token lines", id="lines"):
                token = gr.Dropdown([], label="Target token", elem_id="target-token")
                lines = gr.HTML(elem_id="lines")
            with gr.Tab("Compare versions", id="compare"):
                with gr.Row():
                    model_a = gr.Textbox(label="Version A", value="production", elem_id="model-a")
                    model_b = gr.Textbox(label="Version B", value="candidate", elem_id="model-b")
                compare_btn = gr.Button("Compare", elem_id="compare-button")
                with gr.Row():
                    with gr.Column():
                        out_a = gr.Textbox(label="Translation A", interactive=False, elem_id="translation-a")
                        heat_a = gr.HTML(elem_id="heatmap-a")
                    with gr.Column():
                        out_b = gr.Textbox(label="Translation B", interactive=False, elem_id="translation-b")
                        heat_b = gr.HTML(elem_id="heatmap-b")

        view_inputs = [state, kind, layer, head]
        translated = translate_btn.click(translate, [text, beam, model],
                                         [state, status, translation, tokens, layer, head, token, kind])
        text.submit(translate, [text, beam, model], [state, status, translation, tokens, layer, head, token, kind])
        translated.then(heatmap, view_inputs, heat).then(grid, [state, kind], gallery).then(
            token_lines, [state, layer, head, token], lines)
        for control in (kind, layer, head):
            control.change(heatmap, view_inputs, heat)
            control.change(token_lines, [state, layer, head, token], lines)
        kind.change(grid, [state, kind], gallery)
        token.change(token_lines, [state, layer, head, token], lines)
        gallery.select(open_from_grid, [state], [layer, head, tabs])
        export_btn.click(export, view_inputs, [png_file, html_file, status])
        compare_btn.click(compare, [text, beam, model_a, model_b], [out_a, heat_a, out_b, heat_b, status])
    return demo
