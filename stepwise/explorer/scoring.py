"""Score a translation: a given translation teacher-forced by the model (the service's ``/score``).

Type a source sentence and a translation of it (a reference, a post-edit, another system's
output). The service scores it token by token and the view shows:

* the given translation's tokens coloured by their probability under the model, the unlikely
  ones (probability below :data:`UNLIKELY`) marked;
* the model's own translation beside it, with where it departs from the given one (a token diff:
  the model's tokens that the given translation lacks are marked, the given tokens it dropped are
  struck through);
* a contributions strip under the given tokens: each token's source share (ALTI+, how much of its
  prediction came from the source rather than the target prefix), the tokens below
  :data:`LOW_SOURCE_SHARE` flagged: a token predicted from the prefix alone is what a
  hallucination or an under-translation looks like.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import gradio as gr

from stepwise.explorer.draw import token_diff
from stepwise.explorer.views import Update, error, ok
from stepwise.serve.client import ServiceError, TranslationClient

UNLIKELY = 0.05  # a token the model gives less than this probability is marked
LOW_SOURCE_SHARE = 0.3  # a token whose prediction came less than this much from the source is flagged


def _probability_color(probability: float) -> str:
    """White (likely) to red (unlikely), as a CSS colour."""
    shade = int(round(255 * min(max(probability, 0.0), 1.0)))
    return f"rgb(255,{shade},{shade})"


def scored_tokens_html(tokens: list[str], log_probs: list[float], *, unlikely: float = UNLIKELY) -> str:
    """The tokens coloured by probability, each with it on hover; the unlikely ones in ``mark``."""
    cells = []
    for index, (token, log_prob) in enumerate(zip(tokens, log_probs, strict=True)):
        probability = math.exp(log_prob)
        tag = "mark" if probability < unlikely else "span"
        cells.append(f"<{tag} class='scored-token' data-index='{index}' data-probability='{probability:.5f}' "
                     f"title='p = {probability:.4f}' style='background:{_probability_color(probability)};"
                     f"padding:2px 3px;border-radius:3px'>{html.escape(token)}</{tag}>")
    marked = sum(math.exp(p) < unlikely for p in log_probs)
    return (f"<p class='scored-summary'>{marked} of {len(tokens)} tokens are unlikely (p &lt; {unlikely:g}).</p>"
            f"<p class='scored-tokens' style='line-height:2'>{' '.join(cells)}</p>")


def contributions_strip_html(tokens: list[str], source_share: list[float], *, low: float = LOW_SOURCE_SHARE) -> str:
    """One cell per target token: a bar of its source share, the low ones flagged (class ``low-source``)."""
    cells = []
    for token, share in zip(tokens, source_share, strict=True):
        flagged = share < low
        cells.append(
            f"<span class='share{' low-source' if flagged else ''}' data-share='{share:.5f}' "
            f"title='{html.escape(token)}: {share:.0%} from the source' style='display:inline-block;width:3.2em;"
            f"margin:1px;text-align:center;font-size:12px;border:1px solid {'#c00' if flagged else '#ccc'}'>"
            f"<span style='display:block;height:6px;width:{share * 100:.0f}%;background:#3a7'></span>"
            f"{share:.2f}</span>")
    flagged = sum(share < low for share in source_share)
    return (f"<p class='share-summary'>Source share per token (ALTI+): {flagged} token(s) below {low:g}.</p>"
            f"<div class='contributions-strip'>{''.join(cells)}</div>")


def departures_html(given: list[str], own: list[str]) -> str:
    """Where the model's own tokens depart from the given ones: the model's tokens the given translation
    lacks in ``mark``, the given tokens the model dropped in ``del``."""
    tags = {"same": "span", "added": "mark", "removed": "del"}
    diff = token_diff(given, own)
    cells = [f"<{tags[op]} class='token-{op}'>{html.escape(token)}</{tags[op]}>" for op, token in diff]
    changed = sum(op == "added" for op, _ in diff)
    return (f"<p class='departures-summary'>{changed} of the model's {len(own)} tokens depart from the given "
            f"translation.</p><p class='token-diff' style='line-height:2'>{' '.join(cells)}</p>")


@dataclass
class ScoreView:
    """Source and given translation in; scored tokens, the model's own translation and contributions out."""

    client: TranslationClient
    source: gr.Textbox
    given: gr.Textbox
    button: gr.Button
    status: gr.HTML
    scored: gr.HTML
    total: gr.Markdown
    own: gr.Textbox
    departures: gr.HTML
    strip: gr.HTML

    @classmethod
    def build(cls, client: TranslationClient, source: str, given: str) -> ScoreView:
        """Lay out the inputs and the results (inside their tab)."""
        gr.Markdown("Score a translation of your own: the model reads it token by token (teacher forcing) and says "
                    "how likely it finds each token, how much of each prediction came from the source, and "
                    "where its own translation departs from yours.")
        with gr.Row():
            source_box = gr.Textbox(source, label="Source", lines=2, elem_id="score-source")
            given_box = gr.Textbox(given, label="Given translation", lines=2, elem_id="score-given")
        button = gr.Button("Score", elem_id="score-button")
        status = gr.HTML(elem_id="score-status")
        scored = gr.HTML(elem_id="score-tokens")
        strip = gr.HTML(elem_id="score-contributions")
        total = gr.Markdown(elem_id="score-total")
        own = gr.Textbox(label="The model's own translation", interactive=False, elem_id="score-own")
        departures = gr.HTML(elem_id="score-departures")
        return cls(client, source_box, given_box, button, status, scored, total, own, departures, strip)

    def score(self, source: str, given: str) -> Update:
        """Score the given translation and translate the source; show both."""
        blank: dict[Any, Any] = {self.scored: "", self.total: "", self.own: "", self.departures: "", self.strip: ""}
        try:
            if not source.strip() or not given.strip():
                raise ServiceError("Type a source sentence and a translation of it.")
            scored = self.client.score(source, given, attention="none", contributions=True)
            own = self.client.translate(source, attention="none")
        except ServiceError as exc:
            return {**blank, self.status: error(str(exc), "score-error")}
        tokens = scored["target_tokens"]
        return {
            self.status: ok(f"Scored by {scored['model'].get('id')}.", "score-ok"),
            self.scored: scored_tokens_html(tokens, scored["log_probs"]),
            self.strip: contributions_strip_html(tokens, scored["contributions"]["source_share"]),
            self.total: (f"**Log-probability of the given translation:** <span id='score-value'>{scored['score']:.4f}"
                         f"</span> ({len(tokens)} tokens); **the model's own:** {own['score']:.4f}"),
            self.own: own["translation"],
            self.departures: departures_html(tokens, own["target_tokens"]),
        }

    def wire(self) -> None:
        """Score on the button."""
        self.button.click(self.score, [self.source, self.given],
                          [self.status, self.scored, self.strip, self.total, self.own, self.departures])
