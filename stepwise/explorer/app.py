"""The explorer's page: translate, then look at encoder, decoder and cross-attention.

Views (``stepwise.explorer/views.py``): one layer/head heatmap (weight on hover), a grid of every
layer × head (click one to open it), the head average per layer, token-to-token lines, word
alignments (``stepwise.explorer/words.py``), and two model versions side by side, a layer × head
divergence between two versions, one run's attention
over its training checkpoints, and the registry (with promotion for an explorer started as an
admin: ``--admin``), and head ablation (``stepwise.explorer/ablation.py``: switch heads off, translate
again, see which tokens changed), and scoring a given translation (``stepwise.explorer/scoring.py``:
its tokens coloured by probability, the model's own translation beside it, a source-share strip).
A paragraph is split into sentences by the service and a picker chooses the sentence every view
shows. The current view exports as PNG and as a standalone HTML file.
Layers, heads and tokens are numbered from 1 everywhere on the page (the service's JSON counts
from 0). Every failure (service down, bad input) is shown as a sentence in the status line,
never a traceback.
"""

from __future__ import annotations

import gradio as gr

from stepwise.explorer.ablation import AblationView
from stepwise.explorer.scoring import ScoreView
from stepwise.explorer.versions import DiffView, RegistryView, TrainingView
from stepwise.explorer.views import CompareView, GridView, HeatmapView, LinesView, Selection, TranslationView
from stepwise.explorer.words import AlignmentView, SentencePicker
from stepwise.serve.client import TranslationClient

NOTE = ("**A word of caution:** attention weights show where each layer and head looked while producing a "
        "token. They are not an explanation of why the model translated as it did. Layers, heads and tokens "
        "are numbered from 1.")
EXAMPLES = ["Und Gott sprach: Es werde Licht!", "Der Herr ist mein Hirte, mir wird nichts mangeln.",
            "Selig sind die Friedfertigen, denn sie werden Söhne Gottes heißen."]
SCORE_EXAMPLE = ("Und Gott sprach: Es werde Licht!", "And God said, Let there be light.")
CACHE_LIFETIME_S = 24 * 3600  # Gradio's copies of thumbnails and exports older than this are deleted hourly


def build_app(client: TranslationClient, *, admin: bool = False, model_name: str = "") -> gr.Blocks:
    """The Gradio Blocks of the explorer, talking to ``client``.

    Args:
        client: the translation service.
        admin: show the registry's promote and demote controls (``--admin``).
        model_name: the model name the registry and training views list first.
    """
    with gr.Blocks(title="stepwise attention explorer", delete_cache=(3600, CACHE_LIFETIME_S)) as demo:
        gr.Markdown("# stepwise attention explorer")
        gr.Markdown(NOTE, elem_id="attention-note")
        translation = TranslationView.build(client, EXAMPLES[0])
        picker = SentencePicker.build(translation.result)  # a paragraph: every view shows the picked sentence
        selection = Selection.build(picker.shown)
        with gr.Tabs(selected="heatmap") as tabs:
            with gr.Tab("Heatmap", id="heatmap"):
                heatmap = HeatmapView.build(selection, translation.status)
            with gr.Tab("All layers × heads", id="grid"):
                grid = GridView.build(selection, tabs)
            with gr.Tab("Token lines", id="lines"):
                lines = LinesView.build(selection)
            with gr.Tab("Word alignments", id="alignment"):
                alignment = AlignmentView.build(client, translation, picker)
            with gr.Tab("Compare versions", id="compare"):
                compare = CompareView.build(client, translation)
            with gr.Tab("Version diff", id="diff"):
                diff = DiffView.build(client, EXAMPLES[0])
            with gr.Tab("Attention over training", id="training"):
                training = TrainingView.build(client, translation.text)
            with gr.Tab("Registry", id="registry"):
                registry = RegistryView.build(client, admin=admin, name=model_name, runs=training.run)
            with gr.Tab("Head ablation", id="ablation"):
                ablation = AblationView.build(client, translation)
            with gr.Tab("Score a translation", id="score"):
                scoring = ScoreView.build(client, *SCORE_EXAMPLE)

        shown, picked = picker.wire(translation.wire(), selection)
        redraw = [*selection.wire(shown), picked]
        alignment.wire(shown)
        for view in (heatmap, grid, lines):
            view.wire(redraw)
        compare.wire()
        diff.wire()
        training.wire()
        registry.wire(demo)
        ablation.wire()
        scoring.wire()
        demo.load(translation.refresh_limits, None, translation.beam)
    return demo
