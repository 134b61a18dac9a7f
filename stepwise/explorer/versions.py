"""The explorer's views across versions: the registry, attention over training, a version diff.

* ``RegistryView``: every registered version of a model name, with its tags, BLEU, its gold-set
  alignment error rate (AER, with the layer/head it was measured with: the reading the service
  aligns with by default), the gate's comparison and a link to the experiment it came from.
  Started with ``--admin``, the page can promote (through :func:`stepwise.registry.promotion.promote`,
  the BLEU gate of ``stepwise promote``) and demote; then it asks the service to ``/reload`` and
  says which version now answers.
* ``TrainingView``: one run's registered checkpoints translating the same sentence; a slider over
  the training steps redraws that step's attention, with its BLEU beside it. The run menu opens on
  the run of the ``production`` version (the one the service answers with); only checkpoints with a
  registered ONNX export are translated, so the service never has to export one.
* ``DiffView``: two versions on one or more sentences: both translations, and a layer × head grid
  of the Jensen–Shannon divergence between their attention (``stepwise.explorer.divergence``); clicking
  a cell opens that head's two heatmaps side by side.

The registry is read through ``stepwise.registry.client`` in the explorer's own process (the service
never changes the registry); translations come from the service (``model=<version id>``). Nothing
here imports torch: promotion scores the versions' ONNX exports.

Every handler returns a dict keyed by its outputs; one with nothing to change returns
:func:`unchanged` of them, never ``{}`` (Gradio reads an empty dict as a single value).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from stepwise.errors import StepwiseError
from stepwise.explorer.divergence import compared_rows, head_divergence
from stepwise.explorer.draw import AVERAGE, KINDS, axes, head_count, heatmap_svg, layer_count, matrix, number, title
from stepwise.explorer.views import Update, unchanged
from stepwise.explorer.views import error as status_error
from stepwise.explorer.views import ok as status_ok
from stepwise.registry import client as registry
from stepwise.registry import tracking
from stepwise.serve.client import ServiceError, TranslationClient

MARKED_TAGS = (registry.PRODUCTION, registry.CANDIDATE)
NOT_CONFIGURED = ("No ClearML server is configured, so there is no registry to show: set CLEARML_API_HOST and "
                  "the credentials (or ~/clearml.conf) and restart the explorer.")


def ok(message: str) -> str:
    """These views' success line (an id apart from the translation's status line)."""
    return status_ok(message, "versions-ok")


def error(message: str) -> str:
    """These views' failure line, as a sentence."""
    return status_error(message, "versions-error")


# -- reading the registry ----------------------------------------------------------------------------


def model_versions(name: str | None) -> list[registry.ModelVersion]:
    """Registered versions of ``name`` (every name when empty), newest first; ONNX exports left out.

    The SDK matches model names by pattern, so a name's exports (``<name>-onnx``) are dropped by
    their tag and other names by comparing exactly.
    """
    versions = registry.list_versions(name=name or None)
    return [v for v in versions if registry.ONNX_TAG not in v.tags and (not name or v.name == name)]


def web_host() -> str:
    """The ClearML web app's address (``CLEARML_WEB_HOST``, or inferred by the SDK from the API host)."""
    from clearml.backend_api import Session

    return Session.get_app_server_host().rstrip("/")


def experiment_url(host: str, version: registry.ModelVersion) -> str | None:
    """The results page of the task that registered ``version``."""
    if not version.task or not version.project:
        return None
    return f"{host}/projects/{version.project}/experiments/{version.task}/output/log"


def _step(version: registry.ModelVersion) -> int | None:
    try:
        return int(float(version.metadata["step"]))
    except (KeyError, ValueError):
        return None


def gate_summary(metadata: dict[str, str]) -> str:
    """The gate's comparison recorded by ``stepwise.registry.promotion.promote``, in one line ('' if none)."""
    result = metadata.get("gate_result")
    if not result:
        return ""
    current = metadata.get("gate_current_bleu") or ""
    against = f"{current} ({metadata.get('gate_current_id', '')[:8]})" if current else "no current version"
    return f"{result}: {metadata.get('gate_candidate_bleu', '?')} vs {against} on {metadata.get('gate_split', '?')}"


