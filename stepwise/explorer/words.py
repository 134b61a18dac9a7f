"""Paragraphs and word alignments in the explorer.

* ``SentencePicker``: the explorer asks the service to split a paragraph into sentences
  (``split: "sentences"``); the service answers with each sentence's own tokens and attention.
  The picker chooses which sentence every attention view shows (heatmap, grid, lines, word
  alignments). A single sentence shows no picker and behaves as before.
* ``AlignmentView``: the service's word alignment (``alignment: "soft"`` and ``"hard"``, from
  the cross-attention of a chosen layer and head or their average) as a word-level heatmap with
  the hard links outlined, and as lines from each target word to its source word.

The word-level rule (pieces merged into words, source pieces summed, target pieces averaged,
EOS dropped) is the service's, :mod:`stepwise.serve.alignment`; the explorer only draws what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from stepwise.explorer.draw import AVERAGE, head_count, heatmap_svg, layer_count, links_svg, number
from stepwise.explorer.views import Result, Selection, TranslationView, Update, error, unchanged
from stepwise.serve.alignment import parse_pharaoh
from stepwise.serve.client import ServiceError, TranslationClient

NO_ALIGNMENT = "<p id='alignment-empty'>Translate a sentence to see its word alignment.</p>"


def sentence(result: Result, index: int | None) -> Result:
    """One sentence of a translation, shaped like a one-sentence answer (what the views draw).

    A paragraph's answer has ``sentences`` (each with its own tokens and attention); the picked
    one keeps the answer's ``model`` and ``timings``. An answer without ``sentences`` is itself.
    """
    if not result or not result.get("sentences"):
        return result
    parts = result["sentences"]
    index = index if isinstance(index, int) and 0 <= index < len(parts) else 0
    return {**parts[index], "model": result["model"], "timings": result.get("timings", {})}


@dataclass
class SentencePicker:
    """Which sentence of a split paragraph the attention views show."""

    result: gr.State  # the whole answer
    shown: gr.State  # the picked sentence as a one-sentence answer: what the views read
    picker: gr.Dropdown

    @classmethod
    def build(cls, result: gr.State) -> SentencePicker:
        """Lay out the picker (hidden until a paragraph has more than one sentence)."""
        shown = gr.State(None)
        picker = gr.Dropdown([], label="Sentence (the paragraph was split; every view shows the one picked)",
                             visible=False, elem_id="sentence-picker")
        return cls(result, shown, picker)

    def fit(self, result: Result) -> Update:
        """After a translation: the first sentence, and a picker of all of them if there are several."""
        parts = (result or {}).get("sentences") or []
        choices = [(f"{number(i)}: {part['source']}", i) for i, part in enumerate(parts)]
        return {self.shown: sentence(result, 0),
                self.picker: gr.update(choices=choices, value=0 if choices else None, visible=len(choices) > 1)}

    def pick(self, result: Result, index: int | None) -> Result:
        """The picked sentence."""
        return sentence(result, index)

    def wire(self, translated: gr.events.Dependency,
             selection: Selection) -> tuple[gr.events.Dependency, gr.events.Dependency]:
        """Show the first sentence after a translation, and the picked one on a pick.

        Returns:
            The event after a translation's first sentence is shown (for ``Selection.wire``) and
            the event after a picked sentence's menus are fitted (for the views to redraw after).
        """
        shown = translated.then(self.fit, [self.result], [self.shown, self.picker])
        picked = self.picker.input(self.pick, [self.result, self.picker], self.shown).then(
            selection.fit, selection.inputs, [selection.layer, selection.head])
        return shown, picked


def _choice_label(what: str, value: int | str) -> str:
    return f"{what}s averaged" if value == AVERAGE else f"{what} {number(int(value))}"


@dataclass
class AlignmentView:
    """Word alignments of the picked sentence: a word-level heatmap (``soft``) and lines (``hard``)."""

    client: TranslationClient
    translation: TranslationView
    picker: SentencePicker
    alignments: gr.State  # one {source_words, target_words, layer, head, soft, hard} per sentence
    layer: gr.Dropdown
    head: gr.Dropdown
    matrix: gr.HTML
    lines: gr.HTML

    @classmethod
    def build(cls, client: TranslationClient, translation: TranslationView, picker: SentencePicker) -> AlignmentView:
        """Lay out the layer and head menus, the word matrix and the word lines (inside their tab)."""
        gr.Markdown("Cross-attention merged from pieces into words (a word's source pieces summed, its target "
                    "pieces averaged, end-of-sentence left out), from the layer and head chosen here or their "
                    "average. Left: each target word's row sums to 1; the outlined cell is its hard link (the "
                    "source word it attends to most). Right: the hard links as lines. Where the model looked is "
                    "not why it chose a word.")
        alignments = gr.State(None)
        with gr.Row():
            layer = gr.Dropdown([(AVERAGE, AVERAGE)], value=AVERAGE, label="Alignment layer", elem_id="alignment-layer")
            head = gr.Dropdown([(AVERAGE, AVERAGE)], value=AVERAGE, label="Alignment head", elem_id="alignment-head")
        with gr.Row():
            matrix = gr.HTML(NO_ALIGNMENT, elem_id="alignment-matrix")
            lines = gr.HTML(elem_id="alignment-lines")
        return cls(client, translation, picker, alignments, layer, head, matrix, lines)

    def fit(self, shown: Result, layer: int | str | None, head: int | str | None) -> Update:
        """The menus of the model's cross-attention layers and heads, keeping a choice that still exists."""
        if not shown or "cross" not in shown.get("attention", {}):
            return unchanged(self.layer, self.head)
        layers, heads = layer_count(shown, "cross"), head_count(shown, "cross")
        layer = layer if isinstance(layer, int) and layer < layers else AVERAGE
        head = head if isinstance(head, int) and head < heads else AVERAGE
        return {self.layer: gr.update(choices=[(AVERAGE, AVERAGE), *((number(i), i) for i in range(layers))],
                                      value=layer),
                self.head: gr.update(choices=[(AVERAGE, AVERAGE), *((number(h), h) for h in range(heads))],
                                     value=head)}

    def fetch(self, result: Result, layer: int | str | None, head: int | str | None) -> Update:
        """Ask the service for the soft and the hard alignment of the translated text, per sentence."""
        if not result or "request" not in result:
            return {self.alignments: None}
        request = result["request"]
        layer = AVERAGE if layer is None else layer
        head = AVERAGE if head is None else head
        try:
            answers = {mode: self.client.translate(request["text"], beam_size=request["beam_size"],
                                                   model=request["model"], attention="none", split="sentences",
                                                   alignment=mode, alignment_layer=layer, alignment_head=head)
                       for mode in ("soft", "hard")}
        except ServiceError as exc:
            return {self.alignments: None, self.translation.status: error(str(exc))}
        per_sentence = {mode: [part["alignment"] for part in answer.get("sentences") or [answer]]
                        for mode, answer in answers.items()}
        merged = [{**soft, "hard": hard["hard"]} for soft, hard in zip(per_sentence["soft"], per_sentence["hard"],
                                                                         strict=True)]
        return {self.alignments: merged}

    def draw(self, alignments: list[dict[str, Any]] | None, index: int | None) -> Update:
        """The picked sentence's word matrix and word lines."""
        if not alignments:
            return {self.matrix: NO_ALIGNMENT, self.lines: ""}
        part = alignments[index if isinstance(index, int) and 0 <= index < len(alignments) else 0]
        source, target = part["source_words"], part["target_words"]
        soft = np.asarray(part["soft"], dtype=np.float64).reshape(len(target), len(source))
        links = sorted(parse_pharaoh(part["hard"]), key=lambda link: (link[1], link[0]))
        name = (f"word alignment (target → source) · {_choice_label('layer', part['layer'])} · "
                f"{_choice_label('head', part['head'])}")
        return {self.matrix: heatmap_svg(soft, target, source, title=name, marked={(j, i) for i, j in links}),
                self.lines: links_svg(soft, target, source, links)}

    def wire(self, shown: gr.events.Dependency) -> None:
        """Fetch after a translation and on a new layer or head; redraw on a picked sentence."""
        picker = self.picker
        menus = [self.layer, self.head]
        outputs = [self.matrix, self.lines]
        shown.then(self.fit, [picker.shown, *menus], menus).then(
            self.fetch, [picker.result, *menus], [self.alignments, self.translation.status]).then(
            self.draw, [self.alignments, picker.picker], outputs)
        for menu in menus:
            menu.input(self.fetch, [picker.result, *menus], [self.alignments, self.translation.status]).then(
                self.draw, [self.alignments, picker.picker], outputs)
        picker.picker.input(self.draw, [self.alignments, picker.picker], outputs)
