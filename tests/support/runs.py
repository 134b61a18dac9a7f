"""A registered run without training: three small checkpoints and their ONNX exports in a real registry.

One plain-SDK process (as training is one): ``Task.init``, then for each of three untrained models
(seeds 31–33, steps 5/10/15) its validation BLEU on five held-out verses, ``register_checkpoint``
and its export registered beside it with ``register_export`` (as training does at each save).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from support.processes import run_python

TESTS = Path(__file__).resolve().parents[1]

REGISTER_RUN = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from clearml import Task
from support.models import make_checkpoint
from stepwise.export import export_checkpoint, parity_sentences
from stepwise.registry import client as registry
from stepwise.train.checkpoint import load_checkpoint
from stepwise.train.data import load_split
from stepwise.train.evaluate import evaluate_bleu

task = Task.init(project_name={project!r}, task_name="views-run", auto_connect_frameworks=False,
                 auto_resource_monitoring=False, output_uri=True)
folder = Path({folder!r})
ids = []
for seed, step in ((31, 5), (32, 10), (33, 15)):
    checkpoint = load_checkpoint(make_checkpoint(folder / f"step-{{step:07d}}.pt", seed=seed, name={name!r}))
    pairs = load_split(checkpoint.config.data, "valid")
    bleu, _ = evaluate_bleu(checkpoint.build_model(), checkpoint.tokenizer(), pairs, limit=5)
    ids.append(registry.register_checkpoint(task, folder / f"step-{{step:07d}}.pt", name={name!r}, step=step,
        metadata={{"bleu": round(bleu, 2), "loss": 0.0, "step": step, "config_hash": checkpoint.config.hash(),
                  "language_pair": checkpoint.config.data.language_pair}}))
    # and its ONNX export beside it, from the same task, as training does at each save
    export = export_checkpoint(checkpoint, folder / f"export-{{step:07d}}", sentences=parity_sentences(checkpoint, 2),
                               source={{"id": ids[-1], "name": {name!r}, "project": task.project}})
    registry.register_export(folder / f"export-{{step:07d}}", export, task=task)
print("IDS", json.dumps(ids), "TASK", task.id, "PROJECT", task.project)
task.close()
"""


@dataclass
class RegisteredRun:
    ids: list[str]  # the versions of steps 5, 10 and 15
    task: str
    project: str


def register_run(env: dict[str, str], folder: Path, *, project: str, name: str) -> RegisteredRun:
    """Register the run (see the module docstring) with the server that ``env`` points at; files in ``folder``."""
    code = REGISTER_RUN.format(tests=str(TESTS), project=project, folder=str(folder), name=name)
    out = run_python(code, env, timeout=600).stdout
    line = next(line for line in out.splitlines() if line.startswith("IDS"))
    return RegisteredRun(ids=json.loads(line.split(" TASK ")[0][4:]), task=line.split()[-3], project=line.split()[-1])
