"""Head ablation view: switch heads off and translate again (Michel et al. 2019 style).

Pick heads per kind (encoder self-attention, decoder self-attention, cross-attention) by layer
and head, and the sentence of the translation box is translated twice by the service: with
every head on, and with the picked heads switched off (``mask_heads``: each picked head's output
is multiplied by 0 before the layer's output projection, so it contributes nothing). The view
shows the ablated translation, its score beside the full model's, and a token diff of the two
target sequences. The choices follow the model: read from the service at start, and again
after each translation in the main box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from stepwise.explorer.draw import KINDS, head_count, layer_count, number, token_diff_html
from stepwise.explorer.views import Result, TranslationView, Update, error, ok
from stepwise.serve.client import ServiceError, TranslationClient

ABLATION_KINDS = ("encoder", "decoder", "cross")


def head_choices(layers: int, heads: int) -> list[tuple[str, str]]:
    """Checkbox labels ``L1 H1`` (numbered from 1, as the page does) with values ``"layer,head"`` (0-based)."""
    return [(f"L{number(layer)} H{number(head)}", f"{layer},{head}")
            for layer in range(layers) for head in range(heads)]


def mask_heads(picked: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Checkbox values per kind as the service's ``mask_heads`` (kinds with nothing picked left out)."""
    return {kind: [[int(i) for i in value.split(",")] for value in values] for kind, values in picked.items() if values}


@dataclass
class AblationView:
    """Heads to switch off (one checkbox group per kind), a button, and what changed."""

    client: TranslationClient
    translation: TranslationView
    boxes: dict[str, gr.CheckboxGroup]
    button: gr.Button
    status: gr.HTML
    output: gr.Textbox
    scores: gr.Markdown
    diff: gr.HTML

    @classmethod
    def build(cls, client: TranslationClient, translation: TranslationView) -> AblationView:
        """Lay out the head pickers and the results (inside their tab)."""
        counts = cls._counts(client)
        gr.Markdown("Switch heads off and translate the sentence above again. A switched-off head's output is "
                    "multiplied by 0 before the layer's output projection; its attention weights are unchanged.")
        boxes = {}
        with gr.Row():
            for kind in ABLATION_KINDS:
                layers, heads = counts.get(kind, (0, 0))
                boxes[kind] = gr.CheckboxGroup(head_choices(layers, heads), label=f"Off: {KINDS[kind]}",
                                               elem_id=f"ablation-{kind}")
        button = gr.Button("Translate with these heads off", elem_id="ablation-button")
        status = gr.HTML(elem_id="ablation-status")
        output = gr.Textbox(label="Translation with the heads off", interactive=False, elem_id="ablation-translation")
        scores = gr.Markdown(elem_id="ablation-scores")
        diff = gr.HTML(elem_id="ablation-diff")
        return cls(client, translation, boxes, button, status, output, scores, diff)

    @staticmethod
    def _counts(client: TranslationClient) -> dict[str, tuple[int, int]]:
        """Layers and heads per kind of the service's default model (none while it is unreachable)."""
        try:
            info = client.describe()
        except ServiceError:
            return {}
        heads = int(info.get("heads", 0))
        return {"encoder": (int(info.get("encoder_layers", 0)), heads), "decoder": (int(info.get("layers", 0)), heads),
                "cross": (int(info.get("layers", 0)), heads)}

    def refresh(self, result: Result) -> Update:
        """Offer the heads of the model that made the latest translation (a paragraph's: its first sentence's).

        Every box gets an update (a no-op where nothing is known): Gradio rejects an empty dict.
        """
        if result is not None and not result.get("attention") and result.get("sentences"):
            result = result["sentences"][0]
        attention = (result or {}).get("attention") or {}
        return {box: gr.update(choices=head_choices(layer_count(result, kind), head_count(result, kind)))
                if kind in attention else gr.update() for kind, box in self.boxes.items()}

    def ablate(self, text: str, beam: float, model: str, *picked: list[str]) -> Update:
        """Translate with every head on and with the picked ones off; show both scores and the token diff."""
        heads = mask_heads(dict(zip(ABLATION_KINDS, picked, strict=True)))
        blank = {self.output: "", self.scores: "", self.diff: ""}
        if not heads:
            return {**blank, self.status: error("Pick at least one head to switch off.", "ablation-error")}
        try:
            if not text or not text.strip():
                raise ServiceError("Type a sentence to translate first.")
            options: dict[str, Any] = {"beam_size": int(beam), "model": model.strip() or None, "attention": "none"}
            full = self.client.translate(text, **options)
            ablated = self.client.translate(text, mask_heads=heads, **options)
        except ServiceError as exc:
            return {**blank, self.status: error(str(exc), "ablation-error")}
        count = sum(len(pairs) for pairs in heads.values())
        return {
            self.status: ok(f"Translated with {count} head(s) off by {ablated['model'].get('id')}.", "ablation-ok"),
            self.output: ablated["translation"],
            self.scores: (f"**Score with the heads off:** <span id='ablation-score'>{ablated['score']:.4f}</span>  \n"
                          f"**Score with every head on:** {full['score']:.4f} — *{full['translation']}*"),
            self.diff: token_diff_html(full["target_tokens"], ablated["target_tokens"]),
        }

    def wire(self) -> None:
        """Ablate on the button; follow the model of each new translation."""
        boxes = [self.boxes[kind] for kind in ABLATION_KINDS]
        self.translation.result.change(self.refresh, [self.translation.result], boxes)
        self.button.click(self.ablate, [self.translation.text, self.translation.beam, self.translation.model, *boxes],
                          [self.status, self.output, self.scores, self.diff])