def alignment_summary(version: registry.ModelVersion) -> str:
    """The AER cell: the gold-set alignment error rate and the reading it was measured with (HTML)."""
    if version.aer is None:
        return ""
    layer, head = version.metadata.get("alignment_layer", "?"), version.metadata.get("alignment_head", "?")
    where = "average" if layer == head == "average" else f"layer {layer} head {head}"
    return (f"<span class='aer' title='gold-set alignment error rate (lower is better), "
            f"{html.escape(where)}'>{version.aer:.3f}</span> <small>{html.escape(where)}</small>")


def registry_table(versions: list[registry.ModelVersion], host: str) -> str:
    """The versions as an HTML table, one row per version (``data-id`` on each row)."""
    head = "".join(f"<th>{h}</th>" for h in ("id", "name", "created", "step", "tags", "published", "BLEU",
                                             "AER", "gate", "experiment"))
    rows = []
    for v in versions:
        tags = " ".join(
            f"<span class='tag tag-{html.escape(t)}' style='font-weight:bold;padding:0 4px;border-radius:4px;"
            f"background:{'#1b5e20;color:white' if t == registry.PRODUCTION else '#fff3cd'}'>{html.escape(t)}</span>"
            if t in MARKED_TAGS else f"<span class='tag'>{html.escape(t)}</span>" for t in v.tags)
        url = experiment_url(host, v)
        link = f"<a class='experiment' href='{html.escape(url)}' target='_blank'>{html.escape(v.task or '')}</a>" \
            if url else ""
        step = _step(v)
        cells = [f"<code class='version-id'>{html.escape(v.id)}</code>", html.escape(v.name), html.escape(v.created),
                 "" if step is None else str(step), tags, "yes" if v.published else "no",
                 "" if v.bleu is None else f"{v.bleu:.2f}", alignment_summary(v),
                 html.escape(gate_summary(v.metadata)), link]
        rows.append(f"<tr data-id='{html.escape(v.id)}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<table id='registry-table' style='font-size:13px'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def run_checkpoints(task: str) -> tuple[list[registry.ModelVersion], list[registry.ModelVersion]]:
    """The registered versions of one run (task), oldest step first: those with an ONNX export, and
    those without one (which the service would have to export before translating)."""
    listed = registry.list_versions()
    exported = {tag for v in listed if registry.ONNX_TAG in v.tags for tag in v.tags}
    versions = sorted((v for v in listed if v.task == task and registry.ONNX_TAG not in v.tags),
                      key=lambda v: (_step(v) is None, _step(v) or 0, v.created))
    return ([v for v in versions if registry.export_tag(v.id) in exported],
            [v for v in versions if registry.export_tag(v.id) not in exported])


def _runs(versions: list[registry.ModelVersion]) -> list[tuple[str, str]]:
    """Menu choices of the runs (tasks) among ``versions``: label, task id."""
    counts: dict[str, int] = {}
    for v in versions:
        if v.task:
            counts[v.task] = counts.get(v.task, 0) + 1
    return [(f"{task} ({n} checkpoint{'s' if n != 1 else ''})", task) for task, n in counts.items()]


def default_run(versions: list[registry.ModelVersion]) -> str | None:
    """The run the training view opens on: the task of the newest ``production`` version (the model
    the service answers with), else the task of the newest version; None when no version has one."""
    with_task = [v for v in versions if v.task]
    production = [v for v in with_task if registry.PRODUCTION in v.tags]
    chosen = (production or with_task)[:1]
    return chosen[0].task if chosen else None


# -- the registry --------------------------------------------------------------------------------------


@dataclass
class RegistryView:
    """The registered versions of a model name; with ``admin``, promote and demote."""

    client: TranslationClient
    admin: bool
    name: gr.Textbox
    refresh: gr.Button
    table: gr.HTML
    status: gr.HTML
    runs: gr.Dropdown  # the training view's run menu, filled from the same listing
    version: gr.Dropdown | None = None
    margin: gr.Number | None = None
    sentences: gr.Number | None = None
    promote_button: gr.Button | None = None
    demote_button: gr.Button | None = None

    @classmethod
    def build(cls, client: TranslationClient, *, admin: bool, name: str, runs: gr.Dropdown) -> RegistryView:
        """Lay out the listing and, for an admin, the promotion controls (inside their tab)."""
        with gr.Row():
            name_box = gr.Textbox(label="Model name (empty = every name)", value=name, elem_id="registry-name",
                                  scale=4)
            refresh = gr.Button("Refresh", elem_id="registry-refresh", scale=1)
        table = gr.HTML(elem_id="registry")
        status = gr.HTML(elem_id="registry-status")
        view = cls(client, admin, name_box, refresh, table, status, runs)
        if admin:
            gr.Markdown("**Admin:** promotion re-scores the version and the current `production` on held-out "
                        "sentences and refuses when the version is worse by more than the margin "
                        "(as `stepwise promote`).")
            with gr.Row():
                view.version = gr.Dropdown([], label="Version", elem_id="promote-version", scale=3)
                view.margin = gr.Number(1.0, label="Margin (BLEU)", elem_id="promote-margin", scale=1)
                view.sentences = gr.Number(100, label="Sentences", precision=0, elem_id="promote-sentences",
                                           scale=1)
            with gr.Row():
                view.promote_button = gr.Button("Promote to production", variant="primary", elem_id="promote")
                view.demote_button = gr.Button("Demote (remove production)", elem_id="demote")
        return view

    def list(self, name: str, run: str | None = None) -> Update:
        """Read the registry and redraw the table (and the version and run menus).

        The run menu keeps ``run`` while it is listed, else shows :func:`default_run`.
        """
        if not tracking.is_configured():
            return {self.table: "", self.status: f"<p id='registry-none'>{html.escape(NOT_CONFIGURED)}</p>"}
        try:
            versions = model_versions(name.strip() or None)
            host = web_host()
        except StepwiseError as exc:
            return {self.table: "", self.status: error(str(exc))}
        runs = _runs(versions)
        chosen = run if run in {task for _, task in runs} else default_run(versions)
        update: Update = {self.table: registry_table(versions, host),
                          self.runs: gr.update(choices=runs, value=chosen)}
        if self.version is not None:
            update[self.version] = gr.update(choices=[(f"{v.id} (step {_step(v)})", v.id) for v in versions])
        return update

    def _answering(self) -> str:
        """Ask the service to reload ``production`` and say which version answers now."""
        try:
            reloaded = self.client.reload()
            model = self.client.describe()["model"]
        except ServiceError as exc:
            return f" The service could not reload: {exc}"
        note = " (reloaded)" if reloaded.get("changed") else f" ({reloaded.get('reason', 'unchanged')})"
        return f" The service now answers with {model.get('id')}{note}."

    def promote(self, name: str, version: str | None, margin: float, sentences: float, run: str | None = None
                ) -> Update:
        """Promote through the BLEU gate (on the ONNX exports, as ``stepwise promote``); a refusal shows
        both scores."""
        from stepwise.registry.promotion import PromotionRefused, promote

        if not version:
            return {self.status: error("Choose a version to promote.")}
        try:
            result = promote(version, margin=float(margin), sentences=int(sentences))
        except PromotionRefused as exc:  # its message names both versions and both scores
            reason = str(exc).split("; use --force")[0]
            return {**self.list(name, run), self.status: error(f"Promotion refused: {reason}. (Only the CLI's "
                                                               "`stepwise promote --force` overrides the gate.)")}
        except StepwiseError as exc:
            return {self.status: error(str(exc))}
        current = ("no version was in production" if result.current_id is None
                   else f"previous {result.current_id} BLEU {result.current_bleu:.2f}")
        message = (f"Promoted {version} to production: candidate BLEU {result.candidate_bleu:.2f}, {current} "
                   f"({result.split}, {result.sentences} sentences).")
        return {**self.list(name, run), self.status: ok(message + self._answering())}

    def demote(self, name: str, version: str | None, run: str | None = None) -> Update:
        """Remove ``production`` from a version."""
        if not version:
            return {self.status: error("Choose a version to demote.")}
        try:
            removed = registry.remove_tag(version, registry.PRODUCTION)
        except StepwiseError as exc:
            return {self.status: error(str(exc))}
        if not removed:
            return {self.status: error(f"Version {version} does not carry the tag 'production'.")}
        return {**self.list(name, run),
                self.status: ok(f"Removed 'production' from {version}." + self._answering())}

    def wire(self, demo: gr.Blocks) -> None:
        """List on page load and on Refresh; promote and demote for an admin."""
        outputs = [self.table, self.status, self.runs]
        if self.version is not None:
            outputs.append(self.version)
        demo.load(self.list, [self.name, self.runs], outputs)
        gr.on([self.refresh.click, self.name.submit], self.list, [self.name, self.runs], outputs)
        if self.admin:
            self.promote_button.click(self.promote, [self.name, self.version, self.margin, self.sentences, self.runs],
                                      outputs)
            self.demote_button.click(self.demote, [self.name, self.version, self.runs], outputs)


# -- attention over training ---------------------------------------------------------------------------


def _menus(result: dict[str, Any], kind: str, layer: int | None, head: int | str | None) -> tuple[dict, dict]:
    layers, heads = layer_count(result, kind), head_count(result, kind)
    layer = layer if layer is not None and 0 <= int(layer) < layers else layers - 1
    head = head if head == AVERAGE or (head is not None and 0 <= int(head) < heads) else AVERAGE
    return (gr.update(choices=[(number(i), i) for i in range(layers)], value=layer),
            gr.update(choices=[(AVERAGE, AVERAGE), *[(number(h), h) for h in range(heads)]], value=head))


def _no_export(run: str, unexported: list[registry.ModelVersion]) -> str:
    """The sentence naming a run's checkpoints that have no registered ONNX export."""
    ids = ", ".join(v.id for v in unexported)
    return (f"Left out {len(unexported)} checkpoint{'s' if len(unexported) != 1 else ''} of run {run} without an "
            f"ONNX export ({ids}): `stepwise export --model-id ID` makes one.")


@dataclass
class TrainingView:
    """One run's checkpoints on the same sentence, with a slider over training steps."""

    client: TranslationClient
    text: gr.Textbox
    checkpoints: gr.State  # [{id, step, bleu, result}] oldest first
    run: gr.Dropdown
    button: gr.Button
    status: gr.HTML
    slider: gr.Slider
    kind: gr.Radio
    layer: gr.Dropdown
    head: gr.Dropdown
    caption: gr.HTML
    heat: gr.HTML
    scores: gr.HTML

    @classmethod
    def build(cls, client: TranslationClient, text: gr.Textbox) -> TrainingView:
        """Lay out the run menu, the slider and the heatmap (inside their tab)."""
        gr.Markdown("The sentence above, translated by each registered checkpoint of one run. Move the slider "
                    "through training: cross-attention usually starts nearly uniform and sharpens into an "
                    "alignment. The menu opens on the run of the `production` version; checkpoints without a "
                    "registered ONNX export are left out (`stepwise export --model-id ID` makes one).")
        checkpoints = gr.State([])
        with gr.Row():
            run = gr.Dropdown([], label="Run (ClearML task)", elem_id="training-run", scale=4)
            button = gr.Button("Translate at every checkpoint", elem_id="training-load", scale=1)
        status = gr.HTML(elem_id="training-status")
        slider = gr.Slider(0, 1, value=0, step=1, label="Checkpoint (oldest → newest)", elem_id="training-step")
        with gr.Row():
            kind = gr.Radio(list(KINDS), value="cross", label="Attention", elem_id="training-kind")
            layer = gr.Dropdown([], label="Layer", elem_id="training-layer")
            head = gr.Dropdown([], label="Head", elem_id="training-head")
        caption = gr.HTML(elem_id="training-caption")
        with gr.Row():
            heat = gr.HTML(elem_id="training-heatmap")
            scores = gr.HTML(elem_id="training-scores")
        return cls(client, text, checkpoints, run, button, status, slider, kind, layer, head, caption, heat,
                   scores)

    def load(self, run: str | None, text: str) -> Update:
        """Translate the sentence with every checkpoint of the run that has a registered ONNX export.

        A checkpoint without one is left out and named (the service would have to export it).
        """
        if not run:
            return {self.status: error("Choose a run first (its checkpoints are listed from the registry).")}
        if not text or not text.strip():
            return {self.status: error("Type a sentence to translate first.")}
        started = time.perf_counter()
        try:
            versions, unexported = run_checkpoints(run)
            if not versions:
                return {self.status: error(_no_export(run, unexported) if unexported else
                                           f"Run {run} has no registered checkpoints.")}
            checkpoints = [{"id": v.id, "step": _step(v), "bleu": v.bleu,
                            "result": self.client.translate(text, model=v.id, attention="all")} for v in versions]
        except (StepwiseError, ServiceError) as exc:
            return {self.status: error(str(exc))}
        seconds = time.perf_counter() - started
        layer, head = _menus(checkpoints[0]["result"], "cross", None, AVERAGE)
        left_out = f" {_no_export(run, unexported)}" if unexported else ""
        return {self.checkpoints: checkpoints, self.kind: "cross", self.layer: layer, self.head: head,
                self.slider: gr.update(minimum=0, maximum=max(len(checkpoints) - 1, 1), value=0),
                self.status: ok(f"Translated at {len(checkpoints)} checkpoints in {seconds:.1f} s.{left_out}")}

    def fit(self, checkpoints: list[dict[str, Any]], kind: str, layer: int | None, head: int | str | None) -> Update:
        """The layer and head menus of ``kind``."""
        if not checkpoints:
            return unchanged(self.layer, self.head)
        layer_menu, head_menu = _menus(checkpoints[0]["result"], kind, layer, head)
        return {self.layer: layer_menu, self.head: head_menu}

    def draw(self, checkpoints: list[dict[str, Any]], index: float, kind: str, layer: int | None,
             head: int | str | None) -> Update:
        """The chosen checkpoint's heatmap, its step, BLEU and translation, and the BLEU of every step."""
        if not checkpoints or layer is None or head is None:
            return unchanged(self.caption, self.heat, self.scores)
        i = min(max(int(index), 0), len(checkpoints) - 1)
        chosen = checkpoints[i]
        result = chosen["result"]
        layer_i = min(int(layer), layer_count(result, kind) - 1)
        head_v: int | str = head if head == AVERAGE else min(int(head), head_count(result, kind) - 1)
        rows, cols = axes(result, kind)
        bleu = "–" if chosen["bleu"] is None else f"{chosen['bleu']:.2f}"
        caption = (f"<div><b>checkpoint {i + 1} of {len(checkpoints)}</b> · step <span id='training-step-value'>"
                   f"{chosen['step']}</span> · validation BLEU <span id='training-bleu'>{bleu}</span> · version "
                   f"<code id='training-version'>{html.escape(chosen['id'])}</code><br>translation: "
                   f"<i id='training-translation'>{html.escape(result['translation'])}</i></div>")
        scores = "".join(
            f"<tr{' style=font-weight:bold;background:#e3f2fd' if j == i else ''}><td>{c['step']}</td>"
            f"<td>{'–' if c['bleu'] is None else format(c['bleu'], '.2f')}</td></tr>"
            for j, c in enumerate(checkpoints))
        return {self.caption: caption,
                self.heat: heatmap_svg(matrix(result, kind, layer_i, head_v), rows, cols,
                                       title=f"step {chosen['step']} · {title(kind, layer_i, head_v)}"),
                self.scores: f"<table id='training-bleu-table'><tr><th>step</th><th>BLEU</th></tr>{scores}</table>"}

    def wire(self) -> None:
        """Load on the button; refit the menus on a new kind; redraw on any change."""
        view = [self.checkpoints, self.slider, self.kind, self.layer, self.head]
        drawn = [self.caption, self.heat, self.scores]
        self.button.click(self.load, [self.run, self.text],
                          [self.checkpoints, self.kind, self.layer, self.head, self.slider, self.status]).then(
            self.draw, view, drawn)
        self.kind.change(self.fit, [self.checkpoints, self.kind, self.layer, self.head], [self.layer, self.head]).then(
            self.draw, view, drawn)  # the menus may keep their values: draw the new kind anyway
        for control in (self.slider, self.layer, self.head):
            control.change(self.draw, view, drawn)


# -- version diff --------------------------------------------------------------------------------------


def divergence_frame(grid: np.ndarray) -> pd.io.formats.style.Styler:
    """The layer × head grid as a coloured table: rows are layers, columns heads, numbered from 1."""
    frame = pd.DataFrame(np.round(grid, 4), columns=[f"head {number(h)}" for h in range(grid.shape[1])])
    frame.insert(0, "layer", [number(i) for i in range(grid.shape[0])])
    top = max(float(grid.max()), 1e-9)

    def color(value: object) -> str:
        if not isinstance(value, float):
            return ""
        shade = int(255 - 200 * min(value / top, 1.0))
        return f"background-color: rgb(255,{shade},{shade})"

    return frame.style.map(color).format(precision=4)


@dataclass
class DiffView:
    """Two versions on the same sentences: translations, a layer × head divergence grid, two heatmaps."""

    client: TranslationClient
    model_a: gr.Textbox
    model_b: gr.Textbox
    sentences: gr.Textbox
    kind: gr.Radio
    button: gr.Button
    pairs: gr.State  # [(result_a, result_b)] per sentence
    status: gr.HTML
    translations: gr.HTML
    grid: gr.Dataframe
    heat_a: gr.HTML
    heat_b: gr.HTML

    @classmethod
    def build(cls, client: TranslationClient, example: str) -> DiffView:
        """Lay out the two versions, the sentences, the grid and the pair of heatmaps (inside their tab)."""
        gr.Markdown("Jensen–Shannon divergence (base 2: 0 = the same attention, 1 = disjoint) between the two "
                    "versions' attention, per layer and head, averaged over query positions and sentences. "
                    "Encoder rows always compare (the same source tokens); decoder and cross-attention rows "
                    "compare while the two translations agree (the common target prefix, plus the row that "
                    "produced the first differing token). Click a cell to open that head of both versions.")
        with gr.Row():
            model_a = gr.Textbox(label="Version A", value="production", elem_id="diff-a")
            model_b = gr.Textbox(label="Version B", value="candidate", elem_id="diff-b")
        sentences = gr.Textbox(label="Sentences (one per line)", value=example, lines=3, elem_id="diff-sentences")
        with gr.Row():
            kind = gr.Radio(list(KINDS), value="cross", label="Attention", elem_id="diff-kind")
            button = gr.Button("Diff", variant="primary", elem_id="diff-button")
        pairs = gr.State([])
        status = gr.HTML(elem_id="diff-status")
        translations = gr.HTML(elem_id="diff-translations")
        grid = gr.Dataframe(label="Divergence per layer (rows) × head (columns)", interactive=False,
                            elem_id="diff-grid")
        with gr.Row():
            heat_a = gr.HTML(elem_id="diff-heatmap-a")
            heat_b = gr.HTML(elem_id="diff-heatmap-b")
        return cls(client, model_a, model_b, sentences, kind, button, pairs, status, translations, grid, heat_a,
                   heat_b)

    def diff(self, model_a: str, model_b: str, sentences: str, kind: str) -> Update:
        """Translate every sentence with both versions; the divergence grid averaged over sentences."""
        lines = [s.strip() for s in sentences.splitlines() if s.strip()]
        if not lines:
            return {self.status: error("Type one or more sentences (one per line) first.")}
        try:
            pairs = [tuple(self.client.translate(s, model=m.strip() or None, attention="all")
                           for m in (model_a, model_b)) for s in lines]
        except ServiceError as exc:
            return {self.status: error(str(exc)), self.pairs: [], self.grid: None}
        return {self.pairs: pairs, **self.redraw(pairs, kind)}

    def redraw(self, pairs: list[tuple[dict, dict]], kind: str) -> Update:
        """The translations table and the grid of ``kind``."""
        if not pairs:
            return unchanged(self.status, self.translations, self.grid, self.heat_a, self.heat_b)
        rows, grids = [], []
        for a, b in pairs:
            shared = compared_rows(a, b, kind)
            grid = head_divergence(a, b, kind)
            if grid is not None:
                grids.append(grid)
            if a["source_tokens"] != b["source_tokens"]:
                note = "source tokens differ (different tokenizers): not compared"
            elif a["target_tokens"] == b["target_tokens"]:
                note = "same translation: every query compared"
            elif kind == "encoder":
                note = "translations differ; encoder rows all compared"
            else:
                note = f"translations differ: the first {shared} target positions compared"
            rows.append(f"<tr><td>{html.escape(a['translation'])}</td><td>{html.escape(b['translation'])}</td>"
                        f"<td class='diff-note'>{note}</td></tr>")
        ids = (pairs[0][0]["model"].get("id"), pairs[0][1]["model"].get("id"))
        table = (f"<table id='diff-table'><tr><th>A: {html.escape(str(ids[0]))}</th><th>B: {html.escape(str(ids[1]))}"
                 f"</th><th>compared</th></tr>{''.join(rows)}</table>")
        if not grids:
            return {self.translations: table, self.grid: None, self.heat_a: "", self.heat_b: "",
                    self.status: error("Nothing to compare: the versions split the sentences differently.")}
        shapes = {g.shape for g in grids}
        if len(shapes) > 1:
            return {self.translations: table, self.grid: None,
                    self.status: error("The two versions have different numbers of layers or heads.")}
        mean = np.mean(grids, axis=0)
        return {self.translations: table, self.grid: divergence_frame(mean), self.heat_a: "", self.heat_b: "",
                self.status: ok(f"Compared {ids[0]} and {ids[1]} on {len(grids)} of {len(pairs)} sentences "
                                f"({KINDS[kind]}). Click a cell to open both heatmaps.")}

    def open(self, pairs: list[tuple[dict, dict]], kind: str, event: gr.SelectData) -> Update:
        """Both versions' heatmaps of the clicked layer and head, for every sentence."""
        if not pairs or event.index is None:
            return unchanged(self.heat_a, self.heat_b)
        layer, column = int(event.index[0]), int(event.index[1])
        head = column - 1  # column 0 is the layer number
        if head < 0:
            return unchanged(self.heat_a, self.heat_b)
        drawn: list[list[str]] = [[], []]
        for pair in pairs:
            for side, result in enumerate(pair):
                if layer >= layer_count(result, kind) or head >= head_count(result, kind):
                    continue
                rows, cols = axes(result, kind)
                drawn[side].append(heatmap_svg(matrix(result, kind, layer, head), rows, cols,
                                               title=f"{'AB'[side]}: {title(kind, layer, head)}"))
        return {self.heat_a: "".join(drawn[0]), self.heat_b: "".join(drawn[1])}

    def wire(self) -> None:
        """Diff on the button; redraw the grid for another kind; open a head on click."""
        self.button.click(self.diff, [self.model_a, self.model_b, self.sentences, self.kind],
                          [self.pairs, self.status, self.translations, self.grid, self.heat_a, self.heat_b])
        self.kind.change(self.redraw, [self.pairs, self.kind],
                         [self.status, self.translations, self.grid, self.heat_a, self.heat_b])
        self.grid.select(self.open, [self.pairs, self.kind], [self.heat_a, self.heat_b])
